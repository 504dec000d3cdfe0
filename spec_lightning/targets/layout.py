"""Family-generic discovery of where things live in a Hugging Face causal LM (no Lightning here).

The rest of the library needs a handful of facts about the frozen target that differ between model families:
which modules are the decoder blocks (aux features are hooked there), which module returns the final post-norm
hidden state, how the logits are really made from it (some families post-process them), the norm epsilon and RoPE a
draft should copy, and which layers attend through a sliding window. Every one of those facts is answered here, in
one place, so that a new family means one edit in this file, not a hunt through the trainer, the drafts and the
decoder.

Conventions were read from transformers 5.24 (and hold for 5.17; see the notes per function):

* the text config of composite (multimodal) models: ``PreTrainedConfig.get_text_config(decoder=True)``;
* logits post-processing: ``Gemma2ForCausalLM.forward`` / ``Gemma3ForCausalLM.forward``
  (``final_logit_softcapping``), ``GraniteForCausalLM.forward`` (``logits / logits_scaling``),
  ``CohereForCausalLM.forward`` (``logits * logit_scale``);
* sliding windows: ``masking_utils.sliding_window_overlay`` (``kv_idx > q_idx - sliding_window``) on top of the
  causal mask, chosen per layer from ``config.layer_types`` (Qwen2/Qwen3/Qwen2-MoE/Gemma-2/Gemma-3) or for every
  layer from one global ``config.sliding_window`` (Mistral, Mixtral, Phi-3, Qwen3-MoE, ...).
"""

from __future__ import annotations

import functools
import inspect
import math
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

# Attribute names, relative to the base (decoder) model, under which families keep their decoder blocks:
# Llama/Qwen/Mistral/Gemma/Phi/Granite/Cohere/GPT-NeoX: ``layers``; GPT-2/GPT-J/Falcon/Bloom: ``h``; MPT: ``blocks``.
LAYER_ATTRS: tuple[str, ...] = ("layers", "h", "blocks", "block")
# Where a causal-LM wrapper keeps its base model, searched after ``get_decoder()``/``base_model``.
BASE_ATTRS: tuple[str, ...] = ("model", "transformer", "gpt_neox", "language_model", "text_model", "decoder")
# Final norm names on the base model: Llama & co ``norm``; GPT-2/Falcon/Bloom ``ln_f``; GPT-NeoX ``final_layer_norm``;
# Phi-1/2 ``final_layernorm``; MPT ``norm_f``.
FINAL_NORM_ATTRS: tuple[str, ...] = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f", "final_norm")
# Attention module of a decoder block: Llama & co ``self_attn``; GPT-2 ``attn``; GPT-NeoX ``attention``; Falcon
# ``self_attention``.
ATTENTION_ATTRS: tuple[str, ...] = ("self_attn", "attn", "attention", "self_attention")
# Norm epsilon keys, in the order families name them.
EPS_KEYS: tuple[str, ...] = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps", "norm_epsilon",
                             "rms_norm_epsilon")
# Families whose modeling code applies ONE ``config.sliding_window`` to every layer (the mask function is picked by
# ``config.sliding_window is None`` in their ``*Model.forward``) and ignores any ``layer_types`` / ``max_window_layers``
# a config may carry (MistralConfig warns that layer_types is ignored; Qwen3-MoE configs of 4.x carried
# max_window_layers that the model never read).
GLOBAL_WINDOW_MODEL_TYPES = frozenset({"mistral", "mixtral", "phi3", "phimoe", "qwen3_moe", "starcoder2", "ministral3",
                                       "minimax", "doge"})
# Families with absolute (learned or sinusoidal) or ALiBi positions and no RoPE: a draft falls back to a documented
# default theta for them. Any other config without RoPE fields is an error (never a silent 10000).
NO_ROPE_MODEL_TYPES = frozenset({"gpt2", "gpt_bigcode", "opt", "bloom", "mpt", "biogpt", "xglm", "gpt_neo"})
DEFAULT_ROPE_THETA = 10000.0


# ----------------------------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------------------------
def text_config(config: Any) -> Any:
    """The text decoder's config: ``config.get_text_config(decoder=True)`` where present, else ``config``.

    Multimodal wrappers (Gemma-3, Llava, Qwen2-VL, ...) keep layers, hidden size, RoPE and windows in
    ``config.text_config``; plain causal LMs return themselves.
    """
    getter = getattr(config, "get_text_config", None)
    if getter is None:
        return config
    try:
        return getter(decoder=True)
    except TypeError:  # very old transformers without the ``decoder`` argument
        return getter()


def norm_epsilon(config: Any, default: float = 1e-6) -> float:
    """The target's norm epsilon (``rms_norm_eps``, ``layer_norm_eps``, ``layer_norm_epsilon``, ...), else ``default``.

    A draft initialised from the target's final norm should normalise with the same epsilon.
    """
    cfg = text_config(config)
    for key in EPS_KEYS:
        value = getattr(cfg, key, None)
        if value is not None:
            return float(value)
    return float(default)


def _normalise_rope(params: dict[str, Any]) -> tuple[float | None, dict[str, Any] | None]:
    """Split one RoPE dict into ``(theta, scaling or None)``; ``partial_rotary_factor`` is dropped (see below)."""
    params = dict(params)
    theta = params.pop("rope_theta", None)
    params.pop("partial_rotary_factor", None)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    else:
        params.pop("type", None)
    if params.get("rope_type", "default") == "default" and set(params) <= {"rope_type"}:
        return theta, None
    return theta, params


def draft_rope_settings(config: Any) -> tuple[float, dict[str, Any] | None]:
    """``(rope_theta, rope_scaling or None)`` an EAGLE-3 draft should use, accepted by ``Eagle3Config``.

    * One global setting (transformers 5 ``rope_parameters`` or 4.x ``rope_theta``/``rope_scaling``): the target's.
    * Per-layer-type RoPE (Gemma-3 ``rope_parameters={"full_attention": ..., "sliding_attention": ...}``, or 4.x
      ``rope_theta`` + ``rope_local_base_freq``): the FULL-attention layers' setting. The draft attends over the
      whole context like those layers, and the long-range positional behaviour is what it must reproduce.
    * Partial rotary (GPT-NeoX ``rotary_pct``, Phi ``partial_rotary_factor``): the target's theta; the draft is a
      Llama layer (what SGLang/vLLM serve as ``LlamaForCausalLMEagle3``) and rotates its full head_dim, so the factor
      is not copied.
    * No RoPE at all (GPT-2 & co, absolute positions; see ``NO_ROPE_MODEL_TYPES``): ``DEFAULT_ROPE_THETA`` (10000,
      Llama's default), no scaling: the draft needs some positional signal and the target offers none to copy.

    Raises ValueError when a config has no RoPE fields and is not a known absolute-position family, rather than
    silently returning 10000 for a target that may well use another base.
    """
    cfg = text_config(config)
    params = getattr(cfg, "rope_parameters", None)
    theta: float | None = None
    scaling: dict[str, Any] | None = None
    if isinstance(params, dict) and params:
        nested = {k: v for k, v in params.items() if isinstance(v, dict)}
        if nested:
            if "full_attention" not in nested:
                raise ValueError(f"{type(cfg).__name__}: per-layer-type rope_parameters without a 'full_attention' "
                                 f"entry (found {sorted(nested)}); cannot choose the draft's RoPE")
            params = nested["full_attention"]
        theta, scaling = _normalise_rope(params)
    if theta is None:
        # transformers 4.x: flat attributes (Gemma-3's rope_theta is the global/full-attention base; its
        # rope_local_base_freq belongs to the sliding layers and is ignored on purpose).
        theta = getattr(cfg, "rope_theta", None)
        if theta is None:
            theta = getattr(cfg, "rotary_emb_base", None)  # GPT-NeoX 4.x
        legacy = getattr(cfg, "rope_scaling", None)
        if legacy:
            legacy_theta, scaling = _normalise_rope(legacy)
            theta = theta if theta is not None else legacy_theta
    if theta is None:
        model_type = getattr(cfg, "model_type", None)
        if model_type in NO_ROPE_MODEL_TYPES:
            return DEFAULT_ROPE_THETA, None
        raise ValueError(f"{type(cfg).__name__} (model_type={model_type!r}) has no rope_parameters['rope_theta'], "
                         "rope_theta nor rotary_emb_base, and is not a known absolute-position family "
                         f"({sorted(NO_ROPE_MODEL_TYPES)}); refusing to guess a RoPE base of 10000 for the draft")
    theta = float(theta)
    if not math.isfinite(theta) or theta <= 0:
        raise ValueError(f"{type(cfg).__name__}: rope_theta must be a positive number, got {theta!r}")
    return theta, scaling


# ----------------------------------------------------------------------------------------------------------------
# sliding windows
# ----------------------------------------------------------------------------------------------------------------
def sliding_window_layers(config: Any) -> list[int | None]:
    """Per decoder layer, the sliding-window size the HF model attends with (``None`` = full causal attention).

    Mirrors the installed modeling code:

    * no ``sliding_window`` (None, or 0 as Qwen2-MoE stores a disabled window), or ``use_sliding_window=False``:
      every layer full;
    * families in ``GLOBAL_WINDOW_MODEL_TYPES`` (Mistral, Mixtral, Phi-3, Qwen3-MoE, ...): every layer windowed;
    * ``layer_types`` (Qwen2/Qwen3 from ``use_sliding_window`` + ``max_window_layers``, Gemma-2's alternation
      ``s,f,s,f``, Gemma-3's pattern): ``"sliding_attention"`` -> window, ``"full_attention"`` -> None;
    * 4.x Qwen2-style configs without ``layer_types``: layers ``>= max_window_layers`` windowed;
    * otherwise one global window for every layer (Mistral's convention).

    What a window means is :func:`window_allows`. Raises ValueError for attention kinds this library cannot
    reproduce (chunked, linear, bidirectional).
    """
    cfg = text_config(config)
    n = int(cfg.num_hidden_layers)
    if getattr(cfg, "use_bidirectional_attention", False):
        raise ValueError(f"{type(cfg).__name__} uses bidirectional attention (an encoder); not a causal target")
    window = getattr(cfg, "sliding_window", None)
    if getattr(cfg, "use_sliding_window", True) is False or not window or int(window) <= 0:
        window = None
    window = int(window) if window is not None else None
    model_type = getattr(cfg, "model_type", None)
    layer_types = getattr(cfg, "layer_types", None)
    if model_type in GLOBAL_WINDOW_MODEL_TYPES or (window is None and not layer_types):
        return [window] * n
    if layer_types:
        if len(layer_types) < n:
            raise ValueError(f"{type(cfg).__name__}: layer_types has {len(layer_types)} entries for {n} layers")
        out: list[int | None] = []
        for i, kind in enumerate(layer_types[:n]):
            if kind == "full_attention":
                out.append(None)
            elif kind == "sliding_attention":
                out.append(window)  # None when the window is disabled (HF would fail to build the mask then)
            else:
                raise ValueError(f"{type(cfg).__name__}: layer {i} has attention type {kind!r}; only "
                                 "'full_attention' and 'sliding_attention' are supported")
        return out
    max_window_layers = getattr(cfg, "max_window_layers", None)
    if max_window_layers is not None and getattr(cfg, "use_sliding_window", None):
        return [window if i >= int(max_window_layers) else None for i in range(n)]
    return [window] * n


def window_allows(q_pos: Tensor | int, k_pos: Tensor | int, window: int | None) -> Tensor:
    """Whether a query at position ``q_pos`` may attend a key at ``k_pos`` (broadcasting), HF's convention.

    Causal plus, with a window, ``q_pos - window < k_pos <= q_pos``: a query sees exactly ``window`` positions
    including its own (``masking_utils.sliding_window_overlay``: ``kv_idx > q_idx - sliding_window``, and-ed with
    ``causal_mask_function``: ``kv_idx <= q_idx``). Positions are absolute token positions (``position_ids``), which
    is what a tree decoder needs: a tree node at depth d after a prefix of length P sits at ``P + d``.
    """
    q = torch.as_tensor(q_pos)
    k = torch.as_tensor(k_pos)
    allowed = k <= q
    if window is not None:
        allowed = allowed & (k > q - window)
    return allowed


# ----------------------------------------------------------------------------------------------------------------
# modules
# ----------------------------------------------------------------------------------------------------------------
def _own_layers(module: nn.Module, num_layers: int | None) -> tuple[str, nn.ModuleList] | None:
    """``(name, blocks)`` when ``module`` itself holds the decoder blocks as a ModuleList, else None."""
    for name in LAYER_ATTRS:
        layers = getattr(module, name, None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            if num_layers is None or len(layers) >= num_layers:
                return name, layers
    return None


def _candidates(model: nn.Module) -> list[nn.Module]:
    """Modules that may be the text decoder, most specific lookups first, breadth-first, without repeats.

    ``get_decoder()`` is tried first (it is HF's answer) but is not trusted alone: its generic version returns the
    model itself when it finds no known attribute, and a multimodal wrapper's ``model`` / ``base_model`` is the
    multimodal model, which owns no decoder layers (``Gemma3ForConditionalGeneration.model`` is ``Gemma3Model``; the
    text decoder is ``model.language_model``). The first candidate that owns the blocks wins.
    """
    seen: list[nn.Module] = []
    queue: list[nn.Module] = [model]
    while queue and len(seen) < 32:
        module = queue.pop(0)
        if any(module is m for m in seen):
            continue
        seen.append(module)
        nxt: list[nn.Module] = []
        getter = getattr(module, "get_decoder", None)
        if callable(getter):
            try:
                decoder = getter()
            except Exception:  # noqa: BLE001 - some exotic wrappers raise; the attribute search below still runs
                decoder = None
            if isinstance(decoder, nn.Module):
                nxt.append(decoder)
        base = getattr(module, "base_model", None)
        if isinstance(base, nn.Module):
            nxt.append(base)
        for name in BASE_ATTRS:
            child = getattr(module, name, None)
            if isinstance(child, nn.Module):
                nxt.append(child)
        queue.extend(nxt)
    return seen


def base_model(model: nn.Module) -> nn.Module:
    """The text decoder: the module that owns the decoder blocks and whose forward returns ``last_hidden_state``
    after the final norm (``LlamaModel``, GPT-2's ``transformer``, GPT-NeoX's ``gpt_neox``, a multimodal model's
    ``language_model``). Raises ValueError naming the class and what was looked for when none is found.
    """
    num_layers = _num_layers(model)
    for module in _candidates(model):
        if module is model and _has_head(model):
            continue  # the *ForCausalLM itself never is the base model
        if _own_layers(module, num_layers) is not None:
            return module
    raise ValueError(
        f"cannot find the decoder layers of {type(model).__name__}: looked for a ModuleList named one of "
        f"{list(LAYER_ATTRS)} on the model, on get_decoder(), on base_model and on the attributes {list(BASE_ATTRS)} "
        f"(recursively){'' if num_layers is None else f' with {num_layers} blocks (config.num_hidden_layers)'}; "
        "add this layout to spec_lightning/targets/layout.py"
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks, in order (aux features are forward hooks on these). Exactly ``num_hidden_layers`` long
    (Gemma-3 iterates ``self.layers[: num_hidden_layers]``; a longer list would hold unused blocks)."""
    base = base_model(model)
    n = _num_layers(model)
    _, layers = _own_layers(base, n)  # type: ignore[misc]  # base_model found them with the same rule
    return layers if n is None or len(layers) == n else nn.ModuleList(list(layers)[:n])


def final_norm(model: nn.Module) -> nn.Module | None:
    """The final norm of the text decoder (``norm``, ``ln_f``, ``final_layer_norm``, ...), or None if it has none.

    Only used to initialise a draft's norm from the target; the features themselves come from the base model's
    ``last_hidden_state``, which is already normed.
    """
    base = base_model(model)
    for name in FINAL_NORM_ATTRS:
        module = getattr(base, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


@torch.no_grad()
def rms_norm_scale(norm: nn.Module | None, eps: float | None = None) -> Tensor | None:
    """The per-channel scale ``s`` of an RMS-style norm (``y = x / rms(x) * s``), or None for any other norm.

    A Llama-style draft norm (``x / rms(x) * weight``) copies a target norm correctly only through this scale, never
    through the raw ``weight`` parameter: Gemma/Gemma-2/Gemma-3 store ``w`` and multiply by ``1 + w`` (a copied ``w``
    of a freshly initialised Gemma norm is all zeros), while LayerNorms (GPT-2, GPT-NeoX, Cohere) subtract the mean
    and have no RMS scale at all. The norm is probed numerically (a unit-RMS input gives ``s``, a random input must
    then give ``x / rms(x) * s``), so no family needs to be named. ``eps`` defaults to the module's own
    (``eps`` / ``variance_epsilon``).
    """
    weight = getattr(norm, "weight", None)
    if norm is None or not isinstance(weight, Tensor) or weight.dim() != 1 or weight.device.type == "meta":
        return None
    if eps is None:
        eps = next((float(v) for k in ("eps", "variance_epsilon") if isinstance(v := getattr(norm, k, None), float)),
                   1e-6)
    h = weight.shape[0]
    ones = torch.ones(1, h, dtype=weight.dtype, device=weight.device)
    scale = (norm(ones).float()[0] * (1.0 + eps) ** 0.5)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, h, generator=g) * 3 + 1).to(device=weight.device, dtype=weight.dtype)
    xf = x.float()
    expected = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * scale
    tol = 1e-4 if weight.dtype == torch.float32 else 3e-2
    got = norm(x).float()
    if not torch.allclose(got, expected, rtol=tol, atol=tol * max(float(expected.abs().max()), 1.0)):
        return None
    return scale


def attention_projection_targets(model: nn.Module) -> str:
    """A peft ``target_modules`` regex matching the attention projections of every text-decoder block.

    Names differ per family: ``q_proj/k_proj/v_proj/o_proj`` (Llama & co), ``qkv_proj/o_proj`` (Phi-3),
    ``query_key_value/dense`` (GPT-NeoX), ``c_attn/c_proj`` (GPT-2, Conv1D). They are read from the first decoder
    block's attention module (``self_attn``, ``attn``, ``attention``): its direct ``nn.Linear`` / ``Conv1D`` children.
    The regex is anchored at the decoder blocks (``model.layers.<i>.self_attn.(q_proj|...)``), so a multimodal model's
    vision tower and the MLPs (GPT-2's MLP also has a ``c_proj``) are never adapted. Raises ValueError naming the
    class when no attention module or projection is found.
    """
    layers = decoder_layers(model)
    first = layers[0]
    name_of = {id(m): n for n, m in model.named_modules()}
    attn_name = next((a for a in ATTENTION_ATTRS if isinstance(getattr(first, a, None), nn.Module)), None)
    if attn_name is None:
        raise ValueError(f"{type(model).__name__}: cannot find the attention module of decoder block "
                         f"{type(first).__name__} (looked for {list(ATTENTION_ATTRS)}); pass the LoRA target modules "
                         "explicitly")
    attn = getattr(first, attn_name)
    projections = [n for n, c in attn.named_children() if isinstance(c, nn.Linear) or type(c).__name__ == "Conv1D"]
    if not projections:
        raise ValueError(f"{type(model).__name__}: attention module {type(attn).__name__} has no Linear/Conv1D "
                         "projections; pass the LoRA target modules explicitly")
    path = name_of[id(first)].rsplit(".", 1)[0]
    return rf"{re.escape(path)}\.\d+\.{re.escape(attn_name)}\.(?:{'|'.join(re.escape(p) for p in projections)})"


def _num_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    n = getattr(text_config(config), "num_hidden_layers", None)
    return int(n) if n is not None else None


def _has_head(model: nn.Module) -> bool:
    getter = getattr(model, "get_output_embeddings", None)
    return callable(getter) and getter() is not None


# ----------------------------------------------------------------------------------------------------------------
# logits
# ----------------------------------------------------------------------------------------------------------------
_LOGIT_KEYS: tuple[str, ...] = ("logits_scaling", "logit_scale", "final_logit_softcapping")


@functools.cache
def _forward_logit_keys(model_cls: type) -> frozenset[str] | None:
    """Which of ``_LOGIT_KEYS`` the class's ``forward`` source mentions; None when it cannot be told.

    The config alone does not say whether a class applies a post-processing: in transformers 5.17 and 5.24
    ``Gemma3ForCausalLM.forward`` softcaps with ``final_logit_softcapping`` but
    ``Gemma3ForConditionalGeneration.forward`` (same text config) does not. The ``forward`` of every
    ``PreTrainedModel`` class in the MRO is read; a non-HF wrapper (torch.compile, PEFT) or a class without source
    falls back to the config.
    """
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    if not (isinstance(model_cls, type) and issubclass(model_cls, PreTrainedModel)):
        return None
    found: set[str] = set()
    for cls in model_cls.__mro__:  # a subclass whose forward calls super().forward keeps its parent's steps
        if "forward" not in vars(cls) or not issubclass(cls, PreTrainedModel):
            continue
        try:
            source = inspect.getsource(vars(cls)["forward"])
        except (OSError, TypeError):
            return None
        found.update(k for k in _LOGIT_KEYS if re.search(rf"\b{k}\b", source))
    return frozenset(found)


def logits_transform(config: Any, model_cls: type | None = None) -> Callable[[Tensor], Tensor] | None:
    """The family's post-processing of ``lm_head(final_hidden)``, or None when the logits are the raw head output.

    * Granite (``GraniteForCausalLM.forward``): ``logits / logits_scaling``;
    * Cohere (``CohereForCausalLM.forward``): ``logits * logit_scale``;
    * Gemma-2/Gemma-3 (``Gemma2ForCausalLM.forward``): ``tanh(logits / cap) * cap`` with ``final_logit_softcapping``.

    With ``model_cls`` (a transformers model class), a step is kept only when that class's ``forward`` reads the
    config key (see ``_forward_logit_keys``). Families carrying several (none known today) get the scalings first,
    the softcap last. Post-processing this function does not know is caught by :func:`check_output_logits`.
    """
    cfg = text_config(config)
    applied = _forward_logit_keys(model_cls) if model_cls is not None else None

    def wanted(key: str) -> bool:
        return applied is None or key in applied

    steps: list[Callable[[Tensor], Tensor]] = []
    scaling = getattr(cfg, "logits_scaling", None)
    if scaling is not None and float(scaling) != 1.0 and wanted("logits_scaling"):
        steps.append(lambda x, s=float(scaling): x / s)
    scale = getattr(cfg, "logit_scale", None)
    if isinstance(scale, (int, float)) and float(scale) != 1.0 and wanted("logit_scale"):
        steps.append(lambda x, s=float(scale): x * s)
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap is not None and float(cap) > 0 and wanted("final_logit_softcapping"):
        steps.append(lambda x, c=float(cap): torch.tanh(x / c) * c)
    if not steps:
        return None

    def transform(logits: Tensor) -> Tensor:
        for step in steps:
            logits = step(logits)
        return logits

    return transform


def output_logits(model: nn.Module, hidden: Tensor) -> Tensor:
    """The model's real output logits from its final post-norm hidden state, in float32.

    ``lm_head`` runs in the model's dtype (upcasting a 128k x 4k head would double its memory), its output is cast
    to float32 and then post-processed by :func:`logits_transform` (as the model's class applies it), so
    softcap/scale are applied in float32.
    """
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head); not a causal LM")
    logits = head(hidden).float()
    transform = logits_transform(model.config, type(model))
    return logits if transform is None else transform(logits)


@torch.no_grad()
def check_output_logits(model: nn.Module, input_ids: Tensor | None = None, rtol: float | None = None) -> float | None:
    """Check once that :func:`output_logits` reproduces ``model(ids).logits``; returns the max abs difference.

    Guards families with logit post-processing this library does not know yet (a draft trained on raw
    ``lm_head`` logits of such a model would learn the wrong distribution). Runs a tiny forward (8 tokens unless
    ``input_ids`` is given). The tolerance is relative to the logits' magnitude: ``rtol`` defaults to 1e-4 for
    float32 and 2e-2 for half precision (HF post-processes in the model dtype, we in float32). Returns None without
    running on a meta-device model. Raises ValueError naming the class when the two disagree.
    """
    param = next(model.parameters(), None)
    if param is None or param.device.type == "meta":
        return None
    if input_ids is None:
        vocab = int(text_config(model.config).vocab_size)
        input_ids = (torch.arange(8, device=param.device) * 7919 % max(vocab - 3, 1) + 3).unsqueeze(0)
    input_ids = input_ids.to(param.device)
    reference = model(input_ids=input_ids, use_cache=False).logits.float()
    hidden = base_model(model)(input_ids=input_ids, use_cache=False).last_hidden_state
    ours = output_logits(model, hidden)
    if rtol is None:
        rtol = 1e-4 if param.dtype == torch.float32 else 2e-2
    diff = (ours - reference).abs().max().item()
    scale = max(reference.abs().max().item(), 1.0)
    if not diff <= rtol * scale:
        raise ValueError(
            f"{type(model).__name__}: model(ids).logits differs from lm_head(last_hidden_state) post-processed by "
            f"spec_lightning (max abs diff {diff:.3g}, logits up to {scale:.3g}); the family post-processes its logits "
            "in a way spec_lightning does not know: add it to logits_transform in spec_lightning/targets/layout.py"
        )
    return diff
