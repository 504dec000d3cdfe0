"""One split of a feature cache as a map-style dataset, and the collate function that rebuilds online batches.

Items are read on demand from the shards (``ShardFile.rows``: one ``pread`` per tensor), so memory holds the
current batches only, whatever the cache size; the order is the sampler's (the online :class:`EpochSampler`: a
function of (seed, epoch)), which makes offline batches the online batches. Each shard's token columns (5 bytes a
token) are read when the shard is opened; at most ``OPEN_SHARDS`` shards stay open per process.
"""

from __future__ import annotations

import bisect
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from spec_lightning.datamodules.chat_datamodule import collate_chat
from spec_lightning.datamodules.feature_cache.format import (
    SHARD_DIR,
    FeatureCacheError,
    aux_length,
    decode,
    final_positions,
)
from spec_lightning.datamodules.feature_cache.shards import ShardFile, check_shard_file
from spec_lightning.datamodules.packing import collate_packed, pack_rows

_VERIFIED: set[tuple[str, str]] = set()  # (shard path, sha256) hashed by this process ("first_use")
OPEN_SHARDS = 32


class CachedFeatureDataset(Dataset):
    """The ``split`` samples of a cache: ``{input_ids, loss_mask (lists), final_hidden, final_index[, aux_hidden]}``.

    Args:
        cache_dir: the cache directory.
        manifest: its manifest (already checked against the configuration).
        split: ``train`` or ``val``.
        feature_dtype: dtype of the features handed to the step.
        with_aux: read the aux features (the model reads target layers) or skip them (final hidden state only).
        hash_on_first_use: verify a shard's sha256 the first time this process opens it.
    """

    def __init__(self, cache_dir: str | Path, manifest: dict, split: str, feature_dtype: torch.dtype = torch.float32,
                 with_aux: bool = True, hash_on_first_use: bool = False) -> None:
        self.cache_dir = Path(cache_dir)
        self.shards = [s for s in manifest["shards"] if s["split"] == split]
        self.split = split
        self.starts = [0]
        for s in self.shards:
            self.starts.append(self.starts[-1] + int(s["samples"]))
        storage = manifest["storage"]
        self.positions = storage["positions"]
        self.max_medusa_heads = storage.get("max_medusa_heads") or 0
        self.num_aux = len(manifest["aux_layer_ids"])
        self.with_aux = with_aux and self.num_aux > 0
        self.feature_dtype = feature_dtype
        self.hash_on_first_use = hash_on_first_use
        self._open: dict[int, tuple[ShardFile, dict]] = {}
        self._lengths: list[int] | None = None

    def __len__(self) -> int:
        return self.starts[-1]

    def __getstate__(self) -> dict:  # workers open their own shards
        state = dict(self.__dict__)
        state["_open"] = {}
        return state

    def _shard(self, j: int) -> tuple[ShardFile, dict]:
        if j in self._open:
            self._open[j] = self._open.pop(j)  # most recently used last
        else:
            while len(self._open) >= OPEN_SHARDS:
                self._open.pop(next(iter(self._open)))
            record = self.shards[j]
            path = self.cache_dir / SHARD_DIR / record["file"]
            key = (str(path), record["sha256"])
            if self.hash_on_first_use and key not in _VERIFIED:
                check_shard_file(path, record, hash_content=True)
                _VERIFIED.add(key)
            shard = ShardFile(path)
            lengths = shard.read("lengths").tolist()
            if len(lengths) != int(record["samples"]):
                raise FeatureCacheError(f"feature cache shard {path} holds {len(lengths)} samples, the manifest "
                                        f"records {record['samples']}")
            index = {"lengths": lengths, "input_ids": shard.read("input_ids"), "loss_mask": shard.read("loss_mask")}
            tok, aux, fin = [0], [0], [0]
            for n in lengths:
                lm = index["loss_mask"][tok[-1]: tok[-1] + n]
                tok.append(tok[-1] + n)
                aux.append(aux[-1] + (aux_length(lm, self.positions) if self.num_aux else 0))
                fin.append(fin[-1] + int(final_positions(lm, self.positions, self.max_medusa_heads).sum()))
            expected = {"final_hidden": fin[-1], "aux_hidden": aux[-1] if self.num_aux else None}
            for name, rows in expected.items():
                have = shard.tensors[name][1][0] if shard.has(name) else None
                if have != rows:
                    raise FeatureCacheError(f"feature cache shard {path}: {name} has {have} rows, its samples need "
                                            f"{rows} (written by another format or positions rule?)")
            index.update(tok=tok, aux=aux, fin=fin)
            self._open[j] = (shard, index)
        return self._open[j]

    def _locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for the {self.split} split of {len(self)} samples")
        j = bisect.bisect_right(self.starts, i) - 1
        return j, i - self.starts[j]

    def _features(self, shard: ShardFile, name: str, a: int, b: int) -> Tensor:
        scale_name = name.replace("_hidden", "_scale")
        scale = shard.rows(scale_name, a, b) if shard.has(scale_name) else None
        return decode(shard.rows(name, a, b), scale, self.feature_dtype)

    def tokens(self, i: int) -> dict[str, list[int]]:
        """``input_ids`` and ``loss_mask`` of sample i (no features read)."""
        j, r = self._locate(i)
        _, index = self._shard(j)
        a, b = index["tok"][r], index["tok"][r + 1]
        return {"input_ids": index["input_ids"][a:b].tolist(), "loss_mask": index["loss_mask"][a:b].tolist()}

    def __getitem__(self, i: int) -> dict:
        j, r = self._locate(i)
        shard, index = self._shard(j)
        a, b = index["tok"][r], index["tok"][r + 1]
        loss_mask = index["loss_mask"][a:b]
        item = {"input_ids": index["input_ids"][a:b].tolist(), "loss_mask": loss_mask.tolist(),
                "final_index": final_positions(loss_mask, self.positions, self.max_medusa_heads).nonzero().flatten(),
                "final_hidden": self._features(shard, "final_hidden", index["fin"][r], index["fin"][r + 1])}
        if self.with_aux:
            item["aux_hidden"] = self._features(shard, "aux_hidden", index["aux"][r], index["aux"][r + 1])
        return item

    def sample_lengths(self) -> list[int]:
        """Every sample's token count, in order (the shards' ``lengths`` columns)."""
        if self._lengths is None:
            out: list[int] = []
            for record in self.shards:
                out += ShardFile(self.cache_dir / SHARD_DIR / record["file"]).read("lengths").tolist()
            self._lengths = out
        return self._lengths

    def token_rows(self):
        """Every sample's ``{input_ids, loss_mask}`` in order (for the draft vocabulary; features are not read)."""
        for i in range(len(self)):
            yield self.tokens(i)


def collate_features(rows: list[dict], pad_id: int) -> dict[str, Tensor]:
    """Right-padded online batch (``collate_chat``) plus ``final_hidden [B, T, H]`` and ``aux_hidden [B, T, n*H]``
    with the stored positions filled in and zeros elsewhere (positions no loss reads, and padding)."""
    batch = collate_chat(rows, pad_id)
    B, T = batch["input_ids"].shape
    first = rows[0]["final_hidden"]
    final = first.new_zeros(B, T, first.shape[-1])
    for i, r in enumerate(rows):
        final[i, r["final_index"]] = r["final_hidden"]
    batch["final_hidden"] = final
    if "aux_hidden" in rows[0]:
        width = rows[0]["aux_hidden"].shape[-1]
        aux = first.new_zeros(B, T, width)
        for i, r in enumerate(rows):
            aux[i, : r["aux_hidden"].shape[0]] = r["aux_hidden"]
        batch["aux_hidden"] = aux
    return batch


class PackedFeatureDataset(Dataset):
    """Rows of whole cached samples packed into ``length`` tokens: the rows of the online ``PackedDataset`` (same
    ``pack_rows`` over the same lengths and seed), each document with its features."""

    def __init__(self, samples: CachedFeatureDataset, length: int, seed: int = 0) -> None:
        self.samples = samples
        self.rows = pack_rows(samples.sample_lengths(), length, seed)
        self.length = length

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        docs = [self.samples[i] for i in self.rows[index]]
        return {"input_ids": [d["input_ids"] for d in docs], "loss_mask": [d["loss_mask"] for d in docs], "docs": docs}


def collate_packed_features(rows: list[dict], pad_id: int, length: int) -> dict[str, Tensor]:
    """``collate_packed``'s batch plus the documents' features at their offsets (zeros elsewhere). Each document's
    features were computed on the document alone, which is what the target computes in a packed row (positions
    restart and attention stays in the document)."""
    batch = collate_packed(rows, pad_id, length)
    first = rows[0]["docs"][0]
    B = len(rows)
    final = first["final_hidden"].new_zeros(B, length, first["final_hidden"].shape[-1])
    aux = first["aux_hidden"].new_zeros(B, length, first["aux_hidden"].shape[-1]) if "aux_hidden" in first else None
    for b, row in enumerate(rows):
        start = 0
        for doc in row["docs"]:
            n = min(len(doc["input_ids"]), length - start)
            keep = doc["final_index"] < n
            final[b, start + doc["final_index"][keep]] = doc["final_hidden"][keep]
            if aux is not None:
                a = min(doc["aux_hidden"].shape[0], n)
                aux[b, start:start + a] = doc["aux_hidden"][:a]
            start += n
    batch["final_hidden"] = final
    if aux is not None:
        batch["aux_hidden"] = aux
    return batch
