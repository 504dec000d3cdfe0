"""Medusa-2 exports what it trained: the heads and, beside them, the jointly trained base (LoRA merged into a plain
HF model directory), which evaluation then verifies with."""

from __future__ import annotations

import pytest
import torch

from spec_lightning.export.common import MARKER
from tests.test_medusa_module import TinyMedusa2, fit

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def trained_medusa2(monkeypatch):
    import spec_lightning.targets as targets

    monkeypatch.setattr(targets, "load_tokenizer", lambda source: _NoTokenizer())
    torch.manual_seed(0)
    module = TinyMedusa2(num_heads=2, optimizer=lambda p: torch.optim.AdamW(p, lr=5e-2))
    fit(module, steps=3)
    return module


class _NoTokenizer:
    def save_pretrained(self, directory) -> None:
        (directory / "tokenizer_config.json").write_text("{}")


def test_export_writes_the_merged_base_beside_the_heads(trained_medusa2, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from spec_lightning.export.medusa import load_medusa_heads

    module = trained_medusa2
    out = module.export_draft(str(tmp_path / "m2"))
    assert sorted(p.name for p in out.iterdir()) == ["base", "config.json", "model.safetensors", MARKER]
    base = AutoModelForCausalLM.from_pretrained(out / "base").eval()
    assert not any("lora" in k for k in base.state_dict())  # a plain model: LoRA merged in
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        trained = module._base_lm()(ids).logits  # the peft-wrapped base with its adapters
        original = module.load_target()(ids).logits
        served = base(ids).logits
    torch.testing.assert_close(served, trained, rtol=1e-4, atol=1e-4)
    assert (served - original).abs().max() > 1e-3  # the base really changed: exporting only the heads would be wrong
    heads = load_medusa_heads(out)
    assert torch.equal(heads.lm_heads[0].weight, module.heads.lm_heads[0].weight)
    assert "serve the heads with the trained base" in capsys.readouterr().out


def test_load_export_verifies_with_the_exported_base(trained_medusa2, tmp_path):
    out = trained_medusa2.export_draft(str(tmp_path / "m2"))
    fresh = TinyMedusa2(num_heads=2)
    fresh.load_export(str(out))
    ids = torch.randint(3, 128, (1, 7))
    with torch.no_grad():
        want = trained_medusa2._base_lm()(ids).logits[0, -1]
        target = fresh.decode_target()
        got = target.logits(target(ids).final_hidden)[0, -1]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_medusa2_export_without_its_base_is_refused(trained_medusa2, tmp_path):
    import shutil

    out = trained_medusa2.export_draft(str(tmp_path / "m2"))
    shutil.rmtree(out / "base")
    with pytest.raises(ValueError, match="holds its trained base in base/"):
        TinyMedusa2(num_heads=2).load_export(str(out))
