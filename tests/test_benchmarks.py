"""The speed benchmarks run end to end on a tiny target and print the JSON lines the README quotes."""

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


def test_regenerate_throughput_compares_both_schedulers_on_the_same_prompts(tiny_target_dir, capsys):
    load_benchmark("regenerate_throughput").main(["--target", str(tiny_target_dir), "--num_prompts", "6",
                                                  "--max_new_tokens", "4", "--batch_sizes", "2", "4"])
    rows = json_lines(capsys.readouterr().out)
    assert [r["batch_size"] for r in rows] == [2, 4]
    for r in rows:
        assert r["num_prompts"] == 6 and r["same_as_hf_generate"] == 6  # greedy: both schedulers give the same text
        assert r["hf_generate"]["tokens"] == r["continuous"]["tokens"] == 6 * 4  # the random target never stops
        assert r["speedup"] == pytest.approx(r["hf_generate"]["seconds"] / r["continuous"]["seconds"], rel=0.02)
