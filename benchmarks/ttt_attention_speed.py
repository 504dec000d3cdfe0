"""Forward+backward time and memory of EAGLE-3 TTT attention: dense reference vs blockwise (memory linear in T).

Each configuration runs in its own Python process so that the peak RSS it reports is its own: ``peak_rss_delta_mb``
is the process's peak resident memory minus its resident memory once the inputs exist (one forward+backward, the
first call); ``saved_mb`` is what autograd keeps between forward and backward (counted with
``saved_tensors_hooks``, inputs included). ``ms`` is the median forward+backward time of the later calls.

    python benchmarks/ttt_attention_speed.py --T 256 1024 2048 4096 --steps 1 5
    python benchmarks/ttt_attention_speed.py --T 2048 --methods blockwise --block_sizes 64 128 256 --key_block_sizes 0 256
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", nargs="+", type=int, default=[256, 1024, 2048, 4096], help="sequence lengths")
    p.add_argument("--steps", nargs="+", type=int, default=[1, 5], help="number of TTT steps attended (len(keys))")
    p.add_argument("--methods", nargs="+", choices=["dense", "blockwise"], default=["dense", "blockwise"])
    p.add_argument("--block_sizes", nargs="+", type=int, default=[128], help="blockwise query block sizes")
    p.add_argument("--key_block_sizes", nargs="+", type=int, default=[256],
                   help="blockwise key tile sizes (0: each query block's whole causal key range)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=9, help="query heads (SmolLM2-135M: 9)")
    p.add_argument("--kv_heads", type=int, default=3, help="key/value heads (SmolLM2-135M: 3)")
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=3, help="timed forward+backward calls after the first")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--in_process", action="store_true", help="no subprocess per configuration (RSS less meaningful)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one configuration as JSON
    return p.parse_args(argv)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(cfg: dict) -> dict:
    """Time and memory of one configuration (run in a fresh process for a meaningful peak RSS)."""
    from spec_lightning.drafts.ttt_attention import ttt_attention

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the dense baseline is a test reference
    from tests.references import ttt_attention_reference

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    B, h, hk, T, D, n = cfg["batch"], cfg["heads"], cfg["kv_heads"], cfg["T"], cfg["head_dim"], cfg["steps"]
    dtype = getattr(torch, cfg["dtype"])
    q = torch.randn(B, h, T, D, dtype=dtype, requires_grad=True)
    keys = [torch.randn(B, hk, T, D, dtype=dtype, requires_grad=True) for _ in range(n)]
    values = [torch.randn(B, hk, T, D, dtype=dtype, requires_grad=True) for _ in range(n)]
    key_mask = torch.ones(B, T, dtype=torch.bool)
    key_mask[:, T - T // 8:] = False  # some right padding, as in a real batch
    grad = torch.randn(B, h, T, D, dtype=dtype)
    inputs = [q, *keys, *values]
    if cfg["method"] == "dense":
        def attend():
            return ttt_attention_reference(q, keys, values, key_mask)
    else:
        kb = cfg["key_block_size"] or None
        def attend():
            return ttt_attention(q, keys, values, key_mask, block_size=cfg["block_size"], key_block_size=kb)

    # warm up on a short sequence first: lazily loaded kernels and libraries must not count as this call's memory
    small = [t.detach()[:, :, :16].clone().requires_grad_() for t in inputs]
    warm = ttt_attention_reference if cfg["method"] == "dense" else ttt_attention
    torch.autograd.grad(warm(small[0], small[1:n + 1], small[n + 1:], key_mask[:, :16]), small,
                        grad[:, :, :16])
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    base = rss_mb()
    times = []
    for i in range(cfg["repeats"] + 1):
        start = time.perf_counter()
        if i == 0:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = attend()
        else:
            out = attend()
        torch.autograd.grad(out, inputs, grad)
        times.append((time.perf_counter() - start) * 1e3)
        if i == 0:
            peak = peak_rss_mb() - base
        del out
    row = {"T": T, "steps": n, "method": cfg["method"], "ms": round(statistics.median(times[1:] or times), 1),
           "peak_rss_delta_mb": round(peak, 1), "saved_mb": round(saved / 2**20, 4), "batch": B, "heads": h,
           "kv_heads": hk, "head_dim": D, "dtype": cfg["dtype"], "threads": cfg["threads"]}
    if cfg["method"] == "blockwise":
        row.update(block_size=cfg["block_size"], key_block_size=cfg["key_block_size"] or None)
    return row


def configs(args: argparse.Namespace) -> list[dict]:
    common = {"batch": args.batch, "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
              "dtype": args.dtype, "repeats": args.repeats, "threads": args.threads}
    out = []
    for T in args.T:
        for steps in args.steps:
            for method in args.methods:
                if method == "dense":
                    out.append({**common, "T": T, "steps": steps, "method": method})
                    continue
                for bs in args.block_sizes:
                    for kb in args.key_block_sizes:
                        out.append({**common, "T": T, "steps": steps, "method": method, "block_size": bs,
                                    "key_block_size": kb})
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.one is not None:
        print(json.dumps(measure(json.loads(args.one))), flush=True)
        return
    for cfg in configs(args):
        if args.in_process:
            print(json.dumps(measure(cfg)), flush=True)
            continue
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(cfg)], capture_output=True, text=True)
        if proc.returncode:
            print(json.dumps({"T": cfg["T"], "steps": cfg["steps"], "method": cfg["method"],
                              "error": proc.stderr.strip().splitlines()[-1:]}), flush=True)
        else:
            print(proc.stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
