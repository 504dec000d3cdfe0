"""A target's weight files on disk: find them, read single tensors, and fingerprint the weights by content.

Offline training (``targets.head``) needs a few named tensors of a target without loading the model, and a feature
cache must record *which* target wrote it. Both read the checkpoint files directly:

* :func:`model_directory`: the local directory of a target source (builtin, GGUF, HF directory, hub id);
* :func:`weight_map`: ``{tensor name: file}`` from ``model.safetensors.index.json`` / ``model.safetensors`` (or the
  ``pytorch_model.bin`` equivalents);
* :func:`read_tensors`: only the named tensors (safetensors reads each tensor's bytes alone; ``.bin`` files are
  memory-mapped, so the other tensors are never materialised);
* :func:`target_identity`: ``config_sha256`` (config.json without ``transformers_version``) and
  ``weights_fingerprint``: sha256 of every tensor's name, dtype, shape and three 16 KiB slices of its bytes (start,
  middle, end). Every tensor takes part, so a fine-tune that keeps the embeddings (a merged LoRA) still changes the
  fingerprint; reading ~48 KiB per tensor keeps it cheap (~13 MB for an 8B target).
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import torch
from torch import Tensor

SAFE_INDEX, SAFE_SINGLE = "model.safetensors.index.json", "model.safetensors"
BIN_INDEX, BIN_SINGLE = "pytorch_model.bin.index.json", "pytorch_model.bin"
SLICE_BYTES = 16 * 1024
FINGERPRINT_VERSION = 1
VOLATILE_CONFIG_KEYS = ("transformers_version",)  # re-saving with another transformers changes it, not the model


def model_directory(source: str) -> Path:
    """The local directory holding ``config.json`` and the weights of a target source.

    Builtins and GGUF files resolve to their converted directory (``targets.loading.resolve_target``); a hub id to its
    snapshot in the Hugging Face cache (downloaded there if missing: the config and the weight files, safetensors
    preferred).
    """
    from spec_lightning.targets.loading import resolve_target

    path, _ = resolve_target(source)
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download  # a hub id (never in tests): the files online training loads too

    directory = Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors"]))
    if not any(directory.glob("*.safetensors")):  # an older repository with .bin weights only
        directory = Path(snapshot_download(path, allow_patterns=["*.json", "*.bin"]))
    return directory


def weight_map(directory: str | Path) -> dict[str, Path]:
    """``{tensor name: file}`` of a HF model directory (sharded or not; safetensors preferred)."""
    directory = Path(directory)
    for index_name, single in ((SAFE_INDEX, SAFE_SINGLE), (BIN_INDEX, BIN_SINGLE)):
        index = directory / index_name
        if index.is_file():
            mapping = json.loads(index.read_text())["weight_map"]
            return {name: directory / file for name, file in mapping.items()}
        if (directory / single).is_file():
            return {name: directory / single for name in _tensor_names(directory / single)}
    raise FileNotFoundError(f"{directory} holds no {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX}")


def _tensor_names(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        return [k for k in safetensors_header(path)[0] if k != "__metadata__"]
    return list(_load_bin(path))


def safetensors_header(path: str | Path) -> tuple[dict, int]:
    """``(header, data_start)`` of a safetensors file: the JSON header (tensor name -> dtype, shape, data_offsets
    relative to ``data_start``) and the byte offset where tensor data begins. Raises ValueError naming the file when
    the header cannot be read."""
    path = Path(path)
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise ValueError(f"{path}: not a safetensors file (header length {n})")
        text = f.read(n)
    if len(text) != n:
        raise ValueError(f"{path}: truncated safetensors header ({len(text)} of {n} bytes)")
    try:
        header = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{path}: unreadable safetensors header") from None
    return header, 8 + n


def _load_bin(path: Path) -> dict[str, Tensor]:
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def read_tensors(files: dict[str, Path], names: list[str]) -> dict[str, Tensor]:
    """The named tensors only, in their stored dtype (the rest of the checkpoint is never read into memory)."""
    from safetensors import safe_open

    out: dict[str, Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    for path, wanted in by_file.items():
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                for name in wanted:
                    out[name] = f.get_tensor(name)
        else:
            state = _load_bin(path)
            for name in wanted:
                out[name] = state[name].clone()  # copy out of the memory map
            del state
    return out


def config_sha256(directory: str | Path) -> str:
    """sha256 of ``config.json`` as canonical JSON without :data:`VOLATILE_CONFIG_KEYS`."""
    config = json.loads((Path(directory) / "config.json").read_text())
    for key in VOLATILE_CONFIG_KEYS:
        config.pop(key, None)
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _slices(size: int) -> list[tuple[int, int]]:
    """Byte ranges hashed of a tensor of ``size`` bytes: start, middle and end (all of it when small)."""
    if size <= 3 * SLICE_BYTES:
        return [(0, size)]
    mid = (size // 2) - SLICE_BYTES // 2
    return [(0, SLICE_BYTES), (mid, mid + SLICE_BYTES), (size - SLICE_BYTES, size)]


def weights_fingerprint(directory: str | Path) -> str:
    """Content fingerprint of every tensor of a checkpoint (see module docstring); independent of sharding."""
    files = weight_map(directory)
    h = hashlib.sha256(f"weights-fingerprint-v{FINGERPRINT_VERSION}".encode())
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    entries: dict[str, bytes] = {}
    for path, names in by_file.items():
        if path.suffix == ".safetensors":
            header, start = safetensors_header(path)
            with path.open("rb") as f:
                for name in names:
                    info = header[name]
                    begin, end = info["data_offsets"]
                    parts = [f"{name}|{info['dtype']}|{info['shape']}".encode()]
                    for a, b in _slices(end - begin):
                        f.seek(start + begin + a)
                        parts.append(f.read(b - a))
                    entries[name] = b"".join(parts)
        else:
            state = _load_bin(path)
            for name in names:
                t = state[name].contiguous()
                raw = t.view(torch.uint8).reshape(-1) if t.numel() else torch.empty(0, dtype=torch.uint8)
                parts = [f"{name}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}".encode()]
                parts += [raw[a:b].numpy().tobytes() for a, b in _slices(raw.numel())]
                entries[name] = b"".join(parts)
            del state
    for name in sorted(entries):
        h.update(hashlib.sha256(entries[name]).digest())
    return h.hexdigest()


def target_identity(source: str) -> dict[str, str]:
    """``{"config_sha256", "weights_fingerprint"}`` of a target source (what a feature cache records and checks)."""
    directory = model_directory(source)
    return {"config_sha256": config_sha256(directory), "weights_fingerprint": weights_fingerprint(directory)}
