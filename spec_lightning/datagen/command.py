"""What ``regenerate`` and ``synthesize`` share: the engine arguments (and their help), the output checks, the
provenance-stamped writer and the command line (``python cli.py regenerate|synthesize ...``: a function's signature
and docstring are its command line)."""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from spec_lightning.datagen.jsonl import ResumableJsonl

# Arguments for Python callers only (an already loaded target, an open engine).
PYTHON_ONLY = {"model", "tokenizer", "runner"}
DTYPES = ("float32", "bfloat16", "float16")

# The Args of the engine arguments every data command ends its signature with (``with_engine_arguments``).
ENGINE_ARGS = """\
        engine: what runs the target: ``vllm`` (in this process, or the ``server``) or ``hf`` (transformers
            ``generate``); None: ``vllm`` when installed, else ``hf`` (``SPEC_LIGHTNING_ENGINE`` overrides).
        server: URL of a running ``vllm serve`` of the target (OpenAI-compatible), e.g. ``http://node1:8000``;
            None: run the target in this process.
        device: device of the ``hf`` engine (e.g. ``cuda``, ``cuda:1``; None: CPU).
        vllm: vLLM settings (tensor/data parallel sizes, max_num_seqs, memory, server concurrency).
        progress: show a tqdm progress bar with tokens/s.
        model, tokenizer: an already loaded HF target (tests, notebooks); loaded from ``target`` otherwise.
        runner: an already open engine (reused across calls; not closed here)."""

F = TypeVar("F", bound=Callable[..., Any])


def with_engine_arguments(function: F) -> F:
    """Complete the Args section of ``function``'s docstring with :data:`ENGINE_ARGS` (the help of ``engine`` ...
    ``runner`` on the command line)."""
    doc = (function.__doc__ or "").rstrip() + "\n"
    start = doc.find("\n    Args:\n")
    if start < 0:
        raise TypeError(f"{function.__name__}: the docstring has no Args section to complete")
    end = next((m.start() for m in re.finditer(r"\n\n    \w[\w ]*:\n", doc) if m.start() > start), len(doc) - 1)
    function.__doc__ = f"{doc[:end]}\n{ENGINE_ARGS}{doc[end:]}    "
    return function


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")


def check_output(out: str | Path, batch_size: int) -> Path:
    """``out`` as a path, once it names a ``.jsonl`` file and ``batch_size`` is positive."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = Path(out).expanduser()
    if out.suffix != ".jsonl":
        raise ValueError(f"out must be a .jsonl file, got {out}")
    return out


def engine_writer(out: Path, target: str, engine, **fields) -> ResumableJsonl:
    """The resumable writer of ``out``: every record's provenance names the target (and its config hash), ``fields``
    (settings, version, ...) and the engine; the engine's version is stamped on each record but may change on
    resume."""
    header = {"target": target, "target_config_sha256": engine.target_config_sha256, **fields, "engine": engine.name}
    return ResumableJsonl(out, header, stamp={"engine_version": engine.version})


def run_command(function: Callable[..., Any], prog: str, description: str, args: list[str] | None) -> Any:
    """Parse ``args`` into ``function``'s arguments (jsonargparse reads types and the docstring's Args as help), call
    it, print its report (a dataclass) as one JSON line and return it."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", action="config")
    parser.add_function_arguments(function, skip=PYTHON_ONLY)
    init = parser.instantiate_classes(parser.parse_args(args))
    names = [n for n in inspect.signature(function).parameters if n not in PYTHON_ONLY]
    report = function(**{n: init[n] for n in names if n in init})
    print(json.dumps(asdict(report)))
    return report
