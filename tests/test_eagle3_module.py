"""Eagle3Module: shift and mask alignment, OOV teacher masking, soft CE by hand, frozen embedding, checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import LightningDataModule, Trainer
from torch import nn
from torch.utils.data import DataLoader

from spec_lightning.contract import DataLink, TokenRows
from spec_lightning.modules.eagle3 import Eagle3Module, teacher_alignment
from spec_lightning.targets import FrozenTarget, TargetFeatures
from spec_lightning.vocab import DraftVocab, build_draft_vocab, vocab_from_token_ids
from tests.conftest import make_tiny_llama
from tests.references import soft_cross_entropy, step_decayed_sum


class TinyEagle3(Eagle3Module):
    def load_target(self) -> nn.Module:
        return make_tiny_llama()


# ------------------------------------------------------------------------ losses by hand
def test_soft_cross_entropy_hand_computed_three_positions() -> None:
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]])
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    mask = torch.tensor([True, True, False])  # third position does not count
    # position 0: -log(1/2) = ln 2; position 1: softmax = [3/4, 1/4] -> -(.5 ln .75 + .5 ln .25) = .5 ln(16/3)
    expected_sum = math.log(2.0) + 0.5 * math.log(16.0 / 3.0)
    assert soft_cross_entropy(logits, p, mask, "all_positions").item() == pytest.approx(expected_sum / 3)
    assert soft_cross_entropy(logits, p, mask, "valid_positions").item() == pytest.approx(expected_sum / 2)
    assert step_decayed_sum([torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0)], 0.8).item() == \
        pytest.approx(1.0 + 0.8 * 2.0 + 0.64 * 3.0)


# ------------------------------------------------------------------------ shift + mask alignment
def test_teacher_alignment_on_a_hand_built_sequence() -> None:
    # tokens:  0:sys 1:user 2:user 3:asst 4:asst 5:eot 6:pad 7:pad
    attn = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]])
    loss = torch.tensor([[0, 0, 0, 1, 1, 1, 0, 0]])
    ids = torch.arange(8)[None]
    # teacher index u = target position u + 1; u ranges over 0..6 (the last position never counts)
    # specforge: token u trainable and token u+1 real -> u in {3, 4}; u = 5 has a padding teacher position 6
    sf = teacher_alignment(ids, attn, loss, "specforge")
    assert sf.tolist() == [[False, False, False, True, True, False, False]]
    # predicted: token u+2 (the one step 0 at position u predicts) trainable and u+1 real -> u in {1, 2, 3}
    pr = teacher_alignment(ids, attn, loss, "predicted")
    assert pr.tolist() == [[False, True, True, True, False, False, False]]


class FakeTarget(nn.Module):
    """Returns fixed features: lets a test choose the teacher logits exactly. Its "final hidden state" at (b, t)
    holds the row number ``b * T + t``, and ``logits`` looks the chosen logits up by it."""

    def __init__(self, real: FrozenTarget, aux: torch.Tensor, logits: torch.Tensor) -> None:
        super().__init__()
        self.real, self.aux, self.table = real, aux, logits.reshape(-1, logits.shape[-1])
        self.config, self.text_config = real.config, real.text_config
        B, T = aux.shape[:2]
        self.rows = torch.arange(B * T, dtype=torch.float32).reshape(B, T, 1).expand(B, T, 32)

    def forward(self, input_ids, attention_mask=None, aux_layer_ids=(), return_logits=False,
                position_ids=None) -> TargetFeatures:
        return TargetFeatures(aux_hidden=self.aux, final_hidden=self.rows)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.table[hidden[..., 0].long()]


class FixedVocab(TinyEagle3):
    def build_vocab(self, target: FrozenTarget) -> DraftVocab:
        return vocab_from_token_ids(torch.arange(0, 128, 2), 128)  # even ids only


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_teacher_shift_and_oov_positions_masked_by_hand(temperature: float) -> None:
    torch.manual_seed(0)
    m = FixedVocab(draft_vocab_size=64, ttt_length=2, teacher_temperature=temperature)
    m.configure_model()
    B, T, V = 1, 5, 128
    aux = torch.randn(B, T, 3 * 32)
    target_logits = torch.randn(B, T, V)
    # full-vocabulary argmax of target positions 1..4: 10 (in), 11 (OOV), 20 (in), 31 (OOV)
    for pos, tok in zip([1, 2, 3, 4], [10, 11, 20, 31]):
        target_logits[0, pos, tok] = 50.0
    m.target = FakeTarget(m.target, aux, target_logits)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)}
    out = m.compute(batch)

    logits = m.draft(aux, ids, torch.ones_like(ids), ttt_length=2)
    even = torch.arange(0, 128, 2)

    def ce(lg, pos):  # soft CE against the renormalised teacher of target position `pos`
        p = torch.softmax(target_logits[0, pos, even] / temperature, -1)
        return -(p * torch.log_softmax(lg, -1)).sum()

    # step 0: draft position t has teacher position t+1: t=0 (tok 10, in), t=1 (11, OOV), t=2 (20, in), t=3 (OOV)
    loss0 = (ce(logits[0][0, 0], 1) + ce(logits[0][0, 2], 3)) / (B * T)
    # step 1: teacher position t+2: t=0 -> pos 2 (OOV), t=1 -> pos 3 (in), t=2 -> pos 4 (OOV)
    loss1 = ce(logits[1][0, 1], 3) / (B * T)
    torch.testing.assert_close(out["step_losses"], torch.stack([loss0, loss1]).detach())
    torch.testing.assert_close(out["loss"], loss0 + 0.8 * loss1)
    # metrics: OOV positions stay valid (they are misses), the last position never counts
    assert out["valid"][0, 0].tolist() == [True, True, True, True, False]
    assert out["valid"][1, 0].tolist() == [True, True, True, False, False]
    assert not out["correct"][0, 0, 1] and not out["correct"][0, 0, 3]


def test_metrics_correct_means_mapped_argmax_equals_target_argmax() -> None:
    torch.manual_seed(0)
    m = FixedVocab(draft_vocab_size=64, ttt_length=2)
    m.configure_model()
    B, T = 2, 6
    aux = torch.randn(B, T, 96)
    ids = torch.randint(3, 128, (B, T))
    with torch.no_grad():
        draft_logits = m.draft(aux, ids, torch.ones_like(ids), ttt_length=2)
    target_logits = torch.randn(B, T, 128)
    # make the target agree with the draft exactly at step 0, positions 0 and 2 of row 0 (teacher pos t+1)
    for t in (0, 2):
        tok = 2 * int(draft_logits[0][0, t].argmax())  # draft id d -> target id 2d (even ids)
        target_logits[0, t + 1, tok] = 100.0
    m.target = FakeTarget(m.target, aux, target_logits)
    out = m.compute({"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)})
    assert out["correct"][0, 0, 0] and out["correct"][0, 0, 2]
    manual_cum = out["correct"][0] & out["correct"][1]
    assert torch.equal(out["cum_correct"][1], manual_cum)
    assert torch.equal(out["cum_correct"][0], out["correct"][0])


# ------------------------------------------------------------------------ training with Lightning
class HandDataModule(LightningDataModule):
    def __init__(self, n: int = 8, T: int = 12, link: DataLink | None = None) -> None:
        super().__init__()
        self.link = link
        g = torch.Generator().manual_seed(0)
        rows = []
        for i in range(n):
            length = T - (i % 3)
            ids = torch.randint(3, 128, (length,), generator=g).tolist()
            mask = [0] * 4 + [1] * (length - 4)
            rows.append({"input_ids": ids, "loss_mask": mask})
        self.train_dataset = rows
        self.fingerprint = "hand-made-test-data-v1"
        self.T = T

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        B = len(rows)
        out = {k: torch.zeros(B, self.T, dtype=torch.long) for k in ("input_ids", "attention_mask", "loss_mask")}
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            out["input_ids"][i, :n] = torch.tensor(r["input_ids"])
            out["attention_mask"][i, :n] = 1
            out["loss_mask"][i, :n] = torch.tensor(r["loss_mask"])
        return out

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_dataset, batch_size=4, collate_fn=self.collate)

    def setup(self, stage: str) -> None:
        """The contract ChatDataModule implements: hand the training tokens back on the model's link."""
        if self.link is not None:
            self.link.provide(training_tokens=TokenRows(lambda: self.train_dataset, self.fingerprint))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.train_dataset, batch_size=4, collate_fn=self.collate)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eagle3_fit")
    torch.manual_seed(0)
    model = TinyEagle3(draft_vocab_size=64, ttt_length=3,
                       optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    dm = HandDataModule(link=model.data_link)  # as the CLI links them
    trainer = Trainer(accelerator="cpu", max_steps=2, limit_val_batches=1, val_check_interval=2, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    embed_before = make_tiny_llama().get_input_embeddings().weight.clone()
    trainer.fit(model, datamodule=dm)
    ckpt = tmp / "draft.ckpt"
    trainer.save_checkpoint(ckpt)
    return model, dm, trainer, ckpt, embed_before


def test_vocab_is_built_from_the_datamodule(fitted) -> None:
    model, dm, *_ = fitted
    expected = build_draft_vocab(dm.train_dataset, 128, 64)
    assert torch.equal(model.draft.d2t, expected.d2t) and torch.equal(model.draft.t2d, expected.t2d)


def test_embedding_frozen_through_optimizer_steps(fitted) -> None:
    model, _, trainer, _, embed_before = fitted
    assert trainer.global_step == 2
    emb = model.draft.embed_tokens.weight
    assert not emb.requires_grad and emb.grad is None
    assert torch.equal(emb, embed_before)
    optimised = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert id(emb) not in optimised
    assert all(not p.requires_grad for p in model.target.parameters())
    assert all(id(p) not in optimised for p in model.target.parameters())


def test_validation_metrics_logged(fitted) -> None:
    _, _, trainer, _, _ = fitted
    m = trainer.callback_metrics
    for k in range(3):
        assert 0.0 <= float(m[f"val_acc_{k}"]) <= 1.0
        assert float(m[f"val_cum_acc_{k}"]) <= float(m[f"val_acc_{k}"]) + 1e-6
    est = 1.0 + sum(float(m[f"val_cum_acc_{k}"]) for k in range(3))
    assert float(m["val_accept_length_est"]) == pytest.approx(est)
    assert "val_loss" in m and "train_loss" in m


def test_checkpoint_has_no_target_and_round_trips(fitted) -> None:
    model, _, _, ckpt, _ = fitted
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert state and not any(k.startswith("target.") for k in state)
    assert "draft.embed_tokens.weight" not in state  # frozen copy of the target's: rebuilt, never saved
    assert {"draft.fc.weight", "draft.d2t", "draft.t2d", "draft.lm_head.weight"} <= set(state)
    reloaded = TinyEagle3.load_from_checkpoint(ckpt)
    assert reloaded.hparams.ttt_length == 3 and reloaded.hparams.draft_vocab_size == 64
    for k, v in model.draft.state_dict().items():
        assert torch.equal(reloaded.draft.state_dict()[k], v), k


def test_bad_hyperparameters_are_named() -> None:
    with pytest.raises(ValueError, match="mask_alignment"):
        Eagle3Module(mask_alignment="shifted")
    with pytest.raises(ValueError, match="loss_normalization"):
        Eagle3Module(loss_normalization="mean")
    with pytest.raises(ValueError, match="ttt_length"):
        Eagle3Module(ttt_length=0)
    with pytest.raises(ValueError, match="teacher_temperature"):
        Eagle3Module(teacher_temperature=0.0)
