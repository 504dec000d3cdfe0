"""DFlash training (docs/dflash.md): the loss against an unrolled by-hand reference, anchor sampling, the block mask.

The reference shares no code with ``drafts.dflash`` / ``modules.dflash``: target features from HF
``output_hidden_states`` and ``model(ids).logits``, then every block by itself, one layer at a time with hand-written
RMSNorm, RoPE, GQA attention over [context strictly before the anchor | the whole block] and SiLU MLP, read from
the draft's weight tensors.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from spec_lightning.drafts.dflash import block_attention_mask, sample_anchors
from spec_lightning.modules.dflash import DFlashModule
from tests.conftest import make_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyDFlash(DFlashModule):
    def load_target(self):
        model = make_tiny_llama()
        with torch.no_grad():  # peaked distributions (logit std ~3), so every error moves the soft CE measurably
            model.lm_head.weight.mul_(40.0)
        return model


def rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x, positions, theta):
    """x [heads, n, D] rotated at integer positions [n] (rotate-half layout)."""
    D = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = positions.double()[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1).float(), torch.cat([ang.sin(), ang.sin()], -1).float()
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def block_by_hand(draft, ctx, block_emb, anchor, theta):
    """The lm_head input [bs, H] of one block: ctx [a, H] context states (already fc + hidden_norm)."""
    cfg = draft.config
    h_q, h_kv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    bs = block_emb.shape[0]
    ctx_pos, blk_pos = torch.arange(anchor), torch.arange(anchor, anchor + bs)
    x = block_emb
    for layer in draft.layers:
        at = layer.self_attn
        xn = rms(x, layer.input_layernorm.weight)
        q = rope(rms((xn @ at.q_proj.weight.T).view(bs, h_q, D), at.q_norm.weight).transpose(0, 1), blk_pos, theta)

        def keys(src, pos):
            k = rms((src @ at.k_proj.weight.T).view(src.shape[0], h_kv, D), at.k_norm.weight).transpose(0, 1)
            return rope(k, pos, theta), (src @ at.v_proj.weight.T).view(src.shape[0], h_kv, D).transpose(0, 1)

        k_c, v_c = keys(ctx, ctx_pos)
        k_b, v_b = keys(xn, blk_pos)
        k, v = torch.cat([k_c, k_b], 1), torch.cat([v_c, v_b], 1)
        rep = h_q // h_kv
        k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(D), -1)  # every key: non-causal block
        o = (att @ v).transpose(0, 1).reshape(bs, h_q * D)
        x = x + o @ at.o_proj.weight.T
        xm = rms(x, layer.post_attention_layernorm.weight)
        m = layer.mlp
        x = x + (F.silu(xm @ m.gate_proj.weight.T) * (xm @ m.up_proj.weight.T)) @ m.down_proj.weight.T
    return rms(x, draft.norm.weight)


def loss_by_hand(module, batch, anchors, keep, teacher, gamma):
    model, draft = module.target.model, module.draft
    cfg = draft.config
    ids, lm, am = batch["input_ids"], batch["loss_mask"], batch["attention_mask"]
    with torch.no_grad():
        out = model(ids, attention_mask=am, output_hidden_states=True)
    aux = torch.cat([out.hidden_states[i + 1] for i in cfg.target_layer_ids], -1)
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    num, den = 0.0, 0.0
    for b in range(ids.shape[0]):
        for j in range(anchors.shape[1]):
            if not keep[b, j]:
                continue
            a = int(anchors[b, j])
            ctx = rms(aux[b, :a] @ draft.fc.weight.T, draft.hidden_norm.weight)
            emb = torch.stack([embed[ids[b, a]]] + [draft.mask_embedding] * (cfg.block_size - 1))
            logits = block_by_hand(draft, ctx, emb, a, cfg.rope_theta) @ head.T
            for k in range(1, cfg.block_size):
                if not lm[b, a + k]:
                    continue
                w = 1.0 if gamma is None else math.exp(-(k - 1) / gamma)
                logq = torch.log_softmax(logits[k], -1)
                if teacher == "target":
                    ce = -(torch.softmax(out.logits[b, a + k - 1], -1) * logq).sum()
                else:
                    ce = -logq[ids[b, a + k]]
                num, den = num + w * ce, den + w
    return num / den


def make_batch():
    g = torch.Generator().manual_seed(3)
    B, T = 3, 24
    ids = torch.randint(3, 120, (B, T), generator=g)
    lm = torch.zeros(B, T, dtype=torch.long)
    am = torch.ones(B, T, dtype=torch.long)
    lm[0, 6:] = 1
    lm[1, 4:10] = 1  # a short answer: blocks reach past it (those slots do not count)
    lm[1, 14:20] = 1  # a second assistant turn
    lm[2, 8:17] = 1
    am[2, 17:] = 0  # right padding
    return {"input_ids": ids, "loss_mask": lm, "attention_mask": am}


@pytest.mark.parametrize("teacher,gamma", [("target", 4.0), ("data", 4.0), ("target", None)])
def test_loss_matches_unrolled_reference(teacher, gamma):
    torch.manual_seed(0)
    module = TinyDFlash(block_size=4, num_draft_layers=2, num_anchors=5, loss_decay_gamma=gamma, teacher=teacher,
                        target_layer_ids=[1, 3])
    module.configure_model()
    with torch.no_grad():  # a non-trivial mask embedding and norms
        module.draft.mask_embedding.normal_()
        for layer in module.draft.layers:
            layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    batch = make_batch()
    out = module.compute(batch, torch.Generator().manual_seed(7))
    assert bool(out["keep"].all())  # every row has >= 5 trainable positions with room for a block
    expected = loss_by_hand(module, batch, out["anchors"], out["keep"], teacher, gamma)
    torch.testing.assert_close(out["loss"], expected.float(), rtol=2e-5, atol=2e-6)
    # the counted slots: exactly the trainable tokens inside kept blocks
    counted = sum(int(batch["loss_mask"][b, int(out["anchors"][b, j]) + k])
                  for b in range(3) for j in range(5) if out["keep"][b, j] for k in range(1, 4))
    assert int(out["valid"].sum()) == counted


def test_anchor_sampling_is_uniform_over_trainable_positions():
    T, bs = 20, 4
    lm = torch.zeros(3, T, dtype=torch.long)
    lm[0, 5:] = 1  # candidates 5..16 (a block must fit: a <= T - bs = 16): 12
    lm[1, [2, 9, 17, 18]] = 1  # candidates 2, 9 (17, 18 leave no room for a block)
    counts = torch.zeros(2, T)
    g = torch.Generator().manual_seed(0)
    draws = 3000
    for _ in range(draws):
        anchors, keep = sample_anchors(lm, bs, num_anchors=3, generator=g)
        assert anchors.shape == (3, 3)
        assert keep.tolist() == [[True] * 3, [True, True, False], [False] * 3]  # row 2: nothing trainable
        a0 = anchors[0].tolist()
        assert a0 == sorted(set(a0)) and all(5 <= a <= 16 for a in a0)
        assert sorted(anchors[1, :2].tolist()) == [2, 9]
        for a in a0:
            counts[0, a] += 1
    freq = counts[0, 5:17] / draws  # each of 12 candidates drawn with probability 3/12
    assert torch.allclose(freq, torch.full_like(freq, 0.25), atol=0.04), freq


def test_block_attention_mask_by_hand():
    anchors = torch.tensor([[2, 5], [3, 0]])
    keep = torch.tensor([[True, True], [True, False]])
    real = torch.ones(2, 8, dtype=torch.bool)
    real[1, 6:] = False
    bs = 3
    mask = block_attention_mask(anchors, keep, bs, real)
    assert mask.shape == (2, 1, 6, 8 + 6)
    for b in range(2):
        for q in range(6):
            i = q // bs
            for kv in range(14):
                if kv < 8:
                    want = bool(keep[b, i]) and kv < int(anchors[b, i]) and bool(real[b, kv])
                else:
                    want = (kv - 8) // bs == i
                assert bool(mask[b, 0, q, kv]) == want, (b, q, kv)
