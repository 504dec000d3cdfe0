"""Feature cache figures (JSON lines on stdout): bytes per token, write and read throughput, and the training step
time offline vs online.

    python benchmarks/feature_cache_throughput.py                        # embedded SmolLM2 + chitchat-smollm2
    python benchmarks/feature_cache_throughput.py --samples 64 --steps 12 --repeats 2

Lines (``benchmark`` field):

* ``bytes_per_token``: stored bytes per dataset token for each storage dtype, measured on the written cache and
  computed with the same position statistics for a Llama-3.1-8B-shaped target (H 4096, 3 aux layers); ``all``
  positions (nothing dropped) for comparison.
* ``write``: the cache writer on the target (tokens/s of the whole run: target forward + encoding + safetensors +
  fsync + sha256), per storage dtype.
* ``fidelity``: each storage dtype against float32 on the same samples: relative L2 error of the features, top-1
  agreement and mean KL of the teacher distribution the target's head makes from the final hidden state.
* ``shard_io``: writing and hashing one shard of random 8B-shaped features (no target), MB/s.
* ``read``: the offline training loader over the cache (shuffled, batch as the recipe), tokens/s and MB/s.
* ``step_time``: mean wall time per training step (data loading included) online vs offline for the recipes'
  EAGLE-3 and Medusa shapes, the same batches, medians over ``--repeats`` interleaved runs.

Everything runs on this machine's CPU (set ``--threads``); on a shared machine, compare lines measured together.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LLAMA8B = {"hidden_size": 4096, "num_aux": 3}


def emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def data_settings(args) -> dict:
    return {"tokenizer": args.target, "data": args.data, "max_length": args.max_length, "batch_size": args.batch_size,
            "max_train_samples": args.samples, "max_val_samples": args.val_samples}


def eagle3_module(args):
    from spec_lightning.modules.eagle3 import Eagle3Module

    return Eagle3Module(target=args.target, draft_vocab_size=args.draft_vocab_size, ttt_length=args.ttt_length)


def medusa_module(args):
    from spec_lightning.modules.medusa1 import Medusa1Module

    return Medusa1Module(target=args.target, num_heads=args.medusa_heads)


def write_caches(args, root: Path) -> dict[str, Path]:
    """One EAGLE-3 cache (aux + final; it serves Medusa too) per storage dtype; a ``write`` line each."""
    from spec_lightning.datamodules import FeatureCacheDataModule
    from spec_lightning.datamodules.feature_cache import load_manifest

    out = {}
    for dtype in args.storage:
        dm = FeatureCacheDataModule(**data_settings(args), cache_dir=str(root / dtype), storage_dtype=dtype)
        start = time.perf_counter()
        summary = dm.write_cache(eagle3_module(args).data_requirements(), progress=False,
                                 batch_tokens=args.batch_tokens)
        wall = time.perf_counter() - start
        manifest = load_manifest(root / dtype)
        emit({"benchmark": "write", "target": args.target, "storage_dtype": dtype,
              "tokens": manifest["totals"]["tokens"], "bytes": manifest["totals"]["bytes"],
              "seconds_shards": summary["seconds"], "tokens_per_s": summary.get("tokens_per_second"),
              "seconds_with_setup": round(wall, 2), "threads": torch.get_num_threads(), "load_avg": load_average()})
        out[dtype] = root / dtype
    return out


def bytes_per_token(caches: dict[str, Path]) -> None:
    from spec_lightning.datamodules.feature_cache import load_manifest
    from spec_lightning.datamodules.feature_cache.format import TOKEN_BYTES, bytes_per_position

    for dtype, path in caches.items():
        m = load_manifest(path)
        t = m["totals"]
        tokens = t["tokens"]
        aux_rows = sum(s["aux_rows"] for s in m["shards"])
        final_rows = sum(s["final_rows"] for s in m["shards"])
        hidden, num_aux = m["target"]["hidden_size"], len(m["aux_layer_ids"])
        row = {"benchmark": "bytes_per_token", "storage_dtype": dtype, "tokens": tokens,
               "aux_positions_stored": round(aux_rows / tokens, 4), "final_positions_stored": round(final_rows / tokens, 4),
               "measured": {"target": m["target"]["source"], "hidden_size": hidden, "num_aux": num_aux,
                            "bytes_per_token": t["bytes_per_token"]}}
        for name, shape in (("this_target", {"hidden_size": hidden, "num_aux": num_aux}), ("llama3.1-8b", LLAMA8B)):
            aux_b, final_b = bytes_per_position(shape["hidden_size"], shape["num_aux"], dtype)
            pruned = (aux_rows * aux_b + final_rows * final_b) / tokens + TOKEN_BYTES
            every = aux_b + final_b + TOKEN_BYTES
            row[name] = {"bytes_per_token": round(pruned, 1), "all_positions": every,
                         "medusa_only_cache": round(final_rows * final_b / tokens + TOKEN_BYTES, 1)}
        emit(row)


def fidelity(args, caches: dict[str, Path], samples: int = 32) -> None:
    """How far each storage dtype's features are from float32's, and what that does to the teacher: relative L2
    error of the aux and final features, top-1 agreement and mean KL(p_fp32 || p_stored) of the target's softmax."""
    if "float32" not in caches:
        return
    from spec_lightning.datamodules.feature_cache import load_manifest
    from spec_lightning.datamodules.feature_cache.dataset import CachedFeatureDataset
    from spec_lightning.targets.head import load_target_head

    head = load_target_head(args.target, torch.float32)
    ref = CachedFeatureDataset(caches["float32"], load_manifest(caches["float32"]), "train")
    for dtype, path in caches.items():
        if dtype == "float32":
            continue
        other = CachedFeatureDataset(path, load_manifest(path), "train")
        err = {"aux": [0.0, 0.0], "final": [0.0, 0.0]}
        agree = positions = 0
        kl = 0.0
        for i in range(min(samples, len(ref))):
            a, b = ref[i], other[i]
            for key, name in (("aux_hidden", "aux"), ("final_hidden", "final")):
                err[name][0] += float((a[key] - b[key]).pow(2).sum())
                err[name][1] += float(a[key].pow(2).sum())
            la, lb = head.logits(a["final_hidden"]), head.logits(b["final_hidden"])
            agree += int((la.argmax(-1) == lb.argmax(-1)).sum())
            positions += la.shape[0]
            kl += float(torch.nn.functional.kl_div(lb.log_softmax(-1), la.log_softmax(-1), log_target=True,
                                                   reduction="sum"))
        emit({"benchmark": "fidelity", "storage_dtype": dtype, "vs": "float32", "samples": min(samples, len(ref)),
              "aux_rel_l2": round((err["aux"][0] / err["aux"][1]) ** 0.5, 5),
              "final_rel_l2": round((err["final"][0] / err["final"][1]) ** 0.5, 5),
              "teacher_top1_agreement": round(agree / positions, 5), "teacher_kl_mean": round(kl / positions, 6),
              "positions": positions})


def shard_io(args, root: Path) -> None:
    from safetensors.torch import save_file

    from spec_lightning.atomic import atomic_file
    from spec_lightning.integrity import sha256_file

    rows = args.io_mb * 1_000_000 // (4 * LLAMA8B["hidden_size"] * 2)
    tensors = {"aux_hidden": torch.randn(rows, 3 * LLAMA8B["hidden_size"]).to(torch.bfloat16),
               "final_hidden": torch.randn(rows, LLAMA8B["hidden_size"]).to(torch.bfloat16)}
    path = root / "io.safetensors"
    start = time.perf_counter()
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp))
    saved = time.perf_counter()  # safetensors write + fsync + rename
    sha256_file(path)
    hashed = time.perf_counter()
    size = path.stat().st_size
    emit({"benchmark": "shard_io", "bytes": size, "positions_8b_shape": rows,
          "save_fsync_rename_MB_per_s": round(size / 1e6 / (saved - start), 1),
          "sha256_MB_per_s": round(size / 1e6 / (hashed - saved), 1), "load_avg": load_average()})
    path.unlink()


def read_throughput(args, caches: dict[str, Path]) -> None:
    from spec_lightning.datamodules import FeatureCacheDataModule

    for dtype, path in caches.items():
        dm = FeatureCacheDataModule(**data_settings(args), cache_dir=str(path), storage_dtype=dtype,
                                    link=eagle3_module(args).data_link)
        dm.setup("fit")
        for epoch in range(2):  # the second pass reads from the page cache
            loader = dm.train_dataloader()
            loader.sampler.set_epoch(epoch)
            start = time.perf_counter()
            tokens = nbytes = 0
            for batch in loader:
                tokens += int(batch["attention_mask"].sum())
                nbytes += sum(batch[k].numel() * batch[k].element_size() for k in ("aux_hidden", "final_hidden"))
            seconds = time.perf_counter() - start
            emit({"benchmark": "read", "storage_dtype": dtype, "pass": epoch, "tokens": tokens,
                  "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
                  "batch_MB_per_s_fp32": round(nbytes / 1e6 / seconds, 1), "load_avg": load_average()})


def step_times(args, caches: dict[str, Path]) -> None:
    from lightning.pytorch import Callback, Trainer, seed_everything

    from spec_lightning.datamodules import ChatDataModule, FeatureCacheDataModule

    class Clock(Callback):
        def __init__(self) -> None:
            self.marks: list[float] = []

        def on_train_batch_end(self, *a) -> None:
            self.marks.append(time.perf_counter())

    def one(make, dm) -> tuple[float, float]:
        """(mean seconds per step after two warm-up steps, last loss)."""
        seed_everything(0)
        clock = Clock()
        trainer = Trainer(accelerator="cpu", max_steps=args.steps + 2, limit_val_batches=0, logger=False,
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                          num_sanity_val_steps=0, callbacks=[clock])
        module = make()
        dm.link = module.data_link  # as the CLI links them
        trainer.fit(module, datamodule=dm)
        gaps = [b - a for a, b in zip(clock.marks[1:], clock.marks[2:])]  # from the end of step 2 on
        return statistics.mean(gaps), float(trainer.callback_metrics.get("train_loss", float("nan")))

    storage = args.storage[0]
    for algo, make in (("eagle3", lambda: eagle3_module(args)), ("medusa", lambda: medusa_module(args))):
        runs: dict[str, list[float]] = {"online": [], "offline": []}
        for _ in range(args.repeats):  # interleaved: a disturbance of the shared machine hits both sides
            runs["online"].append(one(make, ChatDataModule(**data_settings(args)))[0])
            offline = FeatureCacheDataModule(**data_settings(args), cache_dir=str(caches[storage]),
                                             storage_dtype=storage)
            runs["offline"].append(one(make, offline)[0])
        on, off = statistics.median(runs["online"]), statistics.median(runs["offline"])
        emit({"benchmark": "step_time", "algorithm": algo, "storage_dtype": storage, "batch_size": args.batch_size,
              "max_length": args.max_length, "steps": args.steps, "online_s": round(on, 3), "offline_s": round(off, 3),
              "speedup": round(on / off, 2), "online_runs": [round(x, 3) for x in runs["online"]],
              "offline_runs": [round(x, 3) for x in runs["offline"]], "threads": torch.get_num_threads(),
              "load_avg": load_average()})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="smollm2-135m-instruct")
    ap.add_argument("--data", default="chitchat-smollm2")
    ap.add_argument("--max_length", type=int, default=256)
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--samples", type=int, default=64, help="training samples cached (max_train_samples)")
    ap.add_argument("--val_samples", type=int, default=8)
    ap.add_argument("--storage", nargs="+", default=["bfloat16", "float32", "float8_e4m3fn"])
    ap.add_argument("--draft_vocab_size", type=int, default=8192)
    ap.add_argument("--ttt_length", type=int, default=5)
    ap.add_argument("--medusa_heads", type=int, default=3)
    ap.add_argument("--batch_tokens", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--io_mb", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out_dir", default=None, help="where the caches go (default: a temp dir, removed)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["write", "io", "read", "steps"])
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out_dir) if args.out_dir else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        caches = write_caches(args, root)
        bytes_per_token(caches)
        fidelity(args, caches)
        if "io" not in args.skip:
            shard_io(args, root)
        if "read" not in args.skip:
            read_throughput(args, caches)
        if "steps" not in args.skip:
            step_times(args, caches)


if __name__ == "__main__":
    main()
