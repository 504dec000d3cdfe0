"""The third algorithm, a distilled draft LM: initialisation from the target, loss by hand, training, lossless
decoding (chain and tree) against HF generate, export and reload."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer
from torch import nn

from spec_lightning.drafts.draft_lm import draft_lm_config, draft_lm_from_target
from spec_lightning.modules.draft_lm import DraftLMModule
from spec_lightning.speculate import speculative_generate
from spec_lightning.speculate.draft_lm import DraftLMDrafter
from spec_lightning.speculate.evaluate import hf_greedy
from spec_lightning.targets import FrozenTarget
from tests.conftest import make_tiny_llama
from tests.test_medusa_module import TinyData, make_batch

pytestmark = pytest.mark.usefixtures("one_thread")


def sharp_tiny_llama() -> nn.Module:
    """A tiny random Llama whose next-token distributions are peaked (a random one is near uniform)."""
    model = make_tiny_llama(num_layers=4, seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(25.0)
    return model


class TinyDraftLM(DraftLMModule):
    def load_target(self) -> nn.Module:
        return sharp_tiny_llama()


def test_draft_copies_the_targets_first_layers():
    target = make_tiny_llama(num_layers=4, seed=0)
    draft = draft_lm_from_target(target, 2)
    assert draft.config.num_hidden_layers == 2 and target.config.num_hidden_layers == 4
    ids = torch.randint(3, 128, (1, 7))
    with torch.no_grad():
        t = target(ids, output_hidden_states=True).hidden_states
        d = draft(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(d[1], t[1], rtol=0, atol=0)  # layer 0 output: same weights, same computation
    assert torch.equal(draft.lm_head.weight, target.lm_head.weight)
    with pytest.raises(ValueError, match="smaller than the target's 4 layers"):
        draft_lm_config(target.config, 4)


def test_loss_is_soft_ce_against_the_targets_real_distribution_by_hand():
    module = TinyDraftLM(num_layers=1, temperature=2.0)
    module.configure_model()
    batch = make_batch(seed=3)
    out = module.compute(batch)
    ids, lm, attn = batch["input_ids"], batch["loss_mask"], batch["attention_mask"]
    with torch.no_grad():
        p = torch.softmax(module.target.model(ids, attention_mask=attn).logits / 2.0, -1)
    q = torch.log_softmax(module.draft_lm(ids, attention_mask=attn).logits, -1)
    counted = torch.zeros_like(lm, dtype=torch.bool)
    counted[:, :-1] = lm[:, 1:].bool() & attn[:, 1:].bool() & attn[:, :-1].bool()  # next token trainable
    expected = -(p * q).sum(-1)[counted].mean()
    torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(out["valid"][0], counted)
    agree = q.argmax(-1) == module.target.model(ids, attention_mask=attn).logits.argmax(-1)
    assert torch.equal(out["correct"][0], agree & counted)


def test_training_lowers_the_loss_and_leaves_the_target_alone():
    torch.manual_seed(0)
    module = TinyDraftLM(num_layers=1, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    module.configure_model()
    before = module.compute(make_batch(seed=0))["loss"].item()
    target_before = {k: v.clone() for k, v in module.target.model.state_dict().items()}
    trainer = Trainer(accelerator="cpu", max_steps=12, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=TinyData(n_batches=1))
    assert module.compute(make_batch(seed=0))["loss"].item() < 0.9 * before
    assert all(torch.equal(v, module.target.model.state_dict()[k]) for k, v in target_before.items())
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"] and all(k.startswith("draft_lm.") for k in checkpoint["state_dict"])


@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_decoding_is_lossless_against_hf_generate(mode):
    target_model = make_tiny_llama(num_layers=4, seed=0)
    target = FrozenTarget(target_model)
    good = DraftLMDrafter(target_model, tree_topk=2, tree_depth=3, tree_total_tokens=6)  # the target itself: oracle
    weak = DraftLMDrafter(draft_lm_from_target(target_model, 1), tree_topk=2, tree_depth=3, tree_total_tokens=6)
    for prompt in ([5, 9, 13], [40, 41, 42, 43, 44]):
        want = hf_greedy(target, prompt, 20, ())
        for drafter in (good, weak):
            out = speculative_generate(target, drafter, prompt, 20, mode=mode, num_draft_tokens=3)
            assert out.tokens == want
        oracle = speculative_generate(target, good, prompt, 20, mode=mode, num_draft_tokens=3)
        assert oracle.accept_length > 2.5  # the target as its own draft: multi-token acceptance is exercised
        if mode == "chain":
            assert oracle.accepted[:-1] == [3] * (len(oracle.accepted) - 1)


def test_export_is_a_plain_hf_directory_that_reloads(tmp_path, monkeypatch):
    import spec_lightning.modules.draft_lm as mod

    monkeypatch.setattr(mod, "load_tokenizer", lambda source: None)
    module = TinyDraftLM(num_layers=1)
    module.configure_model()
    out = module.export_draft(str(tmp_path / "draft"))
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == 1 and type(reloaded).__name__ == "LlamaForCausalLM"
    for k, v in module.draft_lm.state_dict().items():
        assert torch.equal(reloaded.state_dict()[k], v), k
    fresh = TinyDraftLM(num_layers=1)
    fresh.load_export(str(out))
    assert torch.equal(fresh.draft_lm.lm_head.weight, module.draft_lm.lm_head.weight)
