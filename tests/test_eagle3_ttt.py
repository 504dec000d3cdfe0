"""THE key EAGLE-3 test: the TTT forward against a deliberately naive reference (SPEC §3.6, §3.7, §3.8).

The reference below shares nothing with the implementation except the parameter tensors: every step's attention
is computed over the *concatenated* keys of all steps so far with a dense mask built element by element from the
rule of SPEC §3.7 (step-0 keys at positions <= t and not padding; keys of steps 1..k only at the same position t),
with plain Python loops. Loss, per-step logits and gradients must agree to 1e-5 in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from spec_lightning.drafts.eagle3 import Eagle3Config, Eagle3Draft
from tests.references import soft_cross_entropy, step_decayed_sum


# ------------------------------- naive reference -------------------------------------------------------------
def ref_rmsnorm(x, w, eps):
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def ref_rope(x, pos, theta):
    """x [T, D] for one head, rotated at integer positions pos [T] (rotate-half convention)."""
    D = x.shape[-1]
    out = torch.empty_like(x)
    for t in range(x.shape[0]):
        for i in range(D // 2):
            angle = pos[t] * theta ** (-2.0 * i / D)
            c, s = math.cos(angle), math.sin(angle)
            a, b = x[t, i], x[t, i + D // 2]
            out[t, i] = a * c - b * s
            out[t, i + D // 2] = b * c + a * s
    return out


def ref_dense_mask(T, k, attn):
    """allowed[t, j*T + s] for a query at step k, position t, over the keys of steps 0..k."""
    m = torch.zeros(T, (k + 1) * T, dtype=torch.bool)
    for t in range(T):
        for j in range(k + 1):
            for s in range(T):
                if j == 0:
                    m[t, s] = s <= t and bool(attn[s])
                else:
                    m[t, j * T + s] = s == t
    return m


def ref_layer(P, prefix, cfg, h, emb, pos, attn, kv_store, k, first, b):
    """One draft decoder layer at step k for batch row b. kv_store[prefix] collects (K, V) of every step."""
    eps, nh, nkv, D = cfg.rms_norm_eps, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    if first:
        x = torch.cat([ref_rmsnorm(emb, P[prefix + "input_layernorm.weight"], eps),
                       ref_rmsnorm(h, P[prefix + "hidden_norm.weight"], eps)], -1)
    else:
        x = ref_rmsnorm(h, P[prefix + "input_layernorm.weight"], eps)
    T = x.shape[0]
    q = x @ P[prefix + "self_attn.q_proj.weight"].T
    kk = x @ P[prefix + "self_attn.k_proj.weight"].T
    vv = x @ P[prefix + "self_attn.v_proj.weight"].T
    q_heads = [ref_rope(q[:, i * D:(i + 1) * D], pos, cfg.rope_theta) for i in range(nh)]
    k_heads = [ref_rope(kk[:, i * D:(i + 1) * D], pos, cfg.rope_theta) for i in range(nkv)]
    v_heads = [vv[:, i * D:(i + 1) * D] for i in range(nkv)]
    kv_store.setdefault((prefix, b), []).append((k_heads, v_heads))
    steps = kv_store[(prefix, b)]
    assert len(steps) == k + 1
    mask = ref_dense_mask(T, k, attn)
    outs = []
    for i in range(nh):
        g = i // (nh // nkv)  # GQA: query head i reads kv head i // group
        K = torch.cat([steps[j][0][g] for j in range(k + 1)], 0)  # [(k+1)T, D]
        V = torch.cat([steps[j][1][g] for j in range(k + 1)], 0)
        scores = (q_heads[i] @ K.T) / math.sqrt(D)
        scores = scores.masked_fill(~mask, float("-inf"))
        outs.append(torch.softmax(scores, -1) @ V)
    attn_out = torch.cat(outs, -1) @ P[prefix + "self_attn.o_proj.weight"].T
    h = h + attn_out  # residual: the un-normed h
    z = ref_rmsnorm(h, P[prefix + "post_attention_layernorm.weight"], eps)
    mlp = (torch.nn.functional.silu(z @ P[prefix + "mlp.gate_proj.weight"].T) * (z @ P[prefix + "mlp.up_proj.weight"].T))
    return h + mlp @ P[prefix + "mlp.down_proj.weight"].T


def ref_ttt(P, cfg, aux, input_ids, attn, L):
    """Per step logits [L][B, T, Vd], each batch row computed on its own."""
    B, T = input_ids.shape
    per_step = [[None] * B for _ in range(L)]
    for b in range(B):
        kv_store: dict = {}
        h = aux[b] @ P["fc.weight"].T
        for k in range(L):
            ids = [int(input_ids[b, t + k + 1]) if t + k + 1 < T else 0 for t in range(T)]
            emb = P["embed_tokens.weight"][ids]
            pos = [t + k for t in range(T)]
            h = ref_layer(P, "midlayer.", cfg, h, emb, pos, attn[b], kv_store, k, True, b)
            for i in range(cfg.num_layers - 1):
                h = ref_layer(P, f"extra_layers.{i}.", cfg, h, emb, pos, attn[b], kv_store, k, False, b)
            per_step[k][b] = ref_rmsnorm(h, P["norm.weight"], cfg.rms_norm_eps) @ P["lm_head.weight"].T
    return [torch.stack(rows) for rows in per_step]


def ref_loss(logits, teacher, masks, decay):
    total = 0.0
    for k, lg in enumerate(logits):
        B, T, _ = lg.shape
        s = 0.0
        for b in range(B):
            for t in range(T):
                if masks[k][b, t]:
                    s = s - (teacher[k][b, t] * torch.log_softmax(lg[b, t], -1)).sum()
        total = total + decay**k * s / (B * T)
    return total


# ------------------------------- the test ----------------------------------------------------------------------
@pytest.mark.parametrize("num_layers", [1, 2])
def test_ttt_forward_matches_naive_dense_reference(num_layers: int) -> None:
    torch.manual_seed(0)
    cfg = Eagle3Config.tiny(num_layers=num_layers, vocab_size=40, draft_vocab_size=24, hidden_size=16,
                            intermediate_size=24, num_attention_heads=4, num_key_value_heads=2, head_dim=4)
    draft = Eagle3Draft(cfg).double()
    with torch.no_grad():
        for p in draft.parameters():
            p.normal_(0, 0.3)  # norms too, so that they matter
    B, T, L = 2, 6, 3
    aux = torch.randn(B, T, 3 * cfg.hidden_size, dtype=torch.float64)
    input_ids = torch.randint(0, cfg.vocab_size, (B, T))
    attn = torch.tensor([[1] * T, [1, 1, 1, 1, 0, 0]])  # right padding in row 1
    teacher = [torch.softmax(torch.randn(B, T, cfg.draft_vocab_size, dtype=torch.float64), -1) for _ in range(L)]
    masks = [torch.rand(B, T) > 0.3 for _ in range(L)]

    logits = draft(aux, input_ids, attn, ttt_length=L)
    loss = step_decayed_sum([soft_cross_entropy(lg, p, m) for lg, p, m in zip(logits, teacher, masks)], 0.8)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in draft.named_parameters() if p.requires_grad}

    params = {n: p.detach().clone().requires_grad_(p.requires_grad) for n, p in draft.named_parameters()}
    ref_logits = ref_ttt(params, cfg, aux, input_ids, attn, L)
    r_loss = ref_loss(ref_logits, teacher, masks, 0.8)
    r_loss.backward()

    assert len(logits) == L
    for k in range(L):
        torch.testing.assert_close(logits[k], ref_logits[k], atol=1e-5, rtol=1e-5, msg=f"step {k} logits")
    torch.testing.assert_close(loss, r_loss, atol=1e-5, rtol=1e-5)
    assert set(grads) == {n for n, p in params.items() if p.requires_grad}
    for n, g in grads.items():
        torch.testing.assert_close(g, params[n].grad, atol=1e-5, rtol=1e-5, msg=f"grad of {n}")
    assert grads["fc.weight"].abs().sum() > 0 and "embed_tokens.weight" not in grads


def test_later_steps_do_not_see_other_positions_of_later_steps() -> None:
    """Changing step-1 inputs at position s must not change step-1 outputs at any other position (diagonal rule),
    while step 0 stays causal: changing aux at position s changes only positions >= s."""
    torch.manual_seed(1)
    cfg = Eagle3Config.tiny()
    draft = Eagle3Draft(cfg).double()
    B, T = 1, 8
    aux = torch.randn(B, T, 3 * cfg.hidden_size, dtype=torch.float64)
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    base = draft(aux, ids, ttt_length=2)
    ids2 = ids.clone()
    ids2[0, 5] = (ids[0, 5] + 1) % cfg.vocab_size  # token 5: step 0's input at position 4, step 1's at 3
    other = draft(aux, ids2, ttt_length=2)
    changed0 = (base[0] - other[0]).abs().amax(-1)[0] > 1e-12
    assert changed0.tolist() == [False, False, False, False, True, True, True, True]
    changed1 = (base[1] - other[1]).abs().amax(-1)[0] > 1e-12
    # step 1 at t sees step-0 keys <= t (position 4 changed -> t >= 4) and its own step-1 input (t = 3); and
    # position 2, whose step-1 input is token 4, stays unchanged although it attends nothing beyond itself
    assert changed1.tolist() == [False, False, False, True, True, True, True, True]
