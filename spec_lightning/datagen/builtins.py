"""Builtin data sets: human chitchat (``sources``), self-distilled and self-synthesized sets, held-out prompts.

* ``chitchat-smollm2``: the embedded target's own answers to chitchat openers (``datagen.regenerate``);
* ``magpie-smollm2``: conversations in which the embedded target writes the user turns too
  (``datagen.synthesize``; varied instruction-style requests), excluding the held-out prompts;
* ``magpie-tasks-smollm2``: the same with task-type openers (``TASK_OPENERS``) begun for the target to complete;
* ``heldout-chitchat`` / ``heldout-instructions``: the held-out evaluation prompts (32 chitchat openers no recipe
  trains on; 40 hand-written instruction-style prompts), shipped with the package.

Generated sets are built on first use and cached with a key covering everything that changes them
(:func:`builtin_path`); ``datamodules.catalog.resolve_source`` turns any builtin name into the file to read. Sets
built within one :func:`shared_engines` block (``catalog.resolve_sources``: every set of a recipe's mix) share one
engine per target: vLLM starts once, not once per set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from spec_lightning.datagen.engines import Engine, choose_engine, open_engine
from spec_lightning.datagen.jsonl import exclusive
from spec_lightning.datagen.regenerate import REGENERATION_VERSION, GenerationSettings, regenerate
from spec_lightning.datamodules.sources import HELDOUT, source_fingerprint

log = logging.getLogger(__name__)


def builtin_path(name: str) -> Path | None:
    """The cached file of generated builtin set ``name`` (built on first use); ``None`` for any other name."""
    if name in BUILTIN_REGENERATED:
        return builtin_regenerated_path(name)
    if name in BUILTIN_SYNTHESIZED:
        return builtin_synthesized_path(name)
    return None


# The engines open in the current ``shared_engines`` block, by (target, dtype, engine, batch size); None outside one.
_shared: dict[tuple, Engine] | None = None


@contextmanager
def shared_engines() -> Iterator[None]:
    """Within this block, builtin sets written by the same target (same dtype, engine and batch size) are built on one
    engine, opened when the first of them needs building and closed when the outermost block ends."""
    global _shared
    if _shared is not None:  # an outer block owns the engines
        yield
        return
    _shared = {}
    try:
        yield
    finally:
        engines, _shared = _shared, None
        for engine in engines.values():
            engine.close()


def _engine_for(target: str, batch_size: int, dtype: str = "float32") -> Engine:
    """The engine that builds a set of ``target`` (call inside ``shared_engines``)."""
    assert _shared is not None, "builtin sets are built inside shared_engines()"
    kind = choose_engine(None)
    key = (target, dtype, kind, batch_size)
    if key not in _shared:
        _shared[key] = open_engine(target, dtype, engine=kind, batch_size=batch_size)
    return _shared[key]


def builtin_target(name: str) -> str | None:
    """The target that writes generated builtin set ``name`` (without building it); ``None`` for any other name."""
    spec = BUILTIN_REGENERATED.get(name) or BUILTIN_SYNTHESIZED.get(name)
    return spec.target if spec is not None else None


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
    max_samples = env_count(SAMPLES_ENV, spec.max_samples)
    settings = GenerationSettings(max_new_tokens=spec.max_new_tokens)
    key = json.dumps({"v": REGENERATION_VERSION, "target": spec.target, "data": source_fingerprint(spec.data),
                      "max_samples": max_samples, "settings": asdict(settings), **_engine_key()}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = cache_root() / "data" / "regenerated" / f"{name}-{max_samples}-{digest}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(path.with_name(path.name + ".build.lock"), wait=True), shared_engines():  # DDP: one rank builds
        if not path.is_file():
            _build_builtin(name, spec, max_samples, path)
    return path


def _build_builtin(name: str, spec: BuiltinRegenerated, max_samples: int, path: Path) -> None:
    log.info("generating builtin dataset %s (%d prompts, one time; resumable) -> %s", name, max_samples, path)
    report = regenerate(spec.target, spec.data, path, max_samples=max_samples, batch_size=spec.batch_size,
                        max_new_tokens=spec.max_new_tokens, runner=_engine_for(spec.target, spec.batch_size))
    path.with_suffix(".report.json").write_text(json.dumps(asdict(report), indent=2) + "\n")


def _engine_key() -> dict:
    """The engine that builds a set belongs to its cache key (a vLLM build never silently replaces an HF one); ``hf``
    adds nothing, so the sets built before engines were a choice keep their keys."""
    engine = choose_engine(None)
    return {} if engine == "hf" else {"engine": engine}


def env_count(name: str, default: int) -> int:
    """A positive integer from environment variable ``name`` (``default`` when unset), with a one-line error."""
    raw = os.environ.get(name)
    try:
        value = int(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}")
    return value


# --------------------------------------------------------------------------------------------------------------
# Builtin self-synthesized sets (``--data.data magpie-smollm2``): the target writes both sides.
MAGPIE_SAMPLES_ENV = "SPEC_LIGHTNING_MAGPIE_SAMPLES"


@dataclass(frozen=True)
class BuiltinSynthesized:
    target: str
    num_samples: int
    max_turns: int = 1
    max_new_tokens: int = 128
    batch_size: int = 32
    request_openers: tuple[str, ...] = ()


# Task-type openers for ``magpie-tasks-smollm2``: free Magpie requests from SmolLM2 open with "I'm ..." or "Can ..."
# in 60% of cases (report of the 512-conversation set); these make requests of 21 kinds users ask for, and 4 in 25
# stay free. Common instruction types, not the held-out prompts (which are excluded word for word).
TASK_OPENERS = ("", "Explain", "List", "Write a Python function", "What is", "How do", "Describe", "Give me",
                "Why", "", "Summarize", "Compare", "Write a short", "Translate", "Calculate", "", "Rewrite",
                "Name", "Plan", "Suggest", "What are the steps to", "How many", "Create", "Tell me about", "")

BUILTIN_SYNTHESIZED: dict[str, BuiltinSynthesized] = {
    # SmolLM2-135M-Instruct writing 512 requests (Magpie, temperature 1.0, top-p 0.95) and answering them greedily
    # (<= 128 tokens): instruction-style data the chitchat openers lack. Sized by measured tau per build minute
    # (README, "Draft quality"); more: SPEC_LIGHTNING_MAGPIE_SAMPLES.
    "magpie-smollm2": BuiltinSynthesized(target="smollm2-135m-instruct", num_samples=512),
    # The same, each request begun with a task-type opener (TASK_OPENERS) that the target completes.
    "magpie-tasks-smollm2": BuiltinSynthesized(target="smollm2-135m-instruct", num_samples=512,
                                               request_openers=TASK_OPENERS),
}


def synthesized_cache_path(name: str) -> Path:
    """Where builtin synthesized set ``name`` is cached: keyed by the synthesis version, target, settings and the
    held-out sets' contents (never by where this package is installed)."""
    from spec_lightning.datagen.synthesize import SYNTHESIS_VERSION, SynthesisSettings
    from spec_lightning.integrity import sha256_file
    from spec_lightning.targets import cache_root

    spec = BUILTIN_SYNTHESIZED[name]
    num_samples = env_count(MAGPIE_SAMPLES_ENV, spec.num_samples)
    settings = SynthesisSettings(num_samples=num_samples, max_turns=spec.max_turns, max_new_tokens=spec.max_new_tokens,
                                 request_openers=spec.request_openers)
    key = json.dumps({"v": SYNTHESIS_VERSION, "target": spec.target, "settings": settings.recorded(),
                      "exclude": {held: sha256_file(p) for held, p in HELDOUT.items()}, **_engine_key()}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root() / "data" / "synthesized" / f"{name}-{num_samples}-{digest}.jsonl"


def builtin_synthesized_path(name: str) -> Path:
    """The cached JSONL of builtin synthesized set ``name``, generating it on first use (held-out prompts excluded)."""
    from spec_lightning.datagen.synthesize import synthesize

    spec = BUILTIN_SYNTHESIZED[name]
    path = synthesized_cache_path(name)
    num_samples = env_count(MAGPIE_SAMPLES_ENV, spec.num_samples)
    excluded = [str(p) for p in HELDOUT.values()]
    path.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(path.with_name(path.name + ".build.lock"), wait=True), shared_engines():  # DDP: one rank builds
        if not path.is_file():
            log.info("generating builtin dataset %s (%d conversations, one time; resumable) -> %s", name,
                        num_samples, path)
            synthesize(spec.target, path, num_samples=num_samples, max_turns=spec.max_turns,
                       batch_size=spec.batch_size, max_new_tokens=spec.max_new_tokens, exclude=excluded,
                       request_openers=list(spec.request_openers) or None,
                       runner=_engine_for(spec.target, spec.batch_size))
    return path
