"""CUDA paths: compiled flex attention (forward and backward), bf16-mixed training, lossless decoding on the GPU.

These need a CUDA device and are skipped without one (CI has none; run them where a GPU is lent:
``python -m pytest -m gpu``). Each compares against an independent computation on the same tiny random target.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer

from spec_lightning.drafts.eagle3 import Eagle3Config, Eagle3Draft
from spec_lightning.modules.eagle3 import Eagle3Module
from spec_lightning.speculate.decode import speculative_generate, target_generate
from spec_lightning.speculate.eagle3 import Eagle3Drafter
from spec_lightning.speculate.medusa import MedusaDrafter
from spec_lightning.targets import FrozenTarget
from tests.conftest import make_tiny_llama
from tests.speculate_helpers import random_eagle3, random_medusa
from tests.test_eagle3_module import HandDataModule
from tests.test_medusa_module import TinyData, TinyMedusa

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


FLEX_CONFIG = Eagle3Config.tiny(hidden_size=64, intermediate_size=128, head_dim=16)  # inductor's flex needs D >= 16


def test_compiled_flex_attention_matches_eager_forward_and_backward() -> None:
    torch.manual_seed(0)
    draft = Eagle3Draft(FLEX_CONFIG).cuda()
    aux = torch.randn(2, 40, 3 * 64, device="cuda")
    ids = torch.randint(0, 128, (2, 40), device="cuda")
    mask = torch.ones(2, 40, dtype=torch.long, device="cuda")
    mask[1, 29:] = 0
    grads = {}
    for backend in ("eager", "flex"):
        draft.zero_grad()
        logits = draft(aux, ids, mask, ttt_length=4, backend=backend)
        loss = sum((lg.float().logsumexp(-1) * mask).sum() for lg in logits)
        loss.backward()
        grads[backend] = ([lg.detach() for lg in logits],
                          {n: p.grad.detach().clone() for n, p in draft.named_parameters() if p.grad is not None})
    (eager_logits, eager_grads), (flex_logits, flex_grads) = grads["eager"], grads["flex"]
    for a, b in zip(eager_logits, flex_logits, strict=True):
        torch.testing.assert_close(a[mask.bool()], b[mask.bool()], atol=1e-4, rtol=1e-4)
    assert eager_grads.keys() == flex_grads.keys() and "fc.weight" in eager_grads
    for name, g in eager_grads.items():
        torch.testing.assert_close(flex_grads[name], g, atol=1e-3, rtol=1e-3, msg=name)


def test_compiled_flex_is_reused_across_batch_lengths_in_a_bucket() -> None:
    """Batches of different lengths in one bucket run the kernels compiled for the first (no recompile)."""
    torch.manual_seed(0)
    draft = Eagle3Draft(FLEX_CONFIG).cuda()

    def step(T: int) -> None:
        aux = torch.randn(2, T, 3 * 64, device="cuda")
        ids = torch.randint(0, 128, (2, T), device="cuda")
        mask = torch.ones(2, T, dtype=torch.long, device="cuda")
        sum(lg.float().logsumexp(-1).sum() for lg in draft(aux, ids, mask, ttt_length=3, backend="flex")).backward()

    step(100)  # compiles the 128-token bucket's three TTT steps
    with torch.compiler.set_stance("fail_on_recompile"):
        for T in (37, 128, 90, 5):
            step(T)


def wide_tiny_llama():
    return make_tiny_llama(hidden=64, heads=4, kv_heads=2)  # head_dim 16: the least inductor's flex kernel takes


class WideTinyEagle3(Eagle3Module):
    def load_target(self):
        return wide_tiny_llama()


def _fit_on_gpu(module, datamodule, steps: int) -> list[float]:
    losses: list[float] = []

    from lightning.pytorch.callbacks import Callback

    class LossRecorder(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))

    trainer = Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=steps, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, num_sanity_val_steps=0, callbacks=[LossRecorder()])
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == steps
    return losses


@pytest.mark.parametrize("backend", ["eager", "flex"])
def test_eagle3_trains_in_bf16_mixed_on_gpu(backend) -> None:
    torch.manual_seed(0)
    module = WideTinyEagle3(draft_vocab_size=64, ttt_length=3, attention_backend=backend,
                        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    embed_before = wide_tiny_llama().get_input_embeddings().weight.clone()
    losses = _fit_on_gpu(module, HandDataModule(link=module.data_link), steps=30)
    assert all(torch.isfinite(torch.tensor(losses)))
    # the same 2 batches in turn; soft CE against a random teacher has a high floor (its entropy), so ask for 5%
    assert sum(losses[-2:]) < 0.95 * sum(losses[:2]), losses
    assert torch.equal(module.draft.embed_tokens.weight.cpu(), embed_before)  # frozen on the GPU too


def test_medusa_trains_in_bf16_mixed_on_gpu() -> None:
    torch.manual_seed(0)
    module = TinyMedusa(num_heads=3, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.0))
    losses = _fit_on_gpu(module, TinyData(), steps=30)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses


@pytest.mark.parametrize("kind", ["medusa", "eagle3"])
@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_greedy_speculative_decoding_is_lossless_on_gpu(kind, mode) -> None:
    """fp32 on the GPU (bf16 verification of k tokens may round a near-tie differently from a 1-token step)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = make_tiny_llama(num_layers=6, seed=3).cuda()
    if kind == "medusa":
        drafter = MedusaDrafter(random_medusa(num_heads=3).cuda())
    else:
        drafter = Eagle3Drafter(random_eagle3(model.cpu()).cuda(), tree_topk=3, tree_depth=4, tree_total_tokens=10)
        model.cuda()
    runner = FrozenTarget(model)
    plain = FrozenTarget(model)
    for prompt in ([5, 17, 99, 3], [40, 41, 42, 43, 44, 45, 46], [7]):
        want = target_generate(plain, prompt, 24, [2]).tokens
        got = speculative_generate(runner, drafter, prompt, 24, [2], mode=mode, num_draft_tokens=3)
        assert got.tokens == want, f"{kind}/{mode} diverged on prompt {prompt}"
        with torch.no_grad():  # and the GPU baseline is the target's own argmax loop (full forward, no cache)
            ids = list(prompt)
            for t in want:
                assert int(model(torch.tensor([ids], device="cuda")).logits[0, -1].argmax()) == t
                ids.append(t)
