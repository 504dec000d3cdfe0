"""FeatureCacheDataModule: offline training batches (tokens + the target's cached features) from a feature cache.

Swapping online for offline training is a YAML change: ``data.class_path`` becomes this class (its settings are the
ChatDataModule's plus where and how the cache is stored). Build the cache first with ``python cli.py cache --config
<the same YAML>``. The cache to read follows from the model's requirements (target, dtype, aux layers, heads: the
``DataLink`` the CLI hands over, ``spec_lightning.contract``). Batches carry ``final_hidden`` (and ``aux_hidden``),
and ``setup`` says so on the link, so the module reads the features from the batch and loads only the target's
embeddings, final norm and lm_head.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from spec_lightning.contract import DataLink, DataRequirements, TokenRows
from spec_lightning.datamodules.chat_datamodule import ChatDataModule, tokenizer_fingerprint
from spec_lightning.datamodules.feature_cache.dataset import (
    CachedFeatureDataset,
    PackedFeatureDataset,
    collate_features,
    collate_packed_features,
)
from spec_lightning.datamodules.feature_cache.format import (
    MANIFEST_FILE,
    POSITIONS,
    SHARD_DIR,
    FeatureCacheError,
)
from spec_lightning.datamodules.feature_cache.format import storage_dtype as check_storage_dtype
from spec_lightning.datamodules.feature_cache.shards import check_shard_file
from spec_lightning.datamodules.feature_cache.spec import CacheSpec, check_manifest, load_manifest
from spec_lightning.datamodules.sampling import EpochSampler, ResumableDataLoader

log = logging.getLogger(__name__)

VERIFY = ("full", "first_use", "size")


def dtype_name(dtype: torch.dtype | str) -> str:
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


class FeatureCacheDataModule(ChatDataModule):
    """Batches ``{input_ids, attention_mask, loss_mask, final_hidden [B, T, H], aux_hidden [B, T, n*H]}`` read from a
    feature cache; the same samples, split and order as :class:`ChatDataModule` with the same settings.

    Args:
        tokenizer: the target source (linked from ``model.init_args.target``); its identity is checked against the
            cache's.
        data: the chat data the cache was built from (checked by name; the cache holds its tokens).
        max_length: as ChatDataModule (checked).
        batch_size: conversations per batch.
        val_fraction: as ChatDataModule (checked: the cache holds that split).
        seed: split seed and shuffling seed (order a function of (seed, epoch), as online).
        max_train_samples: as ChatDataModule (checked).
        max_val_samples: as ChatDataModule (checked).
        long_samples: as ChatDataModule (checked).
        on_bad_sample: as ChatDataModule (checked).
        num_workers: DataLoader workers (each reads its samples from the shards).
        pack: pack whole training conversations into rows of ``max_length`` tokens, as ChatDataModule (the same rows;
            the cached features of each conversation are placed at its offset in the row).
        cache_dir: the cache directory; ``None``: ``<cache root>/features/<name from the settings>``, the directory
            ``python cli.py cache`` writes for the same config.
        storage_dtype: ``bfloat16``, ``float32`` or ``float8_e4m3fn`` on disk (fp8: the aux features with a per-token
            scale; the final hidden state, which makes the teacher, stays bf16).
        positions: ``loss`` (store only positions some loss reads) or ``all``.
        max_medusa_heads: with ``positions: loss``, Medusa modules of up to this many heads can train from the cache.
        verify: ``full`` (sha256 of every shard at setup), ``first_use`` (each shard hashed when a process first opens
            it: for caches too big to hash up front) or ``size`` (sizes and headers only). Sizes, headers and the
            manifest are always checked.
        feature_dtype: dtype of the features in batches; ``None``: the model's target dtype (what the online
            target yields), else float32.
        allow_other_target: as ChatDataModule (self-distilled data of another target; ``python cli.py cache`` reads
            it from the same YAML).
        link: the model's :class:`~spec_lightning.contract.DataLink` (the CLI passes ``model.data_link``): its
            requirements pick the cache; ``setup`` hands back the training tokens and that batches carry features.
    """

    def __init__(
        self,
        tokenizer: str = "smollm2-135m-instruct",
        data: str | list[str] = "chitchat",
        max_length: int = 512,
        batch_size: int = 4,
        val_fraction: float = 0.05,
        seed: int = 0,
        max_train_samples: int | None = None,
        max_val_samples: int | None = None,
        long_samples: str = "truncate",
        on_bad_sample: str = "skip",
        num_workers: int = 0,
        pack: bool = False,
        cache_dir: str | None = None,
        storage_dtype: Literal["bfloat16", "float32", "float8_e4m3fn"] = "bfloat16",
        positions: Literal["loss", "all"] = "loss",
        max_medusa_heads: int = 5,
        verify: Literal["full", "first_use", "size"] = "full",
        feature_dtype: str | None = None,
        allow_other_target: bool = False,
        link: DataLink | None = None,
    ) -> None:
        super().__init__(tokenizer=tokenizer, data=data, max_length=max_length, batch_size=batch_size,
                         val_fraction=val_fraction, seed=seed, max_train_samples=max_train_samples,
                         max_val_samples=max_val_samples, long_samples=long_samples, on_bad_sample=on_bad_sample,
                         num_workers=num_workers, pack=pack, allow_other_target=allow_other_target,
                         link=link)
        check_storage_dtype(storage_dtype)
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {list(POSITIONS)}, got {positions!r}")
        if verify not in VERIFY:
            raise ValueError(f"verify must be one of {list(VERIFY)}, got {verify!r}")
        if feature_dtype is not None and not isinstance(getattr(torch, feature_dtype, None), torch.dtype):
            raise ValueError(f"feature_dtype {feature_dtype!r} is not a torch dtype (e.g. 'float32', 'bfloat16')")
        self.save_hyperparameters(ignore=["link"])
        self.cache_dir_setting = cache_dir
        self.storage_dtype = storage_dtype
        self.positions = positions
        self.max_medusa_heads = max_medusa_heads
        self.verify = verify
        self.feature_dtype = feature_dtype
        self.manifest: dict | None = None
        self.resolved_cache_dir: Path | None = None

    # --- what the cache must be: the model's requirements (spec_lightning.contract) ------------------------------
    def requirements(self, requirements: DataRequirements | None = None) -> DataRequirements | None:
        """``requirements`` if given, else the linked model's (``None``: no model linked)."""
        if requirements is not None:
            return requirements
        return self.link.requirements if self.link is not None else None

    def target_dtype(self, requirements: DataRequirements) -> torch.dtype:
        """The target's dtype under this datamodule's trainer precision (``auto`` follows it, as in the model)."""
        trainer = self.trainer
        return requirements.dtype(trainer.precision if trainer is not None else None)

    def cache_spec(self, requirements: DataRequirements | None = None) -> CacheSpec:
        """The cache this datamodule reads for ``requirements`` (its target, dtype and aux layers; default: the
        linked model's). The cache CLI builds the same spec from the YAML."""
        requirements = self.requirements(requirements)
        if requirements is None:
            raise FeatureCacheError("no model is linked: the feature cache's target and aux layers come from the "
                                    "model (pass link=module.data_link, or set data.init_args.cache_dir to read a cache "
                                    "without one)")
        aux = requirements.aux_layers
        return CacheSpec(target=requirements.target, data=self.data,
                         target_dtype=dtype_name(self.target_dtype(requirements)),
                         aux_layers=aux if isinstance(aux, str) else list(aux), max_length=self.max_length,
                         long_samples=self.long_samples, on_bad_sample=self.on_bad_sample,
                         val_fraction=self.val_fraction, seed=self.seed, max_train_samples=self.max_train_samples,
                         max_val_samples=self.max_val_samples, storage_dtype=self.storage_dtype,
                         positions=self.positions, max_medusa_heads=self.max_medusa_heads)

    def cache_directory(self, requirements: DataRequirements | None = None) -> Path:
        if self.cache_dir_setting is not None:
            return Path(self.cache_dir_setting).expanduser()
        return self.cache_spec(requirements).default_dir()

    def check_manifest(self, manifest: dict, path: Path, requirements: DataRequirements | None = None) -> None:
        """Refuse a cache written for another target, tokenizer, data settings, storage or aux layers (each mismatch
        named with the manifest's path and both values), or one the model's requirements cannot use."""
        from spec_lightning.targets.weight_files import target_identity

        target = requirements.target if requirements is not None else self.tokenizer_source
        identity = target_identity(target)
        check_manifest(path, manifest, {"target.config_sha256": identity["config_sha256"],
                                        "target.weights_fingerprint": identity["weights_fingerprint"]},
                       f"target {target!r} (another model's features)")
        check_manifest(path, manifest, {"tokenizer.fingerprint": tokenizer_fingerprint(self.tokenizer)},
                       f"tokenizer and chat template of {self.tokenizer_source!r}")
        check_manifest(path, manifest, {
            "data.source": self.data, "data.max_length": self.max_length, "data.long_samples": self.long_samples,
            "data.on_bad_sample": self.on_bad_sample,
            "data.split": {"seed": self.seed, "val_fraction": self.val_fraction,
                           "max_train_samples": self.max_train_samples, "max_val_samples": self.max_val_samples},
            "storage.dtype": self.storage_dtype, "storage.positions": self.positions,
        }, "data settings")
        if requirements is not None:
            self.check_requirements(manifest, path, requirements)

    def check_requirements(self, manifest: dict, path: Path, requirements: DataRequirements) -> None:
        """Refuse a cache without the model's aux layers or head positions, or a model whose target trains."""
        aux = requirements.aux_layers
        if aux != "none":
            from spec_lightning.targets import default_aux_layer_ids

            want = default_aux_layer_ids(int(manifest["target"]["num_hidden_layers"])) if aux == "default" else list(aux)
            check_manifest(path, manifest, {"aux_layer_ids": want}, "model's aux layers (model.init_args.aux_layer_ids)")
        if requirements.trains_target:
            raise FeatureCacheError(f"feature cache {path}: the model trains the target, whose features change every "
                                    "step; offline caches serve models whose target stays frozen")
        heads = requirements.num_heads
        limit = manifest["storage"].get("max_medusa_heads")
        if heads is not None and manifest["storage"]["positions"] == "loss" and int(heads) > int(limit):
            raise FeatureCacheError(f"feature cache {path} keeps the final hidden states heads read for up to "
                                    f"{limit} heads (storage.max_medusa_heads); the model has num_heads={heads}: "
                                    "rebuild with max_medusa_heads >= num_heads")
        written, wanted = manifest["target"].get("dtype"), dtype_name(self.target_dtype(requirements))
        if written != wanted:
            rank_zero_warn(f"feature cache {path} was written with the target in {written}; the model's target_dtype "
                           f"is {wanted} (features differ by that rounding)")

    def verify_shards(self, cache_dir: Path, manifest: dict) -> None:
        hash_content = self.verify == "full"
        shards = manifest["shards"]
        with ThreadPoolExecutor(max_workers=max(1, min(4, len(shards)))) as pool:
            list(pool.map(lambda s: check_shard_file(cache_dir / SHARD_DIR / s["file"], s, hash_content), shards))

    # --- Lightning hooks ----------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Nothing to tokenise: the cache holds the tokens (``python cli.py cache`` builds it)."""

    def setup(self, stage: str | None = None) -> None:
        """Read and check the cache the linked model's requirements pick (or ``cache_dir``); hand back on the link the
        training tokens and that batches carry the target's features. With neither, outside training (``evaluate``'s
        held-out prompts): the tokenised split, identical rows."""
        requirements = self.requirements()
        if requirements is None and self.trainer is not None:
            raise FeatureCacheError("FeatureCacheDataModule is training with no model linked, so the cache's target, "
                                    "dtype and aux layers are unknown: build it with link=module.data_link (the CLI "
                                    "links them)")
        if requirements is None and self.cache_dir_setting is None:
            super().setup(stage)
            return
        if self.manifest is None:
            self.load_cache(requirements)
        if self.link is not None:
            self.link.provide(training_tokens=self.training_tokens(), validation_tokens=self.validation_tokens(),
                              target_features=True)

    def load_cache(self, requirements: DataRequirements | None) -> None:
        cache_dir = self.cache_directory(requirements)
        manifest = load_manifest(cache_dir)
        self.check_manifest(manifest, cache_dir / MANIFEST_FILE, requirements)
        self.verify_shards(cache_dir, manifest)
        if self.feature_dtype is not None:
            dtype = getattr(torch, self.feature_dtype)
        else:
            dtype = self.target_dtype(requirements) if requirements is not None else torch.float32
        with_aux = requirements is None or requirements.aux_layers != "none"
        first_use = self.verify == "first_use"
        self.train_dataset = CachedFeatureDataset(cache_dir, manifest, "train", dtype, with_aux, first_use)
        self.val_dataset = CachedFeatureDataset(cache_dir, manifest, "val", dtype, with_aux, first_use)
        self.resolved_cache_dir, self.manifest = cache_dir, manifest
        log.info("feature cache %s: %d train / %d val samples", cache_dir, len(self.train_dataset),
                 len(self.val_dataset))

    @property
    def fingerprint(self) -> str:
        """The tokenised data's identity, as recorded by the writer (the online ChatDataModule's fingerprint)."""
        if self.manifest is None:
            return super().fingerprint
        return self.manifest["data"]["fingerprint"]

    @property
    def pad_id(self) -> int:
        if self.manifest is None:
            return super().pad_id
        return int(self.manifest["tokenizer"]["pad_id"])

    def training_tokens(self) -> TokenRows:
        """The cached training split's token rows (only the token columns are read) under the online
        ChatDataModule's identity (same rows, so the same draft vocabulary and its cache entry)."""
        train = self.train_dataset
        if not isinstance(train, CachedFeatureDataset):
            return super().training_tokens()
        return TokenRows(read_rows=train.token_rows, fingerprint=f"{self.fingerprint}|{self.split_fingerprint}")

    def validation_tokens(self) -> TokenRows:
        val = self.val_dataset
        if not isinstance(val, CachedFeatureDataset):
            return super().validation_tokens()
        return TokenRows(read_rows=val.token_rows, fingerprint=f"{self.fingerprint}|{self.split_fingerprint}|val")

    def _loader(self, dataset, shuffle: bool) -> DataLoader:
        if not isinstance(dataset, CachedFeatureDataset):
            return super()._loader(dataset, shuffle)
        kwargs = {"batch_size": self.batch_size, "num_workers": self.num_workers,
                  "collate_fn": partial(collate_features, pad_id=self.pad_id)}
        if shuffle and self.pack:
            dataset = PackedFeatureDataset(dataset, self.max_length, self.seed)
            kwargs["collate_fn"] = partial(collate_packed_features, pad_id=self.pad_id, length=self.max_length)
        if not shuffle:
            return DataLoader(dataset, shuffle=False, **kwargs)
        trainer = self.trainer
        shard = (trainer.distributed_sampler_kwargs if trainer is not None else None) or {}
        sampler = EpochSampler(dataset, num_replicas=shard.get("num_replicas", 1), rank=shard.get("rank", 0),
                               shuffle=True, seed=self.seed)
        return ResumableDataLoader(dataset, sampler=sampler, **kwargs)

    def write_cache(self, requirements: DataRequirements | None = None, **writer_options) -> dict:
        """Build this datamodule's cache for ``requirements`` (default: the linked model's; ``FeatureCacheWriter``
        options: ``writer_index``, ``num_writers``, ``device``, ``batch_tokens``, ``shard_size_mb``, ``overwrite``,
        ``load_model``, ...)."""
        from spec_lightning.datamodules.feature_cache.writer import write_feature_cache

        writer_options.setdefault("allow_other_target", self.allow_other_target)
        return write_feature_cache(self.cache_spec(requirements), self.cache_directory(requirements), **writer_options)
