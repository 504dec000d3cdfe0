"""The speed benchmarks run end to end on a tiny target and print the JSON lines benchmarks/results/*.md quote."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_verify_cost_prints_one_row_per_token_count(tiny_target_dir, capsys):
    load_benchmark("verify_cost").main(["--target", str(tiny_target_dir), "--threads", "1", "--max_tokens", "3",
                                        "--context", "8", "--repeats", "2"])
    rows = json_lines(capsys.readouterr().out)
    assert [(r["skinny_gemm"], r["tokens"]) for r in rows] == [(s, n) for s in (False, True) for n in (1, 2, 3)]
    for part in (rows[:3], rows[3:]):  # each setting is relative to its own one-token step
        assert part[0]["ratio_to_one_token"] == 1.0
        for r in part:
            assert r["ms"] > 0 and r["threads"] == 1
            assert r["ratio_to_one_token"] == pytest.approx(r["ms"] / part[0]["ms"], rel=0.05)


def test_speculate_speed_reports_tau_and_the_time_split(tiny_target_dir, tiny_chat_file, capsys):
    load_benchmark("speculate_speed").main([
        "--target", str(tiny_target_dir), "--algorithm", "eagle3", "--prompts", str(tiny_chat_file),
        "--num_prompts", "2", "--max_new_tokens", "6", "--modes", "chain", "tree", "--k", "2",
        "--tree_topk", "2", "--tree_depth", "2", "--tree_total_tokens", "3", "--threads", "1"])
    rows = json_lines(capsys.readouterr().out)
    assert [(r["mode"], r["num_draft_tokens"]) for r in rows] == [("chain", 2), ("tree", 0)]
    for r in rows:
        assert r["identical_outputs"] == 2  # lossless: the untrained draft never changes the output
        assert 1.0 <= r["accept_length"] <= 3.0
        assert r["draft_ms_per_round"] > 0 and r["verify_ms_per_round"] > 0 and r["baseline_ms_per_forward"] > 0
        want = (r["draft_ms_per_round"] + r["verify_ms_per_round"]) / r["baseline_ms_per_forward"]
        assert r["break_even_accept_length"] == pytest.approx(want, rel=1e-3)
    assert rows[1]["tree"] == {"topk": 2, "depth": 2, "total_tokens": 3}


def test_train_throughput_prints_tokens_memory_and_mfu(capsys):
    from spec_lightning.allocator import find_tcmalloc

    allocators = ["system", "tcmalloc"] if find_tcmalloc() else ["system"]
    load_benchmark("train_throughput").main(["--targets", "tiny", "--lengths", "64", "--steps", "1", "--threads", "1",
                                             "--draft_vocab_size", "64", "--ttt_length", "2",
                                             "--optimizer", "fused", "foreach", "--allocator", *allocators])
    rows = json_lines(capsys.readouterr().out)
    header, results = rows[0], rows[1:]
    assert header["machine_peak_gflops"]["32-true"] > 0
    named = {"system": "glibc", "tcmalloc": "tcmalloc"}
    assert [(r["algorithm"], r["optimizer"], r["allocator"]) for r in results] == [
        (a, o, named[m]) for a in ("eagle3", "medusa") for o in ("fused", "foreach") for m in allocators]
    for r in results:
        assert "error" not in r, r
        assert r["tokens_per_s"] > 0 and r["peak_rss_gib"] > 0 and r["model_flops_per_token"] > 0 and 0 < r["mfu"] < 1


def test_draft_agreement_matches_a_position_by_position_recount(tiny_target_dir, tiny_chat_file, tmp_path, capsys):
    from collections import Counter

    import torch

    from spec_lightning.datamodules.prompts import prompts_from_file
    from spec_lightning.modules.eagle3 import Eagle3Module
    from spec_lightning.targets import load_tokenizer
    from spec_lightning.vocab import vocab_from_token_ids

    torch.manual_seed(0)
    module = Eagle3Module(target=str(tiny_target_dir), draft_vocab_size=64, ttt_length=2)
    module.configure_model()
    target, draft = module.target, module.draft.eval()
    prompts = prompts_from_file(str(tiny_chat_file), load_tokenizer(str(tiny_target_dir)), limit=3)
    with torch.no_grad():
        answers = [target.model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                         max_new_tokens=8, do_sample=False)[0] for p in prompts]
        # a draft that always proposes the answers' most common token X: draft id 0 is X, and a zero final norm makes
        # every logit 0, so the argmax is draft id 0
        common = Counter(t for p, a in zip(prompts, answers) for t in a[len(p) + 2:].tolist()).most_common(1)[0][0]
        assert common + 64 <= target.text_config.vocab_size
        vocab = vocab_from_token_ids(torch.arange(common, common + 64), target.text_config.vocab_size)
        draft.set_vocab(vocab.d2t, vocab.t2d)
        draft.norm.weight.zero_()
    ckpt = tmp_path / "draft.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, ckpt)
    load_benchmark("draft_agreement").main(["--ckpt", str(ckpt), "--prompts", str(tiny_chat_file),
                                            "--num_prompts", "3", "--max_new_tokens", "8"])
    (row,) = json_lines(capsys.readouterr().out)

    # the recount: draft position t (step 0) proposes X; it agrees where the target's argmax at position t + 1 is X
    agree, top1, in_vocab = [], [], []
    for prompt, full in zip(prompts, answers):
        with torch.no_grad():
            probs = torch.softmax(target.logits(target(full[None]).final_hidden[0]), -1)
        for t in range(len(prompt), full.shape[0] - 1):
            want = int(probs[t + 1].argmax())
            agree.append(want == common)
            top1.append(float(probs[t + 1].max()))
            in_vocab.append(common <= want < common + 64)
    assert 0 < sum(agree) < len(agree)  # the recount is not trivial
    assert row["positions"] == len(agree)
    assert row["step0_agreement"] == pytest.approx(sum(agree) / len(agree), abs=1e-3)
    assert row["target_top1_mean"] == pytest.approx(sum(top1) / len(top1), abs=1e-3)
    assert row["in_draft_vocab"] == pytest.approx(sum(in_vocab) / len(in_vocab), abs=1e-3)
    shares = [b["share"] for b in row["by_target_confidence"].values()]
    assert sum(shares) == pytest.approx(1.0, abs=2e-3)
