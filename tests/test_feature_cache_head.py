"""Offline training loads only the target's embeddings, final norm and lm_head (``targets.head``), and identifies a
target by content (``targets.weight_files``)."""

from __future__ import annotations

import pytest
import torch

import spec_lightning.targets.head as head_module
from spec_lightning.targets import FrozenTarget
from spec_lightning.targets.head import TargetHead, TargetNotLoadedError, load_target_head
from spec_lightning.targets.weight_files import target_identity, weights_fingerprint
from tests.conftest import make_tiny_llama
from tests.families import FAMILIES


def _reads(monkeypatch) -> list[str]:
    names: list[str] = []
    real = head_module.read_tensors
    monkeypatch.setattr(head_module, "read_tensors", lambda files, wanted: names.extend(wanted) or real(files, wanted))
    return names


# the default run covers the distinct layouts (tied, softcap + embed scale, logit scaling, embed_out renamed, GPT-2
# names, a multimodal text decoder); CI's slow run covers every family
FAST_FAMILIES = {"llama_tied", "gemma2", "granite", "gpt_neox", "gpt2", "gemma3_mm"}


@pytest.mark.parametrize("family", [f if f in FAST_FAMILIES else pytest.param(f, marks=pytest.mark.slow)
                                    for f in sorted(FAMILIES)])
def test_head_logits_embeddings_and_norm_equal_the_full_model(tmp_path, family, monkeypatch):
    model = FAMILIES[family].build()
    model.save_pretrained(tmp_path)
    reads = _reads(monkeypatch)
    head = load_target_head(str(tmp_path), torch.float32)
    full = FrozenTarget(model)
    hidden = torch.randn(2, 5, int(full.text_config.hidden_size))
    assert torch.equal(head.logits(hidden), full.logits(hidden))  # post-processing (softcap, scaling) included
    ids = torch.arange(7)[None] * 5
    assert torch.equal(head.embed_tokens(ids), full.embed_tokens(ids))  # embed scales (Gemma) kept
    if full.final_norm is not None:
        assert torch.equal(head.final_norm(hidden), full.final_norm(hidden))
    # only those tensors were read: no decoder block weight
    assert reads and not any(".layers." in n or ".h." in n or "mlp" in n or "attn" in n for n in reads), reads
    own = sum(p.numel() for p in head.parameters())
    expected = {id(p): p.numel() for m in (full.embed_tokens, full.lm_head, full.final_norm) if m is not None
                for p in m.parameters()}
    assert own == sum(expected.values()) < sum(p.numel() for p in full.parameters())


def test_head_holds_no_decoder_weights_and_refuses_to_run(tiny_target_dir, monkeypatch):
    reads = _reads(monkeypatch)
    head = load_target_head(str(tiny_target_dir), "float32")
    assert isinstance(head, TargetHead)
    names = {n for n, _ in head.named_parameters()}
    assert names == {"embed.weight", "head.weight", "norm.weight"}
    assert sorted(reads) == ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]
    cfg = head.text_config
    decoder = cfg.num_hidden_layers * (4 * cfg.hidden_size**2 + 3 * cfg.hidden_size * cfg.intermediate_size)
    assert sum(p.numel() for p in head.parameters()) == 2 * cfg.vocab_size * cfg.hidden_size + cfg.hidden_size
    assert decoder > 0 and not any(p.requires_grad for p in head.parameters())
    head.train()
    assert not head.training
    for call in (lambda: head(torch.zeros(1, 2, dtype=torch.long)), lambda: head.step(None, None),
                 lambda: head.model, lambda: head.layers):
        with pytest.raises(TargetNotLoadedError, match="offline: the target's decoder is not loaded"):
            call()


def test_tied_and_sharded_checkpoints(tmp_path, monkeypatch):
    model = make_tiny_llama(tie=True, vocab=512, hidden=64)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    reads = _reads(monkeypatch)
    head = load_target_head(str(tmp_path), torch.bfloat16)
    assert head.lm_head.weight is head.embed_tokens.weight and head.dtype == torch.bfloat16
    assert sorted(reads) == ["model.embed_tokens.weight", "model.norm.weight"]
    full = FrozenTarget(model.to(torch.bfloat16))
    hidden = torch.randn(3, 64, dtype=torch.bfloat16)
    assert torch.equal(head.logits(hidden), full.logits(hidden))


def test_weights_fingerprint_sees_decoder_edits_and_ignores_sharding(tmp_path):
    model = make_tiny_llama()
    model.save_pretrained(tmp_path / "a")
    model.save_pretrained(tmp_path / "b", max_shard_size="50KB")
    assert weights_fingerprint(tmp_path / "a") == weights_fingerprint(tmp_path / "b")
    with torch.no_grad():  # a merged LoRA: decoder weights change, embeddings and lm_head do not
        model.model.layers[3].self_attn.q_proj.weight.add_(1e-3)
    model.save_pretrained(tmp_path / "c")
    a, c = target_identity(str(tmp_path / "a")), target_identity(str(tmp_path / "c"))
    assert a["config_sha256"] == c["config_sha256"] and a["weights_fingerprint"] != c["weights_fingerprint"]
