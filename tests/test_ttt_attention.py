"""Blockwise EAGLE-3 TTT attention (memory linear in T) against the dense reference (SPEC §3.7)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from spec_lightning.drafts.ttt_attention import ttt_attention
from tests.references import step0_mask, ttt_attention_reference

pytestmark = pytest.mark.usefixtures("one_thread")


def make_inputs(B: int, h: int, h_kv: int, T: int, D: int, steps: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, h, D, generator=g).to(dtype).transpose(1, 2).requires_grad_()  # non-contiguous, as in the layer
    keys = [torch.randn(B, h_kv, T, D, generator=g).to(dtype).requires_grad_() for _ in range(steps)]
    values = [torch.randn(B, h_kv, T, D, generator=g).to(dtype).requires_grad_() for _ in range(steps)]
    grad = torch.randn(B, h, T, D, generator=g).to(dtype)
    return q, keys, values, grad


def out_and_grads(fn, q, keys, values, grad, **kwargs):
    out = fn(q, keys, values, **kwargs)
    grads = torch.autograd.grad(out, [q, *keys, *values], grad)
    return out, grads


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str) -> None:
    """Max abs error relative to the largest entry of the expected tensor (scale-free across shapes)."""
    assert not torch.isnan(actual).any(), what
    err = (actual.float() - expected.float()).abs().max().item() if actual.numel() else 0.0
    scale = max(expected.float().abs().max().item(), 1e-6) if expected.numel() else 1.0
    assert err <= rel * scale, f"{what}: max abs err {err:.3g} > {rel} * {scale:.3g}"


def check_against_reference(q, keys, values, grad, rel=1e-5, **kwargs):
    block_kwargs = {k: kwargs.pop(k) for k in ("block_size", "key_block_size") if k in kwargs}
    ref_out, ref_grads = out_and_grads(ttt_attention_reference, q, keys, values, grad, **kwargs)
    out, grads = out_and_grads(ttt_attention, q, keys, values, grad, **kwargs, **block_kwargs)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_close_rel(out, ref_out, rel, "output")
    names = ["q"] + [f"keys[{i}]" for i in range(len(keys))] + [f"values[{i}]" for i in range(len(values))]
    for name, g, ref_g, x in zip(names, grads, ref_grads, [q, *keys, *values], strict=True):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        assert_close_rel(g, ref_g, rel, f"grad {name}")
    return out, grads


@pytest.mark.parametrize("T", [1, 5, 16, 37])
@pytest.mark.parametrize("steps", [1, 2, 3, 4])
@pytest.mark.parametrize("h_kv", [2, 4])  # GQA (h=4, h_kv=2) and MHA
def test_blockwise_matches_reference(T: int, steps: int, h_kv: int) -> None:
    q, keys, values, grad = make_inputs(2, 4, h_kv, T, 8, steps, seed=T * 10 + steps)
    _, grads = check_against_reference(q, keys, values, grad, block_size=16)
    if T > 1:  # (T = 1, step 0: a single visible key, the softmax is constant and q/k get no gradient)
        assert all(g.abs().sum() > 0 for g in grads)  # gradients reach q and every step's keys and values


@pytest.mark.parametrize("key_block_size", [None, 8, 64])
@pytest.mark.parametrize("block_size", [1, 7, 16, 64])
def test_block_and_key_tile_sizes(block_size: int, key_block_size: int | None) -> None:
    q, keys, values, grad = make_inputs(2, 4, 2, 45, 8, 3, seed=1)
    check_against_reference(q, keys, values, grad, block_size=block_size, key_block_size=key_block_size)


def test_default_blocks_several_query_blocks_and_key_tiles() -> None:
    """T longer than the default 128-query blocks and 256-key tiles, with padding and documents."""
    B, T = 2, 300
    q, keys, values, grad = make_inputs(B, 2, 1, T, 8, 2, seed=11)
    key_mask = torch.ones(B, T, dtype=torch.bool)
    key_mask[1, 270:] = False
    doc = torch.zeros(B, T, dtype=torch.long)
    doc[0, 140:] = 1
    check_against_reference(q, keys, values, grad, key_mask=key_mask, document_ids=doc)


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("key_block_size", [None, 8])
def test_right_padding_and_fully_masked_rows(steps: int, key_block_size: int | None) -> None:
    B, T = 3, 29
    q, keys, values, grad = make_inputs(B, 4, 2, T, 8, steps, seed=2)
    key_mask = torch.ones(B, T, dtype=torch.long)  # 0/1 accepted as well as bool
    key_mask[0, 20:] = 0  # right padding
    key_mask[1, :6] = 0  # leading padding: queries 0..5 see no step-0 key at all
    key_mask[2] = 0  # an all-padding row
    check_against_reference(q, keys, values, grad, key_mask=key_mask, block_size=8, key_block_size=key_block_size)


def test_fully_masked_rows_follow_masked_fill_softmax() -> None:
    """A query with no visible step-0 key: uniform over all T step-0 values at step 0 (what ``masked_fill(finfo.min)``
    + softmax gives, no NaN), only the same-position keys of steps 1..k later."""
    T, D = 9, 4
    q, keys, values, _ = make_inputs(1, 2, 2, T, D, 2, seed=3)
    key_mask = torch.zeros(1, T, dtype=torch.bool)
    out0 = ttt_attention(q, keys[:1], values[:1], key_mask, block_size=4)
    torch.testing.assert_close(out0, values[0].mean(dim=2, keepdim=True).expand_as(out0))
    out1 = ttt_attention(q, keys, values, key_mask, block_size=4)
    torch.testing.assert_close(out1, values[1].expand_as(out1))  # the only visible key: step 1 at the same position


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_packed_documents(steps: int) -> None:
    B, T = 2, 40
    q, keys, values, grad = make_inputs(B, 4, 2, T, 8, steps, seed=4)
    doc = torch.tensor([[0] * 7 + [1] * 20 + [2] * 13, [3] * 33 + [4] * 7])
    key_mask = torch.ones(B, T, dtype=torch.bool)
    key_mask[1, 35:] = False  # padding at the end of the last document
    for kb in (None, 8):
        check_against_reference(q, keys, values, grad, key_mask=key_mask, document_ids=doc, block_size=16,
                                key_block_size=kb)
    # documents restart: query 7 (first token of document 1) sees only step-0 key 7, never keys 0..6
    allowed = step0_mask(T, key_mask, doc)
    assert allowed[0, 0, 7].nonzero().flatten().tolist() == [7]
    out = ttt_attention(q, keys[:1], values[:1], document_ids=doc, block_size=16)
    torch.testing.assert_close(out[0, :, 7], values[0][0, :, 7].repeat_interleave(2, dim=0))


def test_reference_equals_a_full_mask_over_the_concatenated_cache() -> None:
    """The reference is SPEC §3.7 spelled out: one (T x (k+1)T) mask over all steps' keys, plain softmax attention."""
    B, h, T, D, steps = 2, 4, 11, 8, 3
    q, keys, values, _ = make_inputs(B, h, h, T, D, steps, seed=5)
    key_mask = torch.ones(B, T, dtype=torch.bool)
    key_mask[0, 8:] = False
    full = torch.cat([step0_mask(T, key_mask)] + [torch.eye(T, dtype=torch.bool)[None, None].expand(B, 1, T, T)] *
                     (steps - 1), dim=-1)  # [B, 1, T, steps*T]
    scores = q @ torch.cat(keys, dim=2).transpose(-1, -2) * D**-0.5
    expected = torch.softmax(scores.masked_fill(~full, float("-inf")), -1) @ torch.cat(values, dim=2)
    torch.testing.assert_close(ttt_attention_reference(q, keys, values, key_mask), expected)


@pytest.mark.parametrize("steps", [1, 3])
def test_bf16_inputs(steps: int) -> None:
    """bf16 in, bf16 out (and gradients), fp32 softmax inside: within bf16 rounding of the fp32 reference."""
    q, keys, values, grad = make_inputs(2, 4, 2, 37, 16, steps, dtype=torch.bfloat16, seed=6)
    key_mask = torch.ones(2, 37, dtype=torch.bool)
    key_mask[1, 30:] = False
    up = [x.detach().float().requires_grad_() for x in (q, *keys, *values)]
    ref_out, ref_grads = out_and_grads(ttt_attention_reference, up[0], up[1:steps + 1], up[steps + 1:], grad.float(),
                                       key_mask=key_mask)
    out, grads = out_and_grads(ttt_attention, q, keys, values, grad, key_mask=key_mask, block_size=16)
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
    assert_close_rel(out, ref_out, 1e-2, "bf16 output")  # bf16 has an 8-bit mantissa: ~4e-3 relative rounding
    for g, ref_g in zip(grads, ref_grads, strict=True):
        assert_close_rel(g, ref_g, 2e-2, "bf16 grad")


class MaxAllocation(TorchDispatchMode):
    """Records the largest tensor any operator produces (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


@pytest.mark.parametrize("key_block_size", [None, 64])
def test_no_T_by_T_tensor_is_allocated_or_saved(key_block_size: int | None) -> None:
    B, h, h_kv, T, D, block = 1, 4, 2, 512, 8, 64
    q, keys, values, grad = make_inputs(B, h, h_kv, T, D, 3, seed=7)
    key_mask = torch.ones(B, T, dtype=torch.bool)
    key_mask[0, 400:] = False
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    mode = MaxAllocation()
    with mode:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = ttt_attention(q, keys, values, key_mask, block_size=block, key_block_size=key_block_size)
        torch.autograd.grad(out, [q, *keys, *values], grad)
    assert saved and max(saved) <= B * h * T * D  # only q, keys, values, the output and the lse [B, h, T]
    # fp32 [B, h, T, D] buffers (q, dq) are the largest allowed; scores are [B, h, block, key tile]
    tile = T if key_block_size is None else key_block_size
    assert mode.max_numel <= max(B * h * block * tile, B * h * T * D) < B * h * T * T // 4

    dense = MaxAllocation()  # the check does catch the dense version
    with dense:
        ttt_attention_reference(q, keys, values, key_mask)
    assert dense.max_numel >= B * h * T * T


def test_shape_errors() -> None:
    q, keys, values, _ = make_inputs(1, 4, 2, 8, 4, 2)
    with pytest.raises(ValueError, match="one key and one value"):
        ttt_attention(q, keys, values[:1])
    with pytest.raises(ValueError, match="multiple"):
        ttt_attention(q, [torch.randn(1, 3, 8, 4)], [torch.randn(1, 3, 8, 4)])
    with pytest.raises(ValueError, match="key_mask"):
        ttt_attention(q, keys, values, key_mask=torch.ones(1, 7, dtype=torch.bool))


def test_speed_benchmark_prints_json_lines(capsys) -> None:
    """benchmarks/ttt_attention_speed.py runs (in process, tiny shapes) and prints one JSON line per method."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "ttt_attention_speed.py"
    spec = importlib.util.spec_from_file_location("bench_ttt_attention_speed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--T", "40", "--steps", "2", "--heads", "2", "--kv_heads", "1", "--head_dim", "8", "--repeats", "1",
                 "--block_sizes", "16", "--in_process"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(r["method"], r["T"], r["steps"]) for r in rows] == [("dense", 40, 2), ("blockwise", 40, 2)]
    assert all(r["ms"] > 0 for r in rows) and rows[0]["saved_mb"] > rows[1]["saved_mb"] > 0  # dense keeps T x T
