"""Greedy speculative decoding emits exactly the target's own greedy tokens (chain and tree, Medusa and EAGLE-3).

The reference is an independent loop: full forward without cache, argmax, append.
"""

from __future__ import annotations

import pytest

from spec_lightning.speculate.decode import speculative_generate, target_generate
from spec_lightning.speculate.eagle3 import Eagle3Drafter
from spec_lightning.speculate.medusa import MedusaDrafter
from spec_lightning.targets import FrozenTarget
from tests.conftest import make_tiny_llama
from tests.speculate_helpers import OracleEagle3, OracleMedusa, Reference, random_eagle3, random_medusa

PROMPTS = [[5, 17, 99, 3], [40, 41, 42, 43, 44, 45, 46], [7], [120, 8, 8, 8, 9, 60, 33, 2, 71]]
MAX_NEW = 24

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(num_layers=6, seed=3)


@pytest.fixture(scope="module")
def reference(model):
    return Reference(model)


def drafters(kind: str, model, reference):
    if kind == "medusa":
        heads = random_medusa(num_heads=3)
        return {
            "random": MedusaDrafter(heads),
            "oracle": OracleMedusa(heads, reference),
            # right token at rank 1 for head 1: a chain stops there, the tree's (0, 1) branch accepts it
            "oracle_rank1": OracleMedusa(heads, reference, ranks=[0, 1, 0]),
        }
    draft = random_eagle3(model)
    full_vocab = random_eagle3(model, draft_vocab_size=model.config.vocab_size, seed=1)
    return {
        "random": Eagle3Drafter(draft, tree_topk=3, tree_depth=4, tree_total_tokens=10),
        "oracle": OracleEagle3(full_vocab, reference, tree_topk=3, tree_depth=4, tree_total_tokens=10),
        "oracle_rank1": OracleEagle3(full_vocab, reference, deep_rank=1, tree_topk=3, tree_depth=4,
                                     tree_total_tokens=10),
        "oracle_subvocab": OracleEagle3(draft, reference, tree_topk=2, tree_depth=3, tree_total_tokens=6),
    }


@pytest.mark.parametrize("kind", ["medusa", "eagle3"])
@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_greedy_output_is_the_targets_own(kind, mode, model, reference):
    eos = [2]
    for name, drafter in drafters(kind, model, reference).items():
        runner = FrozenTarget(model)
        k = 3
        for prompt in PROMPTS:
            want = reference.generate(prompt, MAX_NEW, eos)
            got = speculative_generate(runner, drafter, prompt, MAX_NEW, eos, mode=mode, num_draft_tokens=k)
            assert got.tokens == want, f"{kind}/{mode}/{name} diverged on prompt {prompt}"
            assert sum(got.emitted) + 1 == len(got.tokens)  # the prefill's token is not in any round
            if name in ("oracle", "oracle_rank1") and len(want) > 1:
                assert got.accept_length > 1.5, f"{kind}/{mode}/{name}: oracle accepted too little"
    # the baseline uses the same cache code path and must match too
    runner = FrozenTarget(model)
    for prompt in PROMPTS:
        assert target_generate(runner, prompt, MAX_NEW, eos).tokens == reference.generate(prompt, MAX_NEW, eos)


@pytest.mark.parametrize("kind", ["medusa", "eagle3"])
def test_tree_accepts_a_branch_the_chain_cannot(kind, model, reference):
    """Right token at rank 1 after the first draft token: the chain accepts at most 1, the tree more."""
    drafter = drafters(kind, model, reference)["oracle_rank1"]
    runner = FrozenTarget(model)
    prompt = PROMPTS[1]
    chain = speculative_generate(runner, drafter, prompt, MAX_NEW, mode="chain", num_draft_tokens=3)
    tree = speculative_generate(runner, drafter, prompt, MAX_NEW, mode="tree")
    assert max(chain.accepted) == 1
    assert max(tree.accepted) >= 2
    assert chain.tokens == tree.tokens == reference.generate(prompt, MAX_NEW)


def test_max_new_tokens_and_eos_stop(model, reference):
    drafter = OracleMedusa(random_medusa(num_heads=3), reference)
    runner = FrozenTarget(model)
    prompt = PROMPTS[0]
    free = reference.generate(prompt, 12)
    for n in (1, 2, 5, 7):
        out = speculative_generate(runner, drafter, prompt, n, mode="chain", num_draft_tokens=3)
        assert out.tokens == free[:n]
    stop = free[4]  # declare the 5th token an eos: generation must end right after its first occurrence
    out = speculative_generate(runner, drafter, prompt, 12, eos_token_ids=[stop], mode="chain", num_draft_tokens=3)
    assert out.tokens == free[: free.index(stop) + 1]
