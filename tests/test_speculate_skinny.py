"""Few-row products as W @ x^T: same values as F.linear, only for few rows without gradient, modules restored."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from spec_lightning.speculate.skinny import MAX_ROWS, plain_linears, skinny_linear, skinny_linears
from tests.conftest import make_tiny_llama


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 48), (3, 48), (1, 5, 48), (2, 8, 48), (16, 48)])
def test_matches_f_linear_for_few_rows(bias, shape):
    torch.manual_seed(0)
    lin = nn.Linear(48, 40, bias=bias)
    x = torch.randn(*shape)
    with torch.no_grad():
        y = skinny_linear(lin, x)
        want = x @ lin.weight.t() + (lin.bias if bias else 0)  # written out, not F.linear
    assert y.shape == (*shape[:-1], 40) and y.is_contiguous()
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)


def test_many_rows_and_gradients_take_the_usual_path():
    torch.manual_seed(0)
    lin = nn.Linear(48, 40)
    many = torch.randn(MAX_ROWS + 1, 48)
    with torch.no_grad():
        assert torch.equal(skinny_linear(lin, many), F.linear(many, lin.weight, lin.bias))
    x = torch.randn(2, 48, requires_grad=True)
    y = skinny_linear(lin, x)
    assert torch.equal(y, F.linear(x, lin.weight, lin.bias))
    y.sum().backward()
    assert x.grad is not None


def test_context_reroutes_and_restores_every_linear():
    model = make_tiny_llama(num_layers=2)
    linears = plain_linears(model)
    assert len(linears) == 2 * 7 + 1  # q k v o gate up down per layer + lm_head
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        before = model(ids).logits
        with skinny_linears(linears):
            assert all("forward" in m.__dict__ for m in linears)
            inside = model(ids).logits
        assert all("forward" not in m.__dict__ for m in linears)
        with pytest.raises(RuntimeError), skinny_linears(linears):
            raise RuntimeError("boom")
        assert all("forward" not in m.__dict__ for m in linears)
        after = model(ids).logits
    torch.testing.assert_close(inside, before, atol=1e-5, rtol=1e-5)
    assert torch.equal(after, before)


def test_opt_in_wrapper_follows_the_measurement_and_leaves_modules_unchanged(monkeypatch):
    import spec_lightning.speculate.skinny as skinny
    from spec_lightning.speculate import cpu_decode_kernels

    model = make_tiny_llama(num_layers=2)
    linears = plain_linears(model)
    monkeypatch.setattr(skinny, "skinny_is_faster", lambda layers: True)
    with cpu_decode_kernels(model):
        assert all("forward" in m.__dict__ for m in linears)
    assert all("forward" not in m.__dict__ for m in linears)
    monkeypatch.setattr(skinny, "skinny_is_faster", lambda layers: False)  # a CPU where MKL's few-row path is fast
    with cpu_decode_kernels(model):
        assert not any("forward" in m.__dict__ for m in linears)
    with cpu_decode_kernels(model, enabled=True):  # forced on
        assert all("forward" in m.__dict__ for m in linears)
    monkeypatch.setattr(skinny, "skinny_is_faster", lambda layers: True)
    half = make_tiny_llama(num_layers=2).to(torch.bfloat16)
    with cpu_decode_kernels(model, half):  # auto: off unless every module is fp32 on the CPU
        assert not any("forward" in m.__dict__ for m in plain_linears(half))


def test_the_measurement_times_both_forms():
    from spec_lightning.speculate.skinny import skinny_is_faster

    assert skinny_is_faster(plain_linears(make_tiny_llama(num_layers=2)), repeats=1) in (True, False)
