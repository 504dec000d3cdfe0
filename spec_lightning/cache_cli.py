"""``python cli.py cache``: write the feature cache an offline config trains from.

    python cli.py cache --config configs/eagle3_offline.yaml                 # then: python cli.py fit --config ...
    python cli.py cache --config configs/eagle3_offline.yaml --dry_run       # size estimate only
    # several devices / processes, one writer each (disjoint shards, same directory; the last one writes the manifest):
    for i in 0 1 2 3; do CUDA_VISIBLE_DEVICES=$i python cli.py cache --config X.yaml --device cuda \\
        --writer_index $i --num_writers 4 & done; wait
    python cli.py cache --config configs/eagle3_offline.yaml --verify        # check every shard's size and sha256

The config is the training YAML: the target, its dtype and the aux layers come from the requirements the ``model``
states (``data_requirements()``, ``spec_lightning.contract``: EAGLE-3 reads ``aux_layer_ids``, Medusa only the final
hidden state), the data and storage settings from ``data``
(``FeatureCacheDataModule``'s arguments), so ``fit`` with the same YAML finds and accepts the cache. Flags override
single settings. An interrupted run resumes (finished shards are kept) when started again with the same arguments.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from spec_lightning.contract import DataRequirements

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
DATA_FIELDS = ("data", "max_length", "long_samples", "on_bad_sample", "val_fraction", "seed", "max_train_samples",
               "max_val_samples", "storage_dtype", "positions", "max_medusa_heads")


def _resolve_config(value: str) -> Path:
    path = Path(value)
    if path.exists() or path.is_absolute():
        return path
    candidate = CONFIGS_DIR / path
    return candidate if candidate.is_file() else path


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _defaults(class_path: str) -> tuple[type, dict]:
    module_name, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), name)
    params = inspect.signature(cls.__init__).parameters
    return cls, {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "null") else int(text)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python cli.py cache", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=[],
                   help="training YAML (repeatable; later files override earlier ones). A bare name that is not a "
                        f"file here is looked up in {CONFIGS_DIR}.")
    _add_writing(p.add_argument_group("writing"))
    _add_engine(p.add_argument_group("engine"))
    _add_settings(p.add_argument_group(
        "settings (override the config)",
        "Each defaults to the config's value (model.init_args for the target, data.init_args for the rest),\n"
        "else to FeatureCacheDataModule's default, so that fit with the same YAML finds the cache."))
    return p


def _add_writing(run) -> None:
    run.add_argument("--writer_index", type=int, default=0,
                     help="this process's index among --num_writers (default: %(default)s).")
    run.add_argument("--num_writers", type=int, default=1,
                     help="processes writing disjoint shards of the cache (default: %(default)s).")
    run.add_argument("--device", default=None,
                     help="where the target runs (cpu, cuda, cuda:1); default: cuda when the config trains on GPUs and "
                          "one is visible, else cpu.")
    run.add_argument("--batch_tokens", type=int, default=8192,
                     help="padded tokens per target forward (default: %(default)s).")
    run.add_argument("--shard_size_mb", type=float, default=256.0,
                     help="approximate size of one shard file in MB (default: %(default)s).")
    run.add_argument("--overwrite", action="store_true",
                     help="replace a cache of other settings in the cache directory.")
    run.add_argument("--dry_run", action="store_true", help="print the plan and the size estimate; write nothing.")
    run.add_argument("--verify", action="store_true",
                     help="check an existing cache (sizes, headers, sha256), then exit.")
    run.add_argument("--no_progress", action="store_true", help="no progress bar.")
    run.add_argument("--allow_other_target", action="store_true",
                     help="cache self-distilled data another target wrote (refused by default; also read from the "
                          "config's data.init_args.allow_other_target).")


def _add_engine(engine) -> None:
    engine.add_argument("--engine", choices=["hf", "vllm"], default=None,
                        help="what runs the target: vllm (extract_hidden_states; our connector on CPU) or hf (an HF "
                             "forward with hooks); default: vllm when installed, else hf (SPEC_LIGHTNING_ENGINE "
                             "overrides).")
    engine.add_argument("--tensor_parallel_size", type=int, default=1,
                        help="vllm: GPUs one copy of the target is split over (default: %(default)s).")
    engine.add_argument("--max_num_seqs", type=int, default=32,
                        help="vllm: samples scheduled together (default: %(default)s).")
    engine.add_argument("--gpu_memory_utilization", type=float, default=0.9,
                        help="vllm: fraction of each GPU's memory vLLM may take (default: %(default)s).")
    engine.add_argument("--cpu_kv_cache_gb", type=float, default=2.0,
                        help="vllm on CPU: KV-cache space in GiB, VLLM_CPU_KVCACHE_SPACE (default: %(default)s).")


def _add_settings(over) -> None:
    over.add_argument("--target", help="target source (builtin name, HF directory, .gguf file or hub id).")
    over.add_argument("--target_dtype", help="dtype the target runs in (float32, bfloat16, float16, or auto: as the "
                                             "config's trainer precision).")
    over.add_argument("--aux_layers", help="'default', 'none' or comma-separated decoder layer ids (e.g. 1,14,26).")
    over.add_argument("--cache_dir", help="where the cache is written; without one in the config either, a "
                                          "directory under the spec_lightning cache keyed by these settings.")
    over.add_argument("--data", help="conversation source: a builtin name, a .json/.jsonl/.parquet file or a datasets "
                                     "directory.")
    over.add_argument("--max_length", type=int, help="samples longer than this many tokens are truncated or skipped "
                                                     "(see --long_samples).")
    over.add_argument("--long_samples", choices=["truncate", "skip", "error"],
                      help="what to do with samples longer than --max_length.")
    over.add_argument("--on_bad_sample", choices=["skip", "error"],
                      help="skip (count and report) or error on malformed samples.")
    over.add_argument("--val_fraction", type=float, help="share of conversations held out for validation.")
    over.add_argument("--seed", type=int, help="seed of the train/validation split.")
    over.add_argument("--max_train_samples", type=_optional_int,
                      help="cache at most this many training conversations (none: all).")
    over.add_argument("--max_val_samples", type=_optional_int,
                      help="cache at most this many validation conversations (none: all).")
    over.add_argument("--storage_dtype", choices=["bfloat16", "float32", "float8_e4m3fn"],
                      help="dtype the aux features are stored in (float8 with per-row scales).")
    over.add_argument("--positions", choices=["loss", "all"],
                      help="store features at trainable positions only (loss) or at every position (all).")
    over.add_argument("--max_medusa_heads", type=int,
                      help="Medusa: the most heads the cache must serve (final states kept that many positions "
                           "ahead of each trainable token).")


def model_requirements(model: dict) -> DataRequirements:
    """The :class:`~spec_lightning.contract.DataRequirements` the configured model states at ``fit`` time (its class
    built from the YAML's ``init_args``; nothing is loaded)."""
    cls, _ = _defaults(model.get("class_path", "spec_lightning.modules.eagle3.Eagle3Module"))
    init_args = {k: v for k, v in (model.get("init_args") or {}).items() if k not in ("optimizer", "lr_scheduler")}
    return cls(**init_args).data_requirements()


def spec_from_args(args: argparse.Namespace):
    """``(CacheSpec, cache_dir)`` from the configs and flags, exactly as the FeatureCacheDataModule of the same YAML
    derives them at ``fit`` time (from the model's requirements and the data settings); ``args.device`` and
    ``args.allow_other_target`` are settled from the config too."""
    from spec_lightning.datamodules.feature_cache import CacheSpec

    raw: dict = {}
    for config in args.config:
        path = _resolve_config(config)
        if not path.is_file():
            raise FileNotFoundError(f"config not found: {config}")
        raw = _merge(raw, yaml.safe_load(path.read_text()) or {})
    requirements = model_requirements(raw.get("model") or {})
    data = raw.get("data") or {}
    data_path = data.get("class_path", "spec_lightning.datamodules.FeatureCacheDataModule")
    if data_path.rsplit(".", 1)[-1] != "FeatureCacheDataModule" and args.config:
        raise ValueError(f"{args.config[-1]}: data.class_path is {data_path}; the cache is built from an offline "
                         "config (data.class_path: spec_lightning.datamodules.FeatureCacheDataModule)")
    _, data_defaults = _defaults("spec_lightning.datamodules.FeatureCacheDataModule")
    data_args = {**data_defaults, **(data.get("init_args") or {})}

    aux = requirements.aux_layers
    aux = aux if isinstance(aux, str) else list(aux)
    if args.aux_layers is not None:
        text = args.aux_layers.strip()
        aux = text if text in ("default", "none") else [int(i) for i in text.split(",") if i.strip()]
    fields = {k: data_args[k] for k in DATA_FIELDS}
    fields.update({k: getattr(args, k) for k in DATA_FIELDS if getattr(args, k, None) is not None})
    trainer = raw.get("trainer") or {}
    target_dtype = args.target_dtype or requirements.target_dtype
    if target_dtype == "auto":  # as the model and the datamodule: the trainer's precision decides
        from spec_lightning.contract import target_dtype_for
        from spec_lightning.precision import resolve_precision

        precision = resolve_precision(trainer.get("precision"), trainer.get("accelerator"))
        target_dtype = str(target_dtype_for("auto", precision)).removeprefix("torch.")
    spec = CacheSpec(target=args.target or requirements.target, target_dtype=target_dtype, aux_layers=aux, **fields)
    cache_dir = args.cache_dir or data_args.get("cache_dir")  # relative paths: to the working directory, as in fit
    args.device = args.device or _default_device(trainer)
    args.allow_other_target = args.allow_other_target or bool(data_args.get("allow_other_target"))
    return spec, Path(cache_dir).expanduser() if cache_dir else spec.default_dir()


def _default_device(trainer: dict) -> str:
    import torch

    gpu = str(trainer.get("accelerator")) in ("gpu", "cuda", "auto")
    return "cuda" if gpu and torch.cuda.is_available() else "cpu"


def _feature_engine(args: argparse.Namespace, spec):
    """``None`` (the writer's HF capture) or a builder of vLLM's extraction for ``--engine vllm``."""
    from spec_lightning.datagen.engines import choose_engine

    if choose_engine(args.engine) == "hf":
        return None
    from spec_lightning.datagen.engines import VllmOptions

    options = VllmOptions(tensor_parallel_size=args.tensor_parallel_size, max_num_seqs=args.max_num_seqs,
                          gpu_memory_utilization=args.gpu_memory_utilization, cpu_kv_cache_gb=args.cpu_kv_cache_gb)

    def build():
        from transformers import AutoConfig

        from spec_lightning.datagen.hidden_states import VllmFeatureTarget
        from spec_lightning.targets import resolve_target

        config = AutoConfig.from_pretrained(resolve_target(spec.target)[0]).get_text_config()
        ids = spec.resolve_aux(config.num_hidden_layers)
        return VllmFeatureTarget(spec.target, spec.target_dtype, ids, options, args.max_num_seqs)

    return build


def verify(cache_dir: Path) -> dict:
    from spec_lightning.datamodules.feature_cache.format import SHARD_DIR
    from spec_lightning.datamodules.feature_cache.shards import check_shard_file
    from spec_lightning.datamodules.feature_cache.spec import load_manifest

    manifest = load_manifest(cache_dir)
    for shard in manifest["shards"]:
        check_shard_file(cache_dir / SHARD_DIR / shard["file"], shard, hash_content=True)
    return {"cache_dir": str(cache_dir), "verified_shards": len(manifest["shards"]), **manifest["totals"]}


def main(argv: list[str]) -> dict:
    """Entry point of ``python cli.py cache ...``; prints and returns a JSON summary."""
    from spec_lightning.datamodules.feature_cache import FeatureCacheWriter

    args = parser().parse_args(argv)
    spec, cache_dir = spec_from_args(args)
    if args.verify:
        summary = verify(cache_dir)
    else:
        writer = FeatureCacheWriter(spec, cache_dir, writer_index=args.writer_index, num_writers=args.num_writers,
                                    device=args.device, batch_tokens=args.batch_tokens,
                                    shard_size_mb=args.shard_size_mb, overwrite=args.overwrite,
                                    progress=not args.no_progress, load_target=_feature_engine(args, spec),
                                    allow_other_target=args.allow_other_target)
        if args.dry_run:
            writer.make_plan()
            estimate = writer.estimate()
            print(writer.describe(estimate), flush=True)
            summary = {"cache_dir": str(cache_dir), "estimated_bytes": estimate["total_bytes"],
                       "tokens": estimate["tokens"], "bytes_per_token": round(estimate["bytes_per_token"], 2),
                       "pending_shards": len(estimate["pending"]), "shards": len(writer.plan["shards"])}
        else:
            summary = writer.run()
    print(json.dumps(summary), flush=True)
    return summary
