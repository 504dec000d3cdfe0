"""The one wrapper around the target HF causal LM: feature capture for training, a cached step for decoding.

* :meth:`FrozenTarget.forward` (training, under ``no_grad``): one base-model pass over ``[B, T]`` tokens returning
  the aux hidden states of the requested decoder layers (forward hooks, so other layers' states are never kept) and
  the final post-norm hidden state. Packed rows (several documents per row) pass ``position_ids`` that restart per
  document and no ``attention_mask``: transformers then masks attention per document.
* :meth:`FrozenTarget.logits`: the model's REAL output distribution from final hidden states — ``lm_head`` plus the
  family's post-processing (softcap, logit scaling; ``targets.layout.output_logits``), checked once against the
  model's own forward when the wrapper is built. Teachers and decoders both call it.
* :meth:`FrozenTarget.step` (decoding, batch 1): ``n`` new tokens after a KV-cached prefix, optionally a draft tree
  under a tree attention mask that also respects sliding windows, so a whole tree is verified in one pass;
  :func:`keep_cache_positions` then keeps only the accepted path's KV entries.

Decoding uses a full (non-sliding) ``DynamicCache``: rejected draft tokens can always be dropped from it, and the
window is applied by the attention mask (transformers' own masks for chains, :meth:`FrozenTarget.tree_masks` for
trees), which makes sliding-window targets lossless past the window.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from spec_lightning.targets import layout

FULL, SLIDING = "full_attention", "sliding_attention"  # transformers' layer-type names (mask dict keys)


@dataclass
class TargetFeatures:
    """What one frozen target forward yields.

    aux_hidden: ``[B, T, len(aux_layer_ids) * H]`` outputs of the requested decoder layers, concatenated
        in the requested order, or ``None`` when no aux layers were requested.
    final_hidden: ``[B, T, H]`` post-norm hidden state (the lm_head input).
    logits: ``[B, T, V]`` float32 real logits when requested (small inputs only), else ``None``.
    """

    aux_hidden: Tensor | None
    final_hidden: Tensor
    logits: Tensor | None = None


@dataclass
class TargetStep:
    """Target features of the ``n`` tokens of one decode step (batch size 1, batch dim dropped).

    hidden: ``[n, H]`` final post-norm hidden states (the lm_head input; Medusa's features).
    aux: ``[n, len(aux_layer_ids) * H]`` outputs of the aux decoder layers (EAGLE-3's features) or ``None``.
    """

    hidden: Tensor
    aux: Tensor | None

    def select(self, rows: Tensor) -> TargetStep:
        return TargetStep(self.hidden.index_select(0, rows), None if self.aux is None else self.aux.index_select(0, rows))


def cache_keyword(module: nn.Module) -> str:
    """``"cache"`` (newer transformers) or ``"past_key_values"``, from the base model's forward signature."""
    params = inspect.signature(module.forward).parameters
    for name in ("past_key_values", "cache"):
        if name in params:
            return name
    raise ValueError(f"{type(module).__name__}.forward takes neither 'past_key_values' nor 'cache'; cannot decode "
                     "with a KV cache")


def cache_length(cache) -> int:
    return int(cache.get_seq_length())


def keep_cache_positions(cache, keep: Tensor) -> None:
    """Keep only the sequence positions ``keep`` (1D long, increasing) of every layer of a ``DynamicCache``.

    A prefix (a chain's accepted tokens) is kept by slicing, without copying the cache.
    """
    n = int(keep.numel())
    prefix = n > 0 and int(keep[0]) == 0 and int(keep[-1]) == n - 1
    for layer in cache.layers:
        if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
            continue
        if prefix:
            layer.keys, layer.values = layer.keys[..., :n, :], layer.values[..., :n, :]
            continue
        idx = keep.to(layer.keys.device)
        layer.keys = layer.keys.index_select(-2, idx)
        layer.values = layer.values.index_select(-2, idx)


class FrozenTarget(nn.Module):
    """A target HF causal LM, frozen and in eval mode, with one capture forward and one decode step.

    Args:
        model: any transformers causal LM (Llama, Qwen, Mistral, Gemma, Phi, GPT-NeoX, GPT-2, Granite, Cohere, a
            multimodal model's text decoder, ...; see ``targets.layout``).
        freeze: make it frozen (``requires_grad_(False)``, always ``eval()``). ``False`` wraps a model that is trained
            elsewhere (Medusa-2's jointly trained base) for decoding only.
        check_logits: verify once (an 8-token forward) that :meth:`logits` reproduces the model's own logits.
    """

    def __init__(self, model: nn.Module, freeze: bool = True, check_logits: bool = True) -> None:
        super().__init__()
        self.model = model
        self.frozen = freeze
        if freeze:
            self.model.requires_grad_(False)
            self.eval()  # the wrapper too, so the model summary shows the target as a whole in eval mode
        self.__dict__["_layers"] = list(layout.decoder_layers(model))  # a plain list: not registered twice
        self.__dict__["base"] = layout.base_model(model)  # a submodule of ``model`` (not registered twice either)
        self.windows = layout.sliding_window_layers(model.config)
        self._cache_kw = cache_keyword(self.base)
        if check_logits:
            layout.check_output_logits(model)

    def train(self, mode: bool = True) -> FrozenTarget:  # a frozen target is never put in train mode
        return super().train(mode and not self.frozen)

    # --- parts ------------------------------------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def text_config(self):
        return layout.text_config(self.model.config)

    @property
    def layers(self) -> list[nn.Module]:
        """The decoder blocks in order (aux features are the outputs of these)."""
        return self._layers

    @property
    def embed_tokens(self) -> nn.Module:
        return self.model.get_input_embeddings()

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    @property
    def final_norm(self) -> nn.Module | None:
        return layout.final_norm(self.model)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def max_positions(self) -> int | None:
        return getattr(self.text_config, "max_position_embeddings", None)

    def check_aux_layer_ids(self, aux_layer_ids: Sequence[int]) -> None:
        n = len(self.layers)
        for i in aux_layer_ids:
            if not 0 <= i < n - 1:
                raise ValueError(f"aux layer id {i} out of range: must be in [0, {n - 2}] (never the last layer)")

    # --- running ----------------------------------------------------------------------------------------------
    def _run(self, aux_layer_ids: Sequence[int], **kwargs) -> tuple[Tensor, Tensor | None]:
        """The base model forward with hooks on the aux layers: ``(last_hidden_state, aux or None)``."""
        self.check_aux_layer_ids(aux_layer_ids)
        layers = self.layers
        captured: dict[int, Tensor] = {}

        def hook(layer_id: int):
            def fn(_module, _inputs, output):
                captured[layer_id] = output[0] if isinstance(output, tuple) else output

            return fn

        handles = [layers[i].register_forward_hook(hook(i)) for i in dict.fromkeys(aux_layer_ids)]
        try:
            out = self.base(**kwargs)
        finally:
            for h in handles:
                h.remove()
        aux = torch.cat([captured[i] for i in aux_layer_ids], dim=-1) if aux_layer_ids else None
        return out.last_hidden_state, aux

    @torch.no_grad()
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                aux_layer_ids: Sequence[int] = (), return_logits: bool = False,
                position_ids: Tensor | None = None) -> TargetFeatures:
        """Training capture over ``[B, T]`` tokens (see module docstring)."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        hidden, aux = self._run(tuple(aux_layer_ids), **kwargs)
        logits = self.logits(hidden) if return_logits else None
        return TargetFeatures(aux_hidden=aux, final_hidden=hidden, logits=logits)

    def logits(self, hidden: Tensor) -> Tensor:
        """float32 real output logits ``[..., V]`` of final post-norm hidden states ``[..., H]``."""
        with torch.no_grad() if self.frozen else torch.enable_grad():
            return layout.output_logits(self.model, hidden)

    # --- decoding ---------------------------------------------------------------------------------------------
    def new_cache(self):
        """An empty full-attention ``DynamicCache`` (sliding windows are applied by the masks, see module doc)."""
        from transformers import DynamicCache

        return DynamicCache()

    def tree_masks(self, tree_mask: Tensor, past: int, positions: Tensor, visible: Tensor | None = None,
                   cached_positions: Tensor | None = None):
        """Additive 4D masks for ``n`` new tokens after ``past`` cached ones: ``tree_mask`` among the new tokens,
        the cached ones (all, or ``visible`` bool ``[n, past]``), and each layer type's window by position
        (cached slot i sits at position i unless ``cached_positions`` says otherwise). One tensor when every layer
        has the same window, else a ``{"full_attention", "sliding_attention"}`` dict (transformers' per-layer-type
        masks)."""
        device, dtype = self.device, self.dtype
        n = tree_mask.shape[0]
        allowed = torch.ones(n, past + n, dtype=torch.bool, device=device)
        allowed[:, past:] = tree_mask.to(device)
        if visible is not None:
            allowed[:, :past] = visible.to(device)
        old = torch.arange(past, device=device) if cached_positions is None else cached_positions.to(device)
        key_pos = torch.cat([old, positions.to(device)])
        masks = {}
        for window in dict.fromkeys(self.windows):
            seen = allowed & layout.window_allows(positions.to(device)[:, None], key_pos[None, :], window)
            mask = torch.zeros(1, 1, n, past + n, dtype=dtype, device=device)
            masks[window] = mask.masked_fill_(~seen[None, None], torch.finfo(dtype).min)
        if len(masks) == 1:
            return next(iter(masks.values()))
        sliding = [w for w in masks if w is not None]
        if len(sliding) > 1:
            raise ValueError(f"{type(self.model).__name__} has several sliding windows {sliding}; tree verification "
                             "supports one window size per model")
        return {FULL: masks.get(None), SLIDING: masks[sliding[0]]}

    @torch.no_grad()
    def step(self, input_ids: Tensor, cache, tree_mask: Tensor | None = None, depths: Tensor | None = None,
             aux_layer_ids: Sequence[int] = (), visible: Tensor | None = None, positions: Tensor | None = None,
             cached_positions: Tensor | None = None) -> TargetStep:
        """Run ``n`` new tokens after the ``cache``d prefix (which grows by ``n``).

        input_ids: ``[n]`` long. tree_mask: bool ``[n, n]`` (row i may see column j) or ``None`` for causal order.
        depths: ``[n]`` position offsets of the tokens from the prefix end (tree depth; default ``0..n-1``).
        visible / positions / cached_positions: for a draft model expanding a tree in its own cache (which then
        holds other branches): which cached slots each new token sees, the new tokens' absolute positions and the
        cached slots' positions (see :meth:`tree_masks`).
        """
        n = input_ids.shape[0]
        past = cache_length(cache)
        device = self.device
        if positions is None:
            offsets = torch.arange(n, device=device) if depths is None else depths.to(device)
            positions = past + offsets
        positions = positions.to(device)
        if tree_mask is None and visible is not None:
            tree_mask = torch.ones(n, n, dtype=torch.bool).tril()
        attention_mask = None if tree_mask is None else self.tree_masks(tree_mask, past, positions, visible,
                                                                        cached_positions)
        hidden, aux = self._run(tuple(aux_layer_ids), input_ids=input_ids[None].to(device),
                                attention_mask=attention_mask, position_ids=positions[None], use_cache=True,
                                **{self._cache_kw: cache})
        return TargetStep(hidden=hidden[0], aux=None if aux is None else aux[0])
