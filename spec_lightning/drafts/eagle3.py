"""The EAGLE-3 draft network with a step-level API used by training AND decoding (SPEC §3.6, §3.7). No Lightning.

One forward, two callers (the lesson of litgpt and SpecForge's ``backbone``): :class:`Eagle3Draft` exposes

* :meth:`~Eagle3Draft.embed` (frozen copy of the target's embedding), :meth:`~Eagle3Draft.project` (``fc`` over the
  concatenated aux features), :meth:`~Eagle3Draft.layers_step` (the decoder layer(s) on one step, attending through
  an attention cache object) and :meth:`~Eagle3Draft.logits` (``lm_head(norm(h))``);
* two attention caches with one method ``attend(q, k, v)``: :class:`TTTCache` (training: the keys of every TTT step
  of one forward, SPEC §3.7's pattern, memory linear in T) and :class:`KVCache` (decoding: the keys of the positions
  drafted so far and a boolean mask set by the drafter).

The training TTT loop (:meth:`Eagle3Draft.ttt_hidden`) and the decoder's drafter
(``spec_lightning.speculate.eagle3``) both call ``layers_step``: norms, q/k/v, RoPE, GQA, residuals and MLP exist once.

Parameter names are exactly the serving names of SPEC §5 (``fc``, ``midlayer.*``, ``norm``, ``lm_head``,
``embed_tokens``, buffers ``d2t``/``t2d``), so export is a plain state-dict copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spec_lightning.drafts.common import TINY_SHAPE, TargetShapedConfig, check_layer_ids, check_shape, target_shape
from spec_lightning.drafts.ttt_attention import ttt_attention

AttentionBackend = Literal["eager", "flex"]
DEFAULT_ROPE_THETA = 10000.0  # only for targets without RoPE (GPT-2 & co); see targets.layout.draft_rope_settings


# --------------------------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Eagle3Config(TargetShapedConfig):
    """Shape of an EAGLE-3 draft; the attention/RoPE fields are copied from the target (``from_target_config``).

    Attributes:
        hidden_size: H, the target's hidden size.
        intermediate_size: MLP width of the draft decoder layer (the target's).
        num_attention_heads / num_key_value_heads / head_dim: attention shape (the target's; GQA supported).
        rms_norm_eps: RMSNorm epsilon (the target's norm epsilon, whatever the field is called).
        rope_theta: RoPE base, copied from the target (never a silent 10000 default when the target has RoPE).
        rope_scaling: the target's RoPE scaling dict (``{"rope_type": "llama3", ...}``) or None for plain RoPE.
        max_position_embeddings: the target's (a too-small value is a known acceptance trap in serving).
        vocab_size: V, the target vocabulary (size of ``embed_tokens`` and ``t2d``).
        draft_vocab_size: Vd, the draft's output vocabulary (``lm_head`` rows, ``d2t``).
        num_layers: draft decoder layers; layer 0 takes ``2H`` attention inputs, later ones take ``H``.
        aux_layer_ids: target decoder-layer ids whose outputs feed ``fc`` (SPEC §3.1).
        target_num_hidden_layers: N of the target (decides whether ``aux_layer_ids`` are the defaults).
        hidden_act: the draft MLP's activation; always SiLU (Llama MLP, what SGLang/vLLM serve), whatever the target's.
        fc_norm: EAGLE-3.1: an RMSNorm on each aux feature before ``fc`` (``fc_norm.{i}.weight``), so the three
            layers contribute alike whatever their scale.
        norm_output: EAGLE-3.1: the next TTT step (and the lm_head) read the post-``norm`` hidden state instead of
            the raw layer output (no extra weights).
        feature_scaling: training-time reparametrisation of ``fc``: it reads each aux feature dimension divided by
            that dimension's RMS over the first training batch (buffer ``fc_input_scale``, set by
            :meth:`Eagle3Draft.set_feature_scale`). Targets' residual streams have a few "massive activation"
            dimensions (SmolLM2: 4 of 576 hold ~50% of each aux layer's energy, and layer 26 is 9x the RMS of layer
            1), which otherwise dominate ``fc``'s input and its updates. :meth:`Eagle3Draft.serving_state_dict`
            folds the scale into ``fc.weight``, so exports are plain EAGLE-3 (same keys, same function).
    """

    draft_vocab_size: int
    aux_layer_ids: list[int]
    target_num_hidden_layers: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = DEFAULT_ROPE_THETA
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    num_layers: int = 1
    hidden_act: str = "silu"
    fc_norm: bool = False
    norm_output: bool = False
    feature_scaling: bool = False

    def __post_init__(self) -> None:
        check_shape(self, ("draft_vocab_size", "num_layers"))
        if self.draft_vocab_size > self.vocab_size:
            raise ValueError(f"draft_vocab_size ({self.draft_vocab_size}) must be <= vocab_size ({self.vocab_size})")
        self.aux_layer_ids = check_layer_ids(self.aux_layer_ids, self.target_num_hidden_layers, "aux layer id")

    def feature_layer_ids(self) -> list[int]:
        return self.aux_layer_ids

    @classmethod
    def tiny(cls, **overrides: Any) -> Eagle3Config:
        """A few-thousand-parameter draft for unit tests (``drafts.common.TINY_SHAPE``)."""
        return cls(**{**TINY_SHAPE, "draft_vocab_size": 64, "aux_layer_ids": [1, 2, 2], **overrides})

    @classmethod
    def from_target_config(cls, hf_config: Any, draft_vocab_size: int, num_layers: int = 1,
                           aux_layer_ids: list[int] | None = None, fc_norm: bool = False,
                           norm_output: bool = False, feature_scaling: bool = False) -> Eagle3Config:
        """The draft for a target of any family: its shape, norm epsilon, RoPE (``drafts.common``) and vocab."""
        from spec_lightning.targets import default_aux_layer_ids

        shape = target_shape(hf_config)
        return cls(
            **shape, draft_vocab_size=min(int(draft_vocab_size), shape["vocab_size"]),
            aux_layer_ids=(list(aux_layer_ids) if aux_layer_ids is not None
                           else default_aux_layer_ids(shape["target_num_hidden_layers"])),
            num_layers=num_layers, fc_norm=fc_norm, norm_output=norm_output, feature_scaling=feature_scaling,
        )


# --------------------------------------------------------------------------------------------------------------
# RoPE
# --------------------------------------------------------------------------------------------------------------
def rope_inv_freq(cfg: Eagle3Config) -> tuple[Tensor, float]:
    """``(inv_freq [head_dim/2], attention_scaling)``: plain RoPE here, every scaled type by transformers' own
    ``ROPE_INIT_FUNCTIONS`` (linear, llama3, yarn, longrope, dynamic, ...). Computed on the CPU (also under a meta or
    GPU device context)."""
    with torch.device("cpu"):
        return _rope_inv_freq(cfg)


def _rope_inv_freq(cfg: Eagle3Config) -> tuple[Tensor, float]:
    scaling = cfg.rope_scaling
    rope_type = None if scaling is None else scaling.get("rope_type", scaling.get("type"))
    if rope_type in (None, "default"):
        dim = cfg.head_dim
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).double() / dim))
        return inv_freq.float(), 1.0
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported rope_type {rope_type!r} (known: default, {sorted(ROPE_INIT_FUNCTIONS)})")
    params = {**scaling, "rope_type": rope_type, "rope_theta": cfg.rope_theta}
    hf = LlamaConfig(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads, head_dim=cfg.head_dim,
                     max_position_embeddings=cfg.max_position_embeddings, rope_theta=cfg.rope_theta,
                     rope_scaling=params, rope_parameters=params)
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


# --------------------------------------------------------------------------------------------------------------
# attention caches: the one place training and decoding differ
# --------------------------------------------------------------------------------------------------------------
class TTTCache:
    """Training: the keys/values of every TTT step of one forward, for one draft layer (SPEC §3.7).

    ``attend`` appends the current step's keys and runs the TTT pattern: step-0 keys causally (padding and, for
    packed rows, other documents excluded), earlier steps' keys at the same position only.

    Args:
        key_mask: bool ``[B, T]`` (False = padding) or None.
        document_ids: int ``[B, T]`` for packed rows, or None.
        backend: ``eager`` (blockwise, memory linear in T; CPU and GPU) or ``flex`` (compiled flex attention, GPU).
    """

    def __init__(self, key_mask: Tensor | None = None, document_ids: Tensor | None = None,
                 backend: AttentionBackend = "eager") -> None:
        self.key_mask, self.document_ids, self.backend = key_mask, document_ids, backend
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q ``[B, h, T, D]``, k/v ``[B, h_kv, T, D]`` of the current step -> ``[B, h, T, D]``."""
        self.keys.append(k)
        self.values.append(v)
        if self.backend == "flex":
            return ttt_attention_flex(q, self.keys, self.values, self.key_mask, self.document_ids)
        return ttt_attention(q, self.keys, self.values, self.key_mask, self.document_ids)


class KVCache:
    """Decoding: keys/values ``[1, h_kv, S, D]`` of the positions run so far, for one draft layer.

    The drafter sets :attr:`mask` (bool ``[n, S + n]``: which cached and new positions each new query sees) before
    each :meth:`Eagle3Draft.layers_step`; ``attend`` appends the new keys and runs SDPA under that mask.
    """

    def __init__(self) -> None:
        self.keys: Tensor | None = None
        self.values: Tensor | None = None
        self.mask: Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.keys is None else int(self.keys.shape[2])

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.keys is not None:
            k, v = torch.cat([self.keys, k], dim=2), torch.cat([self.values, v], dim=2)
        self.keys, self.values = k, v
        mask = None if self.mask is None else self.mask.to(q.device)[None, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])

    def truncate(self, length: int) -> None:
        if self.keys is not None:
            self.keys, self.values = self.keys[:, :, :length], self.values[:, :, :length]


def flex_bucket(T: int) -> int:
    """Sequence length the flex path pads to: a power of two, at least flex's 128-token block.

    The compiled kernel is specialised on shapes (``dynamic=False``); bucketing keeps the number of compiled
    variants at (#buckets x TTT steps) instead of one per batch length, which hit dynamo's recompile limit (8) on
    a GPU after a few batches and fell back to the unfused, dense implementation.
    """
    return max(128, 1 << (T - 1).bit_length())


def ttt_attention_flex(q: Tensor, keys: list[Tensor], values: list[Tensor], key_mask: Tensor | None,
                       document_ids: Tensor | None = None) -> Tensor:
    """The TTT pattern through ``flex_attention`` over the concatenated keys with a block-sparse mask (GPU path)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, h, T, D = q.shape
    if q.is_cuda and D < 16:  # inductor's flex kernel: "NYI: embedding dimension ... must be at least 16"
        raise ValueError(f"attention_backend 'flex' needs head_dim >= 16 on a GPU, got {D}: use attention_backend: eager")
    P = flex_bucket(T)  # padded queries/keys are masked out and sliced off below
    grow = (0, 0, 0, P - T)  # pad dim 2 (positions) of [B, h, T, D]
    q = F.pad(q, grow).contiguous()
    keys, values = [F.pad(k, grow).contiguous() for k in keys], [F.pad(v, grow).contiguous() for v in values]
    real = F.pad(torch.ones(B, T, dtype=torch.bool, device=q.device) if key_mask is None else key_mask.bool(),
                 (0, P - T))
    docs = F.pad(torch.zeros(B, T, dtype=torch.long, device=q.device) if document_ids is None else document_ids.long(),
                 (0, P - T), value=-1)
    k_all, v_all = torch.cat(keys, dim=2), torch.cat(values, dim=2)  # [B, h_kv, (k+1)P, D]

    def mask_mod(b, _h, q_idx, kv_idx):
        step, pos = kv_idx // P, kv_idx % P
        same_doc = docs[b, pos] == docs[b, q_idx]
        return ((step == 0) & (pos <= q_idx) & real[b, pos] & same_doc) | ((step > 0) & (pos == q_idx))

    block_mask = create_block_mask(mask_mod, B, None, P, k_all.shape[2], device=q.device)
    attend = _compiled_flex() if q.is_cuda else flex_attention  # flex is only fast (and has a backward) compiled
    return attend(q, k_all, v_all, block_mask=block_mask, enable_gqa=k_all.shape[1] != h)[:, :, :T]


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


# --------------------------------------------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------------------------------------------
class Eagle3Attention(nn.Module):
    def __init__(self, cfg: Eagle3Config, in_features: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(in_features, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(in_features, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(in_features, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: TTTCache | KVCache) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = cache.attend(q, k, v)  # [B, h, T, D]
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
        self.input_layernorm = nn.RMSNorm(H, eps=cfg.rms_norm_eps)
        if first:
            self.hidden_norm = nn.RMSNorm(H, eps=cfg.rms_norm_eps)
        self.self_attn = Eagle3Attention(cfg, 2 * H if first else H)
        self.post_attention_layernorm = nn.RMSNorm(H, eps=cfg.rms_norm_eps)
        self.mlp = Eagle3MLP(H, cfg.intermediate_size)

    def forward(self, h: Tensor, emb: Tensor | None, cos: Tensor, sin: Tensor, cache: TTTCache | KVCache) -> Tensor:
        if self.first:
            x = torch.cat([self.input_layernorm(emb), self.hidden_norm(h)], dim=-1)  # [B, T, 2H]
        else:
            x = self.input_layernorm(h)
        h = h + self.self_attn(x, cos, sin, cache)  # residual = un-normed h
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
        if config.fc_norm:  # EAGLE-3.1: one norm per aux feature before fc
            self.fc_norm = nn.ModuleList(nn.RMSNorm(H, eps=config.rms_norm_eps) for _ in range(config.num_aux))
        if config.feature_scaling:  # 1 / RMS of each fc input dimension (set_feature_scale); folded on export
            self.register_buffer("fc_input_scale", torch.ones(config.num_aux * H))
        self.midlayer = Eagle3DecoderLayer(config, first=True)
        self.extra_layers = nn.ModuleList(Eagle3DecoderLayer(config, first=False) for _ in range(config.num_layers - 1))
        self.norm = nn.RMSNorm(H, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(H, config.draft_vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config)
        # placeholder mapping (first Vd target ids); replaced by set_vocab() or a loaded state dict
        t2d = torch.zeros(config.vocab_size, dtype=torch.bool)
        t2d[: config.draft_vocab_size] = True
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.int64))
        self.register_buffer("t2d", t2d)

    # --- vocabulary -----------------------------------------------------------------------------------------
    def set_vocab(self, d2t: Tensor, t2d: Tensor) -> None:
        if d2t.shape != self.d2t.shape or t2d.shape != self.t2d.shape:
            raise ValueError(f"vocab maps of shape {tuple(d2t.shape)}/{tuple(t2d.shape)} do not fit a draft with "
                             f"Vd={self.config.draft_vocab_size}, V={self.config.vocab_size}")
        with torch.no_grad():
            self.d2t.copy_(d2t.to(torch.int64))
            self.t2d.copy_(t2d.to(torch.bool))

    def draft_to_target(self, draft_ids: Tensor) -> Tensor:
        """Target ids for draft ids (``target_id = draft_id + d2t[draft_id]``, SPEC §3.4)."""
        return draft_ids + self.d2t[draft_ids]

    # --- the step-level API (training and decoding) --------------------------------------------------------------
    def layers(self) -> list[Eagle3DecoderLayer]:
        return [self.midlayer, *self.extra_layers]

    def embed(self, input_ids: Tensor, dtype: torch.dtype) -> Tensor:
        """``[..., H]`` embeddings of the tokens fed to a step (frozen copy of the target's embedding)."""
        return self.embed_tokens(input_ids).to(dtype)

    def fc_input(self, aux_hidden: Tensor) -> Tensor:
        """What ``fc`` reads: the aux features in the draft's dtype, each normed with ``fc_norm`` when it has them."""
        aux_hidden = aux_hidden.to(self.fc.weight.dtype)
        if not self.config.fc_norm:
            return aux_hidden
        chunks = aux_hidden.split(self.config.hidden_size, dim=-1)
        return torch.cat([norm(c) for norm, c in zip(self.fc_norm, chunks, strict=True)], dim=-1)

    def feature_scale_is_set(self) -> bool:
        """Whether ``fc_input_scale`` holds measured values (it starts as all ones; one host sync)."""
        return bool((self.fc_input_scale != 1).any())

    def project(self, aux_hidden: Tensor) -> Tensor:
        """``fc``: target aux features ``[..., num_aux*H]`` -> the draft's hidden state ``[..., H]`` (each feature
        normed first with ``fc_norm``)."""
        aux_hidden = self.fc_input(aux_hidden)
        if self.config.feature_scaling:
            return F.linear(aux_hidden, self.fc.weight * self.fc_input_scale.to(self.fc.weight.dtype))
        return self.fc(aux_hidden)

    @torch.no_grad()
    def set_feature_scale(self, aux_hidden: Tensor, real: Tensor | None = None) -> None:
        """``fc_input_scale = 1 / RMS`` of each ``fc`` input dimension over the real tokens of ``aux_hidden``
        ``[B, T, num_aux*H]`` (``real``: bool ``[B, T]``), after ``fc_norm`` when the draft has it; averaged over
        all ranks when torch.distributed is initialised, so DDP replicas stay identical."""
        if not self.config.feature_scaling:
            raise ValueError("set_feature_scale: this draft was built without feature_scaling")
        x = self.fc_input(aux_hidden).float()
        x = x.flatten(0, -2) if real is None else x[real.bool()]
        stats = torch.cat([x.square().sum(0), x.new_tensor([x.shape[0]])])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(stats)
        mean_square = stats[:-1] / stats[-1].clamp_min(1.0)
        self.fc_input_scale.copy_(mean_square.clamp_min(1e-12).rsqrt())

    def serving_state_dict(self) -> dict[str, Tensor]:
        """The state dict under the serving names (SPEC §5): ``fc_input_scale`` folded into ``fc.weight``."""
        state = self.state_dict()
        if self.config.feature_scaling:
            scale = state.pop("fc_input_scale")
            state["fc.weight"] = state["fc.weight"] * scale.to(state["fc.weight"].dtype)
        return state

    def layers_step(self, h: Tensor, input_ids: Tensor, position_ids: Tensor,
                    caches: list[TTTCache] | list[KVCache]) -> Tensor:
        """One step of the decoder layer(s): un-normed ``h [B, T, H]`` in, un-normed ``h`` out.

        input_ids ``[B, T]``: the token embedded at each position; position_ids ``[B, T]``: RoPE positions; caches:
        one attention cache per layer (:class:`TTTCache` in training, :class:`KVCache` in decoding).
        """
        emb = self.embed(input_ids, h.dtype)
        cos, sin = self.rotary(position_ids, h.dtype)
        for layer, cache in zip(self.layers(), caches, strict=True):
            h = layer(h, emb, cos, sin, cache)
        return h

    def advance(self, out: Tensor) -> tuple[Tensor, Tensor]:
        """A step's layer output -> ``(the next step's input h, the lm_head input)``: ``(out, norm(out))``, or with
        ``norm_output`` (EAGLE-3.1) ``(norm(out), norm(out))``."""
        normed = self.norm(out)
        return (normed if self.config.norm_output else out), normed

    def logits(self, head_input: Tensor) -> Tensor:
        """``[..., Vd]`` draft-vocabulary logits of lm_head inputs (the second value of :meth:`advance`)."""
        return self.lm_head(head_input)

    def new_kv_caches(self) -> list[KVCache]:
        return [KVCache() for _ in self.layers()]

    # --- the training-time-test loop ----------------------------------------------------------------------------
    def ttt_hidden(self, aux_hidden: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None,
                   position_ids: Tensor | None = None, ttt_length: int = 7, backend: AttentionBackend = "eager",
                   document_ids: Tensor | None = None) -> list[Tensor]:
        """TTT forward (SPEC §3.7): the lm_head input ``[B, T, H]`` of each of ``ttt_length`` steps (``norm(h)``).

        Each step's un-normed output ``h`` is fed to the next step (SPEC §3.6), or its normed version with
        ``norm_output`` (EAGLE-3.1).

        aux_hidden: ``[B, T, num_aux*H]`` target features of token t; input_ids: ``[B, T]`` *unshifted* tokens.
        Step k embeds the tokens shifted left by k+1 (zero-filled), at positions ``position_ids + k``; step k's
        output at position t predicts token ``t + k + 2`` (:meth:`logits`). Packed rows pass ``document_ids`` and
        per-document ``position_ids``.
        """
        if ttt_length < 1:
            raise ValueError(f"ttt_length must be >= 1, got {ttt_length}")
        if backend not in ("eager", "flex"):
            raise ValueError(f"attention backend must be 'eager' or 'flex', got {backend!r}")
        B, T = input_ids.shape
        key_mask = None if attention_mask is None else attention_mask.bool()
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        h = self.project(aux_hidden)
        caches = [TTTCache(key_mask, document_ids, backend) for _ in self.layers()]
        out = []
        for k in range(ttt_length):
            ids_k = shift_left(input_ids, k + 1)  # same shift as SpecForge's padding(input_ids, left=False)
            h, head_input = self.advance(self.layers_step(h, ids_k, position_ids + k, caches))
            out.append(head_input)
        return out

    def forward(self, aux_hidden: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, ttt_length: int = 7,
                backend: AttentionBackend = "eager") -> list[Tensor]:
        """TTT forward returning each step's logits ``[B, T, Vd]`` (full grids: for tests and small inputs; training
        computes the lm_head only where the loss counts)."""
        return [self.logits(h) for h in self.ttt_hidden(aux_hidden, input_ids, attention_mask, position_ids,
                                                        ttt_length, backend)]


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
