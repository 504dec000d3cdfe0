"""The family matrix (issue 16): every tiny target family of ``tests/families.py`` x EAGLE-3, Medusa and DFlash.

For each family (Llama plain / tied / llama3 RoPE, Qwen2 with and without a sliding window, Qwen3, Qwen3-MoE,
Mixtral, Mistral, Gemma-2, Gemma-3 text, Phi-3, GPT-NeoX, Granite, Cohere, GPT-2 and the multimodal Gemma-3's text
decoder) and for EAGLE-3, Medusa and DFlash, one test per cell of ``docs/families.md``:

* **fit** — a few optimiser steps of ``Eagle3Module`` / ``Medusa1Module`` / ``DFlashModule`` through a Lightning
  ``Trainer`` on a hand-made
  datamodule: the loss is finite and falls on a repeated batch, every trainable draft parameter moved, the target did
  not (:func:`test_fit`);
* **teacher** — ``FrozenTarget.logits(final_hidden)`` equals ``model(ids).logits`` and the EAGLE-3 module's teacher
  equals the softmax of the model's own logits over the draft vocabulary, computed here from ``model(ids).logits``
  (:func:`test_teacher_is_the_models_real_distribution`);
* **capture** — the features the modules train on equal HF ``output_hidden_states`` (``[i + 1]`` for EAGLE-3's aux
  layers and DFlash's target layers, the lm_head input for Medusa) (:func:`test_capture_is_hf_output_hidden_states`);
* **export** — the serving directory reloads to identical weights, with RoPE / eps / dtype that fit the target
  (:func:`test_export_round_trip_and_config`, :func:`test_export_dtype_follows_the_target`);
* **lossless chain / tree** — greedy speculative decoding equals transformers' own ``generate`` token for token, with
  oracle drafts (multi-token acceptance, tau > 1.5) and with the draft trained in the fit cell; sliding-window families
  generate past three windows (:func:`test_lossless_against_hf_generate`,
  :func:`test_tree_verification_is_exact_past_the_window`).

Models and fitted modules are built once per family and reused by the cells (they are only read after the fit).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from lightning.pytorch import Callback, LightningDataModule, Trainer
from torch.utils.data import DataLoader

import spec_lightning.modules.eagle3 as eagle3_module
from spec_lightning.contract import DataLink, TokenRows
from spec_lightning.drafts.eagle3 import Eagle3Config
from spec_lightning.export.dflash import load_dflash_draft
from spec_lightning.export.eagle3 import load_eagle3_draft
from spec_lightning.export.medusa import load_medusa_heads
from spec_lightning.modules.dflash import DFlashModule
from spec_lightning.modules.eagle3 import Eagle3Module
from spec_lightning.modules.medusa1 import Medusa1Module
from spec_lightning.modules.medusa2 import Medusa2Module
from spec_lightning.speculate.decode import speculative_generate
from spec_lightning.speculate.evaluate import hf_greedy
from spec_lightning.speculate.tree import DraftTree
from spec_lightning.targets.layout import (
    attention_projection_targets,
    decoder_layers,
    final_norm,
    rms_norm_scale,
    sliding_window_layers,
    text_config,
)
from tests.families import FAMILIES, MULTIMODAL, VOCAB
from tests.speculate_helpers import OracleDFlash, OracleEagle3, OracleMedusa, Reference, random_eagle3

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings(r"ignore:Found \d+ module\(s\) in eval mode")]

ALL = {**FAMILIES, **MULTIMODAL}
NAMES = sorted(ALL)
SLIDING = sorted(n for n in NAMES if ALL[n].sliding)
ALGOS = ("eagle3", "medusa", "dflash")
DRAFT_VOCAB = 64  # < V = 256: a non-trivial d2t / t2d
NUM_HEADS = 3
BLOCK_SIZE = 4  # DFlash: chains of up to 3 tokens, as NUM_HEADS and the lossless cells' num_draft_tokens
FIT_STEPS = 3
EOS = [2]  # every tiny family's eos_token_id

# What the EAGLE-3 export's config.json must say, written out by hand from the configs in families.py:
# (rope_theta, rope_scaling or None, rms_norm_eps and the target field it comes from).
EXPORT = {
    "llama": (5e4, None, 1e-6, "rms_norm_eps"),
    "llama_tied": (5e4, None, 1e-6, "rms_norm_eps"),
    "llama3_rope": (5e5, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 64}, 1e-6, "rms_norm_eps"),
    "qwen2": (1e6, None, 1e-6, "rms_norm_eps"),
    "qwen2_swa": (1e6, None, 1e-6, "rms_norm_eps"),
    "qwen3": (1e6, None, 1e-6, "rms_norm_eps"),
    "qwen3_moe": (1e6, None, 1e-6, "rms_norm_eps"),
    "mixtral": (1e6, None, 1e-5, "rms_norm_eps"),
    "mistral": (1e4, None, 1e-6, "rms_norm_eps"),
    "gemma2": (1e4, None, 1e-6, "rms_norm_eps"),
    # per-layer-type RoPE: the full-attention layers' setting (theta 1e6, linear x8), not the sliding layers' 1e4
    "gemma3": (1e6, {"rope_type": "linear", "factor": 8.0}, 1e-6, "rms_norm_eps"),
    "gemma3_mm": (1e6, None, 1e-6, "rms_norm_eps"),
    "phi3": (1e4, None, 1e-5, "rms_norm_eps"),  # partial_rotary_factor 0.5 not copied: the draft rotates head_dim
    "gpt_neox": (1e4, None, 1e-5, "layer_norm_eps"),  # rotary_pct 0.25 not copied (same reason)
    "granite": (1e4, None, 1e-6, "rms_norm_eps"),
    "cohere": (1e4, None, 1e-5, "layer_norm_eps"),
    "gpt2": (1e4, None, 1e-5, "layer_norm_epsilon"),  # no RoPE at all: documented default theta 10000
}

# The final norm's kind (what a Llama-style draft norm may copy): "llama" (x/rms * w), "gemma" (x/rms * (1 + w)) or
# None (LayerNorm: mean-subtracting, nothing to copy).
NORM_KIND = {n: "llama" for n in NAMES} | {"gemma2": "gemma", "gemma3": "gemma", "gemma3_mm": "gemma",
                                            "gpt_neox": None, "cohere": None, "gpt2": None}
# Attention projections LoRA adapts by default in Medusa-2 (per decoder block).
LORA_PROJECTIONS = {n: {"q_proj", "k_proj", "v_proj", "o_proj"} for n in NAMES} | {
    "phi3": {"qkv_proj", "o_proj"}, "gpt_neox": {"query_key_value", "dense"}, "gpt2": {"c_attn", "c_proj"}}


def test_every_family_has_expectations():
    assert set(EXPORT) == set(NORM_KIND) == set(LORA_PROJECTIONS) == set(ALL)
    assert SLIDING == ["gemma2", "gemma3", "gemma3_mm", "mistral", "phi3", "qwen2_swa"]


# ------------------------------------------------------------------------------------------------ shared fixtures
class HandData(LightningDataModule):
    """Four right-padded rows of random tokens (4 prompt tokens, then trainable ones): one batch per epoch, so the
    fit sees the same batch every step and its loss must fall. Provides ``draft_vocab`` like ChatDataModule."""

    def __init__(self, T: int = 24, link: DataLink | None = None) -> None:
        super().__init__()
        self.link = link
        g = torch.Generator().manual_seed(0)
        self.rows = []
        for i in range(4):
            n = T - 3 * (i % 3)
            ids = torch.randint(3, VOCAB - 3, (n,), generator=g).tolist()
            self.rows.append({"input_ids": ids, "loss_mask": [0] * 4 + [1] * (n - 4)})
        self.T = T

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        out = {k: torch.zeros(len(rows), self.T, dtype=torch.long) for k in ("input_ids", "attention_mask", "loss_mask")}
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            out["input_ids"][i, :n] = torch.tensor(r["input_ids"])
            out["attention_mask"][i, :n] = 1
            out["loss_mask"][i, :n] = torch.tensor(r["loss_mask"])
        return out

    def batch(self) -> dict[str, torch.Tensor]:
        return self.collate(self.rows)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.rows, batch_size=len(self.rows), collate_fn=self.collate)

    def setup(self, stage: str) -> None:  # the data side of the contract: the training tokens, back on the link
        if self.link is not None:
            self.link.provide(training_tokens=TokenRows(lambda: self.rows, "family-matrix-hand-data-v1"))


class FamilyEagle3(Eagle3Module):
    family = "llama"

    def load_target(self):
        return ALL[self.family].build()


class FamilyMedusa(Medusa1Module):
    family = "llama"

    def load_target(self):
        return ALL[self.family].build()


class FamilyMedusa2(Medusa2Module):
    family = "llama"

    def load_target(self):
        return ALL[self.family].build()


class FamilyDFlash(DFlashModule):
    family = "llama"

    def load_target(self):
        return ALL[self.family].build()


class LossRecorder(Callback):
    """The loss of every step, and the draft's weights before the first step (after configure_model)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.before: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.before = {k: v.detach().clone() for k, v in draft_of(pl_module).state_dict().items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def make_module(algo: str, name: str, **kwargs):
    optimizer = lambda params: torch.optim.AdamW(params, lr=1e-2)  # noqa: E731
    if algo == "eagle3":
        module = FamilyEagle3(draft_vocab_size=DRAFT_VOCAB, ttt_length=3, optimizer=optimizer, **kwargs)
    elif algo == "dflash":
        module = FamilyDFlash(block_size=BLOCK_SIZE, num_draft_layers=2, num_anchors=8, optimizer=optimizer, **kwargs)
    else:
        cls = FamilyMedusa2 if algo == "medusa2" else FamilyMedusa
        module = cls(num_heads=NUM_HEADS, optimizer=optimizer, **kwargs)
    module.family = name
    return module


def draft_of(module) -> torch.nn.Module:
    return module.heads if isinstance(module, (Medusa1Module, Medusa2Module)) else module.draft


_FITTED: dict[tuple[str, str], tuple] = {}


def fitted(algo: str, name: str):
    """``(module, datamodule, losses, draft state before the fit)``, fitted once per (algorithm, family)."""
    key = (algo, name)
    if key not in _FITTED:
        torch.manual_seed(0)
        module, recorder = make_module(algo, name), LossRecorder()
        dm = HandData(link=module.data_link)  # as the CLI links them
        trainer = Trainer(accelerator="cpu", max_steps=FIT_STEPS, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                          num_sanity_val_steps=0, callbacks=[recorder])
        trainer.fit(module, datamodule=dm)
        _FITTED[key] = (module, dm, recorder.losses, recorder.before)
    return _FITTED[key]


def the_model(module) -> torch.nn.Module:
    return module.target.model


# ------------------------------------------------------------------------------------------------ fit
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("algo", ALGOS)
def test_fit(algo, name):
    module, _, losses, before = fitted(algo, name)
    assert len(losses) == FIT_STEPS
    assert all(torch.isfinite(torch.tensor(losses))), f"{algo}/{name}: non-finite loss {losses}"
    assert losses[-1] < losses[0], f"{algo}/{name}: loss did not fall on a repeated batch: {losses}"
    draft = draft_of(module)
    trainable = {n for n, p in draft.named_parameters() if p.requires_grad}
    assert trainable
    after = draft.state_dict()
    unmoved = [n for n in trainable if torch.equal(after[n], before[n])]
    assert not unmoved, f"{algo}/{name}: no update reached {unmoved}"
    if algo == "eagle3":  # the frozen embedding copy never moves
        assert torch.equal(after["embed_tokens.weight"], before["embed_tokens.weight"])
    fresh = ALL[name].build().state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in the_model(module).state_dict().items()), "the target moved"
    assert all(not p.requires_grad for p in module.target.parameters())


# ------------------------------------------------------------------------------------------------ teacher
def _padded_batch() -> dict[str, torch.Tensor]:
    return HandData().batch()


@pytest.mark.parametrize("name", NAMES)
def test_teacher_is_the_models_real_distribution(name, monkeypatch):
    module, dm, _, _ = fitted("eagle3", name)
    model = the_model(module)
    batch = dm.batch()
    ids, attn, loss_mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=attn, use_cache=False).logits.float()

    # FrozenTarget.logits (teacher and decoder) = the model's real logits, post-processing included
    feats = module.target(ids, attn)
    real = attn.bool()
    torch.testing.assert_close(module.target.logits(feats.final_hidden)[real], reference[real], rtol=1e-5, atol=1e-5)
    medusa, _, _, _ = fitted("medusa", name)
    hidden = medusa.decode_target()(ids, attn).final_hidden
    torch.testing.assert_close(medusa.decode_target().logits(hidden)[real], reference[real], rtol=1e-5, atol=1e-5)

    # the EAGLE-3 module's teacher, caught where it is made
    seen = {}
    made = eagle3_module.draft_vocab_teacher

    def spy(logits_fn, rows_hidden, vocab_rows, *args, **kwargs):
        seen["p"], seen["argmax"] = made(logits_fn, rows_hidden, vocab_rows, *args, **kwargs)
        return seen["p"], seen["argmax"]

    monkeypatch.setattr(eagle3_module, "draft_vocab_teacher", spy)
    with torch.no_grad():
        module.compute(batch)
    # independently: SpecForge alignment (token u trainable, target position u + 1 real), draft vocab = t2d's ids
    b, u = (loss_mask[:, :-1].bool() & attn[:, 1:].bool()).nonzero(as_tuple=True)
    draft_ids = module.draft.t2d.nonzero()[:, 0]
    assert draft_ids.numel() == DRAFT_VOCAB
    logits = reference[b, u + 1]
    expected = torch.softmax(logits[:, draft_ids], dim=-1)
    torch.testing.assert_close(seen["p"], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(seen["argmax"], logits.argmax(-1))
    if ALL[name].logit_postprocessing:  # the check has teeth: raw lm_head logits give another distribution
        raw = model.get_output_embeddings()(feats.final_hidden[b, u + 1]).float()
        assert (torch.softmax(raw[:, draft_ids], -1) - expected).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------------ capture
def _hf_states(model, ids, attn):
    """``(hidden_states tuple, lm_head input)`` from one HF forward with ``output_hidden_states``."""
    seen = {}
    handle = model.get_output_embeddings().register_forward_hook(lambda _m, args, _o: seen.setdefault("x", args[0]))
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=attn, output_hidden_states=True, use_cache=False)
    finally:
        handle.remove()
    return out.hidden_states, seen["x"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("algo", ALGOS)
def test_capture_is_hf_output_hidden_states(algo, name, monkeypatch):
    module, dm, _, _ = fitted(algo, name)
    model = the_model(module)
    batch = dm.batch()
    ids, attn, loss_mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    states, head_input = _hf_states(model, ids, attn)
    n = int(text_config(model.config).num_hidden_layers)
    assert len(states) == n + 1
    torch.testing.assert_close(states[-1], head_input, rtol=0, atol=0)  # HF's last state is the lm_head input
    seen: list[torch.Tensor] = []
    if algo == "eagle3":
        aux_ids = [1, n // 2 - 1, n - 4]  # SPEC §3.1 default, written out
        assert module.draft_config.aux_layer_ids == aux_ids
        run = module.draft.ttt_hidden
        monkeypatch.setattr(module.draft, "ttt_hidden", lambda aux, *a, **k: seen.append(aux) or run(aux, *a, **k))
        with torch.no_grad():
            module.compute(batch)
        expected = torch.cat([states[i + 1] for i in aux_ids], dim=-1)
        torch.testing.assert_close(seen[0], expected, rtol=1e-6, atol=1e-6)
    elif algo == "dflash":
        layer_ids = [1, n - 3]  # z-lab's default for 2 draft layers (1 .. N - 3), written out
        assert module.draft.config.target_layer_ids == layer_ids
        run = module.draft.project
        monkeypatch.setattr(module.draft, "project", lambda aux: seen.append(aux) or run(aux))
        with torch.no_grad():
            module.compute(batch)
        expected = torch.cat([states[i + 1] for i in layer_ids], dim=-1)
        torch.testing.assert_close(seen[0], expected, rtol=1e-6, atol=1e-6)
    else:
        run = module.heads.head_hidden
        monkeypatch.setattr(module.heads, "head_hidden", lambda x, h: seen.append(x) or run(x, h))
        with torch.no_grad():
            module.compute_losses(batch)
        assert len(seen) == NUM_HEADS
        for h in range(NUM_HEADS):  # head h at position t predicts token t + 2 + h: rows where that token trains
            s = 2 + h
            valid = torch.zeros_like(attn, dtype=torch.bool)
            valid[:, :-s] = loss_mask[:, s:].bool() & attn[:, s:].bool() & attn[:, :-s].bool()
            torch.testing.assert_close(seen[h], head_input[valid], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------ export
def _state_equal(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k].to(a[k].dtype)) and a[k].dtype == b[k].dtype for k in a)


def _hf_rope_inv_freq(config_json: dict) -> torch.Tensor:
    """What an engine reading the exported config with transformers' LlamaConfig rotates with."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    keys = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
            "rope_theta", "rope_scaling")
    cfg = LlamaConfig(**{k: config_json[k] for k in keys})
    return LlamaRotaryEmbedding(cfg).inv_freq.float()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("algo", ALGOS)
def test_export_round_trip_and_config(algo, name, tmp_path):
    module, _, _, _ = fitted(algo, name)
    model = the_model(module)
    cfg_t = text_config(model.config)
    if algo in ("eagle3", "dflash"):
        out = module.export_draft(str(tmp_path / algo))
        cfg = json.loads((out / "config.json").read_text())
        theta, scaling, eps, eps_field = EXPORT[name]
        assert cfg["rope_theta"] == pytest.approx(theta)
        assert cfg["rope_scaling"] == scaling
        assert cfg["rms_norm_eps"] == pytest.approx(eps) == getattr(cfg_t, eps_field)
        assert cfg["torch_dtype"] == "float32"
        assert cfg["hidden_act"] == "silu"  # the draft's MLP is a Llama MLP whatever the target's activation
        assert cfg["max_position_embeddings"] == cfg_t.max_position_embeddings
        assert (cfg["vocab_size"], cfg["hidden_size"]) == (VOCAB, cfg_t.hidden_size)
        if algo == "eagle3":
            assert cfg["draft_vocab_size"] == DRAFT_VOCAB
            assert "eagle_aux_hidden_state_layer_ids" not in cfg  # default layers: neither engine key is written
        else:
            assert cfg["architectures"] == ["DFlashDraftModel"] and cfg["block_size"] == BLOCK_SIZE
            assert cfg["dflash_config"]["target_layer_ids"] == module.draft.config.target_layer_ids
        reloaded = load_eagle3_draft(out) if algo == "eagle3" else load_dflash_draft(out)
        assert _state_equal(module.draft.state_dict(), reloaded.state_dict())
        # the draft trains with the RoPE an engine reads from the exported config
        torch.testing.assert_close(module.draft.rotary.inv_freq, _hf_rope_inv_freq(cfg), rtol=1e-6, atol=0)
        torch.testing.assert_close(reloaded.rotary.inv_freq, module.draft.rotary.inv_freq, rtol=0, atol=0)
    else:
        for layout in ("vllm", "original"):
            out = module.export_draft(str(tmp_path / layout), layout=layout)
            reloaded = load_medusa_heads(out)
            assert _state_equal(module.heads.state_dict(), reloaded.state_dict()), layout
            assert (reloaded.config.hidden_size, reloaded.config.vocab_size) == (cfg_t.hidden_size, VOCAB)
        cfg = json.loads((tmp_path / "vllm" / "config.json").read_text())
        assert cfg["architectures"] == ["MedusaModel"] and cfg["num_heads"] == NUM_HEADS
        assert not any("num" in k and "heads" in k and k != "num_heads" for k in cfg)


@pytest.mark.parametrize("name", NAMES)
def test_export_dtype_follows_the_target(name, tmp_path):
    """A bf16 target gets a bf16 EAGLE-3 export (config ``torch_dtype`` and weights): SGLang casts neither side."""
    module = make_module("eagle3", name, target_dtype="bfloat16")
    module.configure_model()
    assert module.target.dtype == torch.bfloat16
    assert module.draft.fc.weight.dtype == torch.float32  # fp32 master weights
    out = module.export_draft(str(tmp_path / "e3"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16"
    reloaded = load_eagle3_draft(out)
    for key, value in reloaded.state_dict().items():
        source = module.draft.state_dict()[key]
        if source.is_floating_point():
            assert value.dtype == torch.bfloat16, key
            assert torch.equal(value, source.to(torch.bfloat16)), key
        else:
            assert torch.equal(value, source), key


# ------------------------------------------------------------------------------------------------ lossless
PROMPT = torch.randint(3, VOCAB - 3, (20,), generator=torch.Generator().manual_seed(7)).tolist()


def _max_new(name: str) -> int:
    """Past three windows for sliding-window families (prompt + generated > 3 * window), else 24 tokens."""
    windows = [w for w in sliding_window_layers(ALL[name].build().config) if w is not None]
    return max(24, 3 * max(windows) + 8 - len(PROMPT)) if windows else 24


_REFERENCE: dict[str, tuple] = {}


def reference(name: str):
    """``(FrozenTarget, Reference, hf_greedy tokens, max_new)`` per family (the target from the fitted EAGLE-3)."""
    if name not in _REFERENCE:
        target = fitted("eagle3", name)[0].target
        max_new = _max_new(name)
        want = hf_greedy(target, PROMPT, max_new, EOS)
        _REFERENCE[name] = (target, Reference(target.model), want, max_new)
    return _REFERENCE[name]


def _drafters(algo: str, name: str, mode: str) -> dict:
    target, ref, _, _ = reference(name)
    if algo == "eagle3":
        module = fitted("eagle3", name)[0]
        oracle_draft = random_eagle3(target.model, draft_vocab_size=VOCAB, seed=1)  # full vocab: every token draftable
        deep = 1 if mode == "tree" else 0  # trees: right token at rank 1 after the first draft token (branches)
        return {"oracle": OracleEagle3(oracle_draft, ref, deep_rank=deep, tree_topk=3, tree_depth=4,
                                       tree_total_tokens=10),
                "trained": module.make_drafter(tree_topk=3, tree_depth=3, tree_total_tokens=8)}
    if algo == "dflash":
        module = fitted("dflash", name)[0]
        # trees: slot 1's right token at rank 1 (only a branch of the spine tree accepts it)
        oracle = OracleDFlash(module.draft, module.target.embed_tokens, module.target.lm_head, reference=ref,
                              sequence=[], wrong_at=1 if mode == "tree" else None, tree_topk=2, tree_depth=3)
        return {"oracle": oracle, "trained": module.make_drafter(tree_topk=3, tree_depth=3, tree_total_tokens=8)}
    module = fitted("medusa", name)[0]
    ranks = [0, 1, 0] if mode == "tree" else None  # head 1 right at rank 1: only the sparse tree accepts it
    return {"oracle": OracleMedusa(module.heads, ref, ranks=ranks), "trained": module.make_drafter()}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mode", ["chain", "tree"])
@pytest.mark.parametrize("algo", ALGOS)
def test_lossless_against_hf_generate(algo, mode, name):
    target, _, want, max_new = reference(name)
    assert len(want) == max_new, f"{name}: the reference stopped early ({len(want)} tokens); pick another prompt"
    if ALL[name].sliding:
        window = max(w for w in target.windows if w is not None)
        assert len(PROMPT) + len(want) > 3 * window
    for kind, drafter in _drafters(algo, name, mode).items():
        got = speculative_generate(target, drafter, PROMPT, max_new, EOS, mode=mode, num_draft_tokens=3)
        assert got.tokens == want, f"{algo}/{mode}/{name}/{kind}: diverged from HF generate at token " \
            f"{next(i for i, (a, b) in enumerate(zip(got.tokens + [-1], want, strict=False)) if a != b)}"
        if kind == "oracle":
            assert got.accept_length > 1.5, f"{algo}/{mode}/{name}: oracle tau {got.accept_length:.2f}"
            if mode == "tree":  # the rank-1 branch was accepted: more than a chain of top-1 tokens could take
                assert max(got.accepted) >= 2


@pytest.mark.parametrize("name", NAMES)
def test_tree_verification_is_exact_past_the_window(name, monkeypatch):
    """One tree verified after a cached prefix (three windows long for sliding-window families): every node's
    hidden state equals the model's own uncached forward of prefix + its path (HF's own positions, RoPE or GPT-2's
    learned ones, and sliding masks). Greedy argmaxes of tiny random models are robust to small errors; this is
    the exact check behind the lossless tree column. For sliding families, ignoring the window changes them."""
    target = reference(name)[0]
    windows = [w for w in target.windows if w is not None]
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(3, VOCAB - 3, (3 * max(windows) + 3 if windows else 20,), generator=g)
    tree = DraftTree(torch.randint(3, VOCAB - 3, (6,), generator=g), torch.tensor([-1, -1, 0, 0, 2, 1]))
    root = torch.tensor([5])
    verify = torch.cat([root, tree.tokens])
    depths = torch.cat([torch.zeros(1, dtype=torch.long), tree.depths()])

    def verified(windows) -> torch.Tensor:
        monkeypatch.setattr(target, "windows", windows)
        cache = target.new_cache()
        target.step(prefix, cache)
        return target.step(verify, cache, tree_mask=tree.verify_mask(), depths=depths).hidden

    hidden = verified(sliding_window_layers(target.config))
    parents = [-1] + [p + 1 for p in tree.parents.tolist()]  # rows of [root, nodes]
    for row in range(verify.numel()):
        path, r = [], row
        while r > 0:
            path.append(int(verify[r]))
            r = parents[r]
        ids = torch.cat([prefix, root, torch.tensor(path[::-1], dtype=torch.long)])[None]
        with torch.no_grad():
            full = target.base(input_ids=ids, use_cache=False).last_hidden_state[0, -1]
        torch.testing.assert_close(hidden[row], full, rtol=0, atol=1e-5, msg=f"{name}: tree row {row}")
    if windows:
        ignoring = verified([None] * len(target.windows))
        assert not torch.allclose(ignoring, hidden, atol=1e-3), f"{name}: the window does not matter here"


# ------------------------------------------------------------------------------------------------ beyond the matrix
@pytest.mark.parametrize("name", NAMES)
def test_medusa2_lora_adapts_every_familys_attention(name):
    """Medusa-2 with LoRA (default targets): the attention projections of every decoder block, under the family's
    own names (Phi-3 qkv_proj, GPT-NeoX query_key_value/dense, GPT-2's Conv1D c_attn/c_proj), nothing else (no
    vision tower, no MLP), and a backward reaches every adapter."""
    module = make_module("medusa2", name, base_training="lora")
    module.configure_model()
    lm = module._base_lm()
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in lm.named_parameters() if ".lora_A." in n}
    layers = len(decoder_layers(lm))
    assert len(adapted) == layers * len(LORA_PROJECTIONS[name])
    assert {n.rsplit(".", 1)[1] for n in adapted} == LORA_PROJECTIONS[name]
    assert not any("vision" in n or "mlp" in n for n in adapted)
    out = module.compute_losses(_padded_batch())
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    lora_b = [p for n, p in lm.named_parameters() if ".lora_B." in n]
    assert len(lora_b) == len(adapted) and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)


def test_explicit_lora_targets_are_kept():
    module = make_module("medusa2", "llama", base_training="lora", lora_target_modules=["q_proj"])
    module.configure_model()
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in module._base_lm().named_parameters() if ".lora_A." in n}
    assert {n.rsplit(".", 1)[1] for n in adapted} == {"q_proj"}


def test_attention_targets_name_the_class_when_there_is_no_attention():
    model = copy.deepcopy(ALL["llama"].build())
    for layer in decoder_layers(model):
        layer.renamed = layer.self_attn
        del layer.self_attn
    with pytest.raises(ValueError, match=r"^LlamaForCausalLM: cannot find the attention module"):
        attention_projection_targets(model)


@pytest.mark.parametrize("name", NAMES)
def test_final_norm_scale_a_llama_draft_norm_can_copy(name):
    """``rms_norm_scale``: the effective per-channel scale (``w`` for Llama-style RMSNorms, ``1 + w`` for Gemma's),
    None for LayerNorms, so a draft never copies a Gemma ``w`` (zeros at init) as its scale."""
    model = copy.deepcopy(ALL[name].build())
    norm = final_norm(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(norm.weight.shape, generator=g) * 0.3 + 0.5)
    scale = rms_norm_scale(norm)
    kind = NORM_KIND[name]
    if kind is None:
        assert scale is None
    else:
        w = norm.weight.float()
        torch.testing.assert_close(scale, w if kind == "llama" else 1 + w, rtol=1e-4, atol=1e-5)
        x = torch.randn(3, w.numel(), generator=g)
        draft_like = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm_eps(norm)) * scale
        torch.testing.assert_close(norm(x), draft_like, rtol=1e-4, atol=1e-5)


def norm_eps(norm) -> float:
    return next(float(getattr(norm, k)) for k in ("eps", "variance_epsilon") if hasattr(norm, k))


def test_draft_config_needs_no_llama_fields():
    """GPT-2 (no RoPE, n_embd/n_inner/layer_norm_epsilon, gelu) and GPT-NeoX (rotary_pct, layer_norm_eps, gelu)
    build an EAGLE-3 draft config with SiLU, the 4H MLP width they use, and all heads as KV heads."""
    for name in ("gpt2", "gpt_neox"):
        cfg = Eagle3Config.from_target_config(ALL[name].build().config, DRAFT_VOCAB)
        assert (cfg.hidden_act, cfg.intermediate_size, cfg.num_key_value_heads, cfg.head_dim) == ("silu", 256, 4, 16)
        assert (cfg.rope_theta, cfg.rope_scaling, cfg.rms_norm_eps) == (1e4, None, 1e-5)
