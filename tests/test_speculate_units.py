"""Pieces of speculative decoding checked against independent computations."""

from __future__ import annotations

import json

import pytest
import torch

from spec_lightning.datamodules.prompts import prompt_from_tokenized
from spec_lightning.speculate.decode import GenerationResult, speculative_generate
from spec_lightning.speculate.eagle3 import Eagle3Drafter
from spec_lightning.speculate.evaluate import AcceptanceStats, EvalReport
from spec_lightning.speculate.tree import DraftTree, chain_tree, greedy_accept, tree_from_choices, validate_choices
from spec_lightning.targets import FrozenTarget, keep_cache_positions
from tests.conftest import make_tiny_llama
from tests.speculate_helpers import OracleEagle3, OracleMedusa, Reference, random_eagle3, random_medusa

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(num_layers=6, seed=5)


# --- τ and per-position counting --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["medusa", "eagle3"])
@pytest.mark.parametrize("k", [1, 3])
def test_always_right_draft_gives_k_plus_one_and_always_wrong_gives_one(kind, k, model):
    reference = Reference(model)
    rounds = 4
    n = 1 + rounds * (k + 1)  # the prefill's token + 4 full rounds
    prompt = [9, 8, 7, 6]
    if kind == "medusa":
        right = OracleMedusa(random_medusa(num_heads=3), reference)
        wrong = OracleMedusa(random_medusa(num_heads=3), reference, always_wrong=True)
    else:
        draft = random_eagle3(model, draft_vocab_size=128)
        right, wrong = OracleEagle3(draft, reference), OracleEagle3(draft, reference, always_wrong=True)
    runner = FrozenTarget(model)
    good = speculative_generate(runner, right, prompt, n, mode="chain", num_draft_tokens=k)
    assert good.rounds == rounds and good.accept_length == k + 1
    assert good.accepted == [k] * rounds
    bad = speculative_generate(runner, wrong, prompt, n, mode="chain", num_draft_tokens=k)
    assert bad.rounds == n - 1 and bad.accept_length == 1.0
    stats_good, stats_bad = AcceptanceStats(), AcceptanceStats()
    stats_good.update(good)
    stats_bad.update(bad)
    assert stats_good.position_rates == [1.0] * k
    assert stats_bad.position_rates == [0.0] * k
    assert good.tokens == bad.tokens == reference.generate(prompt, n)
    # the clock split: draft and verification time are both spent, inside the generation's wall time
    assert 0 < good.draft_seconds and 0 < good.verify_seconds
    assert good.draft_seconds + good.verify_seconds <= good.seconds


def test_acceptance_stats_by_hand():
    result = GenerationResult(tokens=[0] * 9, accepted=[2, 0, 3, 1], drafted=[3, 3, 3, 2], emitted=[3, 1, 4, 2])
    stats = AcceptanceStats()
    stats.update(result)
    assert stats.rounds == 4 and stats.emitted == 10
    assert stats.accept_length == 10 / 4
    # position 1 accepted in rounds 1, 3, 4 (of 4); position 2 in rounds 1, 3 (of 4); position 3 in round 3 (of 3)
    assert stats.position_rates == [3 / 4, 2 / 4, 1 / 3]


def test_break_even_accept_length_by_hand():
    report = EvalReport(algorithm="eagle3", mode="chain", num_draft_tokens=2, temperature=0.0, prompts=1,
                        new_tokens=10, rounds=5, accept_length=2.0, position_rates=[0.6, 0.4], spec_tokens_per_s=1.0,
                        baseline_tokens_per_s=1.0, speedup=1.0, identical_outputs=1, draft_ms_per_round=10.0,
                        verify_ms_per_round=50.0, baseline_ms_per_forward=40.0)
    # a round costs 60 ms = 1.5 one-token forwards: tau 1.5 breaks even, tau 2.25 gives 1.5x
    assert report.break_even_accept_length == 1.5
    assert json.loads(report.to_json())["break_even_accept_length"] == 1.5
    assert "break-even" in report.table()
    no_baseline = EvalReport(**{**report.__dict__, "baseline_ms_per_forward": None, "baseline_tokens_per_s": None})
    assert no_baseline.break_even_accept_length is None


def test_prompt_is_cut_before_the_first_assistant_token():
    assert prompt_from_tokenized([1, 2, 3, 4, 5, 6], [0, 0, 0, 1, 1, 0]) == [1, 2, 3]
    assert prompt_from_tokenized([1, 2], [0, 0]) is None
    assert prompt_from_tokenized([1, 2], [1, 1]) is None


# --- trees -----------------------------------------------------------------------------------------------------------
def test_tree_structure_and_greedy_accept_by_hand():
    # root -> a(0) -> c(2) ; root -> b(1) -> d(3) -> e(4)
    tree = DraftTree(torch.tensor([10, 11, 12, 13, 14]), torch.tensor([-1, -1, 0, 1, 3]))
    assert tree.depths().tolist() == [1, 1, 2, 2, 3]
    mask = tree.verify_mask()
    assert mask[5].tolist() == [True, False, True, False, True, True]  # e sees root, b, d, itself
    assert mask[3].tolist() == [True, True, False, True, False, False]  # c sees root, a, itself
    # target argmax per row [root, a, b, c, d, e]: root->11 (b), b->13 (d), d->14 (e), e->99 (bonus)
    assert greedy_accept(tree, [11, 0, 13, 0, 14, 99]) == ([1, 3, 4], 99)
    assert greedy_accept(tree, [50, 0, 0, 0, 0, 0]) == ([], 50)
    # lazy form: only the rows on the accepted path are asked for (root, b, d, e = rows 0, 2, 4, 5)
    asked = []
    argmax = [11, 0, 13, 0, 14, 99]
    assert greedy_accept(tree, lambda row: asked.append(row) or argmax[row]) == ([1, 3, 4], 99)
    assert asked == [0, 2, 4, 5]
    assert chain_tree(torch.tensor([4, 5])).is_chain and not tree.is_chain
    with pytest.raises(ValueError, match="parent"):
        DraftTree(torch.tensor([1, 2]), torch.tensor([1, -1]))


def test_medusa_choices_validation_and_layout():
    with pytest.raises(ValueError, match="prefix"):
        validate_choices([(0,), (1, 0)], num_heads=3)
    with pytest.raises(ValueError, match="deeper"):
        validate_choices([(0,), (0, 0), (0, 0, 0)], num_heads=2)
    choices = validate_choices([(0, 1), (0,), (1,)], num_heads=2)
    assert choices == [(0,), (1,), (0, 1)]
    topk = torch.tensor([[7, 8], [20, 21]])  # head 0 top-2, head 1 top-2
    tree = tree_from_choices(choices, topk)
    assert tree.tokens.tolist() == [7, 8, 21] and tree.parents.tolist() == [-1, -1, 0]


def test_tree_verification_matches_separate_forwards_and_pruned_cache_continues_exactly(model):
    """One tree pass = each branch's own full forward; after pruning, the cache equals the accepted sequence's."""
    runner = FrozenTarget(model)
    prompt = torch.tensor([3, 14, 15, 92, 65])
    tree = DraftTree(torch.tensor([10, 11, 12, 13, 14, 15]), torch.tensor([-1, -1, 0, 1, 3, 0]))
    root = 35
    cache = runner.new_cache()
    runner.step(prompt, cache)
    rows = torch.cat([torch.tensor([root]), tree.tokens])
    depths = torch.cat([torch.zeros(1, dtype=torch.long), tree.depths()])
    step = runner.step(rows, cache, tree_mask=tree.verify_mask(), depths=depths)
    tree_logits = runner.logits(step.hidden)
    parents = tree.parents.tolist()
    for i in range(tree.size + 1):
        path, node = [], i - 1
        while node >= 0:
            path.insert(0, int(tree.tokens[node]))
            node = parents[node]
        seq = prompt.tolist() + [root] + path
        with torch.no_grad():
            want = model(torch.tensor([seq])).logits[0, -1]
        torch.testing.assert_close(tree_logits[i], want, atol=1e-4, rtol=1e-4)
    # accept root -> b(1) -> d(3): keep prefix + root + rows of nodes 1 and 3, then continue with token 77
    keep_cache_positions(cache, torch.cat([torch.arange(5), 5 + torch.tensor([0, 2, 4])]))
    nxt = runner.step(torch.tensor([77]), cache)
    seq = prompt.tolist() + [root, 11, 13, 77]
    with torch.no_grad():
        want = model(torch.tensor([seq])).logits[0, -1]
    torch.testing.assert_close(runner.logits(nxt.hidden)[-1], want, atol=1e-4, rtol=1e-4)


def test_keeping_a_chain_prefix_slices_the_cache(model):
    runner = FrozenTarget(model)
    prompt = torch.tensor([3, 9, 4, 1, 7])
    cache = runner.new_cache()
    runner.step(prompt, cache)
    runner.step(torch.tensor([21, 22, 23, 24]), cache)  # root + a 3-token chain
    keep_cache_positions(cache, torch.arange(7))  # root and the first draft token accepted
    assert cache.get_seq_length() == 7
    nxt = runner.step(torch.tensor([77]), cache)
    with torch.no_grad():
        want = model(torch.tensor([prompt.tolist() + [21, 22, 77]])).logits[0, -1]
    torch.testing.assert_close(runner.logits(nxt.hidden)[-1], want, atol=1e-4, rtol=1e-4)


def test_aux_features_match_frozen_target_capture(model):
    aux_ids = (1, 2, 2)
    runner = FrozenTarget(model)
    ids = torch.tensor([4, 5, 6, 7, 8, 9])
    cache = runner.new_cache()
    a = runner.step(ids[:4], cache, aux_layer_ids=aux_ids)
    b = runner.step(ids[4:], cache, aux_layer_ids=aux_ids)
    feats = FrozenTarget(model)(ids[None], aux_layer_ids=list(aux_ids))
    torch.testing.assert_close(torch.cat([a.aux, b.aux]), feats.aux_hidden[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([a.hidden, b.hidden]), feats.final_hidden[0], atol=1e-5, rtol=1e-5)


# --- EAGLE-3 drafter conventions -------------------------------------------------------------------------------------
def test_eagle3_incremental_draft_matches_the_ttt_forward(model):
    """Step-0 logits at position t and the step-1 logits at t (token t+2 fed, own h) equal the TTT forward's."""
    draft = random_eagle3(model, draft_vocab_size=64)
    ids = torch.tensor([[11, 22, 33, 44, 55, 66, 77, 88]])
    feats = FrozenTarget(model)(ids, aux_layer_ids=draft.config.aux_layer_ids)
    with torch.no_grad():
        ttt = draft(feats.aux_hidden, ids, ttt_length=2)  # [2] x [1, T, Vd]
    drafter = Eagle3Drafter(draft)
    from spec_lightning.targets import TargetStep

    t = 4
    drafter.observe(TargetStep(feats.final_hidden[0, : t + 1], feats.aux_hidden[0, : t + 1]), ids[0, 1 : t + 2],
                    ids[0, : t + 2].tolist())
    torch.testing.assert_close(drafter.last_logits, ttt[0][0, t], atol=1e-4, rtol=1e-4)
    _, head = drafter.run(drafter.last_h[None], ids[0, t + 2 : t + 3], torch.tensor([t + 1]), drafter._causal(1))
    torch.testing.assert_close(drafter.draft_logits(head)[0], ttt[1][0, t], atol=1e-4, rtol=1e-4)


def test_eagle2_tree_shape(model):
    draft = random_eagle3(model, draft_vocab_size=64)
    drafter = Eagle3Drafter(draft, tree_topk=3, tree_depth=4, tree_total_tokens=11)
    runner = FrozenTarget(model)
    ids = torch.tensor([5, 6, 7, 8])
    step = runner.step(ids, runner.new_cache(), aux_layer_ids=drafter.aux_layer_ids)
    drafter.observe(step, torch.tensor([6, 7, 8, 9]), [5, 6, 7, 8, 9])
    length = drafter.cached
    tree = drafter.propose_tree(max_depth=10)
    assert tree.size == 11 and tree.max_depth() <= 4
    assert drafter.cached == length  # drafted positions are dropped again
    valid_targets = set(drafter.to_target(torch.arange(64)).tolist())
    assert set(tree.tokens.tolist()) <= valid_targets  # every token mapped through d2t into the target vocab
    # siblings are distinct tokens (top-k of one distribution)
    for kids in tree.children():
        toks = [int(tree.tokens[c]) for c in kids]
        assert len(toks) == len(set(toks)) and len(kids) <= 3
    assert drafter.propose_tree(max_depth=1).max_depth() == 1


def test_frontier_visibility_hand_counted():
    # prefix of 2 cached slots; level 1 = nodes 0, 1 (children of the root); level 2 = nodes 2 (of 0) and 3 (of 1)
    from spec_lightning.speculate.tree import frontier_visibility
    parents = [-1, -1, 0, 1]
    slot: dict[int, int] = {}
    visible, depth = frontier_visibility([0, 1], parents, slot, prefix=2, cached=2)
    assert depth == 1 and slot == {0: 2, 1: 3}
    assert visible.tolist() == [[True, True, True, False], [True, True, False, True]]
    visible, depth = frontier_visibility([2, 3], parents, slot, prefix=2, cached=4)
    assert depth == 2 and slot == {0: 2, 1: 3, 2: 4, 3: 5}
    assert visible.tolist() == [[True, True, True, False, True, False], [True, True, False, True, False, True]]


def test_draw_chain_feeds_each_token_and_maps_ids():
    from spec_lightning.speculate.sampling import draw_chain
    fed = []

    def advance(tokens, j):
        fed.append((list(tokens), j))
        return torch.nn.functional.one_hot(torch.tensor(tokens[-1] - 100 + 1), 8).float()  # next index = last + 1

    tokens, q = draw_chain(torch.nn.functional.one_hot(torch.tensor(3), 8).float(), 3, 0.0, None, advance,
                           token_id=lambda index: int(index) + 100)  # draft index -> target id
    assert tokens.tolist() == [103, 104, 105] and q is None
    assert fed == [([103], 0), ([103, 104], 1)]  # never advanced past the last token
