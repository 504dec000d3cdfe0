"""EAGLE-3.1 options: per-feature fc norms and the post-norm recurrence, by hand, in decoding and in the export."""

from __future__ import annotations

import json

import pytest
import torch

from spec_lightning.drafts.eagle3 import Eagle3Config, Eagle3Draft
from spec_lightning.export.eagle3 import load_eagle3_draft, write_eagle3
from spec_lightning.speculate.eagle3 import Eagle3Drafter
from spec_lightning.targets import FrozenTarget, TargetStep
from tests.conftest import make_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def draft31(**options) -> Eagle3Draft:
    torch.manual_seed(0)
    draft = Eagle3Draft(Eagle3Config.tiny(**options))
    with torch.no_grad():
        for name, p in draft.named_parameters():
            if "embed" not in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.3)
    return draft


def rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def test_fc_norm_normalises_each_aux_feature_before_fc():
    draft = draft31(fc_norm=True)
    aux = torch.randn(2, 5, 96) * torch.tensor([1.0] * 32 + [50.0] * 32 + [0.01] * 32)
    chunks = aux.split(32, -1)
    expected = torch.cat([rms(c, n.weight) for c, n in zip(chunks, draft.fc_norm, strict=True)], -1) @ draft.fc.weight.T
    torch.testing.assert_close(draft.project(aux), expected, rtol=1e-5, atol=1e-5)


def test_norm_output_feeds_the_normed_state_to_the_next_step():
    plain, post = draft31(), draft31(norm_output=True)
    out = torch.randn(3, 32)
    assert torch.equal(plain.advance(out)[0], out)
    torch.testing.assert_close(post.advance(out)[0], rms(out, post.norm.weight), rtol=1e-6, atol=1e-6)
    assert torch.equal(post.advance(out)[1], plain.advance(out)[1])  # the lm_head input is norm(out) either way
    aux, ids = torch.randn(1, 6, 96), torch.randint(3, 128, (1, 6))
    with torch.no_grad():
        a, b = plain(aux, ids, ttt_length=2), post(aux, ids, ttt_length=2)
    torch.testing.assert_close(a[0], b[0])  # step 0 is the same network
    assert (a[1] - b[1]).abs().max() > 1e-3  # step 1 reads another recurrence


@pytest.mark.parametrize("options", [{"fc_norm": True}, {"norm_output": True}, {"fc_norm": True, "norm_output": True}])
def test_decoding_runs_the_same_network_as_training(options):
    model = make_tiny_llama(num_layers=6, seed=5)
    cfg = Eagle3Config.from_target_config(model.config, 128, **options)
    torch.manual_seed(1)
    draft = Eagle3Draft(cfg)
    with torch.no_grad():
        draft.embed_tokens.weight.copy_(model.get_input_embeddings().weight)
        for name, p in draft.named_parameters():
            if "embed" not in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.3)
    ids = torch.tensor([[11, 22, 33, 44, 55, 66, 77, 88]])
    feats = FrozenTarget(model)(ids, aux_layer_ids=cfg.aux_layer_ids)
    with torch.no_grad():
        ttt = draft(feats.aux_hidden, ids, ttt_length=2)
    drafter = Eagle3Drafter(draft)
    t = 4
    drafter.observe(TargetStep(feats.final_hidden[0, : t + 1], feats.aux_hidden[0, : t + 1]), ids[0, 1: t + 2],
                    ids[0, : t + 2].tolist())
    torch.testing.assert_close(drafter.last_logits, ttt[0][0, t], atol=1e-4, rtol=1e-4)
    _, head = drafter.run(drafter.last_h[None], ids[0, t + 2: t + 3], torch.tensor([t + 1]), drafter._causal(1))
    torch.testing.assert_close(drafter.draft_logits(head)[0], ttt[1][0, t], atol=1e-4, rtol=1e-4)


def test_export_writes_the_eagle31_fields_and_reloads_exactly(tmp_path):
    draft = draft31(fc_norm=True, norm_output=True)
    out = write_eagle3(tmp_path / "d", draft.state_dict(), draft.config)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["fc_norm"] is True and cfg["norm_output"] is True
    back = load_eagle3_draft(out)
    assert back.config.fc_norm and back.config.norm_output
    for name, value in draft.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name
    plain = draft31()
    plain_cfg = json.loads((write_eagle3(tmp_path / "p", plain.state_dict(), plain.config) / "config.json").read_text())
    assert "fc_norm" not in plain_cfg and "norm_output" not in plain_cfg  # plain EAGLE-3 stays exactly as before
    state = draft.state_dict()
    del state["fc_norm.1.weight"]
    with pytest.raises(ValueError, match=r"missing required keys \['fc_norm\.1\.weight'\]"):
        write_eagle3(tmp_path / "bad", state, draft.config)
