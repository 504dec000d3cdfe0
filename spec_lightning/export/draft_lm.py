"""A draft language model exported as a plain Hugging Face model directory (config, safetensors, tokenizer).

Engines serve it as an ordinary draft model next to the target (same tokenizer), e.g. vLLM's
``speculative_config={"model": <dir>, "num_speculative_tokens": k}``; it is read back with ``from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from spec_lightning.export.common import check_finite, export_directory, tensor_bytes


def write_draft_lm(out_dir: str | Path, model: nn.Module, tokenizer=None, overwrite: bool = False) -> Path:
    """``save_pretrained`` of ``model`` (and ``tokenizer``) into ``out_dir`` under the export-directory policy,
    refusing non-finite weights and checking that the directory loads back with the same weights."""
    from transformers import AutoModelForCausalLM

    state = {k: v.detach() for k, v in model.state_dict().items()}
    check_finite(state, "draft LM export")
    with export_directory(out_dir, overwrite, {"algorithm": "draft_lm", "layout": "hf"}, tensor_bytes(state)) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        back = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=next(model.parameters()).dtype).state_dict()
        wrong = [k for k, v in state.items() if k in back and not bool((back[k].to(v.device) == v).all())]
        if wrong:
            raise RuntimeError(f"draft LM export: {wrong[:5]} do not read back identically")
    return Path(out_dir)


def load_draft_lm(directory: str | Path, dtype=None) -> nn.Module:
    """The exported draft LM (plain HF directory)."""
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory}: no config.json (expected a draft LM export, a plain HF model directory)")
    return AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype).eval()
