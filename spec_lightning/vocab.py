"""EAGLE-3 draft vocabulary: the ``Vd`` most frequent trainable tokens and the ``d2t`` / ``t2d`` maps (SPEC §3.4).

* The draft vocabulary holds the ``Vd`` most frequent tokens among *trainable* (``loss_mask == 1``) tokens of
  the training data, ties broken by the smaller token id, and is sorted by token id.
* ``d2t``: int64 ``[Vd]`` **offsets**, ``target_id = draft_id + d2t[draft_id]`` (the SpecForge / SGLang / vLLM
  convention, not absolute ids).
* ``t2d``: bool ``[V]``, true for target ids that are in the draft vocabulary.
* If ``V <= Vd`` the mapping is the identity (``Vd`` becomes ``V``).

The mapping is cached under ``cache_root()/vocab/`` keyed by a fingerprint of (data fingerprint, target vocab
size, Vd); the fingerprint is stored inside the file and verified on load, so a cached mapping is never silently
reused for other data.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from spec_lightning.contract import TokenRows

log = logging.getLogger(__name__)

VOCAB_FORMAT_VERSION = "1"


@dataclass(frozen=True)
class DraftVocab:
    """``d2t`` int64 ``[Vd]`` offsets and ``t2d`` bool ``[V]`` (see module docstring)."""

    d2t: Tensor
    t2d: Tensor

    def __post_init__(self) -> None:
        if self.d2t.dtype != torch.int64 or self.d2t.dim() != 1:
            raise ValueError(f"d2t must be a 1-D int64 tensor, got {self.d2t.dtype} {tuple(self.d2t.shape)}")
        if self.t2d.dtype != torch.bool or self.t2d.dim() != 1:
            raise ValueError(f"t2d must be a 1-D bool tensor, got {self.t2d.dtype} {tuple(self.t2d.shape)}")
        if int(self.t2d.sum()) != self.d2t.numel():
            raise ValueError(f"t2d marks {int(self.t2d.sum())} tokens but d2t has {self.d2t.numel()} entries")
        if not torch.equal(self.draft_to_target_ids(), self.t2d.nonzero().flatten()):
            raise ValueError("d2t and t2d disagree: draft_id + d2t[draft_id] must list the t2d tokens in id order")

    @property
    def draft_vocab_size(self) -> int:
        return self.d2t.numel()

    @property
    def vocab_size(self) -> int:
        return self.t2d.numel()

    def draft_to_target_ids(self) -> Tensor:
        """``[Vd]`` absolute target ids of the draft tokens."""
        return torch.arange(self.d2t.numel(), dtype=torch.int64, device=self.d2t.device) + self.d2t


def identity_vocab(vocab_size: int) -> DraftVocab:
    return DraftVocab(d2t=torch.zeros(vocab_size, dtype=torch.int64), t2d=torch.ones(vocab_size, dtype=torch.bool))


def vocab_from_token_ids(token_ids: Tensor, vocab_size: int) -> DraftVocab:
    """The mapping for an explicit set of target token ids (sorted and deduplicated here)."""
    ids = torch.unique(token_ids.to(torch.int64))  # sorted
    if ids.numel() == 0 or ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"draft token ids must be non-empty and in [0, {vocab_size}), got {ids.tolist()[:10]}...")
    t2d = torch.zeros(vocab_size, dtype=torch.bool, device=ids.device)
    t2d[ids] = True
    return DraftVocab(d2t=ids - torch.arange(ids.numel(), dtype=torch.int64, device=ids.device), t2d=t2d)


def count_trainable_tokens(rows: Iterable[Mapping], vocab_size: int) -> Tensor:
    """int64 ``[V]`` counts of tokens whose ``loss_mask`` is 1, over rows with ``input_ids`` and ``loss_mask``.

    An HF ``datasets.Dataset`` is read in batches (fast path); any iterable of row mappings works too.
    """
    counts = torch.zeros(vocab_size, dtype=torch.int64)

    def add(ids: list[int], mask: list[int]) -> None:
        if len(ids) != len(mask):
            raise ValueError(f"row has {len(ids)} input_ids but {len(mask)} loss_mask entries")
        t_ids = torch.as_tensor(ids, dtype=torch.int64)
        keep = torch.as_tensor(mask, dtype=torch.int64) == 1
        sel = t_ids[keep]
        if sel.numel() and (sel.min() < 0 or sel.max() >= vocab_size):
            raise ValueError(f"token id out of range [0, {vocab_size}) in training data: {sel.max().item()}")
        counts.add_(torch.bincount(sel, minlength=vocab_size))

    if hasattr(rows, "iter") and hasattr(rows, "column_names"):  # datasets.Dataset
        for name in ("input_ids", "loss_mask"):
            if name not in rows.column_names:
                raise ValueError(f"training dataset has no {name!r} column (columns: {rows.column_names})")
        for batch in rows.select_columns(["input_ids", "loss_mask"]).iter(batch_size=1024):
            flat_ids = [i for row in batch["input_ids"] for i in row]
            flat_mask = [m for row in batch["loss_mask"] for m in row]
            add(flat_ids, flat_mask)
        return counts
    for row in rows:
        ids, mask = row["input_ids"], row["loss_mask"]
        add(list(ids.tolist() if isinstance(ids, Tensor) else ids), list(mask.tolist() if isinstance(mask, Tensor) else mask))
    return counts


def vocab_from_counts(counts: Tensor, draft_vocab_size: int) -> DraftVocab:
    """Top-``Vd`` tokens by count (ties: smaller id first), sorted by id; identity when ``V <= Vd``."""
    vocab_size = counts.numel()
    if draft_vocab_size < 1:
        raise ValueError(f"draft_vocab_size must be >= 1, got {draft_vocab_size}")
    if vocab_size <= draft_vocab_size:
        return identity_vocab(vocab_size)
    # stable sort of descending counts keeps ascending ids among ties -> deterministic tie-breaking by id
    order = torch.sort(counts, descending=True, stable=True).indices
    return vocab_from_token_ids(order[:draft_vocab_size], vocab_size)


def build_draft_vocab(rows: Iterable[Mapping], vocab_size: int, draft_vocab_size: int) -> DraftVocab:
    """Uncached build from training rows (see :func:`count_trainable_tokens`)."""
    if vocab_size <= draft_vocab_size:
        return identity_vocab(vocab_size)
    return vocab_from_counts(count_trainable_tokens(rows, vocab_size), draft_vocab_size)


def vocab_fingerprint(data_fingerprint: str, vocab_size: int, draft_vocab_size: int) -> str:
    text = f"eagle3-vocab|v{VOCAB_FORMAT_VERSION}|data={data_fingerprint}|V={vocab_size}|Vd={draft_vocab_size}"
    return hashlib.sha256(text.encode()).hexdigest()


def vocab_cache_path(fingerprint: str) -> Path:
    from spec_lightning.targets import cache_root

    return cache_root() / "vocab" / f"{fingerprint[:32]}.safetensors"


def save_vocab(vocab: DraftVocab, path: str | Path, fingerprint: str) -> Path:
    """Write ``d2t``/``t2d`` with the fingerprint in the safetensors metadata, atomically (temp file + rename)."""
    from safetensors.torch import save_file

    from spec_lightning.atomic import atomic_file

    with atomic_file(path) as tmp:
        save_file({"d2t": vocab.d2t.contiguous(), "t2d": vocab.t2d.contiguous()}, str(tmp),
                  metadata={"fingerprint": fingerprint, "format_version": VOCAB_FORMAT_VERSION,
                            "content_sha256": vocab_content_hash(vocab.d2t, vocab.t2d)})
    return Path(path)


def vocab_content_hash(d2t: Tensor, t2d: Tensor) -> str:
    """sha256 of the mapping's values: a cached file is used only if its tensors are the ones written."""
    h = hashlib.sha256(d2t.to(torch.int64).contiguous().numpy().tobytes())
    h.update(t2d.to(torch.bool).contiguous().numpy().tobytes())
    return h.hexdigest()


def load_vocab(path: str | Path, expected_fingerprint: str) -> DraftVocab:
    """Read a cached mapping, refusing it unless its stored fingerprint equals ``expected_fingerprint`` and its
    tensors hash to the stored content hash (``ValueError`` naming the file otherwise)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"draft vocab file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            d2t, t2d = f.get_tensor("d2t"), f.get_tensor("t2d")
    except (SafetensorError, OSError, KeyError) as e:
        raise ValueError(f"draft vocab cache {path} is unreadable ({str(e).splitlines()[0][:120]})") from None
    stored = meta.get("fingerprint")
    if stored != expected_fingerprint:
        raise ValueError(
            f"draft vocab cache {path} was built for fingerprint {stored!r}, not {expected_fingerprint!r}: "
            "refusing to reuse a mapping built from other data (delete the file to rebuild)"
        )
    if meta.get("content_sha256") != vocab_content_hash(d2t, t2d):
        raise ValueError(f"draft vocab cache {path}: its tensors do not match the content hash written with them")
    return DraftVocab(d2t=d2t, t2d=t2d)


def cached_draft_vocab(rows: Iterable[Mapping], data_fingerprint: str, vocab_size: int,
                       draft_vocab_size: int) -> DraftVocab:
    """Build the mapping once per (data fingerprint, V, Vd) and cache it under ``cache_root()/vocab/``."""
    if vocab_size <= draft_vocab_size:
        return identity_vocab(vocab_size)
    fingerprint = vocab_fingerprint(data_fingerprint, vocab_size, draft_vocab_size)
    path = vocab_cache_path(fingerprint)
    if path.is_file():
        try:
            vocab = load_vocab(path, fingerprint)
            if vocab.vocab_size != vocab_size or vocab.draft_vocab_size != draft_vocab_size:
                raise ValueError(f"draft vocab cache {path} has V={vocab.vocab_size}, Vd={vocab.draft_vocab_size}; "
                                 f"expected V={vocab_size}, Vd={draft_vocab_size}")
            log.info("reusing draft vocab %s", path)
            return vocab
        except ValueError as e:  # corrupted, edited or foreign: rebuilt from the data, never trusted
            log.warning("%s; rebuilding it", e)
    vocab = build_draft_vocab(rows, vocab_size, draft_vocab_size)
    save_vocab(vocab, path, fingerprint)
    log.info("built draft vocab (V=%d -> Vd=%d), cached at %s", vocab_size, draft_vocab_size, path)
    return vocab


def draft_vocab_from(tokens: TokenRows, vocab_size: int, draft_vocab_size: int) -> DraftVocab:
    """The draft vocabulary of a datamodule's training tokens (:class:`~spec_lightning.contract.TokenRows`),
    cached by their fingerprint (:func:`cached_draft_vocab`)."""
    return cached_draft_vocab(tokens.read_rows(), tokens.fingerprint, vocab_size, draft_vocab_size)
