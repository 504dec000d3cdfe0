"""Fused, chunked linear + cross-entropy (Liger-Kernel's idea in plain PyTorch) against the unfused reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from spec_lightning.losses import fused_linear_cross_entropy, fused_linear_soft_cross_entropy

pytestmark = pytest.mark.usefixtures("one_thread")

H, C = 24, 50


def make(N: int, dtype=torch.float32, seed: int = 0, M: int = 13):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, H, generator=g) * 2).to(dtype).requires_grad_()
    weight = torch.randn(C, H, generator=g).to(dtype).requires_grad_()
    teacher = torch.softmax(torch.randn(M, C, generator=g) * 3, dim=-1)
    index = torch.randint(0, M, (N,), generator=g)  # rows share teacher rows (several TTT steps, one teacher)
    labels = torch.randint(0, C, (N,), generator=g)
    row_weights = torch.rand(N, generator=g)
    return hidden, weight, teacher, index, labels, row_weights


def reference(hidden, weight, target, row_weights, topk):
    """Unfused: full [N, C] fp32 logits, F.cross_entropy per row, weighted sum, autograd."""
    logits = hidden.float() @ weight.float().T
    ce = F.cross_entropy(logits, target, reduction="none")
    return (row_weights * ce).sum(), logits.topk(topk, dim=-1).indices


def grads(loss, hidden, weight):
    return torch.autograd.grad(loss, [hidden, weight])


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str) -> None:
    err = (actual.float() - expected.float()).abs().max().item() if actual.numel() else 0.0
    scale = max(expected.float().abs().max().item(), 1e-12) if expected.numel() else 1.0
    assert err <= rel * scale, f"{what}: max abs err {err:.3g} > {rel} * {scale:.3g}"


# Gradients are sums over rows accumulated chunk by chunk: the unfused fp32 reference itself is ~1e-6 (relative to
# the largest entry) away from a float64 computation, so the two may differ by a few 1e-6 (measured: <= 2e-6).
GRAD_REL = 3e-6


def check(loss, top, ref_loss, ref_top, hidden, weight, rel=GRAD_REL):
    g, ref_g = grads(loss, hidden, weight), grads(ref_loss, hidden, weight)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_rel(loss, ref_loss, 1e-6, "loss")
    assert torch.equal(top, ref_top)
    for name, a, b, x in zip(("grad_hidden", "grad_weight"), g, ref_g, (hidden, weight), strict=True):
        assert a.dtype == x.dtype and a.shape == x.shape
        assert_rel(a, b, rel, name)


@pytest.mark.parametrize("N", [1, 16, 37, 100])
@pytest.mark.parametrize("topk", [1, 5])
def test_soft_targets_with_shared_teacher_rows(N: int, topk: int) -> None:
    hidden, weight, teacher, index, _, rw = make(N, seed=N)
    rw[::3] = 0.0  # zero-weight rows (masked positions)
    loss, top = fused_linear_soft_cross_entropy(hidden, weight, teacher, index, row_weights=rw, topk=topk,
                                                chunk_size=16)
    ref_loss, ref_top = reference(hidden, weight, teacher[index], rw, topk)
    check(loss, top, ref_loss, ref_top, hidden, weight)


@pytest.mark.parametrize("N", [1, 37])
def test_soft_targets_one_row_each_and_unnormalised(N: int) -> None:
    hidden, weight, _, _, _, rw = make(N, seed=3)
    probs = torch.rand(N, C)  # rows need not sum to 1: -sum_v p(v) log softmax(v), as F.cross_entropy computes it
    probs[0] = 0.0
    loss, top = fused_linear_soft_cross_entropy(hidden, weight, probs, row_weights=rw, chunk_size=8)
    check(loss, top, *reference(hidden, weight, probs, rw, 1), hidden, weight)


@pytest.mark.parametrize("N", [1, 37, 100])
@pytest.mark.parametrize("topk", [1, 5])
def test_hard_labels(N: int, topk: int) -> None:
    hidden, weight, _, _, labels, rw = make(N, seed=N + 1)
    labels[1::4] = -100  # ignored rows, as F.cross_entropy's ignore_index
    rw[2::5] = 0.0
    loss, top = fused_linear_cross_entropy(hidden, weight, labels, row_weights=rw, topk=topk, chunk_size=16)
    check(loss, top, *reference(hidden, weight, labels, rw, topk), hidden, weight)


def test_default_row_weights_sum_and_mean_normalisations() -> None:
    hidden, weight, teacher, index, labels, _ = make(30, seed=5)
    mask = torch.rand(30) > 0.3
    for rw in (None, mask.float() / mask.numel(), mask.float() / mask.sum()):
        loss, _ = fused_linear_soft_cross_entropy(hidden, weight, teacher, index, row_weights=rw, chunk_size=7)
        ref, _ = reference(hidden, weight, teacher[index], torch.ones(30) if rw is None else rw, 1)
        assert_rel(loss, ref, 1e-6, "loss")
        loss, _ = fused_linear_cross_entropy(hidden, weight, labels, row_weights=rw, chunk_size=7)
        ref, _ = reference(hidden, weight, labels, torch.ones(30) if rw is None else rw, 1)
        assert_rel(loss, ref, 1e-6, "loss")


def test_no_rows() -> None:
    hidden, weight, teacher, index, labels, rw = make(0)
    for loss, top in (fused_linear_soft_cross_entropy(hidden, weight, teacher, index, row_weights=rw, topk=5),
                      fused_linear_cross_entropy(hidden, weight, labels, topk=1)):
        assert loss.item() == 0.0 and top.shape == (0, top.shape[1])
        g_hidden, g_weight = grads(loss, hidden, weight)
        assert g_hidden.shape == (0, H) and torch.equal(g_weight, torch.zeros(C, H))


def test_target_fn_matches_target_probs() -> None:
    hidden, weight, teacher, index, _, rw = make(45, seed=6)
    seen: list[torch.Tensor] = []

    def teacher_fn(rows: torch.Tensor) -> torch.Tensor:  # e.g. softmax(teacher_hidden[rows] @ teacher_head.T)
        seen.append(rows)
        return teacher[rows]

    loss, top = fused_linear_soft_cross_entropy(hidden, weight, target_index=index, target_fn=teacher_fn,
                                                row_weights=rw, chunk_size=16)
    assert [len(r) for r in seen] == [16, 16, 13] and torch.equal(torch.cat(seen), index)
    check(loss, top, *reference(hidden, weight, teacher[index], rw, 1), hidden, weight)
    seen.clear()  # without target_index the function gets the chunk's row numbers
    fused_linear_soft_cross_entropy(hidden, weight, target_fn=lambda rows: seen.append(rows) or teacher[rows % 13],
                                    chunk_size=16)
    assert torch.equal(torch.cat(seen), torch.arange(45))


def test_incoming_gradient_scales_and_composes() -> None:
    hidden, weight, teacher, index, labels, rw = make(20, seed=7)
    soft, _ = fused_linear_soft_cross_entropy(hidden, weight, teacher, index, row_weights=rw, chunk_size=8)
    hard, _ = fused_linear_cross_entropy(hidden, weight, labels, row_weights=rw, chunk_size=8)
    total = 0.8 * soft + 3.0 * hard + (hidden**2).sum()
    ref_soft, _ = reference(hidden, weight, teacher[index], rw, 1)
    ref_hard, _ = reference(hidden, weight, labels, rw, 1)
    ref_total = 0.8 * ref_soft + 3.0 * ref_hard + (hidden**2).sum()
    for a, b in zip(grads(total, hidden, weight), grads(ref_total, hidden, weight), strict=True):
        assert_rel(a, b, GRAD_REL, "composed gradient")


def test_no_grad_and_frozen_weight() -> None:
    hidden, weight, teacher, index, labels, _ = make(20, seed=8)
    with torch.no_grad():
        loss, top = fused_linear_cross_entropy(hidden, weight, labels, topk=2, chunk_size=8)
    assert not loss.requires_grad and top.shape == (20, 2)
    assert_rel(loss, reference(hidden, weight, labels, torch.ones(20), 1)[0], 1e-6, "loss")
    frozen = weight.detach()
    loss, _ = fused_linear_soft_cross_entropy(hidden, frozen, teacher, index, chunk_size=8)
    (g,) = torch.autograd.grad(loss, [hidden])
    (ref_g,) = torch.autograd.grad(reference(hidden, frozen, teacher[index], torch.ones(20), 1)[0], [hidden])
    assert_rel(g, ref_g, GRAD_REL, "grad_hidden")


def test_bf16_inputs() -> None:
    """bf16 hidden and weight: logits in fp32 from the bf16 values, gradients returned in bf16."""
    hidden, weight, teacher, index, labels, rw = make(40, dtype=torch.bfloat16, seed=9)
    loss, top = fused_linear_soft_cross_entropy(hidden, weight, teacher, index, row_weights=rw, chunk_size=16)
    ref_loss, ref_top = reference(hidden, weight, teacher[index], rw, 1)  # same bf16 values, upcast
    assert_rel(loss, ref_loss, 1e-6, "loss")  # the loss itself is all fp32: as exact as in fp32
    assert torch.equal(top, ref_top)
    g, ref_g = grads(loss, hidden, weight), grads(ref_loss, hidden, weight)
    for a, b, x in zip(g, ref_g, (hidden, weight), strict=True):
        assert a.dtype == torch.bfloat16 == x.dtype
        assert_rel(a, b, 1e-2, "bf16 gradient")  # one bf16 rounding (8-bit mantissa) of the fp32 gradient


class MaxAllocation(TorchDispatchMode):
    """Records the largest tensor any operator produces."""

    def __init__(self) -> None:
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_no_N_by_C_tensor_is_saved_or_allocated(kind: str) -> None:
    N, chunk = 300, 32
    hidden, weight, teacher, index, labels, rw = make(N, seed=10)
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    mode = MaxAllocation()
    with mode, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if kind == "soft":
            loss, _ = fused_linear_soft_cross_entropy(hidden, weight, teacher, index, row_weights=rw, chunk_size=chunk)
        else:
            loss, _ = fused_linear_cross_entropy(hidden, weight, labels, row_weights=rw, chunk_size=chunk)
    grads(loss, hidden, weight)
    assert saved and max(saved) <= max(N * H, C * H) < N * C  # only grad_hidden [N, H] and grad_weight [C, H]
    assert mode.max_numel <= max(chunk * C, N * H, C * H) < N * C  # logits exist one chunk at a time


def test_argument_errors() -> None:
    hidden, weight, teacher, index, labels, _ = make(5)
    with pytest.raises(ValueError, match="exactly one"):
        fused_linear_soft_cross_entropy(hidden, weight)
    with pytest.raises(ValueError, match="target_probs must be"):
        fused_linear_soft_cross_entropy(hidden, weight, teacher)  # [M, C] rows need target_index
    with pytest.raises(ValueError, match="labels must be"):
        fused_linear_cross_entropy(hidden, weight, labels[:3])
    with pytest.raises(ValueError, match="topk"):
        fused_linear_cross_entropy(hidden, weight, labels, topk=C + 1)
