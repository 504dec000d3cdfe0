"""The one-way contract between a draft-training module and its data.

The module states what it needs (:class:`DataRequirements`: whose tokens and features, which of the target's layers,
how many positions ahead a head reads the final hidden state, whether the target itself trains). The CLI hands it to
the datamodule once, as the module's :class:`DataLink` (``link_arguments(..., apply_on="instantiate")`` in
``cli.py``; in Python ``ChatDataModule(..., link=module.data_link)``). The datamodule builds what is needed in
``prepare_data``/``setup`` and hands its products back on the same link (:meth:`DataLink.provide`): the training
split's tokens (a draft vocabulary is counted from them), the validation split's (held-out prompts for measuring
acceptance) and whether its batches carry the target's features.
Neither side reaches into the other through the Trainer, and nothing here names an algorithm.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from spec_lightning.precision import dtype_for_precision


def target_dtype_for(setting: str, precision: str | int | None = None) -> torch.dtype:
    """The frozen target's dtype: ``setting`` (a torch dtype name), or for ``"auto"`` the one ``precision`` implies
    (bf16 under bf16-mixed, fp32 otherwise; no trainer: fp32)."""
    if setting != "auto":
        return getattr(torch, setting)
    return dtype_for_precision(precision if precision is not None else "32-true")


@dataclass(frozen=True)
class DataRequirements:
    """What a module needs from its data.

    Args:
        target: the target source whose tokenizer, chat template and features the data must match.
        target_dtype: the dtype the target runs in (a torch dtype name), or ``"auto"``: the trainer's precision
            decides (:meth:`dtype`).
        aux_layers: the target decoder layers whose hidden states the module reads: ``"none"``, ``"default"`` (the
            layers ``targets.default_aux_layer_ids`` picks) or layer ids.
        num_heads: heads reading the final hidden state at positions t + 1 .. t + num_heads of each trainable token
            (``None``: none beyond the next position).
        trains_target: the target's weights train with the draft, so its features change every step and cannot
            come from a cache.
    """

    target: str
    target_dtype: str = "float32"
    aux_layers: str | tuple[int, ...] = "none"
    num_heads: int | None = None
    trains_target: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.aux_layers, str):
            if self.aux_layers not in ("none", "default"):
                raise ValueError(f"aux_layers must be 'none', 'default' or layer ids, got {self.aux_layers!r}")
        else:
            object.__setattr__(self, "aux_layers", tuple(int(i) for i in self.aux_layers))

    def dtype(self, precision: str | int | None = None) -> torch.dtype:
        """The target's dtype under a trainer ``precision`` (see :func:`target_dtype_for`)."""
        return target_dtype_for(self.target_dtype, precision)


@dataclass(frozen=True)
class TokenRows:
    """A split's token rows (``input_ids`` and ``loss_mask`` each) and the identity of those rows.

    Args:
        read_rows: returns the rows, read afresh at each call (only the tokens, never cached features).
        fingerprint: changes whenever the rows can change (data, tokenizer, template, length, split).
    """

    read_rows: Callable[[], Iterable[Mapping]]
    fingerprint: str


class DataLink:
    """The wire between one module and its datamodule: requirements one way, the data's products the other.

    Args:
        requirements: what the module needs (read by the datamodule).
    """

    def __init__(self, requirements: DataRequirements) -> None:
        self.requirements = requirements
        self.training_tokens: TokenRows | None = None
        self.validation_tokens: TokenRows | None = None
        self.target_features = False

    def provide(self, training_tokens: TokenRows | None = None, validation_tokens: TokenRows | None = None,
                target_features: bool = False) -> None:
        """Called by the datamodule in ``setup``: its training and validation tokens, and whether its batches carry
        the target's features (``final_hidden``/``aux_hidden``), so the module need not run the target."""
        self.training_tokens = training_tokens
        self.validation_tokens = validation_tokens
        self.target_features = target_features

    def __repr__(self) -> str:
        return f"DataLink({self.requirements!r})"
