"""Offline feature caches: the target's hidden states written once (``writer``), read as training batches
(``datamodule``); the on-disk format and which positions are stored are in ``format``."""

from spec_lightning.datamodules.feature_cache.datamodule import FeatureCacheDataModule
from spec_lightning.datamodules.feature_cache.format import FeatureCacheError
from spec_lightning.datamodules.feature_cache.spec import CacheSpec, load_manifest
from spec_lightning.datamodules.feature_cache.writer import FeatureCacheWriter, write_feature_cache

__all__ = ["CacheSpec", "FeatureCacheDataModule", "FeatureCacheError", "FeatureCacheWriter", "load_manifest",
           "write_feature_cache"]
