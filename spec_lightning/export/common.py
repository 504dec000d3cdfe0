"""What every exporter shares: the export-directory policy (never destroy a user's files), finite weights, JSON.

An export directory holds the serving files and ``spec_lightning_export.json`` (:data:`MARKER`): which files the
exporter wrote, for which algorithm and layout. That marker is how a later export recognises a directory it may
update:

* ``out_dir`` does not exist: written atomically as a whole.
* ``out_dir`` is an empty directory (maybe a mount point, which cannot be renamed): written into in place, each file
  renamed in from a temp directory inside it.
* ``out_dir`` is a previous export (has the marker): the new files replace the old ones one by one, files the old
  export wrote and the new one does not are removed, anything else (a user's README, ...) is kept.
* ``out_dir`` is any other non-empty directory: refused unless ``overwrite=True``, which writes the export files into
  it and keeps every other file.
* ``out_dir`` is a file: always refused.

The size of the weights is known before writing: an export that would not fit is refused first
(:func:`~spec_lightning.atomic.ensure_free_space`), naming the directory, the bytes needed and the bytes free.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from spec_lightning.atomic import atomic_directory, clean_stale

__all__ = ["MARKER", "atomic_directory", "check_finite", "decoder_shape_json", "export_directory", "read_json",
           "tensor_bytes", "write_json"]

MARKER = "spec_lightning_export.json"


def write_json(path: str | Path, obj: dict) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a UTF-8 text file (expected JSON)") from None


def check_finite(tensors: Mapping[str, Tensor], what: str) -> None:
    """Refuse weights holding NaN or infinity (an engine would load them and emit garbage), naming the tensors."""
    bad = []
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            n = int((~torch.isfinite(t)).sum())
            bad.append(f"{name} ({n} of {t.numel()} values non-finite)")
    if bad:
        raise ValueError(f"{what}: refusing to export non-finite weights: {', '.join(bad[:8])}"
                         + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
                         + " (the training diverged; lower the learning rate or resume from an earlier checkpoint)")


def decoder_shape_json(config: Any, dtype: torch.dtype) -> dict[str, Any]:
    """The ``config.json`` fields of a draft built of Llama/Qwen3 decoder layers shaped like the target (EAGLE-3,
    DFlash; ``drafts.common.target_shape``): sizes, attention shape, activation, norm epsilon, RoPE (``rope_theta``
    always written: vLLM's DFlash layer defaults a missing one to 1e6), max positions, vocabulary, no tied embeddings
    or attention bias, and the weights' dtype. Each exporter adds its architecture and its own fields."""
    return {
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": config.hidden_act,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": dict(config.rope_scaling) if config.rope_scaling else None,
        "max_position_embeddings": config.max_position_embeddings,
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def tensor_bytes(tensors: Mapping[str, Tensor]) -> int:
    """The bytes the tensors' data take in a file (a lower bound of a safetensors / torch.save file's size)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _previous_files(out_dir: Path) -> list[str] | None:
    """Files a previous export listed in its marker, or ``None`` when ``out_dir`` has no (readable) marker."""
    marker = out_dir / MARKER
    if not marker.is_file():
        return None
    try:
        files = json.loads(marker.read_text()).get("files")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    return [str(f) for f in files] if isinstance(files, list) else None


@contextmanager
def export_directory(out_dir: str | Path, overwrite: bool = False, info: dict | None = None,
                     needed_bytes: int = 0) -> Iterator[Path]:
    """Yield a temp directory to write an export into; on success it lands in ``out_dir`` (module docstring).

    The marker (with ``info`` and the list of files written) is added last. Refusals happen before anything is
    written, with a ``ValueError`` naming ``out_dir`` (or a ``DiskSpaceError`` when ``needed_bytes``, the size of
    the files about to be written, is more than the free space).
    """
    out_dir = Path(out_dir)
    clean_stale(out_dir)  # leftovers of a killed export
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out_dir {out_dir} is an existing file; refusing to replace it (choose a directory path)")
    previous = _previous_files(out_dir) if out_dir.is_dir() else None
    existing = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if existing and previous is None and not overwrite:
        shown = ", ".join(existing[:5]) + (f" and {len(existing) - 5} more" if len(existing) > 5 else "")
        raise ValueError(f"--out_dir {out_dir} is a non-empty directory that is not a spec_lightning export (it holds "
                         f"{shown}); refusing to write into it. Choose a new --out_dir, or pass --overwrite to write the "
                         "export files into it (files of other names are kept)")
    # an existing directory is written into, never renamed (an empty one may be a mount point)
    with atomic_directory(out_dir, merge=out_dir.is_dir(), needed_bytes=needed_bytes) as tmp:
        yield tmp
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        write_json(tmp / MARKER, {**(info or {}), "files": files, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    for name in previous or []:  # files of the previous export that this one does not write
        stale = out_dir / name
        if name not in files and name != MARKER and stale.is_file() and stale.resolve().is_relative_to(out_dir.resolve()):
            stale.unlink()

