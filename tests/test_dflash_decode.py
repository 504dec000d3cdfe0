"""DFlash decoding (speculate/dflash.py): lossless against transformers' own ``generate`` on tiny targets of the family
matrix, with the module's real draft network and with an oracle that knows the target's future (multi-token
acceptance, rejections mid-block, tree branches); speculative sampling keeps the target's marginals; one draft
forward per round."""

from __future__ import annotations

import pytest
import torch

from spec_lightning.modules.dflash import DFlashModule
from spec_lightning.speculate.decode import speculative_generate
from spec_lightning.speculate.dflash import spine_choices
from spec_lightning.speculate.evaluate import hf_greedy
from spec_lightning.targets import FrozenTarget
from tests.speculate_helpers import OracleDFlash, Reference
from tests.test_family_matrix import FamilyDFlash
from tests.test_speculate_sampling import TOLERANCE, V, empirical, exact_marginals, model, tv  # noqa: F401 (fixture)

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings(r"ignore:Found \d+ module\(s\) in eval mode")]
EOS = [2]
PROMPTS = [[1, 17, 42, 99, 5], [1, 200, 3, 3, 64, 81, 9]]


def fitted_module(family: str) -> DFlashModule:
    torch.manual_seed(0)
    module = FamilyDFlash(block_size=5, num_draft_layers=2)
    module.family = family
    module.configure_model()
    with torch.no_grad():  # a random draft that proposes varied tokens
        for name, p in module.draft.named_parameters():
            if "norm" not in name:
                p.normal_(std=0.3)
    return module


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
def test_lossless_against_hf_generate(family):
    module = fitted_module(family)
    target = module.decode_target()
    reference = Reference(target.model)
    for prompt in PROMPTS:
        expected = hf_greedy(target, prompt, 40, EOS)
        for mode in ("chain", "tree"):
            out = speculative_generate(target, module.make_drafter(tree_topk=3), prompt, 40, EOS, mode=mode,
                                       num_draft_tokens=4)
            assert out.tokens == expected, (family, mode)
        oracle = OracleDFlash(module.draft, target.embed_tokens, target.lm_head, reference=reference, sequence=[],
                              wrong_at=2, tree_topk=2)
        out = speculative_generate(target, oracle, prompt, 40, EOS, mode="chain", num_draft_tokens=4)
        assert out.tokens == expected
        assert out.accept_length > 2.5  # slots 0, 1 right, slot 2 wrong: 2 accepted + the target's token per round
        assert oracle.forwards == out.rounds  # one draft forward per round, whatever the chain length
        tree = speculative_generate(target, oracle, prompt, 40, EOS, mode="tree")
        assert tree.tokens == expected
        assert tree.accept_length > out.accept_length  # the rank-2 branch at slot 2 is accepted in the tree


def test_chain_longer_than_the_block_is_refused():
    module = fitted_module("llama")
    drafter = module.make_drafter()
    assert drafter.max_chain == 4
    with pytest.raises(ValueError, match="exceeds what the draft can propose"):
        speculative_generate(module.decode_target(), drafter, PROMPTS[0], 8, EOS, num_draft_tokens=5)


def test_spine_tree_choices():
    assert spine_choices(3, 2, 100) == [(0,), (1,), (0, 0), (0, 1), (0, 0, 0), (0, 0, 1)]
    assert spine_choices(3, 2, 3) == [(0,), (1,), (0, 0)]


def test_speculative_sampling_keeps_target_marginals(model):  # noqa: F811 (fixture)
    from tests.conftest import make_tiny_llama  # noqa: F401

    class SamplingDFlash(DFlashModule):
        def load_target(self):
            return model

    torch.manual_seed(1)
    module = SamplingDFlash(block_size=3, num_draft_layers=1, target_layer_ids=[0])
    module.configure_model()
    drafter = module.make_drafter()
    prompt = [3, 9, 4]
    m1, m2 = exact_marginals(model, prompt)
    e1, e2, rate = empirical(FrozenTarget(model), drafter, prompt, k=2)
    assert tv(e1, m1) < TOLERANCE, (e1, m1)
    assert tv(e2, m2) < TOLERANCE, (e2, m2)
    assert 0.05 < rate < 0.95  # both accept and reject paths were exercised
