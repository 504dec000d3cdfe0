"""A running OpenAI-compatible server (``vllm serve``, ``sglang``) as the engine: async requests with bounded
concurrency and retries.

Before any generation the server is checked: it must answer at ``URL/v1/models``, serve the target (its served name or
its root path names the same model as ``--target``) and tokenize a probe text exactly as the local tokenizer does
(``URL/tokenize``, where the server offers it). Prompts are sent as token ids; ``return_token_ids`` (vLLM >= 0.10.2)
makes the server return the generated ids, so the loss mask sits on the exact generation boundary (a server that does
not return them has its answer text re-tokenised locally).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from spec_lightning.datagen.engines.base import Completion, Engine, Sampling, split_stop
from spec_lightning.datagen.engines.vllm_local import VllmOptions

log = logging.getLogger(__name__)
PROBE = "Hello! Tokenizer check: 12345, naïve café, <|x|> \n\tend."
RETRIES = 5
TIMEOUT_S = 600


class ServerError(RuntimeError):
    """The server refused or failed a request after every retry."""


def _same_model(target: str, served: list[dict]) -> bool:
    names = {n for m in served for n in (m.get("id"), m.get("root")) if n}
    tails = {Path(str(n).rstrip("/")).name for n in names}
    return target in names or Path(target.rstrip("/")).name in tails


class ServerEngine(Engine):
    """The client of an OpenAI-compatible completions server at ``url`` serving ``target``."""

    name = "vllm"

    def __init__(self, url: str, target: str, options: VllmOptions, tokenizer=None) -> None:
        self.url, self.target, self.options = url.rstrip("/"), target, options
        self._read_target(target, tokenizer)
        self.model, self.version = asyncio.run(self._check())
        self.name = "vllm" if self.version != "unknown" else "openai-server"  # vLLM answers /version

    # ---- checks --------------------------------------------------------------------------------------------------
    async def _check(self) -> tuple[str, str]:
        """(served model name, server version); ValueError naming the URL and what differs otherwise."""
        import aiohttp

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            try:
                async with session.get(f"{self.url}/v1/models") as r:
                    r.raise_for_status()
                    served = (await r.json()).get("data", [])
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
                raise ValueError(f"{self.url}: no OpenAI-compatible server answers at /v1/models "
                                 f"({type(e).__name__}: {e}); start it with `vllm serve {self.target}`") from None
            model = self._served_model(served)
            await self._check_tokenizer(session, model)
            version = await self._version(session)
        return model, version

    def _served_model(self, served: list[dict]) -> str:
        ids = [m.get("id") for m in served]
        if self.options.served_model is not None:
            if self.options.served_model not in ids:
                raise ValueError(f"{self.url} serves {ids}, not served_model={self.options.served_model!r}")
            return self.options.served_model
        if not _same_model(self.target, served):
            roots = [m.get("root") for m in served]
            raise ValueError(f"{self.url} serves {ids} (root {roots}), not the target {self.target!r}: point --server "
                             "at a server of the target, or name its model with --vllm.served_model if it is the same "
                             "model under another name")
        return next(m["id"] for m in served if _same_model(self.target, [m]))

    async def _check_tokenizer(self, session, model: str) -> None:
        import aiohttp

        ours = self.tokenizer(PROBE, add_special_tokens=False)["input_ids"]
        try:
            async with session.post(f"{self.url}/tokenize",
                                    json={"model": model, "prompt": PROBE, "add_special_tokens": False}) as r:
                if r.status == 404:
                    log.warning("%s has no /tokenize endpoint: the tokenizer is not checked", self.url)
                    return
                r.raise_for_status()
                theirs = (await r.json()).get("tokens")
        except aiohttp.ClientError as e:
            raise ValueError(f"{self.url}/tokenize failed ({type(e).__name__}: {e})") from None
        if theirs != ours:
            first = next((i for i, (a, b) in enumerate(zip(ours, theirs or [])) if a != b), min(len(ours),
                                                                                             len(theirs or [])))
            raise ValueError(f"{self.url} tokenizes differently from the target {self.target!r}'s tokenizer: "
                             f"{PROBE!r} -> server {theirs} vs local {ours} (first difference at token {first})")

    async def _version(self, session) -> str:
        try:
            async with session.get(f"{self.url}/version") as r:
                return str((await r.json()).get("version", "unknown")) if r.status == 200 else "unknown"
        except Exception:  # noqa: BLE001 - the version is informative only
            return "unknown"

    # ---- generation ----------------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], sampling: Sampling, seed: int) -> list[Completion]:
        return asyncio.run(self._generate_all(prompts, sampling, seed))

    async def _generate_all(self, prompts: list[list[int]], sampling: Sampling, seed: int) -> list[Completion]:
        import aiohttp

        limit = asyncio.Semaphore(self.options.concurrency)
        timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            jobs = [self._complete(session, limit, p, sampling, None if sampling.greedy else seed * 100003 + i)
                    for i, p in enumerate(prompts)]
            return list(await asyncio.gather(*jobs))

    async def _complete(self, session, limit: asyncio.Semaphore, prompt: list[int], sampling: Sampling,
                        seed: int | None) -> Completion:
        body = {"model": self.model, "prompt": list(prompt), "max_tokens": sampling.max_new_tokens,
                "temperature": sampling.temperature, "top_p": sampling.top_p, "return_token_ids": True,
                "stop_token_ids": sorted(self.eos_ids), "skip_special_tokens": False}
        if seed is not None:
            body["seed"] = seed
        async with limit:
            choice = await self._post_with_retries(session, body)
        ids = choice.get("token_ids")
        if ids is None:
            ids = self.tokenizer(choice["text"], add_special_tokens=False)["input_ids"]
            log.debug("%s returned no token_ids: answer re-tokenised from its text", self.url)
        return split_stop(list(ids), choice.get("finish_reason"), self.eos_ids)

    async def _post_with_retries(self, session, body: dict) -> dict:
        import aiohttp

        error = ""
        for attempt in range(RETRIES):
            try:
                async with session.post(f"{self.url}/v1/completions", json=body) as r:
                    if r.status == 200:
                        return (await r.json())["choices"][0]
                    error = f"HTTP {r.status}: {(await r.text())[:300]}"
                    if r.status < 500 and r.status != 429:  # the request itself is wrong: retrying cannot help
                        break
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                error = f"{type(e).__name__}: {e}"
            await asyncio.sleep(min(30.0, 0.5 * 2 ** attempt))
        raise ServerError(f"{self.url}/v1/completions failed after {attempt + 1} tries: {error}")


def wait_for_server(url: str, seconds: float) -> None:
    """Block until ``url/v1/models`` answers (a server being started), or raise ``TimeoutError``."""
    import urllib.request

    end = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(f"{url.rstrip('/')}/v1/models", timeout=5):
                return
        except OSError:
            if time.monotonic() > end:
                raise TimeoutError(f"{url} did not answer within {seconds:.0f} s") from None
            time.sleep(2)
