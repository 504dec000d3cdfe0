"""The engine that runs the target for data building, chosen in one place.

``hf``: the target as an HF model in this process (``generate`` on padded batches; any device). ``vllm``: vLLM in this
process (``vllm.LLM``; GPUs, or vLLM's CPU build), or — with ``server`` — a running ``vllm serve`` (or any
OpenAI-compatible completions server) reached over HTTP. The default is ``vllm`` when it is importable, else ``hf``;
``SPEC_LIGHTNING_ENGINE=hf|vllm`` sets another default.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager

from spec_lightning.datagen.engines.base import Completion, Engine, Sampling
from spec_lightning.datagen.engines.vllm_local import VLLM_INSTALL, EngineMissing, VllmOptions

ENGINES = ("hf", "vllm")
ENGINE_ENV = "SPEC_LIGHTNING_ENGINE"

__all__ = ["ENGINES", "Completion", "Engine", "EngineMissing", "Sampling", "VllmOptions", "choose_engine", "open_engine",
           "using_engine"]


def choose_engine(engine: str | None, server: str | None = None) -> str:
    """``engine`` checked, or the default: ``vllm`` when a server is given, else ``SPEC_LIGHTNING_ENGINE``, else
    ``vllm`` when importable, else ``hf``."""
    if engine is None and server is not None:
        engine = "vllm"  # a server URL is the vLLM engine reached over HTTP, whatever the environment's default
    if engine is None:
        engine = os.environ.get(ENGINE_ENV) or None
    if engine is None:
        engine = "vllm" if importlib.util.find_spec("vllm") is not None else "hf"
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if server is not None and engine != "vllm":
        raise ValueError(f"server={server!r} needs engine='vllm' (an OpenAI-compatible server), got {engine!r}")
    if engine == "vllm" and server is None and importlib.util.find_spec("vllm") is None:
        raise EngineMissing(VLLM_INSTALL)
    return engine


def open_engine(target: str, dtype: str = "float32", engine: str | None = None, server: str | None = None,
                device: str | None = None, vllm: VllmOptions | None = None, batch_size: int = 32, model=None,
                tokenizer=None) -> Engine:
    """The engine that runs ``target`` (see the module docstring); ``model`` (an HF model already loaded) means ``hf``."""
    if model is not None:
        from spec_lightning.datagen.engines.hf import HFEngine

        if tokenizer is None:
            raise ValueError("a loaded model needs its tokenizer")
        return HFEngine(model, tokenizer, batch_size)
    vllm = vllm or VllmOptions()
    kind = choose_engine(engine, server)
    if kind == "hf":
        from spec_lightning.datagen.engines.hf import HFEngine

        return HFEngine.load(target, dtype, device, batch_size, tokenizer)
    if device is not None:
        raise ValueError("device applies to engine='hf'; vLLM places the target itself (tensor_parallel_size, "
                         "CUDA_VISIBLE_DEVICES)")
    if server is not None:
        from spec_lightning.datagen.engines.server import ServerEngine

        return ServerEngine(server, target, vllm, tokenizer)
    from spec_lightning.datagen.engines.vllm_local import VllmEngine

    return VllmEngine(target, dtype, vllm, batch_size, tokenizer)


@contextmanager
def using_engine(runner: Engine | None, target: str, dtype: str = "float32", engine: str | None = None,
                 server: str | None = None, device: str | None = None, vllm: VllmOptions | None = None,
                 batch_size: int = 32, model=None, tokenizer=None) -> Iterator[Engine]:
    """``runner`` when the caller passes an open engine (left open), else the engine ``open_engine`` opens for the
    block (closed after it)."""
    if runner is not None:
        yield runner
        return
    with open_engine(target, dtype, engine, server, device, vllm, batch_size, model, tokenizer) as opened:
        yield opened
