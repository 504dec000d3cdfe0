"""Few-row matrix products on the CPU: run ``nn.Linear`` as ``W @ x^T`` while decoding — an opt-in edge wrapper.

A decode step multiplies 1 row (plain decoding) or a handful of rows (verifying a draft) by every weight matrix of
the target. ``F.linear`` computes ``x @ W^T``; on this project's 2-core AVX2 CPUs MKL takes a general-GEMM path for
2..16 rows that costs 2-3x a one-row product on a memory-bound matrix such as the 49152 x 576 lm_head, and its
one-row (matrix-vector) path streams W at about a third of the bandwidth a 2-column product reaches. The product in
the other orientation, ``(W @ x^T)^T``, with at least 2 columns, avoids both (measured with
``benchmarks/verify_cost.py --skinny off on``). The result is the same product up to float rounding (the kernels sum in a
different order), and both plain and speculative decoding use it, so they still compute the same target.

Only inputs without gradient and with at most ``max_rows`` rows are rerouted; training never goes through here.
The decode loop knows nothing of it: callers wrap a whole evaluation in :func:`cpu_decode_kernels` (as gpt-fast
applies ``torch.compile`` from outside), and the modules are unchanged afterwards.
"""

from __future__ import annotations

import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn import functional as F

MAX_ROWS = 16
# Row counts computed with one more (repeated) row: measured faster on 2 AVX2 cores (benchmarks/verify_cost.py,
# SmolLM2-135M, whole forward + lm_head): 1 row 39.6 ms as F.linear, 28.7 ms as 2 columns; 3 rows 34.5 ms, as 4: 30.7.
PADDED_COLUMNS = {1: 2, 3: 4}


def skinny_linear(module: nn.Linear, x: Tensor, max_rows: int = MAX_ROWS) -> Tensor:
    """``module(x)`` computed as ``(W @ x^T)^T`` when ``x`` has few rows (contiguous result, same shape)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if x.requires_grad or not 0 < rows <= max_rows or x.device.type != "cpu":
        return F.linear(x, module.weight, module.bias)
    x2 = x.reshape(rows, x.shape[-1])
    cols = PADDED_COLUMNS.get(rows, rows)
    if cols != rows:  # e.g. MKL's matrix-vector path reads W at a third of the speed of a 2-column product
        x2 = torch.cat([x2, x2[:1].expand(cols - rows, -1)])
    y = torch.mm(module.weight, x2.t())[:, :rows].t()
    if module.bias is not None:
        y = y + module.bias
    return y.contiguous().reshape(*x.shape[:-1], module.out_features)


def plain_linears(model: nn.Module) -> list[nn.Linear]:
    """The ``nn.Linear`` modules of ``model`` (exact type: adapters and quantised subclasses keep their forward)."""
    return [m for m in model.modules() if type(m) is nn.Linear]


@contextmanager
def skinny_linears(linears: Sequence[nn.Linear], max_rows: int = MAX_ROWS) -> Iterator[None]:
    """Within the block, each of ``linears`` computes few-row inputs with :func:`skinny_linear`.

    The override is per instance and removed on exit, so the modules are unchanged afterwards.
    """
    patched = [m for m in linears if "forward" not in m.__dict__]

    def forward(self: nn.Linear, x: Tensor) -> Tensor:
        return skinny_linear(self, x, max_rows)

    for m in patched:
        m.forward = types.MethodType(forward, m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


def _fp32_cpu(module: nn.Module) -> bool:
    params = list(module.parameters())
    return bool(params) and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)


_MEASURED: dict[tuple, bool] = {}


def skinny_is_faster(linears: Sequence[nn.Linear], rows: Sequence[int] = (1, 4), repeats: int = 5) -> bool:
    """Measure on this machine whether :func:`skinny_linear` beats ``F.linear`` on these layers' few-row products.

    CPUs differ: on AVX2 machines MKL's few-row paths were measured 1.5-3x slower than the W @ x^T form, on an AVX-512
    machine the W @ x^T form was 2x slower. Times the two largest layers (the lm_head dominates a decode step) at 1
    and 4 rows, best of ``repeats``; the answer is remembered per set of shapes.
    """
    import time

    biggest = sorted(linears, key=lambda m: m.weight.numel(), reverse=True)[:2]
    key = tuple(tuple(m.weight.shape) for m in biggest) + (torch.get_num_threads(),)
    if key not in _MEASURED:
        totals = {"linear": 0.0, "skinny": 0.0}
        with torch.no_grad():
            for m in biggest:
                for n in rows:
                    x = torch.randn(n, m.in_features, dtype=m.weight.dtype)
                    for name, fn in (("linear", lambda: F.linear(x, m.weight, m.bias)),
                                     ("skinny", lambda: skinny_linear(m, x))):
                        fn()
                        best = float("inf")
                        for _ in range(repeats):
                            start = time.perf_counter()
                            fn()
                            best = min(best, time.perf_counter() - start)
                        totals[name] += best
        _MEASURED[key] = totals["skinny"] < 0.9 * totals["linear"]
    return _MEASURED[key]


@contextmanager
def cpu_decode_kernels(*modules: nn.Module, enabled: bool | None = None) -> Iterator[None]:
    """Within the block, the ``nn.Linear`` layers of ``modules`` (target and draft) use :func:`skinny_linear`.

    ``enabled=None`` (auto): on when every module is float32 on the CPU *and* a quick measurement on this machine
    shows the W @ x^T form faster (:func:`skinny_is_faster`); off elsewhere (GPUs, bf16, CPUs where MKL's few-row
    products are already fast).
    """
    linears = [lin for m in modules for lin in plain_linears(m)]
    if enabled is None:
        enabled = all(_fp32_cpu(m) for m in modules) and bool(linears) and skinny_is_faster(linears)
    if not enabled:
        yield
        return
    with skinny_linears(linears):
        yield
