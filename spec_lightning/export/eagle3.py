"""EAGLE-3 serving directory for SGLang and vLLM (SPEC §5): ``config.json`` + ``model.safetensors``.

Both engines load the same directory (SGLang ``--speculative-algorithm EAGLE3``, vLLM ``"method": "eagle3"``).
SGLang silently skips unknown weight names and vLLM renames ``midlayer.`` to ``layers.0.``, so the writer refuses a
state dict missing any required key (or holding unknown ones) and re-reads what it wrote.

Aux layer ids (the trap of SPEC §5): with the default layers ``[1, N//2-1, N-4]`` neither key is written (both
engines' defaults pick those tensors). Otherwise both are written: top-level ``eagle_aux_hidden_state_layer_ids``
in vLLM numbering (HF ``hidden_states[k]`` = output of layer k-1, so layer id + 1) and
``eagle_config.eagle_aux_hidden_state_layer_ids`` in SGLang numbering (output of layer j, so the layer id itself).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from spec_lightning.drafts.eagle3 import Eagle3Config, Eagle3Draft
from spec_lightning.export.common import (
    check_finite,
    decoder_shape_json,
    export_directory,
    read_json,
    tensor_bytes,
    write_json,
)
from spec_lightning.targets import default_aux_layer_ids

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
REQUIRED_KEYS = (
    "fc.weight",
    "midlayer.input_layernorm.weight",
    "midlayer.hidden_norm.weight",
    "midlayer.self_attn.q_proj.weight",
    "midlayer.self_attn.k_proj.weight",
    "midlayer.self_attn.v_proj.weight",
    "midlayer.self_attn.o_proj.weight",
    "midlayer.post_attention_layernorm.weight",
    "midlayer.mlp.gate_proj.weight",
    "midlayer.mlp.up_proj.weight",
    "midlayer.mlp.down_proj.weight",
    "norm.weight",
    "lm_head.weight",
    "d2t",
    "t2d",
)
OPTIONAL_KEYS = ("embed_tokens.weight",)


def required_keys(config: Eagle3Config | None = None) -> tuple[str, ...]:
    """SPEC §5's keys, plus EAGLE-3.1's ``fc_norm.{i}.weight`` when the draft has per-feature norms."""
    extra = tuple(f"fc_norm.{i}.weight" for i in range(config.num_aux)) if config is not None and config.fc_norm else ()
    return REQUIRED_KEYS + extra
META_KEY = "spec_lightning"  # our own round-trip metadata; both engines ignore unknown config keys


def eagle3_config_json(config: Eagle3Config, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The LlamaConfig-shaped ``config.json`` both engines read (RoPE and max positions copied from the target)."""
    custom = list(config.aux_layer_ids) != default_aux_layer_ids(config.target_num_hidden_layers)
    if custom and list(config.aux_layer_ids) != sorted(set(config.aux_layer_ids)):
        raise ValueError(f"EAGLE-3 export: custom aux layer ids {list(config.aux_layer_ids)} must be strictly "
                         "increasing without repeats (SGLang captures each target layer once, in order)")
    if config.num_layers != 1:
        raise ValueError(f"SGLang and vLLM serve EAGLE-3 drafts with one decoder layer (midlayer); this draft has "
                         f"num_layers={config.num_layers}")
    out: dict[str, Any] = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "num_hidden_layers": 1,
        **decoder_shape_json(config, dtype),
        "draft_vocab_size": config.draft_vocab_size,
        "mlp_bias": False,
        META_KEY: {"aux_layer_ids": list(config.aux_layer_ids),
                   "target_num_hidden_layers": config.target_num_hidden_layers},
    }
    for option in ("fc_norm", "norm_output"):  # EAGLE-3.1 (vLLM's config fields); absent = plain EAGLE-3
        if getattr(config, option):
            out[option] = True
    if list(config.aux_layer_ids) != default_aux_layer_ids(config.target_num_hidden_layers):
        out["eagle_aux_hidden_state_layer_ids"] = [i + 1 for i in config.aux_layer_ids]  # vLLM: hidden_states[i+1]
        out["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": list(config.aux_layer_ids)}  # SGLang: layer i
    return out


def check_state_dict(state_dict: dict[str, Tensor], config: Eagle3Config | None = None) -> None:
    """Refuse a state dict that misses any required SPEC §5 key or has keys the engines would not load."""
    required = required_keys(config)
    missing = [k for k in required if k not in state_dict]
    unknown = sorted(set(state_dict) - set(required) - set(OPTIONAL_KEYS))
    if missing:
        raise ValueError(f"EAGLE-3 export: state dict is missing required keys {missing} "
                         "(SGLang would silently skip them and serve random weights)")
    if unknown:
        raise ValueError(f"EAGLE-3 export: unexpected keys {unknown}; the serving layout holds exactly "
                         f"{list(required)} (+ optional {list(OPTIONAL_KEYS)})")
    if state_dict["d2t"].dtype != torch.int64 or state_dict["t2d"].dtype != torch.bool:
        raise ValueError(f"EAGLE-3 export: d2t must be int64 and t2d bool, got {state_dict['d2t'].dtype} and "
                         f"{state_dict['t2d'].dtype}")


def write_eagle3(out_dir: str | Path, state_dict: dict[str, Tensor], config: Eagle3Config,
                 include_embeddings: bool = True, dtype: torch.dtype | str | None = None,
                 overwrite: bool = False) -> Path:
    """Write ``config.json`` and ``model.safetensors`` to ``out_dir`` atomically and verify them on disk.

    Args:
        state_dict: the draft's state dict (``Eagle3Draft.state_dict()``: exactly the serving names).
        config: the draft config (RoPE, max positions, aux ids already copied from the target).
        include_embeddings: also write ``embed_tokens.weight`` (a frozen copy of the target's; optional for
            both engines, which otherwise share the target's embedding).
        dtype: cast floating weights (e.g. ``"bfloat16"``); ``None`` keeps them as trained.
        overwrite: write into an existing non-export directory (its other files are kept); see
            :func:`~spec_lightning.export.common.export_directory`.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    check_state_dict(state_dict, config)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    keys = list(required_keys(config)) + ([k for k in OPTIONAL_KEYS if k in state_dict] if include_embeddings else [])
    tensors = {}
    for k in keys:
        t = state_dict[k].detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[k] = t.contiguous()
    weight_dtype = tensors["fc.weight"].dtype
    config_json = eagle3_config_json(config, weight_dtype)
    H = config.hidden_size
    expected = {"fc.weight": (H, config.num_aux * H), "lm_head.weight": (config.draft_vocab_size, H),
                "d2t": (config.draft_vocab_size,), "t2d": (config.vocab_size,)}
    for k, shape in expected.items():
        if tuple(tensors[k].shape) != shape:
            raise ValueError(f"EAGLE-3 export: {k} has shape {tuple(tensors[k].shape)}, config says {shape}")
    check_finite(tensors, "EAGLE-3 export")
    with export_directory(out_dir, overwrite, {"algorithm": "eagle3", "layout": "sglang+vllm"},
                          tensor_bytes(tensors)) as tmp:
        write_json(tmp / CONFIG_FILE, config_json)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        with safe_open(str(tmp / WEIGHTS_FILE), framework="pt") as f:  # verify what is on disk
            if set(f.keys()) != set(keys):
                raise RuntimeError(f"EAGLE-3 export: wrote keys {sorted(f.keys())}, expected {sorted(keys)}")
    return Path(out_dir)


def config_from_json(cfg: dict[str, Any], target_num_hidden_layers: int | None = None) -> Eagle3Config:
    """Rebuild an :class:`Eagle3Config` from an exported ``config.json`` (ours, or another trainer's)."""
    meta = cfg.get(META_KEY, {})
    n_target = meta.get("target_num_hidden_layers", target_num_hidden_layers)
    aux = meta.get("aux_layer_ids")
    if aux is None and "eagle_config" in cfg:
        aux = cfg["eagle_config"].get("eagle_aux_hidden_state_layer_ids")  # SGLang numbering = layer ids
    if aux is None and "eagle_aux_hidden_state_layer_ids" in cfg:
        aux = [i - 1 for i in cfg["eagle_aux_hidden_state_layer_ids"]]  # vLLM numbering = layer id + 1
    if n_target is None:
        raise ValueError("config.json does not say the target's num_hidden_layers; pass target_num_hidden_layers")
    if aux is None:
        aux = default_aux_layer_ids(n_target)
    for field_name in ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size", "rope_theta",
                       "max_position_embeddings", "rms_norm_eps"):
        if field_name not in cfg:
            raise ValueError(f"EAGLE-3 config.json has no {field_name!r}")
    heads = int(cfg["num_attention_heads"])
    return Eagle3Config(
        hidden_size=int(cfg["hidden_size"]), intermediate_size=int(cfg["intermediate_size"]),
        num_attention_heads=heads, num_key_value_heads=int(cfg.get("num_key_value_heads", heads)),
        head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads), vocab_size=int(cfg["vocab_size"]),
        draft_vocab_size=int(cfg.get("draft_vocab_size", cfg["vocab_size"])), aux_layer_ids=list(aux),
        target_num_hidden_layers=int(n_target), rms_norm_eps=float(cfg["rms_norm_eps"]),
        rope_theta=float(cfg["rope_theta"]), rope_scaling=cfg.get("rope_scaling"),
        max_position_embeddings=int(cfg["max_position_embeddings"]), num_layers=int(cfg.get("num_hidden_layers", 1)),
        hidden_act=str(cfg.get("hidden_act", "silu")), fc_norm=bool(cfg.get("fc_norm", False)),
        norm_output=bool(cfg.get("norm_output", False)),
    )


def load_eagle3_draft(directory: str | Path, target_num_hidden_layers: int | None = None) -> Eagle3Draft:
    """Read an exported directory back into an :class:`Eagle3Draft` (exact round trip of :func:`write_eagle3`).

    Without ``embed_tokens.weight`` in the file the embedding stays uninitialised: copy the target's in.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    config = config_from_json(read_json(directory / CONFIG_FILE), target_num_hidden_layers)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} not found (expected an EAGLE-3 export directory)")
    tensors = load_file(str(weights_path))
    check_state_dict(tensors, config)
    draft = Eagle3Draft(config)
    dtype = tensors["fc.weight"].dtype
    draft.to(dtype)
    missing, unexpected = draft.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if k not in OPTIONAL_KEYS]
    if missing or unexpected:
        raise ValueError(f"{weights_path}: does not fit its config.json: missing {missing}, unexpected {unexpected}")
    return draft


def exported_embedding(directory: str | Path) -> bool:
    """Whether an exported directory carries ``embed_tokens.weight`` (optional: engines share the target's)."""
    from safetensors import safe_open

    with safe_open(str(Path(directory) / WEIGHTS_FILE), framework="pt") as f:
        return "embed_tokens.weight" in f.keys()  # noqa: SIM118 (safe_open has no __contains__)
