"""Medusa1Module / Medusa2Module: label shift per head, losses, what an optimiser step touches, checkpoint contents, Medusa-2."""

from __future__ import annotations

import functools
import os

import pytest
import torch
from lightning.pytorch import LightningDataModule, Trainer
from torch.nn import functional as F
from torch.utils.data import DataLoader

from spec_lightning.losses import shifted_labels
from spec_lightning.modules.medusa1 import Medusa1Module
from spec_lightning.modules.medusa2 import Medusa2Module
from spec_lightning.modules.medusa_heads import MedusaHeadsModule, medusa_head_labels, resolve_head_weights
from tests.conftest import make_tiny_llama

ADAMW = functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.0)


class TinyMedusa(Medusa1Module):
    """Medusa1Module on a tiny random Llama (H 32, V 128, untied) instead of a real target."""

    def load_target(self):
        return make_tiny_llama(num_layers=2, seed=0)


class TinyMedusa2(Medusa2Module):
    """Medusa2Module on the same tiny random Llama."""

    def load_target(self):
        return make_tiny_llama(num_layers=2, seed=0)


def make_batch(seed: int = 0, b: int = 3, t: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (b, t), generator=g)
    attn = torch.ones(b, t, dtype=torch.long)
    attn[1, 9:] = 0  # right padding
    ids[attn == 0] = 0
    loss = torch.zeros(b, t, dtype=torch.long)
    loss[:, 4:] = 1  # "assistant" tokens from position 4 on
    loss[attn == 0] = 0
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


class TinyData(LightningDataModule):
    def __init__(self, n_batches: int = 4) -> None:
        super().__init__()
        self.batches = [make_batch(seed=i) for i in range(n_batches)]

    def _loader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None)

    def train_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()


def fit(module: MedusaHeadsModule, steps: int = 1, val: bool = False) -> Trainer:
    trainer = Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=2 if val else 0, num_sanity_val_steps=0, val_check_interval=1,
    )
    trainer.fit(module, datamodule=TinyData())
    return trainer


# --- labels ---------------------------------------------------------------------------------------------
def test_label_shift_per_head_on_hand_built_sequence():
    ids = torch.tensor([[10, 11, 12, 13, 14, 15, 0, 0]])
    attn = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]])
    loss = torch.tensor([[0, 0, 0, 1, 1, 1, 0, 0]])  # tokens 13, 14, 15 are the assistant's
    labels, valid = medusa_head_labels(ids, loss, attn, num_heads=3)
    # head 0 at t predicts token t+2, head 1 token t+3, head 2 token t+4
    expected_labels = torch.tensor([
        [[12, 13, 14, 15, 0, 0, 0, 0]],
        [[13, 14, 15, 0, 0, 0, 0, 0]],
        [[14, 15, 0, 0, 0, 0, 0, 0]],
    ])
    expected_valid = torch.tensor([
        [[0, 1, 1, 1, 0, 0, 0, 0]],  # positions 1..3 predict 13, 14, 15
        [[1, 1, 1, 0, 0, 0, 0, 0]],  # positions 0..2 predict 13, 14, 15
        [[1, 1, 0, 0, 0, 0, 0, 0]],  # positions 0..1 predict 14, 15 (13 would need t = -1)
    ]).bool()
    assert torch.equal(labels, expected_labels)
    assert torch.equal(valid, expected_valid)
    # the base head (shift 1) for Medusa-2: position t predicts t+1
    base_labels, base_valid = shifted_labels(ids, loss, attn, 1)
    assert torch.equal(base_labels, torch.tensor([[11, 12, 13, 14, 15, 0, 0, 0]]))
    assert torch.equal(base_valid, torch.tensor([[0, 0, 1, 1, 1, 0, 0, 0]]).bool())


def test_head_weights():
    assert resolve_head_weights(None, 3, "uniform") == [1.0, 1.0, 1.0]
    assert resolve_head_weights(None, 3, "decay") == pytest.approx([1.0, 0.8, 0.64])
    assert resolve_head_weights("decay", 2) == pytest.approx([1.0, 0.8])
    assert resolve_head_weights([0.5, 2.0], 2) == [0.5, 2.0]
    with pytest.raises(ValueError, match="head_weights"):
        resolve_head_weights("linear", 2)
    with pytest.raises(ValueError, match="head_weights"):
        resolve_head_weights([1.0], 2)


def test_bad_hyperparameters_are_rejected():
    with pytest.raises(ValueError, match="num_heads"):
        TinyMedusa(num_heads=0)
    with pytest.raises(ValueError, match="base_training"):
        TinyMedusa2(base_training="qlora")


# --- losses ---------------------------------------------------------------------------------------------
def test_fresh_module_heads_equal_the_target_logits():
    module = TinyMedusa(num_heads=3, num_layers=2)
    module.configure_model()
    batch = make_batch()
    logits = module(batch["input_ids"], batch["attention_mask"])
    ref = module.target.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for h in range(3):
        torch.testing.assert_close(logits[h], ref, rtol=0, atol=1e-5)


def test_losses_match_an_unrolled_reference():
    torch.manual_seed(3)
    module = TinyMedusa(num_heads=3, num_layers=1, head_weights="decay")
    module.configure_model()
    with torch.no_grad():  # non-trivial heads
        for p in module.heads.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = make_batch(seed=5)
    out = module.compute_losses(batch)
    logits = module(batch["input_ids"], batch["attention_mask"])  # [K, B, T, V]
    ids, lm, attn = batch["input_ids"], batch["loss_mask"], batch["attention_mask"]
    b, t = ids.shape
    ref_losses = []
    for h in range(3):
        terms, hits1, hits5, n = [], 0, 0, 0
        for i in range(b):
            for j in range(t):
                k = j + 2 + h
                if k < t and lm[i, k] == 1 and attn[i, k] == 1:
                    row = logits[h, i, j]
                    terms.append(-F.log_softmax(row, -1)[ids[i, k]])
                    hits1 += int(row.argmax() == ids[i, k])
                    hits5 += int(ids[i, k] in row.topk(5).indices)
                    n += 1
        ref_losses.append(torch.stack(terms).mean())
        assert int(out["valid"][h].sum()) == n
        assert int(out["top1"][h].sum()) == hits1 and int(out["top5"][h].sum()) == hits5
    ref = torch.stack(ref_losses)
    torch.testing.assert_close(out["head_losses"], ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["loss"], ref[0] + 0.8 * ref[1] + 0.64 * ref[2], rtol=1e-5, atol=1e-5)


# --- what training touches ------------------------------------------------------------------------------
def _changed(before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


def _snapshot(module: MedusaHeadsModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_medusa1_step_changes_only_head_parameters():
    module = TinyMedusa(num_heads=2, num_layers=1, optimizer=ADAMW)
    module.configure_model()
    before = _snapshot(module)
    fit(module, steps=1)
    changed = _changed(before, _snapshot(module))
    assert changed, "nothing was trained"
    assert all(k.startswith("heads.") for k in changed), sorted(changed)
    assert {"heads.lm_heads.0.weight", "heads.lm_heads.1.weight", "heads.blocks.0.layers.0.bias"} <= changed
    assert not any(p.requires_grad for p in module.target.parameters())
    assert not any(m.training for m in module.target.model.modules())  # frozen target stays in eval mode


def test_medusa2_lora_step_changes_heads_and_adapters_only():
    module = TinyMedusa2(num_heads=2, optimizer=ADAMW, lora_r=4, lora_alpha=8)
    module.configure_model()
    assert module.target is None  # LoRA: the original is the same network with adapters disabled
    before = _snapshot(module)
    fit(module, steps=2)  # two steps: LoRA B starts at 0, so A only moves from the second step on
    changed = _changed(before, _snapshot(module))
    assert all(k.startswith("heads.") or "lora_" in k for k in changed), sorted(changed)
    assert any("lora_B" in k for k in changed) and any("lora_A" in k for k in changed)
    assert any(k.startswith("heads.") for k in changed)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert any(f"{name}.lora_B" in k for k in changed), name


def test_medusa2_head_lr_is_a_multiple_of_the_optimizer_lr():
    module = TinyMedusa2(num_heads=2, optimizer=ADAMW, head_lr_multiplier=4.0)
    module.configure_model()
    optimizer = module.configure_optimizers()
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == {"base": pytest.approx(1e-2), "heads": pytest.approx(4e-2)}
    head_ids = {id(p) for p in module.heads.parameters()}
    groups: dict[str, list] = {}
    for g in optimizer.param_groups:  # each named group is split into decayed matrices and non-decayed vectors
        groups.setdefault(g["name"], []).extend(g["params"])
        assert g["weight_decay"] == (0.0 if all(p.dim() < 2 for p in g["params"]) else ADAMW.keywords["weight_decay"])
    assert {id(p) for p in groups["heads"]} == head_ids
    assert all("lora_" in n for n, p in module.base.named_parameters() if any(p is q for q in groups["base"]))


def test_medusa2_loss_is_base_plus_lambda_weighted_heads():
    module = TinyMedusa2(num_heads=2, medusa2_lambda=0.2)
    module.configure_model()
    batch = make_batch(seed=2)
    out = module.compute_losses(batch)
    ref = module.base.get_base_model()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels, valid = shifted_labels(batch["input_ids"], batch["loss_mask"], batch["attention_mask"], 1)
    base_ref = F.cross_entropy(ref[valid], labels[valid])
    torch.testing.assert_close(out["base_loss"], base_ref, rtol=1e-5, atol=1e-5)
    expected = base_ref + 0.2 * (out["head_losses"][0] + 0.8 * out["head_losses"][1])
    torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-5)


def test_self_distillation_is_zero_before_training_and_grows_after():
    module = TinyMedusa2(num_heads=1, self_distill=True, optimizer=ADAMW)
    module.configure_model()
    batch = make_batch(seed=1)
    with torch.no_grad():
        assert float(module.compute_losses(batch)["base_loss"]) == pytest.approx(0.0, abs=1e-6)  # adapters are 0
    fit(module, steps=3)
    module.eval()
    with torch.no_grad():
        assert float(module.compute_losses(batch)["base_loss"]) > 1e-6


def test_medusa2_full_step_trains_base_but_keeps_frozen_original():
    module = TinyMedusa2(base_training="full", self_distill=True, num_heads=1, optimizer=ADAMW)
    module.configure_model()
    before = _snapshot(module)
    fit(module, steps=1)
    changed = _changed(before, _snapshot(module))
    assert any(k.startswith("base.model.layers.") for k in changed)
    assert not any(k.startswith("target.") for k in changed)  # the frozen original never moves
    assert not any(p.requires_grad for p in module.target.parameters())


# --- checkpoints ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cls", "kwargs", "allowed"),
    [
        (TinyMedusa, {}, lambda k: k.startswith("heads.")),
        (TinyMedusa2, {}, lambda k: k.startswith("heads.") or (k.startswith("base.") and "lora_" in k)),
        (
            TinyMedusa2, {"base_training": "full", "self_distill": True},
            lambda k: k.startswith(("heads.", "base.")),
        ),
    ],
    ids=["medusa1", "medusa2-lora", "medusa2-full-distill"],
)
def test_checkpoint_holds_only_trained_weights_and_round_trips(tmp_path, cls, kwargs, allowed):
    module = cls(num_heads=2, num_layers=2, optimizer=ADAMW, **kwargs)
    trainer = fit(module, steps=2, val=True)
    path = tmp_path / "medusa.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    assert state and all(allowed(k) for k in state), sorted(k for k in state if not allowed(k))
    assert not any(k.startswith("target.") for k in state)
    assert sum(k.startswith("heads.") for k in state) == 2 * 2 * 2 + 2
    print(f"\n{cls.__name__}{''.join(f'/{k}={v}' for k, v in kwargs.items())}: checkpoint "
          f"{os.path.getsize(path) / 1e6:.2f} MB, {len(state)} tensors")

    reloaded = cls.load_from_checkpoint(path)
    for k, v in state.items():
        assert torch.equal(reloaded.state_dict()[k], v), k
    batch = make_batch(seed=7)
    module.eval()
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(batch["input_ids"], batch["attention_mask"]), module(batch["input_ids"], batch["attention_mask"]),
            rtol=0, atol=0,
        )


def test_validation_logs_float_metrics_per_head():
    module = TinyMedusa(num_heads=2, optimizer=ADAMW)
    trainer = fit(module, steps=1, val=True)
    metrics = trainer.callback_metrics
    for name in ("train_loss", "val_loss", "val_loss_head0", "val_loss_head1", "val_top1_head0", "val_top1_head1",
                 "val_top5_head0", "val_top5_head1", "train_top1_head0", "train_top5_head1", "train_loss_head1"):
        assert name in metrics, name
        assert metrics[name].dtype == torch.float32
    assert 0.0 <= float(metrics["val_top1_head0"]) <= float(metrics["val_top5_head0"]) <= 1.0


def test_weight_decay_never_touches_biases_or_norms():
    decayed = functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    module = TinyMedusa(num_heads=2, optimizer=decayed)
    module.configure_model()
    optimizer = module.configure_optimizers()
    by_id = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    for name, p in module.heads.named_parameters():
        assert by_id[id(p)] == (0.1 if p.dim() >= 2 else 0.0), name
