"""Hidden states from vLLM (``extract_hidden_states``, our CPU connector) equal our HF capture layer by layer, with
the exact layer-id mapping (our aux id i = vLLM id i + 1; vLLM's last id is pre-norm, the final norm applied)."""

from __future__ import annotations

import pytest
import torch

from tests.vllm_helpers import needs_vllm, relative_max_difference, vllm_environment

pytestmark = [pytest.mark.vllm, needs_vllm]
TARGET = "smollm2-135m-instruct"
AUX = [1, 14, 26]  # SPEC §3.1 default for 30 layers


@pytest.fixture(scope="module")
def vllm_target():
    vllm_environment()
    from spec_lightning.datagen.hidden_states import VllmFeatureTarget

    engine = VllmFeatureTarget(TARGET, "float32", AUX, max_num_seqs=8)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def prompts():
    from spec_lightning.datamodules.chat import prompt_ids
    from spec_lightning.targets import load_tokenizer

    tok = load_tokenizer(TARGET)
    texts = ["Hi! How was your weekend?", "Explain how tides work.", "Write a haiku about rain.",
             "What would you do with a million dollars? Tell me in detail, please."]
    return [prompt_ids(tok, [{"role": "user", "content": t}]) for t in texts]


def test_layer_ids_map_our_aux_ids_to_vllm_ids():
    from spec_lightning.datagen.hidden_states import vllm_layer_ids

    assert vllm_layer_ids(AUX, 30) == [2, 15, 27, 30]
    with pytest.raises(ValueError, match="decoder layers 0..28"):
        vllm_layer_ids([29], 30)


def test_vllm_features_equal_hf_capture_per_layer(vllm_target, prompts):
    from spec_lightning.targets import FrozenTarget, load_target_model

    hf = FrozenTarget(load_target_model(TARGET, "float32"))
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):  # right padding, as the cache writer batches
        ids[row, :len(p)] = torch.tensor(p)
        mask[row, :len(p)] = 1
    ours = vllm_target(ids, mask, aux_layer_ids=AUX)
    theirs = hf(ids, mask, aux_layer_ids=AUX)
    h = hf.config.hidden_size
    for row, p in enumerate(prompts):
        n = len(p)
        for j, layer in enumerate(AUX):
            diff = relative_max_difference(ours.aux_hidden[row, :n, j * h:(j + 1) * h],
                                           theirs.aux_hidden[row, :n, j * h:(j + 1) * h])
            assert diff < 1e-4, f"aux layer {layer}, prompt {row}: relative max difference {diff}"
        diff = relative_max_difference(ours.final_hidden[row, :n], theirs.final_hidden[row, :n])
        assert diff < 1e-4, f"final state, prompt {row}: relative max difference {diff}"
        assert not ours.final_hidden[row, n:].any()  # padding columns stay zero
