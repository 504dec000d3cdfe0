"""Builtin data sets: the human chitchat conversations (``sources``) and self-distilled sets generated from them.

A self-distilled set (``chitchat-smollm2``) is the target's own answers to chitchat openers, generated on first use
by ``datamodules.regenerate`` and cached with a key covering everything that changes it. :func:`resolve_source` turns
a builtin name into the file to read (generating it if needed); every other source passes through unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from spec_lightning.datamodules.regenerate import (
    REGENERATION_VERSION,
    GenerationSettings,
    _exclusive,
    regenerate,
)
from spec_lightning.datamodules.sources import source_fingerprint

log = logging.getLogger(__name__)


def resolve_source(source: str) -> str:
    """The path to read for ``source``: a builtin self-distilled set's cached file (built on first use), else
    ``source`` itself (a file, a ``datasets`` directory or the human ``chitchat`` builtin)."""
    if source in BUILTIN_REGENERATED:
        return str(builtin_regenerated_path(source))
    return source


SAMPLES_ENV = "SPEC_LIGHTNING_REGEN_SAMPLES"


@dataclass(frozen=True)
class BuiltinRegenerated:
    target: str
    data: str
    max_samples: int
    max_new_tokens: int = 128
    batch_size: int = 32


BUILTIN_REGENERATED: dict[str, BuiltinRegenerated] = {
    # SmolLM2-135M-Instruct answering the first 512 chitchat openers (first user turn only, greedy, <= 128
    # tokens). Sized by measurement (benchmarks/regenerate_throughput.py): a decode step of the 135M target
    # costs about the same at any batch size up to 32 on 2 CPU cores, so the one-time cost is ~
    # (512 / 32) batches x 128 steps; more prompts: SPEC_LIGHTNING_REGEN_SAMPLES.
    "chitchat-smollm2": BuiltinRegenerated(target="smollm2-135m-instruct", data="chitchat", max_samples=512),
}


def builtin_regenerated_path(name: str) -> Path:
    """The cached JSONL of builtin set ``name``, generating it on first use.

    The cache key covers the target, source, sample count (``SPEC_LIGHTNING_REGEN_SAMPLES`` overrides it),
    generation settings and code version, so other settings never reuse a file.
    """
    from spec_lightning.targets import cache_root

    if name not in BUILTIN_REGENERATED:
        raise ValueError(f"unknown builtin regenerated set {name!r} (expected one of {sorted(BUILTIN_REGENERATED)})")
    spec = BUILTIN_REGENERATED[name]
    raw = os.environ.get(SAMPLES_ENV)
    try:
        max_samples = int(raw) if raw else spec.max_samples
    except ValueError:
        raise ValueError(f"{SAMPLES_ENV} must be a positive integer, got {raw!r}") from None
    if max_samples < 1:
        raise ValueError(f"{SAMPLES_ENV} must be a positive integer, got {raw!r}")
    settings = GenerationSettings(max_new_tokens=spec.max_new_tokens)
    key = json.dumps({"v": REGENERATION_VERSION, "target": spec.target, "data": source_fingerprint(spec.data),
                      "max_samples": max_samples, "settings": asdict(settings)}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = cache_root() / "data" / "regenerated" / f"{name}-{max_samples}-{digest}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(path.with_name(path.name + ".build.lock"), wait=True):  # DDP ranks: one builds, others wait
        if not path.is_file():
            _build_builtin(name, spec, max_samples, path)
    return path


def _build_builtin(name: str, spec: BuiltinRegenerated, max_samples: int, path: Path) -> None:
    log.warning("generating builtin dataset %s (%d prompts, one time; resumable) -> %s", name, max_samples, path)
    report = regenerate(spec.target, spec.data, path, max_samples=max_samples, batch_size=spec.batch_size,
                        max_new_tokens=spec.max_new_tokens)
    path.with_suffix(".report.json").write_text(json.dumps(asdict(report), indent=2) + "\n")


