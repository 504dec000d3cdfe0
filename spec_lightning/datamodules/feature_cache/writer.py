"""Write a feature cache: run the frozen target over a chat dataset's train and validation splits, shard by shard.

* Tokenisation is the online ChatDataModule's own (same token ids, loss masks, split and order).
* The shard plan (which samples go to which shard) is a function of the data and the spec only, written to
  ``plan.json`` first; several processes (``writer_index`` of ``num_writers``, one per device) write disjoint shards
  (shard i belongs to writer ``i % num_writers``) into the same directory.
* Each shard is written to a temporary name, fsync'd and renamed (``atomic_file``); its record (bytes, sha256,
  counts) follows it, and only a shard with its record counts as finished: a killed writer's run resumes where it
  stopped, rewriting at most the shard it was writing.
* Whichever writer finds every shard finished writes ``manifest.json`` (same content whoever writes it).
* The expected size is printed before any work and the run is refused when the disk cannot hold it; a tqdm bar shows
  tokens/s.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from typing import Any
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import Tensor, nn

from spec_lightning.atomic import atomic_file
from spec_lightning.datamodules.feature_cache.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_FILE,
    PLAN_FILE,
    POSITIONS_RULE_VERSION,
    SHARD_DIR,
    TOKEN_BYTES,
    FeatureCacheError,
    aux_length,
    bytes_per_position,
    encode,
    final_positions,
    final_storage,
    record_name,
    run_length,
    shard_name,
)
from spec_lightning.datamodules.feature_cache.spec import CacheSpec, read_json
from spec_lightning.integrity import sha256_file

log = logging.getLogger(__name__)

DISK_MARGIN = 1.02  # refuse unless free space >= 1.02 x the bytes still to write (+ 64 MiB)


def code_version() -> str:
    try:
        from importlib.metadata import version

        package = version("spec_lightning")
    except Exception:  # noqa: BLE001 - not installed as a distribution (a source checkout)
        package = "source"
    return f"spec_lightning {package}, feature cache format {FORMAT_VERSION}, positions rule {POSITIONS_RULE_VERSION}"


def _canonical(doc: dict) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def _sample_sizes(loss_mask: list[int], spec: CacheSpec, aux_row: int, final_row: int) -> dict:
    lm = torch.as_tensor(loss_mask)
    n_aux = aux_length(lm, spec.positions) if aux_row else 0
    n_final = int(final_positions(lm, spec.positions, spec.max_medusa_heads).sum())
    return {"tokens": len(loss_mask), "trainable": int(lm.sum()), "aux_rows": n_aux, "final_rows": n_final,
            "bytes": len(loss_mask) * TOKEN_BYTES + 8 + n_aux * aux_row + n_final * final_row}


def plan_shards(sizes: dict[str, list[dict]], shard_bytes: int) -> list[dict]:
    """Consecutive samples of each split grouped into shards of about ``shard_bytes`` (at least one sample each)."""
    shards = []
    for split, rows in sizes.items():
        index, first, acc, tokens = 0, 0, 0, 0
        for i, row in enumerate(rows):
            acc += row["bytes"]
            tokens += row["tokens"]
            if acc >= shard_bytes or i == len(rows) - 1:
                shards.append({"file": shard_name(split, index), "split": split, "first": first,
                               "samples": i + 1 - first, "tokens": tokens, "estimated_bytes": acc})
                index, first, acc, tokens = index + 1, i + 1, 0, 0
    return shards


def _free_bytes(path: Path) -> int:
    probe = path
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


class FeatureCacheWriter:
    """Writes the cache described by a :class:`CacheSpec` into ``cache_dir`` (see module docstring).

    Args:
        spec: what to cache.
        cache_dir: destination (default ``spec.default_dir()``).
        writer_index: this process's index in ``[0, num_writers)``.
        num_writers: processes writing the same cache (one per device).
        device: where the target runs (``cpu``, ``cuda:1``, ...).
        batch_tokens: padded tokens per target forward (batch x longest sample).
        shard_size_mb: approximate shard size.
        overwrite: replace a cache of another plan in ``cache_dir`` (otherwise refused).
        progress: show a tqdm bar.
        load_model: builds the target HF model (default ``load_target_model(spec.target, spec.target_dtype)``;
            tests inject tiny models).
        load_target: builds what computes the features instead of ``FrozenTarget(load_model())`` — called as
            ``target(ids, attention_mask, aux_layer_ids=...)`` returning ``TargetFeatures`` (e.g. vLLM's extraction,
            ``datagen.hidden_states``); its ``engine`` attribute is written into each shard's record.
        hook: ``hook(stage, shard_file)`` called after a shard file is renamed into place (``"data"``) and after its
            record is written (``"record"``); tests kill the writer there.
        allow_other_target: cache self-distilled data that another target wrote (refused by default, as in
            ``ChatDataModule``; not part of the cache's identity).
    """

    def __init__(self, spec: CacheSpec, cache_dir: str | Path | None = None, writer_index: int = 0,
                 num_writers: int = 1, device: str = "cpu", batch_tokens: int = 8192, shard_size_mb: float = 256.0,
                 overwrite: bool = False, progress: bool = True, load_model: Callable[[], nn.Module] | None = None,
                 hook: Callable[[str, str], None] | None = None, load_target: Callable[[], Any] | None = None,
                 allow_other_target: bool = False) -> None:
        if num_writers < 1 or not 0 <= writer_index < num_writers:
            raise ValueError(f"need 0 <= writer_index < num_writers, got writer_index={writer_index}, "
                             f"num_writers={num_writers}")
        if batch_tokens < 1 or shard_size_mb <= 0:
            raise ValueError(f"batch_tokens and shard_size_mb must be positive, got {batch_tokens}, {shard_size_mb}")
        self.spec = spec
        self.cache_dir = Path(cache_dir) if cache_dir is not None else spec.default_dir()
        self.writer_index, self.num_writers = writer_index, num_writers
        self.device = torch.device(device)
        self.batch_tokens = batch_tokens
        self.shard_bytes = int(shard_size_mb * 1e6)
        self.overwrite = overwrite
        self.progress = progress
        self.load_model = load_model
        self.load_target = load_target
        self.hook = hook
        self.allow_other_target = allow_other_target
        self.datamodule = None
        self.plan: dict | None = None

    # --- plan ---------------------------------------------------------------------------------------------------
    def _data(self):
        from spec_lightning.datamodules.chat_datamodule import ChatDataModule

        s = self.spec
        dm = ChatDataModule(tokenizer=s.target, data=s.data, max_length=s.max_length, batch_size=1,
                            val_fraction=s.val_fraction, seed=s.seed, max_train_samples=s.max_train_samples,
                            max_val_samples=s.max_val_samples, long_samples=s.long_samples,
                            on_bad_sample=s.on_bad_sample, allow_other_target=self.allow_other_target)
        dm.prepare_data()
        dm.setup("fit")
        return dm

    def make_plan(self) -> dict:
        """Tokenise (cached), identify the target and the tokenizer, and plan the shards."""
        from transformers import AutoConfig

        from spec_lightning.datamodules.chat_datamodule import tokenizer_fingerprint
        from spec_lightning.targets.layout import text_config
        from spec_lightning.targets.weight_files import model_directory, target_identity

        s = self.spec
        dm = self.datamodule = self._data()
        directory = model_directory(s.target)
        cfg = text_config(AutoConfig.from_pretrained(str(directory)))
        num_layers, hidden = int(cfg.num_hidden_layers), int(cfg.hidden_size)
        aux = s.resolve_aux(num_layers)
        for i in aux:
            if not 0 <= i < num_layers - 1:
                raise ValueError(f"aux layer id {i} out of range: must be in [0, {num_layers - 2}] (never the last "
                                 "layer)")
        aux_row, final_row = bytes_per_position(hidden, len(aux), s.storage_dtype)
        aux_row = aux_row if aux else 0
        sizes = {split: [_sample_sizes(m, s, aux_row, final_row) for m in ds["loss_mask"]]
                 for split, ds in (("train", dm.train_dataset), ("val", dm.val_dataset))}
        plan = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "target": {"source": s.target, **target_identity(s.target), "dtype": s.target_dtype,
                       "model_type": getattr(cfg, "model_type", None), "num_hidden_layers": num_layers,
                       "hidden_size": hidden, "vocab_size": int(cfg.vocab_size)},
            "aux_layer_ids": aux,
            "tokenizer": {"fingerprint": tokenizer_fingerprint(dm.tokenizer), "pad_id": dm.pad_id},
            "data": {"source": s.data, "fingerprint": dm.fingerprint, "max_length": s.max_length,
                     "long_samples": s.long_samples, "on_bad_sample": s.on_bad_sample, "split": s.split_settings(),
                     "split_fingerprint": dm.split_fingerprint},
            "storage": {"dtype": s.storage_dtype, "final_dtype": final_storage(s.storage_dtype),
                        "positions": s.positions,
                        "max_medusa_heads": s.max_medusa_heads if s.positions == "loss" else None,
                        "positions_rule": POSITIONS_RULE_VERSION, "aux_row_bytes": aux_row,
                        "final_row_bytes": final_row, "token_bytes": TOKEN_BYTES},
            "shards": plan_shards(sizes, self.shard_bytes),
        }
        plan["plan_id"] = hashlib.sha256(_canonical(plan).encode()).hexdigest()[:16]
        self.plan = plan
        return plan

    def _claim_directory(self, plan: dict) -> None:
        """Write ``plan.json``, or check that the one there is this plan (a resumed or parallel writer)."""
        path = self.cache_dir / PLAN_FILE
        if path.is_file():
            old = read_json(path, "plan")
            if old.get("plan_id") == plan["plan_id"]:
                return
            differs = [k for k in ("target", "aux_layer_ids", "tokenizer", "data", "storage", "shards")
                       if _canonical({"v": old.get(k)}) != _canonical({"v": plan[k]})]
            if not self.overwrite:
                raise FeatureCacheError(f"feature cache {self.cache_dir} holds a cache of another plan ({path}: "
                                        f"{', '.join(differs) or 'format'} differ); use another cache_dir or "
                                        "--overwrite to replace it")
            self._remove_cache()
        elif self.cache_dir.exists() and any(self.cache_dir.iterdir()):
            if not (self.cache_dir / SHARD_DIR).is_dir() and not (self.cache_dir / MANIFEST_FILE).is_file():
                raise FeatureCacheError(f"{self.cache_dir} exists and is not a feature cache (no {PLAN_FILE}); "
                                        "refusing to write into it")
            if not self.overwrite:
                raise FeatureCacheError(f"feature cache {self.cache_dir} has shards but no {PLAN_FILE}; use "
                                        "--overwrite to replace it")
            self._remove_cache()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(plan, indent=1) + "\n")

    def _remove_cache(self) -> None:
        """Remove a feature cache's own files only (plan, manifest, shards/)."""
        for name in (MANIFEST_FILE, PLAN_FILE):
            (self.cache_dir / name).unlink(missing_ok=True)
        shutil.rmtree(self.cache_dir / SHARD_DIR, ignore_errors=True)

    def shard_done(self, shard: dict) -> bool:
        """A shard is finished iff its record exists, belongs to this plan and its file has the recorded size."""
        assert self.plan is not None
        rec_path = self.cache_dir / SHARD_DIR / record_name(shard["file"])
        if not rec_path.is_file():
            return False
        try:
            rec = json.loads(rec_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False
        data = self.cache_dir / SHARD_DIR / shard["file"]
        return (rec.get("plan_id") == self.plan["plan_id"] and data.is_file()
                and data.stat().st_size == rec.get("bytes"))

    # --- running ------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Write this writer's unfinished shards; write the manifest when every shard is finished. Returns a summary
        (bytes and tokens written, seconds, tokens/s, whether the cache is complete)."""
        plan = self.plan or self.make_plan()
        estimate = self.estimate()
        print(self.describe(estimate), flush=True)
        free = _free_bytes(self.cache_dir)
        need = estimate["pending_bytes"] * DISK_MARGIN + (64 << 20 if estimate["pending_bytes"] else 0)
        if need > free:
            raise FeatureCacheError(f"feature cache {self.cache_dir}: this writer still has to write about "
                                    f"{_human(estimate['pending_bytes'])}, only {_human(free)} is free there; free "
                                    "space or choose another cache_dir (or storage_dtype float8_e4m3fn)")
        self._claim_directory(plan)
        pending = estimate["pending"]
        summary = {"cache_dir": str(self.cache_dir), "writer_index": self.writer_index,
                   "num_writers": self.num_writers, "shards_written": 0,
                   "shards_skipped": len(estimate["mine"]) - len(pending), "tokens": 0, "bytes": 0, "seconds": 0.0}
        if pending:
            target = self._target()
            bar = self._bar(sum(s["tokens"] for s in pending))
            start = time.perf_counter()
            try:
                for shard in pending:
                    rec = self.write_shard(shard, target, bar)
                    summary["shards_written"] += 1
                    summary["tokens"] += rec["tokens"]
                    summary["bytes"] += rec["bytes"]
            finally:
                if bar is not None:
                    bar.close()
                if hasattr(target, "close"):
                    target.close()
            summary["seconds"] = round(time.perf_counter() - start, 3)
            summary["tokens_per_second"] = round(summary["tokens"] / max(summary["seconds"], 1e-9), 1)
        summary["complete"] = self.finalize() is not None
        if not summary["complete"]:
            done = sum(self.shard_done(s) for s in plan["shards"])
            print(f"feature cache {self.cache_dir}: {done} of {len(plan['shards'])} shards written; the last writer to "
                  f"finish writes {MANIFEST_FILE}", flush=True)
        return summary

    def estimate(self) -> dict:
        """Bytes of the whole cache and of this writer's unfinished shards."""
        plan = self.plan or self.make_plan()
        mine = [s for i, s in enumerate(plan["shards"]) if i % self.num_writers == self.writer_index]
        manifest_ok = False
        if (self.cache_dir / MANIFEST_FILE).is_file() and (self.cache_dir / PLAN_FILE).is_file():
            manifest_ok = read_json(self.cache_dir / PLAN_FILE, "plan").get("plan_id") == plan["plan_id"]
        pending = [] if manifest_ok else [s for s in mine if not self.shard_done(s)]
        total = sum(s["estimated_bytes"] for s in plan["shards"])
        tokens = sum(s["tokens"] for s in plan["shards"])
        return {"total_bytes": total, "tokens": tokens, "bytes_per_token": total / max(tokens, 1), "mine": mine,
                "pending": pending, "pending_bytes": sum(s["estimated_bytes"] for s in pending)}

    def describe(self, estimate: dict) -> str:
        plan = self.plan
        assert plan is not None
        st = plan["storage"]
        samples = sum(s["samples"] for s in plan["shards"])
        return (f"feature cache {self.cache_dir}: {samples} samples, {estimate['tokens']} tokens, "
                f"{len(plan['shards'])} shards, estimated {_human(estimate['total_bytes'])} "
                f"({estimate['bytes_per_token']:.0f} bytes/token stored; per stored position aux "
                f"{st['aux_row_bytes']} B + final {st['final_row_bytes']} B, {st['dtype']}); writer "
                f"{self.writer_index}/{self.num_writers}: {len(estimate['pending'])} of {len(estimate['mine'])} shards "
                f"to write, ~{_human(estimate['pending_bytes'])}")

    def _target(self):
        from spec_lightning.targets import FrozenTarget, load_target_model

        if self.load_target is not None:
            return self.load_target()
        model = (self.load_model() if self.load_model is not None
                 else load_target_model(self.spec.target, dtype=self.spec.target_dtype))
        return FrozenTarget(model).to(self.device)

    def _bar(self, total_tokens: int):
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total_tokens, unit="tok", unit_scale=True, dynamic_ncols=True,
                    desc=f"feature cache (writer {self.writer_index}/{self.num_writers})")

    def _batches(self, runs: list[int]) -> list[list[int]]:
        """Sample indices grouped so that batch size x longest run <= batch_tokens (longest first)."""
        order = sorted(range(len(runs)), key=lambda i: -runs[i])
        batches, current, width = [], [], 0
        for i in order:
            w = max(width, runs[i])
            if current and w * (len(current) + 1) > self.batch_tokens:
                batches.append(current)
                current, w = [], runs[i]
            current.append(i)
            width = w
        if current:
            batches.append(current)
        return batches

    @torch.inference_mode()
    def features(self, target, input_ids: list[list[int]], loss_masks: list[list[int]]) -> list[dict[str, Tensor]]:
        """Per sample: stored aux rows ``[aux_length, n*H]`` and final rows ``[n_final, H]`` (float, on the CPU)."""
        assert self.plan is not None
        s, aux_ids = self.spec, self.plan["aux_layer_ids"]
        pad = int(self.plan["tokenizer"]["pad_id"])
        masks = [torch.as_tensor(m) for m in loss_masks]
        runs = [run_length(m, s.positions) for m in masks]
        out: list[dict[str, Tensor]] = [{} for _ in input_ids]
        for batch in self._batches(runs):
            width = max(runs[i] for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attn = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, : runs[i]] = torch.as_tensor(input_ids[i][: runs[i]])
                attn[row, : runs[i]] = 1
            feats = target(ids.to(self.device), attn.to(self.device), aux_layer_ids=aux_ids)
            for row, i in enumerate(batch):
                keep = final_positions(masks[i], s.positions, s.max_medusa_heads)[: runs[i]]
                final = feats.final_hidden[row, : runs[i]][keep.to(self.device)]
                out[i]["final"] = final.cpu()
                if aux_ids:
                    out[i]["aux"] = feats.aux_hidden[row, : aux_length(masks[i], s.positions)].cpu()
        return out

    def write_shard(self, shard: dict, target, bar=None) -> dict:
        """Compute and write one shard, then its record; returns the record."""
        assert self.plan is not None and self.datamodule is not None
        start = time.perf_counter()
        dataset = self.datamodule.train_dataset if shard["split"] == "train" else self.datamodule.val_dataset
        rows = dataset[shard["first"]: shard["first"] + shard["samples"]]
        ids, masks = rows["input_ids"], rows["loss_mask"]
        dtype = self.spec.storage_dtype
        aux_ids = self.plan["aux_layer_ids"]
        parts: dict[str, list[Tensor]] = {"final_hidden": [], "final_scale": [], "aux_hidden": [], "aux_scale": []}
        chunk = max(1, self.batch_tokens * 4 // max(self.spec.max_length, 1))  # samples per features() call
        for a in range(0, len(ids), chunk):
            feats = self.features(target, ids[a: a + chunk], masks[a: a + chunk])
            # encoded chunk by chunk (per-row scales), so at most one chunk is held in float
            final, final_scale = encode(torch.cat([f["final"] for f in feats]), final_storage(dtype), 1)
            parts["final_hidden"].append(final)
            parts["final_scale"].append(final_scale)
            if aux_ids:
                aux, aux_scale = encode(torch.cat([f["aux"] for f in feats]), dtype, len(aux_ids))
                parts["aux_hidden"].append(aux)
                parts["aux_scale"].append(aux_scale)
            if bar is not None:
                bar.update(sum(len(x) for x in ids[a: a + chunk]))
        tensors: dict[str, Tensor] = {
            "input_ids": torch.as_tensor([t for x in ids for t in x], dtype=torch.int32),
            "loss_mask": torch.as_tensor([t for x in masks for t in x], dtype=torch.uint8),
            "lengths": torch.as_tensor([len(x) for x in ids], dtype=torch.int64),
        }
        for name, pieces in parts.items():
            if pieces and pieces[0] is not None:
                tensors[name] = torch.cat(pieces)
        from safetensors.torch import save_file

        shard_dir = self.cache_dir / SHARD_DIR
        path = shard_dir / shard["file"]
        with atomic_file(path) as tmp:
            # one metadata key: safetensors writes a map in arbitrary order, so several keys make the bytes vary
            save_file(tensors, str(tmp), metadata={"spec_lightning": _canonical(
                {"plan_id": self.plan["plan_id"], "file": shard["file"]})})
            digest = sha256_file(tmp)
            size = tmp.stat().st_size
        if self.hook is not None:
            self.hook("data", shard["file"])
        record = {"plan_id": self.plan["plan_id"], "file": shard["file"], "split": shard["split"],
                  "first": shard["first"], "samples": shard["samples"], "tokens": int(tensors["lengths"].sum()),
                  "trainable_tokens": int(tensors["loss_mask"].sum()),
                  "aux_rows": int(tensors["aux_hidden"].shape[0]) if aux_ids else 0,
                  "final_rows": int(tensors["final_hidden"].shape[0]), "bytes": size, "sha256": digest,
                  "writer_index": self.writer_index, "device": str(self.device),
                  "engine": getattr(target, "engine", "hf"),
                  "seconds": round(time.perf_counter() - start, 3)}
        with atomic_file(shard_dir / record_name(shard["file"])) as tmp:
            tmp.write_text(json.dumps(record, indent=1) + "\n")
        if self.hook is not None:
            self.hook("record", shard["file"])
        return record

    def finalize(self) -> dict | None:
        """Write ``manifest.json`` if every shard is finished (returns it), else None."""
        plan = self.plan
        assert plan is not None
        path = self.cache_dir / MANIFEST_FILE
        if path.is_file():
            manifest = read_json(path, "manifest")
            if manifest.get("plan_id") == plan["plan_id"]:
                return manifest
        if not all(self.shard_done(s) for s in plan["shards"]):
            return None
        records = [read_json(self.cache_dir / SHARD_DIR / record_name(s["file"]), "shard record")
                   for s in plan["shards"]]
        shards = [{**s, **{k: r[k] for k in ("tokens", "trainable_tokens", "aux_rows", "final_rows", "bytes",
                                            "sha256")}} for s, r in zip(plan["shards"], records)]
        for s in shards:
            s.pop("estimated_bytes", None)
        splits = {}
        for split in ("train", "val"):
            mine = [s for s in shards if s["split"] == split]
            splits[split] = {k: sum(s[k] for s in mine) for k in ("samples", "tokens", "trainable_tokens",
                                                                   "aux_rows", "final_rows", "bytes")}
            splits[split]["shards"] = len(mine)
        total_bytes = sum(s["bytes"] for s in shards)
        total_tokens = sum(s["tokens"] for s in shards)
        seconds = sum(r["seconds"] for r in records)
        manifest = {**{k: v for k, v in plan.items() if k != "shards"}, "shards": shards, "splits": splits,
                    "totals": {"samples": sum(s["samples"] for s in shards), "tokens": total_tokens,
                               "bytes": total_bytes, "bytes_per_token": round(total_bytes / max(total_tokens, 1), 2),
                               "write_seconds": round(seconds, 3),
                               "write_tokens_per_second": round(total_tokens / max(seconds, 1e-9), 1)},
                    "code_version": code_version(),
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}  # noqa: UP017 (3.10)
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(manifest, indent=1) + "\n")
        log.info("feature cache %s complete: %d shards, %s", self.cache_dir, len(shards), _human(total_bytes))
        return manifest


def write_feature_cache(spec: CacheSpec, cache_dir: str | Path | None = None, **kwargs) -> dict:
    """Write (or finish) the cache of ``spec``; see :class:`FeatureCacheWriter` for the options. Returns a summary."""
    return FeatureCacheWriter(spec, cache_dir, **kwargs).run()
