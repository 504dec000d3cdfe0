"""The frozen target at decode time: an HF causal LM with a KV cache, tree attention and aux-feature capture.

One :meth:`TargetRunner.forward` call runs the decoder on ``n`` new tokens on top of the cached prefix. With a
``tree_mask`` the new tokens form a draft tree: each token sees the cached prefix, its ancestors and itself
(a 4D additive mask handed to the HF model, positions = prefix length + depth), so a whole tree is verified in
one target pass. :func:`keep_cache_positions` then keeps only the accepted path's KV entries (index-select per
layer), so no second target pass is needed.

The cache is a transformers ``DynamicCache``; the forward keyword is ``cache`` in transformers >= 5.2x and
``past_key_values`` before, detected from the decoder's signature.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from spec_lightning.speculate.skinny import plain_linears, skinny_linears


@dataclass
class TargetStep:
    """Target features of the ``n`` tokens of one forward (batch size 1, batch dim dropped).

    hidden: ``[n, H]`` final post-norm hidden states (the lm_head input; Medusa's features).
    aux: ``[n, len(aux_layer_ids) * H]`` outputs of the aux decoder layers (EAGLE-3's features) or ``None``.
    """

    hidden: Tensor
    aux: Tensor | None

    def select(self, rows: Tensor) -> TargetStep:
        return TargetStep(self.hidden.index_select(0, rows), None if self.aux is None else self.aux.index_select(0, rows))


def cache_keyword(decoder: nn.Module) -> str:
    """``"cache"`` (transformers >= 5.2x) or ``"past_key_values"`` (earlier), from the forward signature."""
    params = inspect.signature(decoder.forward).parameters
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    raise ValueError(f"{type(decoder).__name__}.forward takes neither 'cache' nor 'past_key_values'; "
                     "cannot run it with a KV cache")


def cache_length(cache) -> int:
    return int(cache.get_seq_length())


def keep_cache_positions(cache, keep: Tensor) -> None:
    """Keep only the sequence positions ``keep`` (1D long, increasing) of every layer of a ``DynamicCache``.

    A prefix (a chain's accepted tokens) is kept by slicing, without copying the cache.
    """
    n = int(keep.numel())
    prefix = n > 0 and int(keep[0]) == 0 and int(keep[-1]) == n - 1
    for i, layer in enumerate(cache.layers):
        if getattr(layer, "is_sliding", False):
            raise ValueError(f"cache layer {i} is a sliding-window layer; speculative decoding here needs full "
                             "attention layers")
        if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
            continue
        if prefix:
            layer.keys, layer.values = layer.keys[..., :n, :], layer.values[..., :n, :]
            continue
        idx = keep.to(layer.keys.device)
        layer.keys = layer.keys.index_select(-2, idx)
        layer.values = layer.values.index_select(-2, idx)


class TargetRunner:
    """Batch-size-1 incremental forward of a frozen HF causal LM (or a :class:`~spec_lightning.targets.FrozenTarget`).

    Args:
        model: the causal LM (``get_decoder()``/``get_output_embeddings()``), or a FrozenTarget wrapping one.
        aux_layer_ids: decoder layers whose outputs :meth:`forward` returns as ``aux`` (0-based layer ids,
            the output of layer i, as ``FrozenTarget`` and SPEC §3.1).
        skinny_gemm: compute the few-row products of a decode or verification step as ``W @ x^T``
            (:mod:`spec_lightning.speculate.skinny`); ``None``: on for an fp32 target on the CPU.
    """

    def __init__(self, model: nn.Module, aux_layer_ids: Sequence[int] = (), skinny_gemm: bool | None = None) -> None:
        from spec_lightning.targets import FrozenTarget

        if isinstance(model, FrozenTarget):
            model = model.model
        self.model = model
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        self.layers = self.decoder.layers
        n = len(self.layers)
        self.aux_layer_ids = tuple(int(i) for i in aux_layer_ids)
        for i in self.aux_layer_ids:
            if not 0 <= i < n - 1:
                raise ValueError(f"aux layer id {i} out of range: must be in [0, {n - 2}] (never the last layer)")
        self._cache_kw = cache_keyword(self.decoder)
        # few-row products as W @ x^T (see speculate/skinny.py): on by default for an fp32 target on the CPU
        self.skinny_gemm = (self.device.type == "cpu" and self.dtype == torch.float32) if skinny_gemm is None \
            else bool(skinny_gemm)
        self._linears = plain_linears(model) if self.skinny_gemm else []
        self._head_linears = [m for m in self._linears if m is self.lm_head]  # logits() needs only the lm_head

    def _products(self, linears: list[nn.Linear]):
        return skinny_linears(linears) if linears else contextlib.nullcontext()

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def max_positions(self) -> int | None:
        cfg = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        return getattr(cfg, "max_position_embeddings", None)

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.config)

    @torch.no_grad()
    def logits(self, hidden: Tensor) -> Tensor:
        """``[n, V]`` float32 logits of post-norm hidden states ``[n, H]``."""
        with self._products(self._head_linears):
            return self.lm_head(hidden).float()

    @torch.no_grad()
    def forward(self, input_ids: Tensor, cache, tree_mask: Tensor | None = None, depths: Tensor | None = None,
                capture_aux: bool = True) -> TargetStep:
        """Run ``n`` new tokens after the ``cache``d prefix (which grows by ``n``).

        input_ids: ``[n]`` long. tree_mask: bool ``[n, n]`` (row i may see column j) or ``None`` for causal order.
        depths: ``[n]`` position offsets of the tokens from the prefix end (tree depth; default ``0..n-1``).
        """
        n = input_ids.shape[0]
        past = cache_length(cache)
        device = self.device
        offsets = torch.arange(n, device=device) if depths is None else depths.to(device)
        position_ids = (past + offsets)[None]
        attention_mask = None
        if tree_mask is not None:
            allowed = torch.ones(n, past + n, dtype=torch.bool, device=device)
            allowed[:, past:] = tree_mask.to(device)
            # 4D additive mask: transformers hands a 4D mask to the attention kernel as is
            attention_mask = torch.zeros(1, 1, n, past + n, dtype=self.dtype, device=device)
            attention_mask.masked_fill_(~allowed[None, None], torch.finfo(self.dtype).min)
        captured: dict[int, Tensor] = {}

        def hook(layer_id: int):
            def fn(_module, _inputs, output):
                captured[layer_id] = output[0] if isinstance(output, tuple) else output

            return fn

        ids = self.aux_layer_ids if capture_aux else ()
        handles = [self.layers[i].register_forward_hook(hook(i)) for i in dict.fromkeys(ids)]
        try:
            with self._products(self._linears):
                out = self.decoder(input_ids=input_ids[None].to(device), attention_mask=attention_mask,
                                   position_ids=position_ids, use_cache=True, **{self._cache_kw: cache})
        finally:
            for h in handles:
                h.remove()
        aux = torch.cat([captured[i][0] for i in ids], dim=-1) if ids else None
        return TargetStep(hidden=out.last_hidden_state[0], aux=aux)
