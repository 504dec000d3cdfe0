"""What every engine that runs the target for data building offers: continue token prompts, and say who it is."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

Completion = tuple[list[int], str]  # (generated ids without the end token, "stop" | "length")


@dataclass(frozen=True)
class Sampling:
    """How to continue a prompt: greedy when ``temperature`` is 0."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def config_sha256(config) -> str:
    """A short hash of the target's config (written into provenance: which target wrote the data)."""
    return hashlib.sha256(config.to_json_string(use_diff=False).encode()).hexdigest()[:16]


def eos_ids_of(generation_config, tokenizer) -> set[int]:
    """The ids that end a turn: the generation config's ``eos_token_id`` (one or a list), else the tokenizer's."""
    eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the target has no eos_token_id (generation_config or tokenizer): cannot stop turns")
    return set(eos if isinstance(eos, list) else [eos])


def split_stop(ids: list[int], finish_reason: str | None, eos_ids: set[int]) -> Completion:
    """An engine's output as ``(ids without the end token, "stop" | "length")``."""
    if ids and ids[-1] in eos_ids:
        return ids[:-1], "stop"
    return ids, "length" if finish_reason == "length" else "stop"


class Engine:
    """A running target: ``generate`` continues tokenised prompts; ``identity`` goes into every record's provenance.

    Subclasses set ``name``, ``version``, ``tokenizer``, ``eos_ids`` and ``target_config_sha256``.
    """

    name: str
    version: str
    tokenizer: object
    eos_ids: set[int]
    target_config_sha256: str

    def generate(self, prompts: list[list[int]], sampling: Sampling, seed: int) -> list[Completion]:
        """Continue every prompt; results in prompt order. Sampled output is reproducible for the same seed."""
        raise NotImplementedError

    def _read_target(self, target: str, tokenizer=None) -> str:
        """For an engine that runs the target outside this process's HF model (vLLM here, or behind a server): set
        ``tokenizer`` (the one given, else the target's), ``eos_ids`` and ``target_config_sha256`` from the target's
        files; returns its local directory."""
        from transformers import AutoConfig, GenerationConfig

        from spec_lightning.targets import load_tokenizer, resolve_target

        target_dir, _ = resolve_target(target)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(target)
        try:
            generation_config = GenerationConfig.from_pretrained(target_dir)
        except OSError:
            generation_config = None
        self.eos_ids = eos_ids_of(generation_config, self.tokenizer)
        self.target_config_sha256 = config_sha256(AutoConfig.from_pretrained(target_dir))
        return target_dir

    def identity(self) -> dict:
        return {"engine": self.name, "engine_version": self.version}

    def close(self) -> None:
        """Free what the engine holds (processes, memory)."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
