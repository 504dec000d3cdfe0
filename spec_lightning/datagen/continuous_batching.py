"""Continuous batching for data generation: a finished row leaves the batch and a waiting prompt takes its place.

HF ``generate`` runs a left-padded batch until its longest answer ends, so every row that stopped early keeps
being computed: on SmolLM2's answers to the chitchat openers (mean 69 of up to 128 tokens) about half of all
decode rows were already finished. Here a row leaves the batch the step its answer ends, and waiting prompts are
prefilled (in one left-padded forward) and join the batch, so up to ``slots`` rows are always useful work.

How: every row keeps its own next position (``position_ids``) and a 2-D attention mask over the shared cache
columns; the cache is a transformers ``DynamicCache`` whose per-layer keys/values live in preallocated buffers
(``DynamicLayer`` concatenates, copying the whole cache for every token). A row whose answer ended frees its slot
without any copy; the next prefilled prompts are written into free slots in place (their columns end at the last
column, the columns before are masked) and only prompts beyond the free slots are appended. Leading columns no row
attends to any more are dropped once there are ``TRIM_COLUMNS`` of them, and free slots no prompt will take are
dropped at the end. Keys are cached after RoPE, so a row's keys carry their own positions wherever their columns sit.
Same numbers as a plain batched forward up to float summation order (``tests/test_continuous_batching.py`` compares
against one-prompt-at-a-time greedy decoding).

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


# Leading cache columns no row attends to any more (their rows ended) are dropped once there are this many: a copy of
# the cache, so not every step.
TRIM_COLUMNS = 64

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


def _left_pad(x: torch.Tensor, width: int) -> torch.Tensor:
    """``x`` ([B, L] mask or [B, heads, L, dim] keys/values) with masked zero columns in front, to ``width``."""
    dim = 1 if x.dim() == 2 else 2
    missing = width - x.shape[dim]
    return x if missing <= 0 else F.pad(x, [0, 0] * (x.dim() - 1 - dim) + [missing, 0])


class _Rows:
    """The running batch: cache, attention mask [B, L], next position [B], last sampled token [B], and per row the
    prompt index and the tokens generated so far. A row whose answer ended becomes a free slot (index ``None``): it is
    still computed, attending to one column, until a new prompt takes its place in the tensors."""

    def __init__(self) -> None:
        self.cache = None
        self.mask: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.last: torch.Tensor | None = None
        self.index: list[int | None] = []
        self.tokens: list[list[int] | None] = []

    def __len__(self) -> int:
        return len(self.index)

    def live(self) -> int:
        return sum(i is not None for i in self.index)

    def free_slots(self) -> list[int]:
        return [r for r, i in enumerate(self.index) if i is None]

    def set_layers(self, keys_values) -> None:
        growing = _growing_layer_class()
        self.cache.layers[:] = [growing(k, v) for k, v in keys_values]

    def drop_first(self, k: int) -> None:
        """Forget the first ``k`` rows (a prefill's rows that went into free slots of the running batch)."""
        if k:
            for layer in self.cache.layers:  # the prefill's own cache: views, no copy
                layer.keys, layer.values = layer.keys[k:], layer.values[k:]
            self.mask, self.positions, self.last = self.mask[k:], self.positions[k:], self.last[k:]
            self.index, self.tokens = self.index[k:], self.tokens[k:]

    def widen(self, width: int) -> None:
        """Left-pad every row with masked zero columns to ``width``."""
        if width > self.mask.shape[1]:
            self.set_layers((_left_pad(layer.keys, width), _left_pad(layer.values, width)) for layer in self.cache.layers)
            self.mask = _left_pad(self.mask, width)

    def append(self, other: _Rows) -> None:
        """Add ``other``'s rows below these; the narrower cache is left-padded with masked zero columns."""
        if self.cache is None or not self.index:
            self.cache, self.mask, self.positions, self.last = other.cache, other.mask, other.positions, other.last
            self.index, self.tokens = list(other.index), list(other.tokens)
            self.set_layers((layer.keys, layer.values) for layer in self.cache.layers)
            return
        width = max(self.mask.shape[1], other.mask.shape[1])
        self.set_layers((torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)]),
                         torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)]))
                        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True))
        self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(other.mask, width)])
        self.positions = torch.cat([self.positions, other.positions])
        self.last = torch.cat([self.last, other.last])
        self.index += other.index
        self.tokens += other.tokens

    def admit(self, other: _Rows) -> None:
        """Put ``other``'s rows into free slots, in place (their columns end at the last column, the columns before
        are masked), and append the rest below."""
        free = self.free_slots()[: len(other)]
        if free:
            self.widen(other.mask.shape[1])
            n, width, k = self.mask.shape[1], other.mask.shape[1], len(free)
            slots = torch.tensor(free, device=self.mask.device)
            for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
                mine.keys[slots, :, n - width:] = theirs.keys[:k]  # views of the layer's buffer: written in place
                mine.values[slots, :, n - width:] = theirs.values[:k]
            self.mask[slots] = 0
            self.mask[slots, n - width:] = other.mask[:k]
            self.positions[slots], self.last[slots] = other.positions[:k], other.last[:k]
            for j, r in enumerate(free):
                self.index[r], self.tokens[r] = other.index[j], other.tokens[j]
        if len(free) < len(other):
            other.drop_first(len(free))
            self.append(other)

    def release(self, row: int) -> None:
        """Row ``row`` is done: its slot is free; until reused it attends to the last column only (never to nothing,
        which would make its attention NaN)."""
        self.index[row] = self.tokens[row] = None
        self.mask[row] = 0
        self.mask[row, -1] = 1

    def keep(self, rows: list[int] | None = None) -> None:
        """Keep only ``rows`` (default: the live ones) and drop the leading columns none of them attends to."""
        rows = [r for r, i in enumerate(self.index) if i is not None] if rows is None else rows
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

    def unused_columns(self) -> int:
        """Leading columns no row attends to."""
        return int(self.mask.any(0).to(torch.int8).argmax())


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
    rows.cache = cache  # plain DynamicLayers: copied into growing buffers only if the rows are appended
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
            if tokens is not None:
                tokens.append(t)

    def retire() -> None:
        for r, tokens in enumerate(rows.tokens):
            if tokens is None:
                continue
            if tokens[-1] in eos_ids:
                results[rows.index[r]] = (tokens[:-1], "stop")
            elif len(tokens) >= max_new_tokens:
                results[rows.index[r]] = (tokens, "length")
            else:
                continue
            rows.release(r)

    while waiting or rows.live():
        free = slots - rows.live()
        if waiting and (free >= admit_at or free >= len(waiting) or not rows.live()):
            take = [waiting.popleft() for _ in range(min(free, len(waiting)))]
            new, logits = _prefill(forward, [prompts[i] for i in take], take, pad_id)
            record(logits, new)
            rows.admit(new)
            retire()
        live = rows.live()
        if not live:
            rows.keep()
            continue
        if (not waiting and len(rows) - live >= max(1, live // 4)) or rows.unused_columns() >= TRIM_COLUMNS:
            rows.keep()  # no prompt will take the free slots: stop computing them; or drop columns nobody reads
        mask = F.pad(rows.mask, (0, 1), value=1)
        logits = forward(rows.cache, input_ids=rows.last[:, None], attention_mask=mask,
                         position_ids=rows.positions[:, None])
        rows.mask, rows.positions = mask, rows.positions + 1
        record(logits, rows)
        retire()
    return results  # type: ignore[return-value]
