"""The EAGLE-3 draft network and its training-time test (TTT) forward (SPEC §3.6, §3.7). No Lightning here.

Parameter names are exactly the serving names of SPEC §5 (``fc``, ``midlayer.*``, ``norm``, ``lm_head``,
``embed_tokens``, buffers ``d2t``/``t2d``), so export is a plain state-dict copy.

TTT attention (SPEC §3.7): a query at step k, position t attends to the step-0 keys at positions <= t (causal,
padding respected) and to the keys of steps 1..k at the *same* position t only. It is computed without a dense
``(L*T) x (L*T)`` mask: step-0 causal scores ``[T, T]`` plus one diagonal score ``q_t . k^{(j)}_t`` per earlier step,
softmaxed jointly (same pattern as SpecForge's eager Eagle3 attention).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

AttentionBackend = Literal["eager", "flex"]


# --------------------------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Eagle3Config:
    """Shape of an EAGLE-3 draft; the attention/RoPE fields are copied from the target (``from_target_config``).

    Attributes:
        hidden_size: H, the target's hidden size.
        intermediate_size: MLP width of the draft decoder layer (the target's).
        num_attention_heads / num_key_value_heads / head_dim: attention shape (the target's; GQA supported).
        rms_norm_eps: RMSNorm epsilon (the target's).
        rope_theta: RoPE base, copied from the target (never a silent 10000 default).
        rope_scaling: the target's RoPE scaling dict (``{"rope_type": "llama3", ...}``) or None for plain RoPE.
        max_position_embeddings: the target's (a too-small value is a known acceptance trap in serving).
        vocab_size: V, the target vocabulary (size of ``embed_tokens`` and ``t2d``).
        draft_vocab_size: Vd, the draft's output vocabulary (``lm_head`` rows, ``d2t``).
        num_layers: draft decoder layers; layer 0 takes ``2H`` attention inputs, later ones take ``H``.
        aux_layer_ids: target decoder-layer ids whose outputs feed ``fc`` (SPEC §3.1).
        target_num_hidden_layers: N of the target (decides whether ``aux_layer_ids`` are the defaults).
    """

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    draft_vocab_size: int
    aux_layer_ids: list[int]
    target_num_hidden_layers: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    num_layers: int = 1
    hidden_act: str = "silu"

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                     "vocab_size", "draft_vocab_size", "max_position_embeddings", "num_layers",
                     "target_num_hidden_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Eagle3Config.{name} must be a positive int, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.draft_vocab_size > self.vocab_size:
            raise ValueError(f"draft_vocab_size ({self.draft_vocab_size}) must be <= vocab_size ({self.vocab_size})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not self.aux_layer_ids:
            raise ValueError("aux_layer_ids must name at least one target layer")
        self.aux_layer_ids = [int(i) for i in self.aux_layer_ids]
        for i in self.aux_layer_ids:
            if not 0 <= i < self.target_num_hidden_layers - 1:
                raise ValueError(f"aux layer id {i} must be in [0, {self.target_num_hidden_layers - 2}] "
                                 "(a decoder layer of the target, never its last)")
        if self.rope_theta is None or self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta!r}")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if rope_type is None:
                raise ValueError(f"rope_scaling needs a 'rope_type', got {self.rope_scaling}")
        if self.hidden_act != "silu":
            raise ValueError(f"only hidden_act='silu' is supported (Llama/Qwen MLP), got {self.hidden_act!r}")

    @property
    def num_aux(self) -> int:
        return len(self.aux_layer_ids)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def tiny(cls, **overrides: Any) -> Eagle3Config:
        """A few-thousand-parameter draft for unit tests (matches ``tests/conftest.py::make_tiny_llama``)."""
        kwargs: dict[str, Any] = {
            "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 8, "vocab_size": 128, "draft_vocab_size": 64, "aux_layer_ids": [1, 2, 2],
            "target_num_hidden_layers": 6, "rms_norm_eps": 1e-6, "rope_theta": 50000.0,
            "max_position_embeddings": 256,
        }
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_target_config(cls, hf_config: Any, draft_vocab_size: int, num_layers: int = 1,
                           aux_layer_ids: list[int] | None = None) -> Eagle3Config:
        """Copy the target's shape and RoPE (``rope_theta``/``rope_scaling`` or transformers-5 ``rope_parameters``)."""
        from spec_lightning.targets import default_aux_layer_ids

        cfg = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
        n_layers = int(cfg.num_hidden_layers)
        theta, scaling = rope_settings(cfg)
        heads = int(cfg.num_attention_heads)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        vocab = int(cfg.vocab_size)
        return cls(
            hidden_size=int(cfg.hidden_size), intermediate_size=int(cfg.intermediate_size),
            num_attention_heads=heads, num_key_value_heads=int(getattr(cfg, "num_key_value_heads", None) or heads),
            head_dim=int(head_dim), vocab_size=vocab, draft_vocab_size=min(int(draft_vocab_size), vocab),
            aux_layer_ids=list(aux_layer_ids) if aux_layer_ids is not None else default_aux_layer_ids(n_layers),
            target_num_hidden_layers=n_layers, rms_norm_eps=float(cfg.rms_norm_eps), rope_theta=theta,
            rope_scaling=scaling, max_position_embeddings=int(cfg.max_position_embeddings), num_layers=num_layers,
            hidden_act=str(getattr(cfg, "hidden_act", "silu")),
        )


def rope_settings(hf_config: Any) -> tuple[float, dict[str, Any] | None]:
    """``(rope_theta, rope_scaling or None)`` from a HF config of either transformers generation."""
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and params.get("rope_theta") is not None:
        theta = params["rope_theta"]
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = getattr(hf_config, "rope_theta", None)
        scaling = getattr(hf_config, "rope_scaling", None)
        scaling = dict(scaling) if scaling else None
    if theta is None:
        raise ValueError("target config has no rope_theta (nor rope_parameters['rope_theta']); refusing to guess 10000")
    if scaling is not None:
        if "type" in scaling and "rope_type" not in scaling:
            scaling["rope_type"] = scaling.pop("type")
        if scaling.get("rope_type", "default") == "default" and len(scaling) <= 1:
            scaling = None
    return float(theta), scaling


# --------------------------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """Llama RMSNorm (statistics in at least float32, weight applied in the input dtype)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x32 = x.to(torch.promote_types(dtype, torch.float32))
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inv_freq(cfg: Eagle3Config) -> tuple[Tensor, float]:
    """``(inv_freq [head_dim/2], attention_scaling)`` for default, linear and llama3 RoPE (others via transformers)."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).double() / dim))
    scaling = cfg.rope_scaling
    rope_type = None if scaling is None else scaling.get("rope_type", scaling.get("type"))
    if rope_type in (None, "default"):
        return inv_freq.float(), 1.0
    if rope_type == "linear":
        return (inv_freq / scaling["factor"]).float(), 1.0
    if rope_type == "llama3":  # same formula as transformers' _compute_llama3_parameters
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(is_medium, smoothed, scaled).float(), 1.0
    from transformers import LlamaConfig  # yarn, longrope, dynamic, ...: defer to transformers' own tables
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported rope_type {rope_type!r} (known: default, {sorted(ROPE_INIT_FUNCTIONS)})")
    hf = LlamaConfig(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads, head_dim=cfg.head_dim,
                     max_position_embeddings=cfg.max_position_embeddings,
                     rope_parameters={**scaling, "rope_theta": cfg.rope_theta})
    inv, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](hf, torch.device("cpu"))
    return inv.float(), float(attention_scaling)


class RotaryEmbedding(nn.Module):
    def __init__(self, cfg: Eagle3Config) -> None:
        super().__init__()
        inv_freq, self.attention_scaling = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``cos, sin``: ``[B, T, head_dim]`` for ``position_ids`` ``[B, T]``."""
        ftype = torch.promote_types(self.inv_freq.dtype, torch.float32)
        freqs = position_ids[..., None].to(ftype) * self.inv_freq.to(ftype)  # [B, T, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x`` ``[B, heads, T, D]``; ``cos``/``sin`` ``[B, T, D]``."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """``[B, kv_heads, T, D]`` -> ``[B, kv_heads * n_rep, T, D]`` (GQA)."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def step0_allowed(attention_mask: Tensor) -> Tensor:
    """bool ``[B, 1, T, T]``: query t may see step-0 key s iff ``s <= t`` and key s is not padding."""
    T = attention_mask.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
    return causal[None, None] & attention_mask.bool()[:, None, None, :]


def ttt_attention(q: Tensor, keys: list[Tensor], values: list[Tensor], allowed0: Tensor) -> Tensor:
    """Attention of step ``len(keys) - 1`` (SPEC §3.7) without a dense (L*T)^2 mask.

    q: ``[B, h, T, D]``; keys/values: per step ``[B, h, T, D]`` (step 0 first, the current step last);
    allowed0: bool ``[B, 1, T, T]`` for the step-0 keys. Returns ``[B, h, T, D]``.
    """
    scale = q.shape[-1] ** -0.5
    s0 = torch.matmul(q, keys[0].transpose(-1, -2)) * scale  # [B, h, T, T]
    s0 = s0.masked_fill(~allowed0, torch.finfo(s0.dtype).min)
    if len(keys) == 1:
        p = torch.softmax(s0.to(torch.promote_types(s0.dtype, torch.float32)), dim=-1).to(q.dtype)
        return torch.matmul(p, values[0])
    diag = torch.stack([(q * k).sum(-1) for k in keys[1:]], dim=-1) * scale  # [B, h, T, k]: same-position keys
    scores = torch.cat([s0, diag], dim=-1)
    p = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).to(q.dtype)  # joint softmax over both parts
    T = q.shape[2]
    out = torch.matmul(p[..., :T], values[0])
    return out + (p[..., T:, None] * torch.stack(values[1:], dim=-2)).sum(-2)  # [B,h,T,k,1]*[B,h,T,k,D]


def flex_bucket(T: int) -> int:
    """Sequence length the flex path pads to: a power of two, at least flex's 128-token block.

    The compiled kernel is specialised on shapes (``dynamic=False``); bucketing keeps the number of compiled
    variants at (#buckets x TTT steps) instead of one per batch length, which hit dynamo's recompile limit (8) on
    a GPU after a few batches and fell back to the unfused, dense implementation.
    """
    return max(128, 1 << (T - 1).bit_length())


def ttt_attention_flex(q: Tensor, keys: list[Tensor], values: list[Tensor], attention_mask: Tensor) -> Tensor:
    """Same pattern through ``flex_attention`` over the concatenated keys, with a block-sparse mask (GPU path)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, _, T, D = q.shape
    if q.is_cuda and D < 16:  # inductor's flex kernel: "NYI: embedding dimension ... must be at least 16"
        raise ValueError(f"attention_backend 'flex' needs head_dim >= 16 on a GPU, got {D}: use attention_backend: eager")
    P = flex_bucket(T)  # padded queries/keys are masked out and sliced off below
    grow = (0, 0, 0, P - T)  # pad dim 2 (positions) of [B, h, T, D]; contiguous either way (strides are guarded too)
    q = F.pad(q, grow).contiguous()
    keys, values = [F.pad(k, grow).contiguous() for k in keys], [F.pad(v, grow).contiguous() for v in values]
    attention_mask = F.pad(attention_mask, (0, P - T))
    k_all, v_all = torch.cat(keys, dim=2), torch.cat(values, dim=2)  # [B, h, (k+1)P, D]
    pad = attention_mask.bool()

    def mask_mod(b, h, q_idx, kv_idx):
        step, pos = kv_idx // P, kv_idx % P
        return ((step == 0) & (pos <= q_idx) & pad[b, pos]) | ((step > 0) & (pos == q_idx))

    block_mask = create_block_mask(mask_mod, B, None, P, k_all.shape[2], device=q.device)
    attend = _compiled_flex() if q.is_cuda else flex_attention  # flex is only fast (and has a backward) compiled
    return attend(q, k_all, v_all, block_mask=block_mask)[:, :, :T]


_COMPILED_FLEX = None
FLEX_RECOMPILE_LIMIT = 64  # buckets x TTT steps variants; SpecForge raises dynamo's limit to 64 the same way


def _compiled_flex():
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        cfg = torch._dynamo.config
        name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"  # renamed in torch 2.6
        setattr(cfg, name, max(getattr(cfg, name), FLEX_RECOMPILE_LIMIT))
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


class Eagle3Attention(nn.Module):
    def __init__(self, cfg: Eagle3Config, in_features: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(in_features, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(in_features, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(in_features, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: list[tuple[Tensor, Tensor]],
                attention_mask: Tensor, allowed0: Tensor, backend: AttentionBackend = "eager") -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        n_rep = self.num_heads // self.num_kv_heads
        cache.append((repeat_kv(k, n_rep), repeat_kv(v, n_rep)))  # per-forward TTT cache: one entry per step
        keys, values = [c[0] for c in cache], [c[1] for c in cache]
        if backend == "flex":
            out = ttt_attention_flex(q, keys, values, attention_mask)
        else:
            out = ttt_attention(q, keys, values, allowed0)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class Eagle3MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Eagle3DecoderLayer(nn.Module):
    """SPEC §3.6. The first layer attends over ``cat([input_layernorm(emb), hidden_norm(h)])`` (2H); later
    layers are plain Llama layers over H. The residual is always the un-normed ``h``."""

    def __init__(self, cfg: Eagle3Config, first: bool) -> None:
        super().__init__()
        self.first = first
        H = cfg.hidden_size
        self.input_layernorm = RMSNorm(H, cfg.rms_norm_eps)
        if first:
            self.hidden_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.self_attn = Eagle3Attention(cfg, 2 * H if first else H)
        self.post_attention_layernorm = RMSNorm(H, cfg.rms_norm_eps)
        self.mlp = Eagle3MLP(H, cfg.intermediate_size)

    def forward(self, h: Tensor, emb: Tensor | None, cos: Tensor, sin: Tensor, cache: list, attention_mask: Tensor,
                allowed0: Tensor, backend: AttentionBackend = "eager") -> Tensor:
        if self.first:
            x = torch.cat([self.input_layernorm(emb), self.hidden_norm(h)], dim=-1)  # [B, T, 2H]
        else:
            x = self.input_layernorm(h)
        h = h + self.self_attn(x, cos, sin, cache, attention_mask, allowed0, backend)  # residual = un-normed h
        return h + self.mlp(self.post_attention_layernorm(h))


# --------------------------------------------------------------------------------------------------------------
# the draft
# --------------------------------------------------------------------------------------------------------------
class Eagle3Draft(nn.Module):
    """EAGLE-3 draft: ``fc`` over the concatenated aux features, one (or more) decoder layer(s), ``norm`` and a
    draft-vocabulary ``lm_head``; ``embed_tokens`` is a frozen copy of the target's embedding."""

    def __init__(self, config: Eagle3Config) -> None:
        super().__init__()
        self.config = config
        H = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, H)
        self.embed_tokens.weight.requires_grad_(False)  # frozen copy of the target's embedding
        self.fc = nn.Linear(config.num_aux * H, H, bias=False)
        self.midlayer = Eagle3DecoderLayer(config, first=True)
        self.extra_layers = nn.ModuleList(Eagle3DecoderLayer(config, first=False) for _ in range(config.num_layers - 1))
        self.norm = RMSNorm(H, config.rms_norm_eps)
        self.lm_head = nn.Linear(H, config.draft_vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config)
        # placeholder mapping (first Vd target ids); replaced by set_vocab() or a loaded state dict
        t2d = torch.zeros(config.vocab_size, dtype=torch.bool)
        t2d[: config.draft_vocab_size] = True
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.int64))
        self.register_buffer("t2d", t2d)

    # --- setup ----------------------------------------------------------------------------------------------
    def set_vocab(self, d2t: Tensor, t2d: Tensor) -> None:
        if d2t.shape != self.d2t.shape or t2d.shape != self.t2d.shape:
            raise ValueError(f"vocab maps of shape {tuple(d2t.shape)}/{tuple(t2d.shape)} do not fit a draft with "
                             f"Vd={self.config.draft_vocab_size}, V={self.config.vocab_size}")
        with torch.no_grad():
            self.d2t.copy_(d2t.to(torch.int64))
            self.t2d.copy_(t2d.to(torch.bool))

    def draft_to_target(self, draft_ids: Tensor) -> Tensor:
        """Target ids for draft ids (``target_id = draft_id + d2t[draft_id]``)."""
        return draft_ids + self.d2t[draft_ids]

    # --- forward --------------------------------------------------------------------------------------------
    def layers(self) -> list[Eagle3DecoderLayer]:
        return [self.midlayer, *self.extra_layers]

    def step(self, h: Tensor, input_ids: Tensor, position_ids: Tensor, caches: list[list], attention_mask: Tensor,
             allowed0: Tensor, backend: AttentionBackend = "eager") -> tuple[Tensor, Tensor]:
        """One TTT step: ``(un-normed h [B, T, H] for the next step, logits [B, T, Vd])``."""
        emb = self.embed_tokens(input_ids).to(h.dtype)
        cos, sin = self.rotary(position_ids, h.dtype)
        for layer, cache in zip(self.layers(), caches, strict=True):
            h = layer(h, emb, cos, sin, cache, attention_mask, allowed0, backend)
        return h, self.lm_head(self.norm(h))

    def forward(self, aux_hidden: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, ttt_length: int = 7,
                backend: AttentionBackend = "eager") -> list[Tensor]:
        """TTT forward (SPEC §3.7): ``ttt_length`` logits ``[B, T, Vd]``.

        aux_hidden: ``[B, T, num_aux*H]`` target features of token t; input_ids: ``[B, T]`` *unshifted* tokens.
        Step k embeds the tokens shifted left by k+1 (zero-filled), at positions ``position_ids + k``; step k's
        logits at position t predict token ``t + k + 2``.
        """
        if ttt_length < 1:
            raise ValueError(f"ttt_length must be >= 1, got {ttt_length}")
        if backend not in ("eager", "flex"):
            raise ValueError(f"attention backend must be 'eager' or 'flex', got {backend!r}")
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        allowed0 = step0_allowed(attention_mask)
        h = self.fc(aux_hidden.to(self.fc.weight.dtype))
        caches: list[list] = [[] for _ in self.layers()]
        logits = []
        for k in range(ttt_length):
            ids_k = shift_left(input_ids, k + 1)  # same shift as SpecForge's padding(input_ids, left=False)
            h, step_logits = self.step(h, ids_k, position_ids + k, caches, attention_mask, allowed0, backend)
            logits.append(step_logits)
        return logits


def shift_left(x: Tensor, n: int, dim: int = 1) -> Tensor:
    """``y[..., t] = x[..., t + n]``, zero-filled at the end (SPEC §3.2)."""
    if n == 0:
        return x
    T = x.shape[dim]
    n = min(n, T)
    kept = x.narrow(dim, n, T - n)
    pad_shape = list(x.shape)
    pad_shape[dim] = n
    return torch.cat([kept, x.new_zeros(pad_shape)], dim=dim)
