"""What the drafts that attend like the target (EAGLE-3, DFlash) copy from it, and the checks of that shape.

A draft of this kind has the target's hidden size, attention shape, norm epsilon and RoPE, read from any family's
config through ``targets.layout``. :func:`target_shape` is that reading, once; :func:`check_shape` the checks every
such config makes on it. Each draft's config adds what is its own (draft vocabulary, aux/target layers, block size).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# the target shape of the few-thousand-parameter drafts of unit tests (fits ``tests/conftest.py::make_tiny_llama``)
TINY_SHAPE: dict[str, Any] = {
    "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
    "vocab_size": 128, "target_num_hidden_layers": 6, "rms_norm_eps": 1e-6, "rope_theta": 50000.0,
    "max_position_embeddings": 256,
}
SHAPE_INTS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
              "vocab_size", "target_num_hidden_layers", "max_position_embeddings")


@dataclass
class TargetShapedConfig:
    """Base of the config dataclasses of target-shaped drafts (:class:`~spec_lightning.drafts.eagle3.Eagle3Config`,
    :class:`~spec_lightning.drafts.dflash.DFlashConfig`): their first six fields, the aux feature count and a
    plain-dict form. Each subclass documents the fields and adds its own after them."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int

    def feature_layer_ids(self) -> list[int]:  # pragma: no cover - abstract
        """The target layers whose outputs the draft reads."""
        raise NotImplementedError

    @property
    def num_aux(self) -> int:
        return len(self.feature_layer_ids())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def target_shape(hf_config: Any) -> dict[str, Any]:
    """The fields of :data:`SHAPE_INTS` plus ``rms_norm_eps``, ``rope_theta`` and ``rope_scaling`` of a target
    config of any family (composite configs: the text decoder's)."""
    from spec_lightning.targets.layout import draft_rope_settings, norm_epsilon, text_config

    cfg = text_config(hf_config)
    n_layers = int(cfg.num_hidden_layers)
    theta, scaling = draft_rope_settings(cfg)  # first: a config without RoPE settings is refused naming them
    hidden, heads = int(cfg.hidden_size), int(cfg.num_attention_heads)
    intermediate = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * hidden
    return {
        "hidden_size": hidden, "intermediate_size": int(intermediate), "num_attention_heads": heads,
        "num_key_value_heads": int(getattr(cfg, "num_key_value_heads", None) or heads),
        "head_dim": int(getattr(cfg, "head_dim", None) or hidden // heads), "vocab_size": int(cfg.vocab_size),
        "target_num_hidden_layers": n_layers, "rms_norm_eps": norm_epsilon(cfg),
        "rope_theta": theta, "rope_scaling": scaling,
        "max_position_embeddings": int(getattr(cfg, "max_position_embeddings", None) or 2048),
    }


def check_shape(config: Any, more_ints: tuple[str, ...] = ()) -> None:
    """Refuse a non-positive size in :data:`SHAPE_INTS` and ``more_ints``, heads that are not a multiple of the KV
    heads, an odd head_dim, a non-positive RoPE theta, a RoPE scaling without its type and a non-SiLU MLP, naming
    the field."""
    name = type(config).__name__
    for field in SHAPE_INTS + more_ints:
        value = getattr(config, field)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}.{field} must be a positive int, got {value!r}")
    if config.num_attention_heads % config.num_key_value_heads:
        raise ValueError(f"num_attention_heads ({config.num_attention_heads}) must be a multiple of "
                         f"num_key_value_heads ({config.num_key_value_heads})")
    if config.head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {config.head_dim}")
    if config.rope_theta is None or config.rope_theta <= 0:
        raise ValueError(f"rope_theta must be positive, got {config.rope_theta!r}")
    if config.rope_scaling is not None:
        rope_type = config.rope_scaling.get("rope_type", config.rope_scaling.get("type"))
        if rope_type is None:
            raise ValueError(f"rope_scaling needs a 'rope_type', got {config.rope_scaling}")
    if config.hidden_act != "silu":
        raise ValueError(f"{name}.hidden_act must be 'silu' (the draft's MLP is a SiLU MLP, as the engines serve it), "
                         f"got {config.hidden_act!r}")

def check_layer_ids(ids: list[int], num_target_layers: int, what: str) -> list[int]:
    """``ids`` as ints, each a decoder layer of the target other than its last (whose output is the final hidden
    state, read anyway)."""
    if not ids:
        raise ValueError(f"{what}s must name at least one target layer")
    ids = [int(i) for i in ids]
    for i in ids:
        if not 0 <= i < num_target_layers - 1:
            raise ValueError(f"{what} {i} must be in [0, {num_target_layers - 2}] (a decoder layer of the target, "
                             "never its last)")
    return ids
