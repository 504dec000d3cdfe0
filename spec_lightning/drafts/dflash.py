"""The DFlash block draft (arXiv 2602.06036; vLLM ``qwen3_dflash.py``) with a step-level API. No Lightning.

Conventions (each with its source) are in ``docs/dflash.md``. In short: ``fc`` projects the concatenated target
features of the context, ``hidden_norm`` normalises them, and every draft layer turns them into extra keys/values
(its own ``k_proj``/``v_proj``/``k_norm``, RoPE at the context positions; never through ``input_layernorm``). The
queries are a block ``[anchor, mask, ..., mask]`` of token embeddings (the target's embedding, shared and frozen;
the mask slots read the draft's own ``mask_embedding``) run through Qwen3 decoder layers whose attention sees the
context keys and, non-causally, every key of its own block. ``norm`` then the target's lm_head give, at block slot
k >= 1, the draft's guess of the token at position ``anchor + k``.

One forward, two callers: training (``modules.dflash``: many blocks per sequence, each seeing the context strictly
before its anchor, :func:`block_attention_mask`) and decoding (``speculate.dflash``: one block after the verified
prefix, context keys cached) both call :meth:`DFlashDraft.context_kv` and :meth:`DFlashDraft.block_hidden`.

Parameter names are vLLM's serving names (``fc``, ``hidden_norm``, ``layers.{i}.*``, ``norm``, ``mask_embedding``),
so export is a state-dict copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spec_lightning.drafts.common import TINY_SHAPE, TargetShapedConfig, check_layer_ids, check_shape, target_shape
from spec_lightning.drafts.eagle3 import DEFAULT_ROPE_THETA, Eagle3MLP, RotaryEmbedding, apply_rope

KV = tuple[Tensor, Tensor]  # keys, values [B, h_kv, S, D] of one layer


def default_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """z-lab's ``build_target_layer_ids``: one target layer per draft layer, spread from layer 1 to ``N - 3``
    (``[N // 2]`` for a one-layer draft); Qwen3-8B (36 layers) with 5 draft layers gives ``[1, 9, 17, 25, 33]``,
    the ids of the released ``z-lab/Qwen3-8B-DFlash-b16``. Ids are decoder-layer outputs (our aux-id meaning)."""
    if num_draft_layers == 1:
        return [num_target_layers // 2]
    start, end = 1, num_target_layers - 3
    return [int(round(start + i * (end - start) / (num_draft_layers - 1))) for i in range(num_draft_layers)]


@dataclass
class DFlashConfig(TargetShapedConfig):
    """Shape of a DFlash draft; hidden size, heads, RoPE and norm epsilon are the target's (``from_target_config``).

    Attributes:
        hidden_size: H, the target's hidden size (the draft shares its embedding and lm_head).
        intermediate_size: MLP width of each draft layer.
        num_attention_heads / num_key_value_heads / head_dim: attention shape (GQA supported).
        vocab_size: V, the target vocabulary (the shared lm_head's rows).
        target_layer_ids: target decoder layers whose outputs feed ``fc`` (``dflash_config.target_layer_ids``).
        target_num_hidden_layers: N of the target.
        num_layers: draft decoder layers (``num_hidden_layers`` of the exported config).
        block_size: trained block length B (anchor + B - 1 masks): chains of at most B - 1 tokens.
        mask_token_id: the id whose embedding the mask slots read (``dflash_config.mask_token_id``); the draft ships
            its own trained ``mask_embedding`` for it, so any id the target never needs to embed works.
        rms_norm_eps, rope_theta, rope_scaling, max_position_embeddings: the target's.
        hidden_act: the MLP activation (SiLU, Qwen3's).
    """

    target_layer_ids: list[int]
    target_num_hidden_layers: int
    num_layers: int = 1
    block_size: int = 8
    mask_token_id: int = 0
    rms_norm_eps: float = 1e-6
    rope_theta: float = DEFAULT_ROPE_THETA
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    hidden_act: str = "silu"

    def __post_init__(self) -> None:
        check_shape(self, ("num_layers",))
        if self.block_size < 2:
            raise ValueError(f"DFlashConfig.block_size must be >= 2 (an anchor and at least one mask), got "
                             f"{self.block_size}")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"mask_token_id must be in [0, {self.vocab_size - 1}], got {self.mask_token_id}")
        self.target_layer_ids = check_layer_ids(self.target_layer_ids, self.target_num_hidden_layers,
                                                "target layer id")

    def feature_layer_ids(self) -> list[int]:
        return self.target_layer_ids

    @classmethod
    def tiny(cls, **overrides: Any) -> DFlashConfig:
        """A few-thousand-parameter draft for unit tests (``drafts.common.TINY_SHAPE``)."""
        return cls(**{**TINY_SHAPE, "target_layer_ids": [1, 3], "num_layers": 2, "block_size": 4, "mask_token_id": 127,
                      **overrides})

    @classmethod
    def from_target_config(cls, hf_config: Any, num_layers: int = 1, block_size: int = 8,
                           mask_token_id: int | None = None, target_layer_ids: list[int] | None = None) -> DFlashConfig:
        """The draft for a target of any family: its shape, norm epsilon and RoPE (``drafts.common``)."""
        shape = target_shape(hf_config)
        return cls(
            **shape, num_layers=num_layers, block_size=block_size,
            target_layer_ids=(list(target_layer_ids) if target_layer_ids is not None
                              else default_target_layer_ids(shape["target_num_hidden_layers"], num_layers)),
            mask_token_id=shape["vocab_size"] - 1 if mask_token_id is None else int(mask_token_id),
        )


# --------------------------------------------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------------------------------------------
class DFlashAttention(nn.Module):
    """Qwen3 attention (per-head ``q_norm``/``k_norm`` before RoPE) whose keys are the context's then the block's."""

    def __init__(self, cfg: DFlashConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        H = cfg.hidden_size
        self.q_proj = nn.Linear(H, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(H, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(H, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, H, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=cfg.rms_norm_eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=cfg.rms_norm_eps)

    def kv(self, x: Tensor, cos: Tensor, sin: Tensor) -> KV:
        """Keys (``k_proj``, ``k_norm``, RoPE) and values ``[B, h_kv, S, D]`` of inputs ``x [B, S, H]``."""
        B, S, _ = x.shape
        k = self.k_norm(self.k_proj(x).view(B, S, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(k, cos, sin), v

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, context: KV, mask: Tensor | None) -> Tensor:
        """x ``[B, Q, H]`` (block queries); context: the layer's context keys/values; mask: bool
        ``[B, 1 or h, Q, S + Q]`` (True = attend) or None (everything)."""
        B, Q, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, Q, self.num_heads, self.head_dim)).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k, v = self.kv(x, cos, sin)
        k, v = torch.cat([context[0], k], dim=2), torch.cat([context[1], v], dim=2)
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask,
                                             enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, Q, self.num_heads * self.head_dim))


class DFlashDecoderLayer(nn.Module):
    """A Qwen3 decoder layer (pre-norm residual) attending over context + block keys (vLLM
    ``DFlashQwen3DecoderLayer``)."""

    def __init__(self, cfg: DFlashConfig) -> None:
        super().__init__()
        H = cfg.hidden_size
        self.input_layernorm = nn.RMSNorm(H, eps=cfg.rms_norm_eps)
        self.self_attn = DFlashAttention(cfg)
        self.post_attention_layernorm = nn.RMSNorm(H, eps=cfg.rms_norm_eps)
        self.mlp = Eagle3MLP(H, cfg.intermediate_size)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, context: KV, mask: Tensor | None) -> Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, context, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


# --------------------------------------------------------------------------------------------------------------
# the draft
# --------------------------------------------------------------------------------------------------------------
class DFlashDraft(nn.Module):
    """DFlash draft: ``fc`` + ``hidden_norm`` over the target's features, ``num_layers`` Qwen3 layers, ``norm`` and a
    trained ``mask_embedding``; the token embedding and lm_head are the target's (passed in, never owned)."""

    def __init__(self, config: DFlashConfig) -> None:
        super().__init__()
        self.config = config
        H = config.hidden_size
        self.fc = nn.Linear(config.num_aux * H, H, bias=False)
        self.hidden_norm = nn.RMSNorm(H, eps=config.rms_norm_eps)
        self.layers = nn.ModuleList(DFlashDecoderLayer(config) for _ in range(config.num_layers))
        self.norm = nn.RMSNorm(H, eps=config.rms_norm_eps)
        self.mask_embedding = nn.Parameter(torch.zeros(H))  # set from the target's embedding by the module
        self.rotary = RotaryEmbedding(config)  # type: ignore[arg-type]  # reads the same RoPE fields

    def project(self, aux_hidden: Tensor) -> Tensor:
        """Context states: ``hidden_norm(fc(aux))`` ``[..., H]`` of target features ``[..., num_aux * H]``."""
        return self.hidden_norm(self.fc(aux_hidden.to(self.fc.weight.dtype)))

    def context_kv(self, context: Tensor, position_ids: Tensor) -> list[KV]:
        """Every layer's keys/values of context states ``[B, S, H]`` at RoPE positions ``[B, S]``."""
        cos, sin = self.rotary(position_ids, context.dtype)
        return [layer.self_attn.kv(context, cos, sin) for layer in self.layers]

    def embed(self, input_ids: Tensor, embed_tokens: nn.Module) -> Tensor:
        """Block inputs ``[..., H]``: the target's embedding, ``mask_embedding`` wherever the id is the mask id (as
        vLLM substitutes a shipped mask embedding)."""
        emb = embed_tokens(input_ids).to(self.mask_embedding.dtype)
        is_mask = (input_ids == self.config.mask_token_id)[..., None]
        return torch.where(is_mask, self.mask_embedding.expand_as(emb), emb)

    def block_hidden(self, block_emb: Tensor, position_ids: Tensor, context: list[KV],
                     mask: Tensor | None = None) -> Tensor:
        """The lm_head input ``norm(h)`` ``[B, Q, H]`` of block embeddings ``[B, Q, H]`` at RoPE positions ``[B, Q]``
        over per-layer context keys (:meth:`context_kv`); mask: bool ``[B, 1, Q, S + Q]`` or None (non-causal,
        everything visible)."""
        cos, sin = self.rotary(position_ids, block_emb.dtype)
        h = block_emb
        for layer, kv in zip(self.layers, context, strict=True):
            h = layer(h, cos, sin, kv, mask)
        return self.norm(h)


# --------------------------------------------------------------------------------------------------------------
# training blocks
# --------------------------------------------------------------------------------------------------------------
def sample_anchors(loss_mask: Tensor, block_size: int, num_anchors: int,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Anchor positions per row (SpecForge ``_sample_anchor_positions``): ``(anchors [B, n] long, keep [B, n] bool)``.

    Candidates are positions ``a <= T - block_size`` whose token is trainable (``loss_mask``), so a whole block fits
    in the row; each row draws ``min(num_anchors, its candidates)`` of them uniformly without replacement, sorted;
    ``n`` is the largest such count over the rows, and unused slots have ``keep`` False (anchor 0).
    """
    B, T = loss_mask.shape
    last = T - block_size
    candidates = torch.zeros(B, max(last + 1, 0), dtype=torch.bool, device=loss_mask.device)
    if last >= 0:
        candidates = loss_mask[:, : last + 1].bool()
    counts = candidates.sum(1)
    n = int(min(num_anchors, int(counts.max()) if B else 0))
    if n == 0:
        return torch.zeros(B, 0, dtype=torch.long, device=loss_mask.device), torch.zeros(B, 0, dtype=torch.bool,
                                                                                         device=loss_mask.device)
    noise = torch.rand(candidates.shape, generator=generator, device=generator.device if generator is not None
                       else loss_mask.device).to(loss_mask.device)
    noise = torch.where(candidates, noise, torch.full_like(noise, 2.0))  # non-candidates sort last
    picked = noise.argsort(dim=1)[:, :n]
    keep = torch.arange(n, device=loss_mask.device)[None] < counts.clamp(max=n)[:, None]
    anchors = torch.where(keep, picked, torch.full_like(picked, T + 1)).sort(dim=1).values
    return torch.where(keep, anchors, torch.zeros_like(anchors)), keep


def block_attention_mask(anchors: Tensor, keep: Tensor, block_size: int, context_real: Tensor) -> Tensor:
    """bool ``[B, 1, n * bs, T + n * bs]`` (SpecForge ``create_dflash_sdpa_mask``): a query of block i sees the context
    positions strictly before its anchor that are real tokens (``context_real [B, T]``), every slot of its own block
    (non-causal), nothing of other blocks; an unused block (``keep`` False) sees only itself (its rows are never
    scored, and SDPA needs one visible key per row)."""
    B, n = anchors.shape
    T = context_real.shape[1]
    Q = n * block_size
    block_of_q = torch.arange(Q, device=anchors.device) // block_size  # [Q]
    anchor_q = anchors[:, block_of_q]  # [B, Q]
    ctx = (torch.arange(T, device=anchors.device)[None, None] < anchor_q[..., None]) & context_real.bool()[:, None]
    ctx &= keep[:, block_of_q][..., None]
    own = block_of_q[:, None] == block_of_q[None, :]  # [Q, Q]
    return torch.cat([ctx, own[None].expand(B, Q, Q)], dim=-1)[:, None]


def block_positions(anchors: Tensor, block_size: int) -> Tensor:
    """RoPE positions ``[B, n * bs]`` of the blocks: ``anchor + k`` at slot k."""
    B, n = anchors.shape
    return (anchors[..., None] + torch.arange(block_size, device=anchors.device)).reshape(B, n * block_size)


def block_input_ids(input_ids: Tensor, anchors: Tensor, block_size: int, mask_token_id: int) -> Tensor:
    """Block tokens ``[B, n * bs]``: the anchor's own token at slot 0, ``mask_token_id`` at slots 1..bs-1."""
    B, n = anchors.shape
    ids = torch.full((B, n, block_size), mask_token_id, dtype=input_ids.dtype, device=input_ids.device)
    ids[:, :, 0] = input_ids.gather(1, anchors)
    return ids.reshape(B, n * block_size)


def decay_weights(block_size: int, gamma: float | None, device: torch.device | None = None) -> Tensor:
    """Loss weight of block slots ``[bs]`` (paper Eq. 4 as SpecForge implements it): 0 for the anchor slot,
    ``exp(-(k - 1) / gamma)`` for slot k >= 1 (1 everywhere when ``gamma`` is None)."""
    k = torch.arange(block_size, device=device, dtype=torch.float32)
    w = torch.ones_like(k) if gamma is None else torch.exp(-(k - 1).clamp(min=0) / gamma)
    w[0] = 0.0
    return w
