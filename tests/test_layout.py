"""Family-generic target layout (spec_lightning.targets.layout) on tiny random targets of every common family."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from spec_lightning.drafts.eagle3 import Eagle3Config, rope_inv_freq
from spec_lightning.targets import default_aux_layer_ids
from spec_lightning.targets.layout import (
    DEFAULT_ROPE_THETA,
    base_model,
    check_output_logits,
    decoder_layers,
    draft_rope_settings,
    final_norm,
    logits_transform,
    norm_epsilon,
    output_logits,
    sliding_window_layers,
    text_config,
    window_allows,
)
from tests.families import FAMILIES, MULTIMODAL, WINDOW

torch.set_num_threads(1)

ALL = {**FAMILIES, **MULTIMODAL}
_MODELS: dict[str, nn.Module] = {}


def model_of(name: str) -> nn.Module:
    """Each tiny family is built once per session (the tests only read it)."""
    if name not in _MODELS:
        _MODELS[name] = ALL[name].build()
    return _MODELS[name]


def ids_of(length: int, vocab: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab - 3, (1, length), generator=g)


# What each family must report: (decoder layers path, final norm class, draft rope (theta, rope_type or None),
# windows per layer). Written out by hand from the configs in families.py, so a wrong generic rule shows here.
S = WINDOW
EXPECTED = {
    "llama": ("model.layers", "LlamaRMSNorm", (5e4, None), [None] * 6),
    "llama_tied": ("model.layers", "LlamaRMSNorm", (5e4, None), [None] * 6),
    "llama3_rope": ("model.layers", "LlamaRMSNorm", (5e5, "llama3"), [None] * 6),
    "qwen2": ("model.layers", "Qwen2RMSNorm", (1e6, None), [None] * 6),
    "qwen2_swa": ("model.layers", "Qwen2RMSNorm", (1e6, None), [None, None, None, S, S, S]),
    "qwen3": ("model.layers", "Qwen3RMSNorm", (1e6, None), [None] * 6),
    "qwen3_moe": ("model.layers", "Qwen3MoeRMSNorm", (1e6, None), [None] * 6),
    "mixtral": ("model.layers", "MixtralRMSNorm", (1e6, None), [None] * 6),
    "mistral": ("model.layers", "MistralRMSNorm", (1e4, None), [S] * 6),
    "gemma2": ("model.layers", "Gemma2RMSNorm", (1e4, None), [S, None] * 3),
    "gemma3": ("model.layers", "Gemma3RMSNorm", (1e6, "linear"), [S, S, None] * 2),
    "phi3": ("model.layers", "Phi3RMSNorm", (1e4, None), [2 * S] * 6),
    "gpt_neox": ("gpt_neox.layers", "LayerNorm", (1e4, None), [None] * 6),
    "granite": ("model.layers", "GraniteRMSNorm", (1e4, None), [None] * 6),
    "cohere": ("model.layers", "CohereLayerNorm", (1e4, None), [None] * 6),
    "gpt2": ("transformer.h", "LayerNorm", (DEFAULT_ROPE_THETA, None), [None] * 6),
    "gemma3_mm": ("model.language_model.layers", "Gemma3RMSNorm", (1e6, None), [S, S, None] * 2),
}


def test_every_family_has_expectations():
    assert set(EXPECTED) == set(ALL)


@pytest.mark.parametrize("name", sorted(ALL))
def test_decoder_layers_and_hooks_match_hidden_states(name):
    model = model_of(name)
    cfg = text_config(model.config)
    n = int(cfg.num_hidden_layers)
    layers = decoder_layers(model)
    assert len(layers) == n

    path = EXPECTED[name][0]
    expected_layers = model.get_submodule(path)
    assert all(a is b for a, b in zip(layers, expected_layers, strict=True))
    assert base_model(model) is model.get_submodule(path.rsplit(".", 1)[0])

    aux = default_aux_layer_ids(n)
    captured: dict[int, torch.Tensor] = {}

    def hook(i):
        def fn(_module, _inputs, output):
            captured[i] = output[0] if isinstance(output, tuple) else output
        return fn

    handles = [layers[i].register_forward_hook(hook(i)) for i in aux]
    try:
        with torch.no_grad():
            out = model(input_ids=ids_of(12), output_hidden_states=True, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    assert len(out.hidden_states) == n + 1
    for i in aux:
        assert torch.equal(captured[i], out.hidden_states[i + 1]), f"{name}: layer {i} output != hidden_states[{i + 1}]"


@pytest.mark.parametrize("name", sorted(ALL))
def test_output_logits_equal_model_logits(name):
    model = model_of(name)
    ids = ids_of(12)
    with torch.no_grad():
        reference = model(input_ids=ids, use_cache=False).logits
        hidden = base_model(model)(input_ids=ids, use_cache=False).last_hidden_state
        ours = output_logits(model, hidden)
        raw = model.get_output_embeddings()(hidden).float()
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    assert check_output_logits(model) <= 1e-5

    if ALL[name].logit_postprocessing:
        assert logits_transform(model.config, type(model)) is not None
        # The transform must matter: raw lm_head logits are a measurably different distribution.
        kl = torch.nn.functional.kl_div(raw.log_softmax(-1), reference.log_softmax(-1), log_target=True,
                                        reduction="batchmean").item() / ids.shape[1]
        assert kl > 0.3, f"{name}: KL(real || raw lm_head) per token only {kl:.3f}"
        assert (raw - reference).abs().max().item() > 1.0
        assert raw.std().item() > 1.0  # the logits are not ~0 (families.py rescales the head)
    else:
        assert logits_transform(model.config, type(model)) is None
        torch.testing.assert_close(raw, reference, rtol=0, atol=1e-6)


def test_softcap_follows_the_class_not_only_the_config():
    """Same text config (final_logit_softcapping=5): Gemma3ForCausalLM softcaps, but transformers 5.24's
    Gemma3ForConditionalGeneration.forward does not; output_logits follows the class that is actually run."""
    mm = model_of("gemma3_mm")
    assert mm.config.text_config.final_logit_softcapping == 5.0
    assert logits_transform(mm.config) is not None  # config alone says softcap
    gemma2 = model_of("gemma2")
    assert logits_transform(gemma2.config, type(gemma2)) is not None

    class LoggingGemma2(type(gemma2)):  # a subclass calling super().forward keeps its parent's softcap
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    assert logits_transform(gemma2.config, LoggingGemma2) is not None


def test_check_output_logits_catches_unknown_postprocessing():
    """A family that post-processes its logits in a way layout.py does not know is refused, naming the class."""
    from transformers import LlamaForCausalLM

    class TemperedLlamaForCausalLM(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits / 2.0
            return out

    llama = model_of("llama")
    model = TemperedLlamaForCausalLM(llama.config).eval()
    model.load_state_dict(llama.state_dict())
    with pytest.raises(ValueError, match="TemperedLlamaForCausalLM.*logits"):
        check_output_logits(model)
    # A config key the class never reads is not applied either (the class decides, see logits_transform).
    model.config.final_logit_softcapping = 3.0
    assert logits_transform(model.config, LlamaForCausalLM) is None


def _eps_of(norm: nn.Module) -> float:
    for key in ("eps", "variance_epsilon", "epsilon"):
        if hasattr(norm, key):
            return float(getattr(norm, key))
    raise AssertionError(f"no eps on {type(norm).__name__}")


def _draft_config(config) -> Eagle3Config:
    """An Eagle3Config from the family-generic helpers (what the wrapper will do for any family)."""
    cfg = text_config(config)
    hidden, vocab = int(cfg.hidden_size), int(cfg.vocab_size)  # GPT-2: n_embd through its attribute_map
    theta, scaling = draft_rope_settings(config)
    heads = int(cfg.num_attention_heads)
    n = int(cfg.num_hidden_layers)
    return Eagle3Config(
        hidden_size=hidden, intermediate_size=int(getattr(cfg, "intermediate_size", None) or 4 * hidden),
        num_attention_heads=heads, num_key_value_heads=int(getattr(cfg, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(cfg, "head_dim", None) or hidden // heads), vocab_size=vocab,
        draft_vocab_size=min(64, vocab), aux_layer_ids=default_aux_layer_ids(n), target_num_hidden_layers=n,
        rms_norm_eps=norm_epsilon(config), rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=int(cfg.max_position_embeddings),
    )


def _target_full_attention_inv_freq(model: nn.Module) -> torch.Tensor | None:
    rotary = getattr(base_model(model), "rotary_emb", None)
    if rotary is None:
        return None
    return getattr(rotary, "full_attention_inv_freq", getattr(rotary, "inv_freq", None))


@pytest.mark.parametrize("name", sorted(ALL))
def test_norm_eps_rope_and_draft_config(name):
    model = model_of(name)
    norm = final_norm(model)
    assert type(norm).__name__ == EXPECTED[name][1]
    assert norm is base_model(model).get_submodule(
        next(n for n in ("norm", "ln_f", "final_layer_norm") if hasattr(base_model(model), n)))
    assert norm_epsilon(model.config) == pytest.approx(_eps_of(norm))

    theta, scaling = draft_rope_settings(model.config)
    exp_theta, exp_type = EXPECTED[name][2]
    assert theta == pytest.approx(exp_theta)
    assert (scaling or {}).get("rope_type") == exp_type
    assert scaling is None or "partial_rotary_factor" not in scaling

    draft = _draft_config(model.config)
    assert draft.rope_theta == theta and draft.rope_scaling == scaling
    inv_freq, _ = rope_inv_freq(draft)
    target_inv = _target_full_attention_inv_freq(model)
    partial = (getattr(text_config(model.config), "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)
    if target_inv is not None and partial == 1.0:
        # The draft rotates exactly like the target's full-attention layers.
        torch.testing.assert_close(inv_freq, target_inv.float(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", sorted(ALL))
def test_sliding_window_layers_match_config(name):
    model = model_of(name)
    windows = sliding_window_layers(model.config)
    assert windows == EXPECTED[name][3]
    assert any(w is not None for w in windows) == ALL[name].sliding


def _layer_calls(model: nn.Module, ids: torch.Tensor) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) every decoder layer is called with in one forward (hidden states, masks, RoPE, ...)."""
    calls: list = [None] * len(decoder_layers(model))
    handles = [layer.register_forward_pre_hook(lambda _m, args, kwargs, i=i: calls.__setitem__(i, (args, kwargs)),
                                               with_kwargs=True) for i, layer in enumerate(decoder_layers(model))]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return calls


def _call_layer(layer: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
    with torch.no_grad():
        out = layer(hidden, *args[1:], **kwargs)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("name", sorted(n for n, f in ALL.items() if f.sliding))
def test_reported_windows_are_what_the_model_does(name):
    """Lift the window (same weights, config.sliding_window=10000: HF builds masks from it at run time) and feed
    every decoder layer the SAME input in both models, with the masks/RoPE each model builds: layers reported full
    give identical outputs, layers reported windowed agree up to position window-1 and differ from the first
    position that ``window_allows`` says loses key 0. The final logits agree exactly before that position."""
    model = model_of(name)
    windows = sliding_window_layers(model.config)
    window = next(w for w in windows if w is not None)
    # first query position that can no longer see key 0 (HF: q - window < k <= q -> position `window`)
    q_first = next(q for q in range(4 * window) if not window_allows(q, 0, window))
    assert q_first == window

    unwindowed = copy.deepcopy(model)
    text_config(unwindowed.config).sliding_window = 10_000
    ids = ids_of(2 * window + 8)
    calls_w, calls_f = _layer_calls(model, ids), _layer_calls(unwindowed, ids)
    for i, w in enumerate(windows):
        args, kwargs = calls_w[i]
        hidden = args[0] if args else kwargs["hidden_states"]
        a = _call_layer(decoder_layers(model)[i], hidden, args, kwargs)
        b = _call_layer(decoder_layers(unwindowed)[i], hidden, *calls_f[i])
        if w is None:
            assert torch.equal(a, b), f"{name}: layer {i} reported full but its mask depends on the window"
        else:
            assert w == window
            assert torch.equal(a[0, :q_first], b[0, :q_first]), f"{name}: layer {i} windowed too early"
            assert not torch.allclose(a[0, q_first], b[0, q_first], atol=1e-6), f"{name}: layer {i} not windowed"

    with torch.no_grad():
        logits_w = model(input_ids=ids, use_cache=False).logits
        logits_f = unwindowed(input_ids=ids, use_cache=False).logits
    assert torch.equal(logits_w[0, :q_first], logits_f[0, :q_first])
    assert not torch.allclose(logits_w[0, q_first:], logits_f[0, q_first:])


def test_check_output_logits_in_bfloat16():
    """Half-precision targets pass the load-time check (HF post-processes in bf16, we in float32)."""
    for name in ("gemma2", "granite", "cohere", "llama"):
        model = copy.deepcopy(model_of(name)).to(torch.bfloat16)
        assert check_output_logits(model) is not None


def test_window_allows_convention():
    q = torch.arange(6).unsqueeze(1)
    k = torch.arange(6).unsqueeze(0)
    full = window_allows(q, k, None)
    assert torch.equal(full, torch.ones(6, 6, dtype=torch.bool).tril())
    w3 = window_allows(q, k, 3)
    assert w3.sum(-1).tolist() == [1, 2, 3, 3, 3, 3]  # a query sees exactly `window` keys including itself
    assert bool(window_allows(5, 3, 3)) and not bool(window_allows(5, 2, 3)) and not bool(window_allows(2, 3, 3))


class _NoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=2, vocab_size=8, hidden_size=4)
        self.body = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        self.lm_head = nn.Linear(4, 8)


def test_unsupported_layout_raises_naming_the_class():
    with pytest.raises(ValueError, match=r"_NoLayers.*layers.*'h'"):
        decoder_layers(_NoLayers())
    with pytest.raises(ValueError, match="_NoLayers"):
        base_model(_NoLayers())


def test_rope_settings_of_transformers4_style_configs():
    """4.x configs keep RoPE in flat attributes; the rules must hold there too."""
    llama = SimpleNamespace(model_type="llama", rope_theta=500000.0,
                            rope_scaling={"type": "linear", "factor": 2.0})
    assert draft_rope_settings(llama) == (500000.0, {"rope_type": "linear", "factor": 2.0})
    gemma3 = SimpleNamespace(model_type="gemma3_text", rope_theta=1e6, rope_local_base_freq=1e4,
                             rope_scaling={"rope_type": "linear", "factor": 8.0})
    assert draft_rope_settings(gemma3) == (1e6, {"rope_type": "linear", "factor": 8.0})
    neox = SimpleNamespace(model_type="gpt_neox", rotary_emb_base=10000, rotary_pct=0.25, rope_scaling=None)
    assert draft_rope_settings(neox) == (10000.0, None)
    default_dict = SimpleNamespace(model_type="qwen2", rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    assert draft_rope_settings(default_dict) == (1e6, None)
    with pytest.raises(ValueError, match="refusing to guess"):
        draft_rope_settings(SimpleNamespace(model_type="mystery"))
    assert draft_rope_settings(SimpleNamespace(model_type="gpt2")) == (DEFAULT_ROPE_THETA, None)
    with pytest.raises(ValueError, match="full_attention"):
        draft_rope_settings(SimpleNamespace(rope_parameters={"sliding_attention": {"rope_theta": 1e4}}))


def test_window_rules_of_other_config_shapes():
    n = 4
    # Qwen2 of transformers 4.x before layer_types: layers >= max_window_layers are windowed.
    old_qwen2 = SimpleNamespace(model_type="qwen2", num_hidden_layers=n, sliding_window=8, use_sliding_window=True,
                                max_window_layers=2)
    assert sliding_window_layers(old_qwen2) == [None, None, 8, 8]
    # use_sliding_window=False disables the window whatever sliding_window says.
    off = SimpleNamespace(model_type="qwen2", num_hidden_layers=n, sliding_window=8, use_sliding_window=False,
                          max_window_layers=2)
    assert sliding_window_layers(off) == [None] * n
    # Qwen2-MoE stores a disabled window as 0.
    zero = SimpleNamespace(model_type="qwen2_moe", num_hidden_layers=n, sliding_window=0,
                           layer_types=["full_attention"] * n)
    assert sliding_window_layers(zero) == [None] * n
    # Mistral ignores layer_types (HF warns about them) and windows every layer.
    mistral = SimpleNamespace(model_type="mistral", num_hidden_layers=n, sliding_window=8,
                              layer_types=["full_attention"] * n)
    assert sliding_window_layers(mistral) == [8] * n
    chunked = SimpleNamespace(model_type="llama4_text", num_hidden_layers=2, sliding_window=8,
                              layer_types=["chunked_attention", "full_attention"])
    with pytest.raises(ValueError, match="chunked_attention"):
        sliding_window_layers(chunked)
    assert norm_epsilon(SimpleNamespace()) == 1e-6
    assert norm_epsilon(SimpleNamespace(layer_norm_epsilon=1e-5)) == 1e-5
