"""DFlash decoding on the embedded SmolLM2-135M-Instruct target: lossless against transformers' ``generate`` (slow)."""

from __future__ import annotations

import pytest
import torch

from spec_lightning.datamodules.prompts import prompt_from_messages
from spec_lightning.modules.dflash import DFlashModule
from spec_lightning.speculate.decode import speculative_generate
from spec_lightning.speculate.evaluate import eos_token_ids, hf_greedy
from spec_lightning.targets import load_tokenizer

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_dflash_greedy_output_equals_smollm2_greedy():
    torch.manual_seed(0)
    module = DFlashModule(block_size=8, num_draft_layers=3)  # the default recipe's shape (target_layer_ids [1, 14, 27])
    module.configure_model()
    assert module.draft.config.target_layer_ids == [1, 14, 27]
    target, tok = module.decode_target(), load_tokenizer("smollm2-135m-instruct")
    prompt = prompt_from_messages(tok, [{"role": "user", "content": "Name three colours."}])
    eos = eos_token_ids(target.model, tok)
    want = hf_greedy(target, prompt, 16, eos)
    for mode in ("chain", "tree"):
        got = speculative_generate(target, module.make_drafter(tree_topk=3), prompt, 16, eos, mode=mode,
                                   num_draft_tokens=7)
        assert got.tokens == want, f"{mode}: {tok.decode(got.tokens)!r} != {tok.decode(want)!r}"
