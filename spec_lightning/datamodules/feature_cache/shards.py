"""Reading and verifying shard files: rows by byte range (``os.pread``), never a whole shard in memory."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from spec_lightning.datamodules.feature_cache.format import FeatureCacheError
from spec_lightning.integrity import sha256_file
from spec_lightning.targets.weight_files import safetensors_header

SAFETENSORS_DTYPES = {
    "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F8_E4M3": torch.float8_e4m3fn,
    "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool,
}


def check_shard_file(path: Path, record: dict, hash_content: bool) -> None:
    """Refuse a missing, truncated, resized, unreadable or (``hash_content``) corrupted shard, naming the file."""
    if not path.is_file():
        raise FeatureCacheError(f"feature cache shard {path} is missing (listed in the manifest with "
                                f"{record['samples']} samples): rebuild it with `python cli.py cache --config <config>`")
    size, expected = path.stat().st_size, int(record["bytes"])
    if size != expected:
        kind = "truncated" if size < expected else "larger than written"
        raise FeatureCacheError(f"feature cache shard {path} is {kind}: {size} bytes, the manifest records {expected}"
                                " (delete it and run `python cli.py cache --config <config>` to rewrite it)")
    ShardFile(path)  # header readable and consistent with the size
    if hash_content:
        digest = sha256_file(path)
        if digest != record["sha256"]:
            raise FeatureCacheError(f"feature cache shard {path} is corrupted: its sha256 {digest[:16]}... differs "
                                    f"from the manifest's {record['sha256'][:16]}... (delete it and run `python cli.py "
                                    "cache --config <config>` to rewrite it)")


class ShardFile:
    """One shard's tensor directory (from the safetensors header) and row reads by byte range.

    The file descriptor is opened lazily per process (DataLoader workers each open their own).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            header, self.data_start = safetensors_header(self.path)
        except ValueError as e:
            raise FeatureCacheError(f"feature cache shard {e}") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self.tensors: dict[str, tuple[torch.dtype, list[int], int, int]] = {}
        end = 0
        for name, info in header.items():
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise FeatureCacheError(f"feature cache shard {self.path}: tensor {name} has unsupported dtype "
                                        f"{info['dtype']}")
            begin, stop = info["data_offsets"]
            self.tensors[name] = (SAFETENSORS_DTYPES[info["dtype"]], list(info["shape"]), begin, stop)
            end = max(end, stop)
        size = self.path.stat().st_size
        if size < self.data_start + end:
            raise FeatureCacheError(f"feature cache shard {self.path} is truncated: {size} bytes, its header needs "
                                    f"{self.data_start + end}")
        self._fd: int | None = None
        self._pid: int | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fd"] = state["_pid"] = None
        return state

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def has(self, name: str) -> bool:
        return name in self.tensors

    def rows(self, name: str, start: int, stop: int) -> Tensor:
        """Rows ``[start, stop)`` of tensor ``name`` (first dimension), read from disk."""
        dtype, shape, begin, _ = self.tensors[name]
        row_elems = 1
        for d in shape[1:]:
            row_elems *= d
        item = torch.empty((), dtype=dtype).element_size()
        nbytes = (stop - start) * row_elems * item
        if nbytes == 0:
            return torch.empty((0, *shape[1:]), dtype=dtype)
        offset = self.data_start + begin + start * row_elems * item
        raw = os.pread(self._descriptor(), nbytes, offset)
        if len(raw) != nbytes:
            raise FeatureCacheError(f"feature cache shard {self.path}: short read of {name} rows {start}:{stop} "
                                    f"({len(raw)} of {nbytes} bytes): the file changed or was truncated")
        return torch.frombuffer(bytearray(raw), dtype=dtype).view(stop - start, *shape[1:])

    def read(self, name: str) -> Tensor:
        """The whole (small) tensor ``name``."""
        return self.rows(name, 0, self.tensors[name][1][0])
