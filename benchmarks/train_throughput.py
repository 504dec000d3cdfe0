"""Training throughput, peak memory and MFU of EAGLE-3 and Medusa steps against sequence length (JSON lines).

    python benchmarks/train_throughput.py                                   # SmolLM2, both algorithms, T 512..16384
    python benchmarks/train_throughput.py --targets llama8b-shaped --lengths 512 2048 --time_budget 1200
    python benchmarks/train_throughput.py --precision bf16-mixed            # CPUs with AVX-512 BF16 / AMX, GPUs

Each (target, algorithm, T, precision, optimizer) runs in its own subprocess (so its peak RSS is its own): one full
step (forward, backward, AdamW: ``fused`` as the recipes set it, or torch's default ``foreach``) untimed, then
``--steps`` timed; batch 1 of T random tokens whose second half is trainable (assistant) text. The parent measures
the machine's dense-matmul peak in the same run, for each precision used, and prints one JSON line per configuration:

* ``tokens_per_s``: T / median step seconds;
* ``peak_rss_gib`` (CPU; ``ru_maxrss`` of the child) or ``peak_allocated_gib`` (GPU);
* ``model_flops_per_token``: the FLOPs the algorithm needs, counted as 2·(multiply-adds) of (a) the frozen target's
  forward: 2·N_params over all tokens (embedding lookup excluded) plus causal attention 2·T·H per token and layer,
  plus the teacher's lm_head 2·V·H at each teacher row it computes; (b) the draft, forward + backward = 3× forward:
  EAGLE-3 per TTT step the decoder layer (its parameter count ×2, per token), its TTT attention (4·(t_avg + k)·H per
  token, t_avg = T/2) and the draft lm_head 2·Vd·H at each counted pair, plus ``fc`` once; Medusa per head the
  residual block 2·H² and its lm_head 2·V·H at each valid row. Recomputation (blockwise backward) is not counted.
* ``mfu``: model FLOPs per second / measured matmul peak of the same precision.

"llama8b-shaped" is Llama-3.1-8B's layer shape (hidden 4096, 32/8 heads, head_dim 128, MLP 14336, vocab 128256,
llama3 RoPE) with ``--shaped_layers`` layers (default 6, tied embeddings) so that target and draft fit 24 GiB in fp32
on a CPU (Medusa with ``--shaped_medusa_heads`` 1); on a GPU use 32 layers, untied (``--shaped_layers 32
--shaped_untied``): the real 8B target (benchmarks/gpu_train_bench.sh).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

TARGETS = ("smollm2", "llama8b-shaped", "tiny")  # tiny: a random 4-layer Llama (smoke test of this script)
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 6, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 4096, "rope_theta": 10000.0}
LLAMA8B_SHAPED = {
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 6, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
    "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", nargs="+", choices=TARGETS, default=["smollm2"])
    p.add_argument("--algorithms", nargs="+", choices=["eagle3", "medusa"], default=["eagle3", "medusa"])
    p.add_argument("--lengths", nargs="+", type=int, default=[512, 2048, 8192, 16384])
    p.add_argument("--precision", nargs="+", choices=["32-true", "bf16-mixed"], default=["32-true"])
    p.add_argument("--ttt_length", type=int, default=7)
    p.add_argument("--draft_vocab_size", type=int, default=8192, help="EAGLE-3 Vd (8B-shaped: 32000)")
    p.add_argument("--medusa_heads", type=int, default=3)
    p.add_argument("--shaped_layers", type=int, default=6, help="llama8b-shaped: decoder layers")
    p.add_argument("--shaped_untied", action="store_true", help="llama8b-shaped: untied lm_head (the real 8B)")
    p.add_argument("--shaped_medusa_heads", type=int, default=1, help="llama8b-shaped: Medusa heads")
    p.add_argument("--optimizer", nargs="+", choices=["fused", "foreach"], default=["fused"],
                   help="AdamW implementation: fused (the recipes' setting) and/or foreach (torch's default)")
    p.add_argument("--allocator", nargs="+", choices=["auto", "system", "tcmalloc"], default=["auto"],
                   help="children's memory allocator: auto = what cli.py uses (tcmalloc when the system has it), "
                        "system = glibc malloc, tcmalloc = preloaded (spec_lightning.allocator)")
    p.add_argument("--steps", type=int, default=2, help="timed optimiser steps per configuration")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--time_budget", type=float, default=3600.0, help="seconds; configurations past it are skipped")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --- the machine ----------------------------------------------------------------------------------------------
def matmul_peak(dtype: torch.dtype, device: str, n: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of an n x n x n matmul in ``dtype`` (the machine's dense peak as this process sees it)."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    c = torch.empty(n, n, dtype=dtype, device=device)  # written in place: the allocator's page faults are not timed
    best = float("inf")
    for _ in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        torch.mm(a, b, out=c)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --- one configuration (child process) -----------------------------------------------------------------------
def build(cfg: dict):
    """The module (target loaded, draft built) for one configuration."""
    from spec_lightning.modules.eagle3 import Eagle3Module
    from spec_lightning.modules.medusa1 import Medusa1Module

    def load_target(self):
        if cfg["target"] == "smollm2":
            return type(self).__mro__[1].load_target(self)
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        shape = TINY if cfg["target"] == "tiny" else {**LLAMA8B_SHAPED, "num_hidden_layers": cfg["shaped_layers"],
                                                      "tie_word_embeddings": not cfg["shaped_untied"]}
        with torch.device(cfg["device"]):
            model = LlamaForCausalLM(LlamaConfig(**shape)).to(self.target_dtype)
        return model.requires_grad_(False).eval()

    dtype = "bfloat16" if cfg["precision"] == "bf16-mixed" else "float32"
    if cfg["algorithm"] == "eagle3":
        cls = type("BenchEagle3", (Eagle3Module,), {"load_target": load_target})
        module = cls(target="smollm2-135m-instruct", target_dtype=dtype, draft_vocab_size=cfg["draft_vocab_size"],
                     ttt_length=cfg["ttt_length"])
    else:
        cls = type("BenchMedusa", (Medusa1Module,), {"load_target": load_target})
        module = cls(target="smollm2-135m-instruct", target_dtype=dtype, num_heads=cfg["medusa_heads"])
    module.configure_model()
    return module.to(cfg["device"])


def batch_for(T: int, vocab: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(T)
    ids = torch.randint(100, vocab, (1, T), generator=g)
    loss_mask = torch.zeros(1, T, dtype=torch.long)
    loss_mask[:, T // 2:] = 1  # the second half is the assistant's answer
    return {k: v.to(device) for k, v in
            {"input_ids": ids, "attention_mask": torch.ones(1, T, dtype=torch.long), "loss_mask": loss_mask}.items()}


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def text_config(config):
    """The text decoder's config (kept local: the script also measures earlier versions of the package)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def model_flops(module, cfg: dict, batch: dict[str, torch.Tensor]) -> float:
    """Model FLOPs of one step (see the module docstring)."""
    T = batch["input_ids"].shape[1]
    tc = text_config(module.target.config)
    H, V, layers = int(tc.hidden_size), int(tc.vocab_size), int(tc.num_hidden_layers)
    embed = module.target.embed_tokens.weight.numel()
    head = 0 if getattr(tc, "tie_word_embeddings", False) else module.target.lm_head.weight.numel()
    body = count_params(module.target.model) - embed - head  # decoder layers and final norm
    flops = 2 * body * T + 2 * T * H * layers * T  # the target's forward (2·T·H per token and layer: causal attention)
    trainable = int(batch["loss_mask"][0, 1:].sum())  # ~ positions whose next token is trainable
    if cfg["algorithm"] == "eagle3":
        draft = module.draft
        L, Vd = cfg["ttt_length"], draft.config.draft_vocab_size
        flops += 2 * V * H * trainable  # teacher logits at the teacher rows
        layer = sum(p.numel() for p in draft.midlayer.parameters())
        attn_dim = draft.config.num_attention_heads * draft.config.head_dim
        per_step = 2 * layer * T + 4 * T * attn_dim * (T / 2) + 2 * Vd * H * trainable
        flops += 3 * (2 * draft.fc.weight.numel() * T + sum(per_step + 4 * T * attn_dim * k for k in range(L)))
    else:
        K = cfg["medusa_heads"]
        flops += 3 * K * (2 * H * H + 2 * V * H) * trainable
    return float(flops)


def run_child(cfg: dict) -> dict:
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    device = cfg["device"]
    module = build(cfg)
    module.train()
    impl = {"fused": True} if cfg["optimizer"] == "fused" else {"foreach": True}
    optimizer = torch.optim.AdamW([p for p in module.trainable_parameters()], lr=1e-4, **impl)
    batch = batch_for(cfg["T"], int(text_config(module.target.config).vocab_size), device)
    compute = module.compute if cfg["algorithm"] == "eagle3" else module.compute_losses
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=cfg["precision"] == "bf16-mixed")
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(cfg["steps"] + 1):
        _sync(device)
        start = time.perf_counter()
        with autocast:
            loss = compute(batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if i:  # the first step is a warm-up
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    out = {"step_seconds": round(seconds, 3), "tokens_per_s": round(cfg["T"] / seconds, 1),
           "model_flops_per_token": round(model_flops(module, cfg, batch) / cfg["T"]),
           "trainable_params": sum(p.numel() for p in module.trainable_parameters())}
    if device.startswith("cuda"):
        out["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    else:
        out["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        maps = Path("/proc/self/maps")  # the allocator this process really has mapped (Linux)
        if maps.is_file():
            out["allocator"] = "tcmalloc" if "tcmalloc" in maps.read_text() else "glibc"
    return out


# --- the parent ---------------------------------------------------------------------------------------------
def child_environment(allocator: str) -> dict[str, str]:
    """The child's environment for ``--allocator`` (``LD_PRELOAD`` set or cleared of tcmalloc)."""
    from spec_lightning.allocator import find_tcmalloc, preload_environment

    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env["LD_PRELOAD"] = ":".join(p for p in env.get("LD_PRELOAD", "").split(":") if p and "tcmalloc" not in p)
    library = find_tcmalloc() if allocator != "system" else None
    if allocator == "tcmalloc" and library is None:
        raise SystemExit("--allocator tcmalloc: no tcmalloc library found (apt-get install libtcmalloc-minimal4)")
    return preload_environment(library, env) if library else env


def allocator_name(env: dict[str, str]) -> str:
    from spec_lightning.allocator import active_allocator

    return "glibc" if active_allocator(env) == "glibc malloc" else "tcmalloc"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))), flush=True)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    n = 8192 if args.device.startswith("cuda") else 2048
    peaks = {p: matmul_peak(torch.bfloat16 if p == "bf16-mixed" else torch.float32, args.device, n)
             for p in args.precision}
    print(json.dumps({"benchmark": "train_throughput", "machine_peak_gflops": {k: round(v / 1e9, 1) for k, v in
                                                                                peaks.items()},
                      "threads": threads, "device": args.device,
                      "cpu_capability": torch.backends.cpu.get_cpu_capability()}), flush=True)
    start = time.perf_counter()
    for target in args.targets:
        for algorithm in args.algorithms:
            for precision, optimizer, T, allocator in itertools.product(args.precision, args.optimizer, args.lengths,
                                                                       args.allocator):  # allocators side by side
                cfg = {"target": target, "algorithm": algorithm, "T": T, "precision": precision, "optimizer": optimizer,
                       "ttt_length": args.ttt_length, "steps": args.steps, "device": args.device,
                       "threads": threads, "shaped_layers": args.shaped_layers,
                       "shaped_untied": args.shaped_untied,
                       "medusa_heads": args.shaped_medusa_heads if target == "llama8b-shaped" else args.medusa_heads,
                       "draft_vocab_size": 32000 if target == "llama8b-shaped" else args.draft_vocab_size}
                env = child_environment(allocator)
                row = {"benchmark": "train_throughput", **{k: cfg[k] for k in
                       ("target", "algorithm", "T", "precision", "optimizer", "ttt_length", "medusa_heads",
                        "draft_vocab_size")}, "allocator": allocator_name(env)}
                if time.perf_counter() - start > args.time_budget:
                    print(json.dumps({**row, "skipped": "time budget"}), flush=True)
                    continue
                flags = ["-S"] if sys.flags.no_site else []  # keep the parent's import setup (e.g. an older checkout)
                proc = subprocess.run([sys.executable, *flags, __file__, "--child", json.dumps(cfg)], capture_output=True,
                                      text=True, env=env)
                lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
                if proc.returncode or not lines:
                    tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                    print(json.dumps({**row, "error": tail[:300], "returncode": proc.returncode}), flush=True)
                    continue
                result = json.loads(lines[-1])
                result["mfu"] = round(result["model_flops_per_token"] * result["tokens_per_s"] / peaks[precision], 3)
                print(json.dumps({**row, **result}), flush=True)


if __name__ == "__main__":
    main()
