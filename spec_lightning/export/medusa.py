"""Medusa heads in the two serving layouts of SPEC §5, written atomically and verified on write.

* ``"vllm"`` — vLLM's ``MedusaModel``: ``config.json`` (``architectures: ["MedusaModel"]``,
  ``model_type: "medusa"``, ``hidden_size``, ``vocab_size``, ``num_heads``, ``num_hidden_layers``,
  ``medusa_fc_bias``, ``truncated_vocab_size``) and ``model.safetensors`` with
  ``blocks.{h}.layers.{l}.weight [H, H]``, ``blocks.{h}.layers.{l}.bias [H]``, ``lm_heads.{h}.weight [V, H]``.
  vLLM's ``MedusaConfig.from_pretrained`` renames every key containing "num" and "heads" to ``num_heads``
  (and "num" + "layers" to ``num_hidden_layers``), so the config must carry no ``num_attention_heads`` /
  ``num_key_value_heads``: they would silently overwrite the head count.
* ``"original"`` — FasterDecoding Medusa (also read by TGI and TensorRT-LLM): ``medusa_lm_head.safetensors``
  holding the ``nn.ModuleList([nn.Sequential(ResBlock * L, Linear(H, V))] * K)`` state dict
  (``{h}.{l}.linear.weight/bias``, ``{h}.{L}.weight``) and ``config.json`` with ``medusa_num_heads``,
  ``medusa_num_layers``, ``base_model_name_or_path``, ``hidden_size``, ``vocab_size``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from spec_lightning.drafts.medusa import MedusaConfig, MedusaHeads
from spec_lightning.export.common import check_finite, export_directory, read_json, tensor_bytes, write_json

LAYOUTS = ("vllm", "original")
VLLM_WEIGHTS = "model.safetensors"
ORIGINAL_WEIGHTS = "medusa_lm_head.safetensors"
CONFIG = "config.json"


def expected_shapes(config: MedusaConfig) -> dict[str, tuple[int, ...]]:
    """Every key of a complete ``MedusaHeads`` state dict (the vLLM names) and its shape."""
    h, v = config.hidden_size, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {}
    for head in range(config.num_heads):
        for layer in range(config.num_layers):
            shapes[f"blocks.{head}.layers.{layer}.weight"] = (h, h)
            shapes[f"blocks.{head}.layers.{layer}.bias"] = (h,)
        shapes[f"lm_heads.{head}.weight"] = (v, h)
    return shapes


def check_state_dict(state_dict: dict[str, Tensor], config: MedusaConfig) -> None:
    """Refuse a state dict with missing, unexpected or mis-shaped keys (naming them)."""
    shapes = expected_shapes(config)
    missing = [k for k in shapes if k not in state_dict]
    if missing:
        raise ValueError(f"Medusa state dict is incomplete for {config}: missing {missing}")
    unexpected = sorted(set(state_dict) - set(shapes))
    if unexpected:
        raise ValueError(f"Medusa state dict has unexpected keys for {config}: {unexpected}")
    wrong = {k: (list(state_dict[k].shape), list(s)) for k, s in shapes.items() if tuple(state_dict[k].shape) != s}
    if wrong:
        raise ValueError(f"Medusa state dict has wrong shapes (got, expected): {wrong}")


def to_original_names(state_dict: dict[str, Tensor], config: MedusaConfig) -> dict[str, Tensor]:
    """vLLM names -> FasterDecoding names: ``blocks.h.layers.l.*`` -> ``h.l.linear.*``, ``lm_heads.h`` -> ``h.L``."""
    out = {}
    for head in range(config.num_heads):
        for layer in range(config.num_layers):
            for p in ("weight", "bias"):
                out[f"{head}.{layer}.linear.{p}"] = state_dict[f"blocks.{head}.layers.{layer}.{p}"]
        out[f"{head}.{config.num_layers}.weight"] = state_dict[f"lm_heads.{head}.weight"]
    return out


def from_original_names(state_dict: dict[str, Tensor], config: MedusaConfig) -> dict[str, Tensor]:
    """FasterDecoding names -> vLLM names (inverse of :func:`to_original_names`); missing keys are named."""
    wanted = to_original_names({k: k for k in expected_shapes(config)}, config)  # original name -> vLLM name
    missing = [k for k in wanted if k not in state_dict]
    if missing:
        raise ValueError(f"{ORIGINAL_WEIGHTS} is incomplete for {config}: missing {missing}")
    return {vllm_name: state_dict[orig_name] for orig_name, vllm_name in wanted.items()}


def vllm_config(config: MedusaConfig) -> dict:
    return {
        "architectures": ["MedusaModel"],
        "model_type": "medusa",
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "truncated_vocab_size": config.vocab_size,  # full vocabulary: no token_map needed
        "num_heads": config.num_heads,
        "num_hidden_layers": config.num_layers,
        "medusa_fc_bias": True,  # our blocks always have a bias (vLLM's default is False)
    }


def original_config(config: MedusaConfig, base_model_name_or_path: str | None) -> dict:
    return {
        "medusa_num_heads": config.num_heads,
        "medusa_num_layers": config.num_layers,
        "base_model_name_or_path": base_model_name_or_path,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
    }


def write_medusa(
    out_dir: str | Path,
    state_dict: dict[str, Tensor],
    config: MedusaConfig,
    layout: str = "vllm",
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
    extra_writer: Callable[[Path], None] | None = None,
    extra_bytes: int = 0,
) -> Path:
    """Write heads (``MedusaHeads.state_dict()`` names) to ``out_dir`` in ``layout``; returns ``out_dir``.

    Refuses an incomplete state dict before anything is written; reads the files back before the
    directory is moved into place. ``extra_writer(tmp_dir)`` adds files to the same export (Medusa-2's base), about
    ``extra_bytes`` of them (counted in the free-space check).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    check_state_dict(state_dict, config)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    check_finite(tensors, "Medusa export")
    if layout == "vllm":
        files, cfg, weights = tensors, vllm_config(config), VLLM_WEIGHTS
    else:
        files, cfg, weights = to_original_names(tensors, config), original_config(config, base_model_name_or_path), \
            ORIGINAL_WEIGHTS
    out_dir = Path(out_dir)
    info = {"algorithm": "medusa", "layout": layout}
    with export_directory(out_dir, overwrite, info, tensor_bytes(files) + extra_bytes) as tmp:
        save_file(files, str(tmp / weights), metadata={"format": "pt"})
        write_json(tmp / CONFIG, cfg)
        back = load_file(str(tmp / weights))
        if back.keys() != files.keys() or not all(torch.equal(back[k], files[k]) for k in files):
            raise RuntimeError(f"verification of {weights} failed: the file does not read back identically")
        if extra_writer is not None:
            extra_writer(tmp)
    return out_dir


def detect_layout(directory: str | Path) -> str:
    """``"vllm"`` or ``"original"`` from the files present in ``directory``."""
    directory = Path(directory)
    if (directory / ORIGINAL_WEIGHTS).is_file():
        return "original"
    if (directory / VLLM_WEIGHTS).is_file():
        return "vllm"
    raise FileNotFoundError(f"{directory}: no Medusa weights ({VLLM_WEIGHTS} or {ORIGINAL_WEIGHTS}) found")


def read_medusa(directory: str | Path) -> tuple[MedusaConfig, dict[str, Tensor], str]:
    """Read either layout: ``(config, state dict in MedusaHeads names, layout)``."""
    directory = Path(directory)
    layout = detect_layout(directory)
    cfg = read_json(directory / CONFIG)
    if layout == "vllm":
        keys = {"hidden_size": "hidden_size", "vocab_size": "vocab_size", "num_heads": "num_heads",
                "num_layers": "num_hidden_layers"}
    else:
        keys = {"hidden_size": "hidden_size", "vocab_size": "vocab_size", "num_heads": "medusa_num_heads",
                "num_layers": "medusa_num_layers"}
    missing = [v for v in keys.values() if v not in cfg]
    if missing:
        raise ValueError(f"{directory / CONFIG}: missing fields {missing} for the {layout} Medusa layout")
    config = MedusaConfig(**{k: cfg[v] for k, v in keys.items()})
    if layout == "vllm":
        state = load_file(str(directory / VLLM_WEIGHTS))
    else:
        state = from_original_names(load_file(str(directory / ORIGINAL_WEIGHTS)), config)
    check_state_dict(state, config)
    return config, state, layout


def load_medusa_heads(directory: str | Path) -> MedusaHeads:
    """A ``MedusaHeads`` with the weights of an exported directory (either layout, detected)."""
    config, state, _ = read_medusa(directory)
    heads = MedusaHeads(config)
    heads.load_state_dict(state, strict=True)
    return heads
