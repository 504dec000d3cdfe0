"""Continuous batching for data generation: a finished row leaves the batch and a waiting prompt takes its place.

HF ``generate`` runs a left-padded batch until its longest answer ends, so every row that stopped early keeps
being computed: on SmolLM2's answers to the chitchat openers (mean 69 of up to 128 tokens) about half of all
decode rows were already finished. Here a row leaves the batch the step its answer ends, and waiting prompts are
prefilled (in one left-padded forward) and join the batch, so up to ``slots`` rows are always useful work.

How: every row keeps its own next position (``position_ids``) and a 2-D attention mask over the shared cache
columns; the cache is a transformers ``DynamicCache`` whose per-layer key/value tensors are edited between steps:
finished rows removed, newly prefilled rows appended (the shorter side left-padded with masked columns), leading
columns that no remaining row attends to dropped. Between those edits new tokens are written into spare columns of
preallocated buffers (``DynamicLayer`` concatenates, copying the whole cache for every token). Keys are cached after RoPE, so a row's keys carry their own
positions wherever their columns sit. Same numbers as a plain batched forward up to float summation order
(``tests/test_continuous_batching.py`` compares against one-prompt-at-a-time HF ``generate``).

The cache is a full-attention ``DynamicCache`` for every model (sliding windows are applied by transformers' masks,
by column, which equals by position here: a row's columns are contiguous and end at the last column). A model whose
cache holds other state (linear attention, recurrent layers) raises :class:`UnsupportedCache` and the caller falls
back to HF ``generate``.
"""

from __future__ import annotations

import functools
import inspect
from collections import deque
from collections.abc import Callable

import torch
import torch.nn.functional as F


class UnsupportedCache(NotImplementedError):
    """The model's KV cache has layers this scheduler cannot edit row by row."""


@functools.cache
def _growing_layer_class():
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """Stands in for a ``DynamicLayer`` after the prefill: new keys/values are written into spare columns of a
        preallocated buffer instead of concatenated (``DynamicLayer.update`` copies the whole cache every token: a third
        of a decode step at batch 32 on SmolLM2). ``keys`` / ``values`` are views of the filled columns."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, spare: int = 64) -> None:
            super().__init__()
            self.is_initialized = True
            self.device, self.dtype = keys.device, keys.dtype
            self._fill(keys, values, spare)

        def _fill(self, keys: torch.Tensor, values: torch.Tensor, spare: int) -> None:
            b, h, n, d = keys.shape
            self._k = keys.new_empty(b, h, n + spare, d)
            self._v = values.new_empty(b, h, n + spare, values.shape[-1])
            self._k[:, :, :n], self._v[:, :, :n] = keys, values
            self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            n, m = self.keys.shape[-2], key_states.shape[-2]
            if n + m > self._k.shape[-2]:
                self._fill(self.keys, self.values, spare=max(64, n))  # amortised doubling
            self._k[:, :, n:n + m], self._v[:, :, n:n + m] = key_states, value_states
            self.keys, self.values = self._k[:, :, :n + m], self._v[:, :, :n + m]
            return self.keys, self.values

    return GrowingLayer


Picker = Callable[[torch.Tensor], torch.Tensor]  # [rows, vocab] next-token logits -> [rows] token ids


def greedy_picker() -> Picker:
    return lambda logits: logits.argmax(-1)


def sampling_picker(temperature: float, top_p: float, seed: int) -> Picker:
    """Temperature + nucleus sampling with transformers' own logits warpers and a private, seeded RNG."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    rng = torch.Generator().manual_seed(seed)

    def pick(logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(warpers(None, logits.float()), dim=-1)
        return torch.multinomial(probs.cpu(), 1, generator=rng).squeeze(1).to(logits.device)

    return pick


class _Rows:
    """The running batch: cache, attention mask [B, L], next position [B], last sampled token [B], and per row the
    prompt index and the tokens generated so far."""

    def __init__(self) -> None:
        self.cache = None
        self.mask: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.last: torch.Tensor | None = None
        self.index: list[int] = []
        self.tokens: list[list[int]] = []

    def __len__(self) -> int:
        return len(self.index)

    def set_layers(self, keys_values) -> None:
        growing = _growing_layer_class()
        self.cache.layers[:] = [growing(k, v) for k, v in keys_values]

    def append(self, other: _Rows) -> None:
        """Add ``other``'s rows below these; the narrower cache is left-padded with masked zero columns."""
        if self.cache is None or not self.index:
            self.cache, self.mask, self.positions, self.last = other.cache, other.mask, other.positions, other.last
            self.index, self.tokens = list(other.index), [list(t) for t in other.tokens]
            return
        width = max(self.mask.shape[1], other.mask.shape[1])

        def left_pad(x: torch.Tensor, dim: int) -> torch.Tensor:
            missing = width - x.shape[dim]
            if missing == 0:
                return x
            pad = [0, 0] * (x.dim() - 1 - dim) + [missing, 0]
            return F.pad(x, pad)

        self.set_layers((torch.cat([left_pad(mine.keys, 2), left_pad(theirs.keys, 2)]),
                         torch.cat([left_pad(mine.values, 2), left_pad(theirs.values, 2)]))
                        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True))
        self.mask = torch.cat([left_pad(self.mask, 1), left_pad(other.mask, 1)])
        self.positions = torch.cat([self.positions, other.positions])
        self.last = torch.cat([self.last, other.last])
        self.index += other.index
        self.tokens += other.tokens

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` and drop the leading columns none of them attends to."""
        if len(rows) == len(self.index):
            return
        self.index = [self.index[r] for r in rows]
        self.tokens = [self.tokens[r] for r in rows]
        if not rows:
            self.cache = self.mask = self.positions = self.last = None
            return
        sel = torch.tensor(rows, device=self.mask.device)
        mask = self.mask[sel]
        first = int(mask.any(0).to(torch.int8).argmax())  # first column some remaining row attends to
        self.mask = mask[:, first:]
        self.positions, self.last = self.positions[sel], self.last[sel]
        self.set_layers((layer.keys[sel, :, first:], layer.values[sel, :, first:]) for layer in self.cache.layers)


class _Forward:
    """One model call with a given cache: this transformers version's cache keyword, and the last position's logits
    only where the model supports it (saves the prefill's lm_head over every prompt token)."""

    def __init__(self, model) -> None:
        from spec_lightning.targets.frozen import cache_keyword

        self.model, self.cache_kw = model, cache_keyword(model)
        self.extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}

    def __call__(self, cache, **inputs) -> torch.Tensor:
        out = self.model(**inputs, use_cache=True, **{self.cache_kw: cache}, **self.extra)
        return out.logits[:, -1]


def _check_cache(cache) -> None:
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers or []})
        raise UnsupportedCache(f"continuous batching edits plain DynamicLayer caches only, this model uses {kinds}")


def _prefill(forward: _Forward, prompts: list[list[int]], index: list[int], pad_id: int) -> tuple[_Rows, torch.Tensor]:
    """Run the left-padded prompts through the model; their rows (cache filled) and last-position logits."""
    from transformers import DynamicCache

    device = forward.model.device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[r, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as HF generate: padding columns get any position (masked)
    # A full-attention cache whatever the model: each row's columns are contiguous up to the last column (rows join
    # left-padded, tokens append on the right), so transformers' masks apply sliding windows by column correctly.
    cache = DynamicCache()
    logits = forward(cache, input_ids=ids, attention_mask=mask, position_ids=positions)
    _check_cache(cache)
    rows = _Rows()
    rows.cache = cache
    rows.set_layers((layer.keys, layer.values) for layer in cache.layers)
    rows.mask, rows.positions = mask, mask.sum(-1)
    rows.index = list(index)
    rows.tokens = [[] for _ in prompts]
    return rows, logits


@torch.no_grad()
def continuous_generate(model, prompts: list[list[int]], *, slots: int, max_new_tokens: int, eos_ids: set[int],
                        pad_id: int, pick: Picker) -> list[tuple[list[int], str]]:
    """Continue every prompt (token ids) with at most ``slots`` rows in flight.

    Returns, in prompt order, ``(generated ids without the end token, "stop" | "length")``. Prompts are admitted
    in the order given; new rows join when a quarter of the slots are free (one prefill forward per admission).
    """
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    forward = _Forward(model)
    waiting = deque(range(len(prompts)))
    results: list[tuple[list[int], str] | None] = [None] * len(prompts)
    rows = _Rows()
    admit_at = max(1, slots // 4)

    def record(logits: torch.Tensor, batch: _Rows) -> None:
        batch.last = pick(logits)
        for tokens, t in zip(batch.tokens, batch.last.tolist(), strict=True):
            tokens.append(t)

    def retire() -> None:
        keep = []
        for r, tokens in enumerate(rows.tokens):
            if tokens[-1] in eos_ids:
                results[rows.index[r]] = (tokens[:-1], "stop")
            elif len(tokens) >= max_new_tokens:
                results[rows.index[r]] = (tokens, "length")
            else:
                keep.append(r)
        rows.keep(keep)

    while waiting or len(rows):
        free = slots - len(rows)
        if waiting and (free >= admit_at or free >= len(waiting) or not len(rows)):
            take = [waiting.popleft() for _ in range(min(free, len(waiting)))]
            new, logits = _prefill(forward, [prompts[i] for i in take], take, pad_id)
            record(logits, new)
            rows.append(new)
            retire()
            if not len(rows):
                continue
        mask = F.pad(rows.mask, (0, 1), value=1)
        logits = forward(rows.cache, input_ids=rows.last[:, None], attention_mask=mask,
                         position_ids=rows.positions[:, None])
        rows.mask, rows.positions = mask, rows.positions + 1
        record(logits, rows)
        retire()
    return results  # type: ignore[return-value]
