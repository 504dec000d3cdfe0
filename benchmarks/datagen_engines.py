"""The target writing data on vLLM against our HF path, same prompts, same run (issue 25's "must show"). JSON lines:

* ``regenerate``: the first ``--num_prompts`` chitchat openers answered greedily (``--max_new_tokens``) by each
  engine: generated tokens/s (engine start excluded, reported apart) and how many answers are identical;
* ``synthesize``: ``--num_prompts`` Magpie conversations by each engine: tokens/s (requests are sampled, so they
  differ between engines; identical conversations are counted anyway);
* ``cache``: an EAGLE-3 feature cache (float32, default aux layers) of the regenerated answers written by each engine:
  cache-write tokens/s;
* ``features``: the two caches compared per stored row: max relative difference per aux layer and for the final
  state; then ``--train_steps`` steps of the offline EAGLE-3 recipe on each cache: the losses side by side.

Needs vLLM (run it with the vLLM venv's python), alone on the machine:

    VLLM_CPU_KVCACHE_SPACE=2 python benchmarks/datagen_engines.py --num_prompts 512 --max_new_tokens 128

``--engines hf`` measures our HF path alone (no vLLM needed; no comparison rows); ``--device cuda --dtype bfloat16``
runs it on a GPU (``benchmarks/gpu_datagen.sh``).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def emit(row: dict) -> None:
    print(json.dumps({"benchmark": "datagen_engines", **row}), flush=True)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _identical(a: Path, b: Path) -> int:
    ours, theirs = {r["id"]: r["messages"] for r in _records(a)}, {r["id"]: r["messages"] for r in _records(b)}
    return sum(ours[k] == theirs.get(k) for k in ours)


def generation_parts(args, out: Path) -> None:
    """regenerate and synthesize (``--parts``) on each engine (one engine start each, timed apart)."""
    from spec_lightning.datagen.engines import VllmOptions, open_engine
    from spec_lightning.datagen.regenerate import regenerate
    from spec_lightning.datagen.synthesize import synthesize

    engines = {}
    for name in args.engines:
        start = time.perf_counter()
        engines[name] = open_engine(args.target, args.dtype, engine=name, batch_size=args.batch_size,
                                    device=args.device if name == "hf" else None,
                                    vllm=VllmOptions(max_num_seqs=args.batch_size,
                                                     gpu_memory_utilization=args.gpu_memory_utilization))
        emit({"part": "engine_start", "engine": name, "version": engines[name].version, "dtype": args.dtype,
              "device": args.device if name == "hf" else "vllm", "seconds": round(time.perf_counter() - start, 1)})
    both = len(engines) == 2
    common = {"max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "progress": False,
              "dtype": args.dtype}
    if "regenerate" in args.parts:
        for name, engine in engines.items():
            report = regenerate(args.target, args.data, out / f"regen-{name}.jsonl", max_samples=args.num_prompts,
                                runner=engine, **common)
            emit({"part": "regenerate", "engine": name, "conversations": report.written,
                  "generated_tokens": report.generated_tokens, "tokens_per_s": report.tokens_per_second})
        if both:
            emit({"part": "regenerate", "of": args.num_prompts,
                  "identical_answers": _identical(out / "regen-vllm.jsonl", out / "regen-hf.jsonl")})
    if "synthesize" in args.parts:
        for name, engine in engines.items():
            t = time.perf_counter()
            report = synthesize(args.target, out / f"synth-{name}.jsonl", num_samples=args.num_prompts,
                                runner=engine, **common)
            seconds = time.perf_counter() - t
            emit({"part": "synthesize", "engine": name, "conversations": report.samples,
                  "generated_tokens": report.generated_tokens, "seconds": round(seconds, 1),
                  "tokens_per_s": round(report.generated_tokens / seconds, 1)})
        if both:
            emit({"part": "synthesize", "of": args.num_prompts, "identical_conversations": _identical(
                out / "synth-vllm.jsonl", out / "synth-hf.jsonl")})
    for engine in engines.values():
        engine.close()
    _free_gpu()


def _free_gpu() -> None:
    """Hand the GPU memory of an engine that is gone back to the device (vLLM sizes its KV cache from what is free)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cache_part(args, out: Path) -> dict[str, Path]:
    """One EAGLE-3 cache (``--storage_dtype``) of the regenerated answers per engine; cache-write tokens/s."""
    from spec_lightning.cache_cli import main as cache_main

    data = out / "regen-hf.jsonl"  # both engines' caches of the same answers (an HF run's, when there is one)
    if not data.is_file():
        data = out / f"regen-{args.engines[0]}.jsonl"
    dirs = {}
    for name in args.engines:
        dirs[name] = out / f"cache-{name}"
        device = ["--device", args.device] if args.device else []
        if name == "vllm":
            device += ["--gpu_memory_utilization", str(args.gpu_memory_utilization)]
        summary = cache_main(["--config", str(ROOT / "configs/eagle3_offline.yaml"), "--engine", name,
                              "--target", args.target, "--target_dtype", args.dtype, "--data", str(data),
                              "--storage_dtype", args.storage_dtype, "--max_train_samples", str(args.cache_samples),
                              "--max_val_samples", "8", "--cache_dir", str(dirs[name]), "--no_progress",
                              "--overwrite", *device])
        emit({"part": "cache", "engine": name, "tokens": summary["tokens"], "seconds": summary.get("seconds"),
              "tokens_per_s": summary.get("tokens_per_second"), "storage_dtype": args.storage_dtype})
        _free_gpu()
    return dirs


def compare_caches(dirs: dict[str, Path]) -> None:
    """Max relative difference per aux layer and for the final state, over every stored row."""
    import torch
    from safetensors.torch import load_file

    from spec_lightning.datamodules.feature_cache.format import SHARD_DIR

    manifest = json.loads((dirs["hf"] / "manifest.json").read_text())
    n_aux = len(manifest["aux_layer_ids"])
    worst: dict[str, float] = {}
    for shard in manifest["shards"]:
        a, b = (load_file(str(dirs[e] / SHARD_DIR / shard["file"])) for e in ("vllm", "hf"))
        pieces = [("final", a["final_hidden"], b["final_hidden"])]
        h = a["final_hidden"].shape[-1]
        pieces += [(f"aux_{layer}", a["aux_hidden"][:, j * h:(j + 1) * h], b["aux_hidden"][:, j * h:(j + 1) * h])
                   for j, layer in enumerate(manifest["aux_layer_ids"][:n_aux])]
        for name, x, y in pieces:
            diff = float((x.double() - y.double()).abs().max() / y.double().abs().max())
            worst[name] = max(worst.get(name, 0.0), diff)
    emit({"part": "features", "max_relative_difference": {k: float(f"{v:.3g}") for k, v in worst.items()}})


PRECISION_OF_DTYPE = {"float32": "32-true", "bfloat16": "bf16-mixed", "float16": "16-mixed"}


def train_losses(args, dirs: dict[str, Path], out: Path) -> None:
    """The offline EAGLE-3 recipe's first steps on each cache: the training losses side by side."""
    losses = {}
    for name, cache_dir in dirs.items():
        logs = out / f"logs-{name}"
        subprocess.run([sys.executable, str(ROOT / "cli.py"), "fit", "--config", str(ROOT / "configs/eagle3_offline.yaml"),
                        "--model.init_args.target", args.target, "--data.init_args.data", str(out / "regen-hf.jsonl"),
                        "--data.init_args.cache_dir", str(cache_dir), "--data.init_args.storage_dtype", "float32",
                        "--data.init_args.max_train_samples", str(args.cache_samples),
                        "--data.init_args.max_val_samples", "8", "--trainer.max_steps", str(args.train_steps),
                        "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "0",
                        "--trainer.precision", PRECISION_OF_DTYPE[args.dtype],  # the dtype the caches were written in
                        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir",
                        str(logs), "--trainer.default_root_dir", str(logs)],
                       check=True, cwd=ROOT)
        rows = list(csv.DictReader(next(logs.rglob("metrics.csv")).open()))
        losses[name] = [round(float(r["train_loss"]), 5) for r in rows if r.get("train_loss")]
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses["vllm"], losses["hf"], strict=False))
    emit({"part": "training", "steps": args.train_steps, "loss_vllm_cache": losses["vllm"],
          "loss_hf_cache": losses["hf"], "max_relative_loss_difference": float(f"{worst:.3g}")})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="smollm2-135m-instruct", help="target source (the embedded SmolLM2 default)")
    p.add_argument("--data", default="chitchat", help="the conversations whose first user turns regenerate answers")
    p.add_argument("--num_prompts", type=int, default=512, help="chitchat openers answered / conversations synthesized")
    p.add_argument("--max_new_tokens", type=int, default=128, help="longest answer (greedy)")
    p.add_argument("--batch_size", type=int, default=32, help="sequences in flight (vLLM max_num_seqs, HF batch)")
    p.add_argument("--cache_samples", type=int, default=256, help="training samples in each feature cache")
    p.add_argument("--train_steps", type=int, default=20, help="training steps on each cache")
    p.add_argument("--parts", nargs="+", default=["generate", "cache", "train"],
                   choices=["generate", "regenerate", "synthesize", "cache", "train"],
                   help="which parts to run (generate = regenerate + synthesize; cache needs regenerate's answers, "
                        "train the caches)")
    p.add_argument("--engines", nargs="+", default=["vllm", "hf"], choices=["vllm", "hf"],
                   help="engines to measure (the comparison rows need both)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype the target runs in (engines and cache writer)")
    p.add_argument("--device", default=None, help="device of the HF engine and the HF cache writer (e.g. cuda)")
    p.add_argument("--gpu_memory_utilization", type=float, default=0.9,
                   help="vLLM on a GPU: its share of the memory (lower it when the HF engine shares the GPU)")
    p.add_argument("--storage_dtype", default="float32", choices=["float32", "bfloat16"],
                   help="feature cache storage (float32: the engines' features compare exactly)")
    p.add_argument("--out_dir", default="benchmark_datagen", help="where the generated files and caches go")
    args = p.parse_args(argv)
    if "generate" in args.parts:
        args.parts += ["regenerate", "synthesize"]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if "regenerate" in args.parts or "synthesize" in args.parts:
        generation_parts(args, out)
    if "cache" in args.parts or "train" in args.parts:
        dirs = cache_part(args, out) if "cache" in args.parts else {e: out / f"cache-{e}" for e in args.engines}
        if len(dirs) == 2:
            compare_caches(dirs)
            if "train" in args.parts:
                train_losses(args, dirs, out)


if __name__ == "__main__":
    main()
