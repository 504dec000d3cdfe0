"""The frozen pieces of a target that offline training needs: embeddings, final norm and lm_head, nothing else.

Offline (feature-cache) training reads the target's hidden states from disk; its losses still need the target's
input embedding (the EAGLE-3 draft copies it), its lm_head and post-processing (teacher logits, Medusa heads' init)
and its final norm (optional draft-norm init). :func:`load_target_head` builds the model on the meta device from its
config only to learn the parameter names of those modules, reads just those tensors from the checkpoint files
(``targets.weight_files``) and materialises just those modules. The decoder weights are never read.

:class:`TargetHead` offers the attributes the modules use from :class:`~spec_lightning.targets.FrozenTarget`
(``config``, ``text_config``, ``embed_tokens``, ``lm_head``, ``final_norm``, ``logits``, ``dtype``, ``device``);
running the target (``forward``, ``step``, ``model``, ``layers``) raises :class:`TargetNotLoadedError`.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor, nn

from spec_lightning.targets import layout
from spec_lightning.targets.weight_files import model_directory, read_tensors, weight_map

NOT_LOADED = ("offline: the target's decoder is not loaded (training reads its cached features); measure acceptance "
              "with `python cli.py evaluate` (it loads the whole target) instead of running the target here")


class TargetNotLoadedError(RuntimeError):
    """Something asked an offline target head to run the target's decoder."""


class TargetHead(nn.Module):
    """A target's embeddings, final norm and lm_head (frozen, eval mode), for offline training.

    Args:
        config: the target's HF config.
        model_class: the target's causal-LM class (its ``forward`` says which logit post-processing applies).
        embed_tokens: the input embedding.
        lm_head: the output embedding (the same parameter as ``embed_tokens``' when tied).
        final_norm: the decoder's final norm, or None for families without one.
        source: the target source it was read from (for messages).
    """

    def __init__(self, config, model_class: type, embed_tokens: nn.Module, lm_head: nn.Module,
                 final_norm: nn.Module | None, source: str = "") -> None:
        super().__init__()
        self.embed = embed_tokens
        self.head = lm_head
        self.norm = final_norm
        self.__dict__["_config"] = config
        self.source = source
        self._transform = layout.logits_transform(config, model_class)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> TargetHead:  # frozen: always eval
        return super().train(False)

    # --- what the modules use (FrozenTarget's interface) ---------------------------------------------------------
    @property
    def config(self):
        return self._config

    @property
    def text_config(self):
        return layout.text_config(self._config)

    @property
    def embed_tokens(self) -> nn.Module:
        return self.embed

    @property
    def lm_head(self) -> nn.Module:
        return self.head

    @property
    def final_norm(self) -> nn.Module | None:
        return self.norm

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.head.weight.dtype

    @property
    def max_positions(self) -> int | None:
        return getattr(self.text_config, "max_position_embeddings", None)

    def logits(self, hidden: Tensor) -> Tensor:
        """float32 real output logits ``[..., V]`` of final post-norm hidden states ``[..., H]`` (as
        ``layout.output_logits``: the head in its dtype, post-processing in float32)."""
        with torch.no_grad():
            out = self.head(hidden).float()
            return out if self._transform is None else self._transform(out)

    # --- what an offline head cannot do ----------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        raise TargetNotLoadedError(NOT_LOADED)

    def step(self, *args, **kwargs):
        raise TargetNotLoadedError(NOT_LOADED)

    @property
    def model(self):
        raise TargetNotLoadedError(NOT_LOADED)

    @property
    def layers(self):
        raise TargetNotLoadedError(NOT_LOADED)


def _renamings(model: nn.Module) -> list[tuple[str, str]]:
    """transformers' checkpoint-key renamings for this model (regex source -> target), e.g. GPT-NeoX's
    ``embed_out.`` -> ``lm_head.``; empty where the installed transformers has none."""
    try:
        from transformers.conversion_mapping import WeightRenaming, get_model_conversion_mapping

        mapping = get_model_conversion_mapping(model)
    except Exception:  # noqa: BLE001 - older transformers or a model without conversions: keys are the names
        return []
    out = []
    for rule in mapping or []:
        if not isinstance(rule, WeightRenaming):
            continue
        sources = list(rule.source_patterns) if isinstance(rule.source_patterns, (list, tuple)) else [rule.source_patterns]
        targets = list(rule.target_patterns) if isinstance(rule.target_patterns, (list, tuple)) else [rule.target_patterns]
        out += [(src, targets[i] if len(targets) == len(sources) else targets[0]) for i, src in enumerate(sources)]
    return out


def _model_names(keys: set[str], renamings: list[tuple[str, str]]) -> dict[str, str]:
    """``{model parameter name: checkpoint key}`` after transformers' renamings."""
    out = {}
    for key in keys:
        name = key
        for src, tgt in renamings:
            name = re.sub(src, tgt, name)
        out.setdefault(name, key)
    return out


def _checkpoint_key(name: str, keys: set[str], renamed: dict[str, str], what: str, directory: Path) -> str | None:
    """The checkpoint key of model parameter ``name``: itself, or the key transformers renames to it, else the unique
    key sharing its longest suffix of at least two components (checkpoints saved under another prefix)."""
    if name in keys:
        return name
    if name in renamed:
        return renamed[name]
    parts = name.split(".")
    for n in range(len(parts) - 1, 1, -1):
        suffix = "." + ".".join(parts[-n:])
        found = [k for k in keys if k.endswith(suffix) or k == suffix[1:]]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ValueError(f"{directory}: several checkpoint tensors match the {what} parameter {name!r}: "
                             f"{sorted(found)[:4]}")
    return None


def _tied(config) -> bool:
    return bool(getattr(config, "tie_word_embeddings", False) or
                getattr(layout.text_config(config), "tie_word_embeddings", False))


def load_target_head(source: str, dtype: torch.dtype | str = torch.float32) -> TargetHead:
    """Load only the embeddings, final norm and lm_head of the target ``source`` (see module docstring)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    directory = model_directory(source)
    config = AutoConfig.from_pretrained(str(directory))
    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (e.g. embed scales) real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    embed, head, norm = model.get_input_embeddings(), model.get_output_embeddings(), layout.final_norm(model)
    if head is None:
        raise ValueError(f"{source}: {type(model).__name__} has no output embeddings (lm_head); not a causal LM")
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    files = weight_map(directory)
    keys = set(files)
    renamed = _model_names(keys, _renamings(model))
    tied = _tied(config)
    wanted: dict[str, tuple[nn.Module, str]] = {}  # checkpoint key -> (module, parameter name in it)
    modules = [("embedding", embed), ("final norm", norm)] + ([] if tied else [("lm_head", head)])
    for what, module in modules:
        if module is None:
            continue
        for pname, param in module.named_parameters(recurse=True):
            key = _checkpoint_key(names[id(param)], keys, renamed, what, directory)
            if key is None:
                raise ValueError(f"{directory}: no checkpoint tensor for the {what} parameter {names[id(param)]!r} "
                                 f"(checked {len(keys)} tensor names)")
            wanted[key] = (module, pname)
    tensors = read_tensors(files, list(wanted))
    for key, (module, pname) in wanted.items():
        owner_name, _, leaf = pname.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        expected = getattr(owner, leaf).shape
        if tensors[key].shape != expected:
            raise ValueError(f"{directory}: checkpoint tensor {key!r} has shape {tuple(tensors[key].shape)}, the "
                             f"config expects {tuple(expected)}")
        setattr(owner, leaf, nn.Parameter(tensors[key].to(dtype), requires_grad=False))
    if tied:
        head.weight = embed.weight
    for what, module in (("embedding", embed), ("lm_head", head), ("final norm", norm)):
        if module is not None and any(p.is_meta for p in module.parameters()):
            raise ValueError(f"{directory}: the {what} was not fully loaded from the checkpoint")
    return TargetHead(config, type(model), embed, head, norm, source=source)
