"""DFlashModule through Lightning and its export: a few optimiser steps (loss falls, only the draft moves and is
checkpointed), the vLLM layout written out by hand (docs/dflash.md), write -> read -> same weights and same
proposals, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from safetensors.torch import load_file

from spec_lightning.export.dflash import load_dflash_draft, write_dflash
from spec_lightning.modules.dflash import DFlashModule
from spec_lightning.speculate.decode import speculative_generate
from tests.conftest import make_tiny_llama
from tests.test_family_matrix import HandData

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings(r"ignore:Found \d+ module\(s\) in eval mode")]


class TinyDFlash(DFlashModule):
    def load_target(self):
        return make_tiny_llama(vocab=256)


def trained(steps: int = 4, tmp_path=None) -> tuple[DFlashModule, list[float], Trainer]:
    torch.manual_seed(0)
    module = TinyDFlash(block_size=4, num_draft_layers=2, num_anchors=6,
                        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))
    losses: list[float] = []

    class Losses(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, limit_val_batches=1,
                      num_sanity_val_steps=0, callbacks=[Losses()], default_root_dir=tmp_path)
    trainer.fit(module, datamodule=HandData())
    return module, losses, trainer


def test_fit_trains_the_draft_only_and_checkpoints_it(tmp_path):
    module, losses, trainer = trained(tmp_path=tmp_path)
    target_before = make_tiny_llama(vocab=256).state_dict()
    assert all(torch.equal(v, module.target.model.state_dict()[k]) for k, v in target_before.items())
    assert losses[-1] < losses[0]
    metrics = trainer.validate(module, dataloaders=HandData().train_dataloader(), verbose=False)[0]
    assert {"val_loss", "val_acc_1", "val_acc_2", "val_acc_3"} <= set(metrics)
    cum = 1.0  # the estimate is 1 + the sum of the cumulative slot accuracies, each <= the plain one
    assert 1.0 <= metrics["val_accept_length_est"] <= cum + sum(metrics[f"val_acc_{k}"] for k in (1, 2, 3)) + 1e-6
    trainer.save_checkpoint(tmp_path / "x.ckpt")
    ckpt = torch.load(tmp_path / "x.ckpt", weights_only=True)
    assert ckpt["state_dict"] and all(k.startswith("draft.") for k in ckpt["state_dict"])
    assert "draft.mask_embedding" in ckpt["state_dict"]
    back = TinyDFlash.load_from_checkpoint(tmp_path / "x.ckpt", weights_only=True)
    back.configure_model()
    back.load_state_dict(ckpt["state_dict"], strict=False)
    assert all(torch.equal(v, back.draft.state_dict()[k]) for k, v in module.draft.state_dict().items())


def test_export_layout_by_hand(tmp_path):
    module, _, _ = trained(steps=1)
    out = module.export_draft(str(tmp_path / "dflash"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["DFlashDraftModel"] and cfg["model_type"] == "qwen3"
    assert cfg["dflash_config"]["mask_token_id"] == 255  # the last id of the tiny target's 256
    assert cfg["dflash_config"]["target_layer_ids"] == [1, 3]  # z-lab's default for 2 draft layers of 6: 1 .. N-3
    assert cfg["num_hidden_layers"] == 2 and cfg["block_size"] == 4 and cfg["num_target_layers"] == 6
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (32, 4, 2, 8)
    assert cfg["rope_theta"] == 50000.0 and cfg["vocab_size"] == 256 and "causal" not in cfg["dflash_config"]
    layer = ["input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
             "self_attn.o_proj", "self_attn.q_norm", "self_attn.k_norm", "mlp.gate_proj", "mlp.up_proj",
             "mlp.down_proj"]
    want = {"fc.weight", "hidden_norm.weight", "norm.weight"} | {f"layers.{i}.{n}.weight" for i in range(2)
                                                                 for n in layer}
    weights = load_file(str(out / "model.safetensors"))
    assert set(weights) == want  # no lm_head, no embed_tokens: vLLM shares the target's
    assert weights["fc.weight"].shape == (32, 2 * 32)
    mask = torch.load(out / "mask_embedding.pt", weights_only=True)
    assert mask["mask_token_id"] == 255 and torch.equal(mask["embedding"], module.draft.mask_embedding.detach())


def test_export_round_trip_gives_the_same_draft_and_proposals(tmp_path):
    module, _, _ = trained(steps=2)
    out = module.export_draft(str(tmp_path / "dflash"))
    back = load_dflash_draft(out)
    assert back.config == module.draft.config
    for k, v in module.draft.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    fresh = TinyDFlash(block_size=4, num_draft_layers=2)
    fresh.load_export(str(out))
    target = module.decode_target()
    prompt = [1, 7, 50, 9]
    a = speculative_generate(target, module.make_drafter(), prompt, 20, num_draft_tokens=3)
    b = speculative_generate(fresh.decode_target(), fresh.make_drafter(), prompt, 20, num_draft_tokens=3)
    assert a.tokens == b.tokens and a.accepted == b.accepted


def test_export_refuses_bad_weights_and_keeps_nothing(tmp_path):
    module, _, _ = trained(steps=1)
    with torch.no_grad():
        module.draft.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite.*layers.1.mlp.down_proj.weight"):
        write_dflash(tmp_path / "bad", module.draft)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="a DFlash draft exports in vLLM"):
        module.export_draft(str(tmp_path / "x"), layout="fastertransformer")


def test_export_casts_to_the_given_dtype(tmp_path):
    module, _, _ = trained(steps=1)
    out = write_dflash(tmp_path / "bf16", module.draft, dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_file(str(out / "model.safetensors")).values())
    assert torch.load(out / "mask_embedding.pt", weights_only=True)["embedding"].dtype == torch.bfloat16


def test_export_that_does_not_fit_is_refused_before_writing(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from spec_lightning.drafts.dflash import DFlashConfig, DFlashDraft

    torch.manual_seed(0)
    draft = DFlashDraft(DFlashConfig.tiny())
    # the bytes of what lands: every weight but the mask embedding, plus the mask embedding (H floats)
    needed = sum(v.numel() * v.element_size() for v in draft.state_dict().values())
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "d"
    with pytest.raises(OSError, match=rf"not enough disk space to write {out}: {needed} bytes needed, 1000 bytes free"):
        write_dflash(out, draft)
    assert list(tmp_path.iterdir()) == []
