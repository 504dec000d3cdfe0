"""The frozen target: loading it from a source name (``loading``), finding its parts in any HF layout (``layout``),
and the one wrapper that runs it for training capture and for decoding (``frozen``)."""

from spec_lightning.targets.frozen import FrozenTarget, TargetFeatures, TargetStep, keep_cache_positions
from spec_lightning.targets.loading import (
    BUILTIN_TARGETS,
    cache_root,
    convert_gguf,
    default_aux_layer_ids,
    load_target_model,
    load_tokenizer,
    resolve_target,
)

__all__ = [
    "BUILTIN_TARGETS", "FrozenTarget", "TargetFeatures", "TargetStep", "cache_root", "convert_gguf",
    "default_aux_layer_ids", "keep_cache_positions", "load_target_model", "load_tokenizer", "resolve_target",
]
