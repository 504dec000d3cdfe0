"""DFlash serving directory, the layout vLLM 0.32 loads as ``DFlashDraftModel`` (SPEC §8.2, ``docs/dflash.md``).

* ``config.json``: ``"architectures": ["DFlashDraftModel"]``, ``"model_type": "qwen3"``, the Qwen3 sizes, RoPE and
  norm epsilon copied from the target, ``block_size`` and ``num_target_layers`` (top level, where z-lab's drafts
  and SGLang's ``parse_dflash_draft_config`` read them), and ``dflash_config`` with ``mask_token_id``,
  ``target_layer_ids`` (decoder-layer outputs; vLLM adds 1 to reach its residual-stream ids) and
  ``block_size``/``num_target_layers`` again. No ``causal`` key: vLLM and SGLang then attend non-causally.
* ``model.safetensors``: exactly ``fc.weight``, ``hidden_norm.weight``, ``norm.weight`` and per layer i
  ``layers.{i}.{input_layernorm,post_attention_layernorm}.weight``, ``layers.{i}.self_attn.{q,k,v,o}_proj.weight``,
  ``layers.{i}.self_attn.{q_norm,k_norm}.weight``, ``layers.{i}.mlp.{gate,up,down}_proj.weight``. No ``lm_head``
  and no ``embed_tokens``: vLLM shares the target's (``_maybe_share_lm_head``), SGLang's draft has neither.
* ``mask_embedding.pt``: ``{"mask_token_id": int, "embedding": [H]}``, the trained mask embedding vLLM substitutes
  for ``embed_tokens[mask_token_id]`` (``_read_mask_embedding``, read with ``torch.load(weights_only=True)``).

The writer refuses a missing or unknown key and non-finite weights, and reads every file back before it lands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from spec_lightning.drafts.dflash import DFlashConfig, DFlashDraft
from spec_lightning.export.common import (
    check_finite,
    decoder_shape_json,
    export_directory,
    read_json,
    tensor_bytes,
    write_json,
)

WEIGHTS_FILE, CONFIG_FILE, MASK_FILE = "model.safetensors", "config.json", "mask_embedding.pt"
META_KEY = "spec_lightning"
LAYER_KEYS = ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
              "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
              "self_attn.q_norm.weight", "self_attn.k_norm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
              "mlp.down_proj.weight")


def required_keys(config: DFlashConfig) -> list[str]:
    return ["fc.weight", "hidden_norm.weight", "norm.weight"] + [
        f"layers.{i}.{k}" for i in range(config.num_layers) for k in LAYER_KEYS]


def dflash_config_json(config: DFlashConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The Qwen3-shaped ``config.json`` vLLM's ``DFlashDraftModel`` (and SGLang's DFlash loader) reads."""
    dflash = {"mask_token_id": config.mask_token_id, "target_layer_ids": list(config.target_layer_ids),
              "block_size": config.block_size, "num_target_layers": config.target_num_hidden_layers}
    return {
        "architectures": ["DFlashDraftModel"],
        "model_type": "qwen3",
        "num_hidden_layers": config.num_layers,
        **decoder_shape_json(config, dtype),  # rope_theta included: vLLM's DFlash layer defaults a missing one to 1e6
        "block_size": config.block_size,
        "num_target_layers": config.target_num_hidden_layers,
        "dflash_config": dflash,
        META_KEY: {"config": config.to_dict()},
    }


def check_state_dict(state: dict[str, Tensor], config: DFlashConfig) -> None:
    required = required_keys(config)
    missing = [k for k in required if k not in state]
    unknown = sorted(set(state) - set(required))
    if missing or unknown:
        raise ValueError(f"DFlash export: the serving layout holds exactly {len(required)} tensors; missing "
                         f"{missing[:6]}, unexpected {unknown[:6]} (vLLM would fail or serve random weights)")
    H = config.hidden_size
    if tuple(state["fc.weight"].shape) != (H, config.num_aux * H):
        raise ValueError(f"DFlash export: fc.weight has shape {tuple(state['fc.weight'].shape)}, config says "
                         f"{(H, config.num_aux * H)}")


def write_dflash(out_dir: str | Path, draft: DFlashDraft, overwrite: bool = False,
                 dtype: torch.dtype | str | None = None) -> Path:
    """Write the three files to ``out_dir`` atomically and verify them on disk (module docstring).

    dtype: cast the weights (the target's serving dtype; ``None`` keeps them as trained).
    """
    from safetensors.torch import load_file, save_file

    config = draft.config
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    state = {k: v.detach().to("cpu") for k, v in draft.state_dict().items()}
    mask = state.pop("mask_embedding")
    check_state_dict(state, config)
    tensors = {k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in state.items()}
    mask = (mask.to(dtype) if dtype is not None else mask).contiguous()
    check_finite({**tensors, "mask_embedding": mask}, "DFlash export")
    with export_directory(out_dir, overwrite, {"algorithm": "dflash", "layout": "vllm"},
                          tensor_bytes({**tensors, "mask_embedding": mask})) as tmp:
        write_json(tmp / CONFIG_FILE, dflash_config_json(config, tensors["fc.weight"].dtype))
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        torch.save({"mask_token_id": config.mask_token_id, "embedding": mask}, tmp / MASK_FILE)
        back = load_file(str(tmp / WEIGHTS_FILE))
        back_mask = torch.load(tmp / MASK_FILE, weights_only=True)
        wrong = [k for k, v in tensors.items() if k not in back or not torch.equal(back[k], v)]
        if wrong or set(back) != set(tensors) or not torch.equal(back_mask["embedding"], mask):
            raise RuntimeError(f"DFlash export: {wrong[:5] or 'mask_embedding'} do not read back identically")
    return Path(out_dir)


def config_from_json(cfg: dict[str, Any], path: Path) -> DFlashConfig:
    """Rebuild a :class:`DFlashConfig` from an exported ``config.json`` (ours: its ``spec_lightning`` block)."""
    meta = cfg.get(META_KEY, {}).get("config")
    if meta is None:
        raise ValueError(f"{path}: not a spec_lightning DFlash export (no '{META_KEY}.config' block)")
    try:
        return DFlashConfig(**meta)
    except TypeError as e:
        raise ValueError(f"{path}: '{META_KEY}.config' does not fit this version's DFlashConfig: {e}") from None


def load_dflash_draft(directory: str | Path) -> DFlashDraft:
    """Read an exported directory back into a :class:`DFlashDraft` (exact round trip of :func:`write_dflash`)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config = config_from_json(read_json(directory / CONFIG_FILE), directory / CONFIG_FILE)
    for name in (WEIGHTS_FILE, MASK_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found (expected a DFlash export directory)")
    tensors = load_file(str(directory / WEIGHTS_FILE))
    check_state_dict(tensors, config)
    mask = torch.load(directory / MASK_FILE, weights_only=True)
    if not isinstance(mask, dict) or mask.get("mask_token_id") != config.mask_token_id:
        raise ValueError(f"{directory / MASK_FILE}: expected {{'mask_token_id': {config.mask_token_id}, "
                         "'embedding': [H]}")
    draft = DFlashDraft(config).to(tensors["fc.weight"].dtype)
    draft.load_state_dict({**tensors, "mask_embedding": mask["embedding"].reshape(-1)}, strict=True)
    return draft.eval()
