import pytest
import torch

from spec_lightning.targets import FrozenTarget, default_aux_layer_ids, resolve_target
from tests.conftest import make_tiny_llama


def test_default_aux_layers_match_spec():
    # SPEC §3.1: outputs of layers [1, N//2-1, N-4] == HF hidden_states [2, N//2, N-3]
    assert default_aux_layer_ids(30) == [1, 14, 26]
    assert default_aux_layer_ids(32) == [1, 15, 28]


def test_capture_equals_output_hidden_states():
    model = make_tiny_llama(num_layers=8)
    target = FrozenTarget(model)
    ids = torch.randint(3, 128, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding on the second row
    aux_ids = default_aux_layer_ids(8)
    feats = target(ids, mask, aux_layer_ids=aux_ids, return_logits=True)
    ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    hs = ref.hidden_states
    expected = torch.cat([hs[i + 1] for i in aux_ids], dim=-1)  # layer i output == hidden_states[i+1]
    assert feats.aux_hidden.shape == (2, 11, 3 * 32)
    torch.testing.assert_close(feats.aux_hidden, expected)
    torch.testing.assert_close(feats.final_hidden, hs[-1])  # HF's last entry is post-norm
    torch.testing.assert_close(feats.logits, ref.logits)


def test_capture_order_follows_request_and_no_logits_by_default():
    model = make_tiny_llama(num_layers=6)
    target = FrozenTarget(model)
    ids = torch.randint(3, 128, (1, 5))
    feats = target(ids, aux_layer_ids=[3, 0])
    hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(feats.aux_hidden, torch.cat([hs[4], hs[1]], -1))
    assert feats.logits is None


def test_last_layer_is_refused_as_aux():
    target = FrozenTarget(make_tiny_llama(num_layers=6))
    with pytest.raises(ValueError, match="never the last layer"):
        target(torch.ones(1, 3, dtype=torch.long), aux_layer_ids=[5])


def test_target_stays_frozen_in_eval():
    target = FrozenTarget(make_tiny_llama())
    target.train()
    assert not target.training and not any(p.requires_grad for p in target.parameters())


def test_missing_paths_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        resolve_target(str(tmp_path / "nope.gguf"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_target(str(tmp_path))


def test_path_typos_are_never_sent_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for typo in ["models/smollm2", "./smollm2", "a/b/c", "weights/x.safetensors", "my_model.gguf"]:
        with pytest.raises(FileNotFoundError, match="not found"):
            resolve_target(typo)
    with pytest.raises(ValueError, match="did you mean the builtin 'smollm2-135m-instruct'"):
        resolve_target("smollm2-135m-instrct")
    assert resolve_target("meta-llama/Llama-3.1-8B-Instruct") == ("meta-llama/Llama-3.1-8B-Instruct", {})


def test_converted_builtin_target_is_verified_and_reconverted_when_corrupted(tmp_path, monkeypatch, caplog):
    """A corrupted conversion cache is rebuilt from the GGUF (here a tiny stand-in conversion)."""
    import json
    import logging

    import spec_lightning.targets.loading as targets

    calls = []

    def fake_convert(gguf, out):
        calls.append(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"weights")
        (out / targets.CONVERSION_RECORD).write_text(json.dumps({"files_sha256": targets.tree_digest(out)}))
        return out

    monkeypatch.setattr(targets, "convert_gguf", fake_convert)
    monkeypatch.setattr(targets, "cache_root", lambda: tmp_path)
    monkeypatch.setattr(targets, "_builtin_gguf", lambda name: tmp_path / "x.gguf")
    resolve_target("smollm2-135m-instruct")
    resolve_target("smollm2-135m-instruct")
    assert len(calls) == 1  # verified and reused
    (tmp_path / "targets" / "smollm2-135m-instruct" / "model.safetensors").write_bytes(b"weightz")
    with caplog.at_level(logging.WARNING):
        resolve_target("smollm2-135m-instruct")
    assert len(calls) == 2 and "failed verification" in caplog.text
