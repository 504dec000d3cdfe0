"""The feature cache format: which positions are stored, in which dtype, and what one shard holds.

A cache is a directory::

    plan.json                       identity + shard plan, written first (a resumed or parallel writer must agree)
    shards/train-00000.safetensors  features of consecutive training samples (split order)
    shards/train-00000.json         the shard's record (bytes, sha256, counts), written after the shard: its presence
                                    marks the shard finished
    shards/val-00000.safetensors ...
    manifest.json                   plan + every shard's record + totals; written once all shards exist

One shard (safetensors) holds, for its samples concatenated in split order:

* ``input_ids`` int32 ``[tokens]``, ``loss_mask`` uint8 ``[tokens]``, ``lengths`` int64 ``[samples]``: every token of
  every sample (5 bytes a token), exactly what the online ChatDataModule yields;
* ``aux_hidden`` ``[aux rows, n_aux * H]`` (EAGLE-3): the outputs of the aux layers at positions
  ``0 .. aux_length(loss_mask) - 1`` of each sample;
* ``final_hidden`` ``[final rows, H]``: the final post-norm hidden state at the positions ``final_positions`` selects;
* with ``float8_e4m3fn`` storage the aux features are fp8 with ``aux_scale`` ``[aux rows, n_aux]`` float32, per token
  and layer (``x = q * scale``, ``scale = amax(|x|) / 448``), and the final hidden state stays bfloat16: the teacher
  is made from it, and in fp8 its argmax changed at 3.4% of the positions on SmolLM2 (0.2% in bf16; the aux
  features, the draft's input, lose 0.5% relative L2 in fp8; ``benchmarks/feature_cache_throughput.py``).

Which positions are stored (``positions: loss``; ``all`` keeps every position of every sample). Let m be a sample's
last trainable position (``loss_mask[m] = 1``):

* aux features at ``p <= m``. EAGLE-3's pairs (step k, position t) count only for ``t + k <= m`` (SpecForge
  alignment: token ``t + k`` trainable) or ``t + k + 2 <= m`` (predicted alignment), so no counted pair sits at a
  draft position past m; its TTT attention reads step-0 keys at positions ``<= t`` and later steps at t itself, so
  the aux features after m only feed queries that are never counted. (Its teacher reads target position
  ``t + k + 1 <= m + 1``: a final hidden state, see below; its input tokens are all stored.)
* the final hidden state where a loss reads it: EAGLE-3's teacher at p iff token ``p - 1`` (SpecForge alignment) or
  token ``p + 1`` (predicted alignment) is trainable; Medusa head h at p iff token ``p + 2 + h`` is trainable, for
  ``h < max_medusa_heads``.

Dropped positions are zero-filled by the reader; ``tests/test_feature_cache_positions.py`` proves the losses and the
gradients are bitwise those of the full features.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

FORMAT_NAME = "spec_lightning.feature_cache"
FORMAT_VERSION = 1
POSITIONS_RULE_VERSION = 1
STORAGE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float8_e4m3fn": torch.float8_e4m3fn}
POSITIONS = ("loss", "all")
FP8_MAX = 448.0  # largest finite float8_e4m3fn
SHARD_DIR = "shards"
PLAN_FILE, MANIFEST_FILE = "plan.json", "manifest.json"
SPLITS = ("train", "val")
TOKEN_BYTES = 5  # int32 id + uint8 loss mask


class FeatureCacheError(ValueError):
    """A feature cache that cannot be written or trusted (names the file and what is wrong)."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.safetensors"


def record_name(shard_file: str) -> str:
    return re.sub(r"\.safetensors$", ".json", shard_file)


def storage_dtype(name: str) -> torch.dtype:
    if name not in STORAGE_DTYPES:
        raise ValueError(f"storage_dtype must be one of {list(STORAGE_DTYPES)}, got {name!r}")
    return STORAGE_DTYPES[name]


def element_bytes(name: str) -> int:
    return torch.empty((), dtype=storage_dtype(name)).element_size()


# ----------------------------------------------------------------------------------------------------------------
# positions
# ----------------------------------------------------------------------------------------------------------------
def aux_length(loss_mask: Tensor, positions: str = "loss") -> int:
    """Number of leading positions whose aux features are stored: ``min(n, m + 1)`` (``loss``) or n (``all``)."""
    n = int(loss_mask.numel())
    if positions == "all":
        return n
    trainable = loss_mask.nonzero().flatten()
    return 0 if trainable.numel() == 0 else min(n, int(trainable[-1]) + 1)


def final_positions(loss_mask: Tensor, positions: str = "loss", max_medusa_heads: int = 5) -> Tensor:
    """bool ``[n]``: positions whose final hidden state is stored (see module docstring)."""
    lm = loss_mask.bool().flatten()
    n = lm.numel()
    if positions == "all":
        return torch.ones(n, dtype=torch.bool)
    keep = torch.zeros(n, dtype=torch.bool)
    keep[1:] |= lm[:-1]  # EAGLE-3 teacher, SpecForge alignment: token p - 1 trainable
    for shift in range(1, max_medusa_heads + 2):  # predicted alignment (p + 1), Medusa heads (p + 2 + h)
        if shift < n:
            keep[: n - shift] |= lm[shift:]
    return keep


def run_length(loss_mask: Tensor, positions: str = "loss") -> int:
    """Positions the target must run over to produce everything stored (the rest of the sample is never read)."""
    n = int(loss_mask.numel())
    if positions == "all":
        return n
    trainable = loss_mask.nonzero().flatten()
    return 1 if trainable.numel() == 0 else min(n, int(trainable[-1]) + 2)  # final hidden states reach m + 1


# ----------------------------------------------------------------------------------------------------------------
# storage dtypes
# ----------------------------------------------------------------------------------------------------------------
def encode(x: Tensor, dtype_name: str, groups: int) -> tuple[Tensor, Tensor | None]:
    """``[N, groups * H]`` features -> (stored tensor, per-row-and-group float32 scales or None)."""
    if dtype_name != "float8_e4m3fn":
        return x.to(storage_dtype(dtype_name)).contiguous(), None
    n = x.shape[0]
    x = x.float().reshape(n, groups, -1)
    scale = (x.abs().amax(-1, keepdim=True) / FP8_MAX).clamp_min(1e-12)  # [N, groups, 1]
    q = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.reshape(n, -1).contiguous(), scale.reshape(n, groups).contiguous()


def decode(stored: Tensor, scale: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    """Inverse of :func:`encode` (up to the storage rounding), in ``out_dtype``."""
    if scale is None:
        return stored.to(out_dtype)
    n, groups = scale.shape
    x = stored.float().reshape(n, groups, -1) * scale[..., None]
    return x.reshape(n, -1).to(out_dtype)


def final_storage(dtype_name: str) -> str:
    """The final hidden state's storage dtype: the cache's, except bfloat16 for fp8 caches (see module docstring)."""
    return "bfloat16" if dtype_name == "float8_e4m3fn" else dtype_name


def bytes_per_position(hidden_size: int, num_aux: int, dtype_name: str) -> tuple[int, int]:
    """(bytes of one stored aux row, bytes of one stored final row), scales included."""
    fp8 = dtype_name == "float8_e4m3fn"
    return (num_aux * hidden_size * element_bytes(dtype_name) + (4 * num_aux if fp8 else 0),
            hidden_size * element_bytes(final_storage(dtype_name)))
