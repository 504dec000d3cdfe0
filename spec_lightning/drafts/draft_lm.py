"""A standalone draft language model (DistillSpec-style): a few decoder layers of the target's own family.

The draft is a plain Hugging Face causal LM with the target's tokenizer and architecture class, its config the
target's with ``num_hidden_layers`` cut to ``num_layers`` (per-layer lists such as ``layer_types`` cut with it), and
its weights copied from the target: embeddings, the first ``num_layers`` decoder layers, the final norm and the
lm_head (Zhou et al., 2024, "DistillSpec", train a small model of the target's family on the target's
distributions). Being a plain HF model, it is served by engines as an ordinary draft model and decoded here through
the same wrapper as the target (:class:`~spec_lightning.targets.FrozenTarget`). No Lightning here.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from spec_lightning.targets.layout import text_config

# Config fields holding one entry per decoder layer, cut to the draft's layer count.
PER_LAYER_FIELDS = ("layer_types", "mlp_only_layers", "sliding_window_pattern_layers")


def draft_lm_config(target_config, num_layers: int):
    """The target's config with ``num_layers`` decoder layers (per-layer fields cut alike)."""
    if num_layers < 1:
        raise ValueError(f"a draft LM needs at least one decoder layer, got num_layers={num_layers}")
    config = copy.deepcopy(target_config)
    text = text_config(config)
    n = int(text.num_hidden_layers)
    if num_layers >= n:
        raise ValueError(f"num_layers={num_layers} must be smaller than the target's {n} layers (a draft is cheaper)")
    text.num_hidden_layers = num_layers
    for name in PER_LAYER_FIELDS:
        value = getattr(text, name, None)
        if isinstance(value, (list, tuple)) and len(value) == n:
            setattr(text, name, list(value)[:num_layers])
    if getattr(text, "max_window_layers", None) is not None:  # Qwen2: layers >= this use the window
        text.max_window_layers = min(int(text.max_window_layers), num_layers)
    return config


def draft_lm_from_target(target: nn.Module, num_layers: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A ``num_layers``-layer model of the target's class, initialised from the target's embeddings, first layers,
    final norm and lm_head (every draft tensor whose name and shape the target has; the rest keep their init)."""
    from transformers import AutoModelForCausalLM

    config = draft_lm_config(target.config, num_layers)
    config.architectures = [type(target).__name__]
    draft = AutoModelForCausalLM.from_config(config, dtype=dtype)
    draft.to(target.get_input_embeddings().weight.device)
    source = target.state_dict()
    own = draft.state_dict()
    copied = {k: source[k].to(dtype) for k, v in own.items() if k in source and source[k].shape == v.shape}
    missing = sorted(set(own) - set(copied))
    if any(".layers." not in k and "rotary" not in k and "inv_freq" not in k for k in missing):
        raise ValueError(f"cannot initialise a draft LM of {type(target).__name__} from the target: no match for "
                         f"{[k for k in missing if '.layers.' not in k][:5]}")
    draft.load_state_dict(copied, strict=False)
    if getattr(config, "tie_word_embeddings", False):
        draft.tie_weights()
    return draft.eval()
