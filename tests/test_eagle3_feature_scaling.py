"""EAGLE-3 ``feature_scaling``: fc reads aux dimensions over their RMS from the first training batch; exports fold it."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from torch import nn

from spec_lightning.drafts.eagle3 import Eagle3Config, Eagle3Draft
from spec_lightning.export.eagle3 import load_eagle3_draft
from spec_lightning.modules.eagle3 import Eagle3Module
from tests.conftest import make_tiny_llama
from tests.test_export_eagle3 import SPEC_KEYS


class TinyEagle3(Eagle3Module):
    def load_target(self) -> nn.Module:
        return make_tiny_llama()


def batch(seed: int, pad: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (2, 10), generator=g)
    attn = torch.ones_like(ids)
    if pad:
        attn[1, -pad:] = 0
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": attn.clone()}


def test_scale_is_the_inverse_rms_of_each_dimension_over_real_tokens_only() -> None:
    draft = Eagle3Draft(Eagle3Config.tiny(feature_scaling=True))
    aux = torch.randn(2, 5, 96) * torch.linspace(0.1, 50.0, 96)  # dimensions of very different scale
    aux[1, 3:] = 1e4  # padding: must not count
    real = torch.ones(2, 5, dtype=torch.bool)
    real[1, 3:] = False
    draft.set_feature_scale(aux, real)
    rows = torch.cat([aux[0], aux[1, :3]])  # the 8 real rows, gathered by hand
    expected = 1.0 / rows.pow(2).mean(0).sqrt()
    torch.testing.assert_close(draft.fc_input_scale, expected)
    assert torch.allclose((rows * draft.fc_input_scale).pow(2).mean(0), torch.ones(96), atol=1e-5)


def test_project_reads_scaled_features_and_plain_drafts_refuse_scaling() -> None:
    torch.manual_seed(0)
    draft = Eagle3Draft(Eagle3Config.tiny(feature_scaling=True))
    with torch.no_grad():
        draft.fc_input_scale.uniform_(0.1, 3.0)
    aux = torch.randn(3, 96)
    torch.testing.assert_close(draft.project(aux), (aux * draft.fc_input_scale) @ draft.fc.weight.T)
    with pytest.raises(ValueError, match="feature_scaling"):
        Eagle3Draft(Eagle3Config.tiny()).set_feature_scale(aux)


def test_first_training_batch_sets_the_scale_later_batches_and_eval_do_not() -> None:
    torch.manual_seed(0)
    m = TinyEagle3(draft_vocab_size=64, ttt_length=2, feature_scaling=True)
    m.configure_model()
    m.eval()
    m.compute(batch(1))  # not training: the scale stays at ones
    assert torch.equal(m.draft.fc_input_scale, torch.ones(96))
    m.train()
    first = batch(2, pad=4)
    m.compute(first)
    aux = m.target(first["input_ids"], first["attention_mask"], aux_layer_ids=m.draft_config.aux_layer_ids).aux_hidden
    real_rows = aux[first["attention_mask"].bool()]
    torch.testing.assert_close(m.draft.fc_input_scale, real_rows.pow(2).mean(0).rsqrt())
    kept = m.draft.fc_input_scale.clone()
    m.compute(batch(3))
    assert torch.equal(m.draft.fc_input_scale, kept)
    # a module restored from a checkpoint keeps the checkpoint's scale
    restored = TinyEagle3(draft_vocab_size=64, ttt_length=2, feature_scaling=True)
    restored.configure_model()
    checkpoint = {"state_dict": m.state_dict(), "hyper_parameters": dict(m.hparams)}
    restored.on_load_checkpoint(checkpoint)
    restored.load_state_dict(checkpoint["state_dict"], strict=False)
    restored.train()
    restored.compute(batch(4))
    assert torch.equal(restored.draft.fc_input_scale, kept)


def test_export_folds_the_scale_into_fc_and_serves_the_same_function(tmp_path) -> None:
    torch.manual_seed(0)
    m = TinyEagle3(draft_vocab_size=64, ttt_length=2, feature_scaling=True)
    m.configure_model()
    m.train()
    m.compute(batch(5))
    assert not torch.equal(m.draft.fc_input_scale, torch.ones(96))
    out = m.export_draft(str(tmp_path / "d"))
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) - {"embed_tokens.weight"} == SPEC_KEYS  # plain EAGLE-3: no extra key
        fc = f.get_tensor("fc.weight")
    torch.testing.assert_close(fc, m.draft.fc.weight.detach() * m.draft.fc_input_scale)
    served = load_eagle3_draft(out)
    assert not served.config.feature_scaling
    ids = batch(6)["input_ids"]
    aux = m.target(ids, aux_layer_ids=m.draft_config.aux_layer_ids).aux_hidden
    m.draft.eval()
    with torch.no_grad():
        want = m.draft(aux, ids, torch.ones_like(ids), ttt_length=2)
        got = served(aux, ids, torch.ones_like(ids), ttt_length=2)
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
