"""``precision: auto``: bf16-mixed where the hardware makes bf16 fast, fp32 elsewhere (decided by measurement).

CPUs of the same kind differ: with AVX-512 BF16 / AMX a bf16 matmul runs ~4x faster than fp32, while on AVX2-only
CPUs it runs ~100x slower (emulated). So the CPU is not guessed from flags: a quick matmul probe times both and
bf16-mixed is chosen when bf16 is at least :data:`MIN_BF16_SPEEDUP` x faster. CUDA devices with bf16 support get
bf16-mixed. The choice and the measured ratio are logged.

The CPU choice is measured once per machine and recorded (``<cache>/precision.json``, keyed by the CPU model, its
instruction set and the torch version): on a busy CPU the probe's ratio swings (1.9-2.9x measured on one AVX-512 BF16
machine, around the 2.0 threshold), and a choice that flips between runs changes the target's dtype, hence which
feature cache a recipe reads. Delete the file to measure again.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path

import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType

log = logging.getLogger(__name__)

MIN_BF16_SPEEDUP = 2.0


def bf16_speedup(n: int = 1024, repeats: int = 3) -> float:
    """fp32 time / bf16 time of an n x n x n CPU matmul (best of ``repeats``); > 1 means bf16 is faster."""
    def best(dtype: torch.dtype) -> float:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return min(times)

    return best(torch.float32) / best(torch.bfloat16)


def resolve_precision(precision, accelerator: str | None = None) -> str | int | None:
    """``precision`` unchanged unless it is ``"auto"``: then bf16-mixed or 32-true (see module docstring)."""
    if precision != "auto":
        return precision
    wants_gpu = str(accelerator) in ("gpu", "cuda") or (str(accelerator) == "auto" and torch.cuda.is_available())
    if wants_gpu and torch.cuda.is_available():
        choice = "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
        log.info("precision auto: %s on %s", choice, torch.cuda.get_device_name())
        return choice
    ratio, recorded = cpu_bf16_speedup()
    choice = "bf16-mixed" if ratio >= MIN_BF16_SPEEDUP else "32-true"
    log.info("precision auto: %s (a bf16 matmul is %.2fx as fast as fp32 on this CPU, %s; bf16-mixed needs >= %.1fx%s)",
             choice, ratio, torch.backends.cpu.get_cpu_capability(), MIN_BF16_SPEEDUP,
             f"; measured once and recorded in {recorded}" if recorded else "")
    return choice


def cpu_key() -> str:
    """What the bf16/fp32 ratio depends on: the CPU model, the instruction set torch uses, the torch version."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} | {torch.backends.cpu.get_cpu_capability()} | torch {torch.__version__}"


def cpu_bf16_speedup() -> tuple[float, Path | None]:
    """The bf16 speedup of this CPU: recorded for :func:`cpu_key` if measured before, else measured now and recorded
    (atomically; a cache that cannot be written only loses the record). Returns ``(ratio, record path or None)``."""
    from spec_lightning.targets import cache_root

    path = cache_root() / "precision.json"
    key = cpu_key()
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: measure (and rewrite it)
        records = {}
    records = records if isinstance(records, dict) else {}
    entry = records.get(key)
    if isinstance(entry, dict) and isinstance(entry.get("bf16_speedup"), (int, float)):
        return float(entry["bf16_speedup"]), path
    ratio = bf16_speedup()
    try:
        records[key] = {"bf16_speedup": round(ratio, 3), "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(records, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as err:
        log.info("precision auto: could not record the measurement in %s (%s)", path, err)
        return ratio, None
    return ratio, path


def dtype_for_precision(precision) -> torch.dtype:
    """The dtype a frozen target is loaded in under a trainer precision (bf16 under bf16, fp16 under 16-mixed)."""
    text = str(precision)
    if "bf16" in text:
        return torch.bfloat16
    if text.startswith("16"):
        return torch.float16
    return torch.float32


class ScalerFreeMixedPrecision(MixedPrecision):
    """Lightning's ``MixedPrecision`` for bf16-mixed, whose gradient clipping also works with fused optimisers.

    Lightning refuses to clip gradients when the optimiser unscales them itself (fused AdamW: "does not allow for
    gradient clipping because it performs unscaling of gradients internally"), which is right for fp16's GradScaler,
    where the gradients are still scaled when clipping would run. bf16-mixed has no scaler: the gradients are the
    true ones, so the plain norm/value clipping of ``Precision`` applies. Every recipe sets fused AdamW and
    ``gradient_clip_val``, so without this bf16-mixed training (GPUs, ``precision: auto`` on BF16 CPUs) stopped at
    its first step. With a scaler it behaves exactly as Lightning's plugin.
    """

    def clip_gradients(self, optimizer, clip_val=0.0,
                       gradient_clip_algorithm=GradClipAlgorithmType.NORM) -> None:
        parent = MixedPrecision if self.scaler is not None else Precision  # bf16: no scaler, no unscaling concern
        parent.clip_gradients(self, optimizer, clip_val, gradient_clip_algorithm)


def allow_clipping_with_fused_optimizers(strategy) -> None:
    """Swap a strategy's scaler-free ``MixedPrecision`` plugin (bf16-mixed) for :class:`ScalerFreeMixedPrecision`."""
    plugin = strategy.precision_plugin
    if type(plugin) is MixedPrecision and plugin.scaler is None:
        strategy.precision_plugin = ScalerFreeMixedPrecision(plugin.precision, plugin.device)
