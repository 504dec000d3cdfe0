"""FSDP (``DraftFSDPStrategy``): the frozen target and the trainable draft never share a sharding unit; gradient-norm
clipping works; 2 CPU processes (gloo) train like one process.

Tolerance: FSDP reduce-scatters the gradients (another summation order than one process, and than DDP), and the norm
for clipping is summed over shards. Measured here (4 steps): per-step losses within 1.9e-6 absolute (1.2e-7 relative),
final weights within 1.7e-6; Medusa's gradient norm exceeds the clip value 1.0 in these runs (a run without clipping
differs by 2.6e-5 at step 4), so the sharded clipping is exercised. Asserted: rtol 1e-5 on losses, atol 1e-4 on weights.
"""

from __future__ import annotations

import pytest
from ddp_helpers import EAGLE3, MEDUSA, assert_same_training, one_process_run, two_process_run
from lightning.pytorch.plugins.precision import FSDPPrecision

from spec_lightning.strategies import DraftFSDPStrategy, ShardedNormClipPrecision, split_units


def _module(model: str, target_dir):
    from spec_lightning.modules.eagle3 import Eagle3Module
    from spec_lightning.modules.medusa1 import Medusa1Module

    if model == EAGLE3:
        module = Eagle3Module(target=str(target_dir), draft_vocab_size=49152, ttt_length=2)
    else:
        module = Medusa1Module(target=str(target_dir), num_heads=2)
    module.configure_model()
    return module


@pytest.mark.parametrize("model", [EAGLE3, MEDUSA], ids=["eagle3", "medusa"])
def test_frozen_and_trainable_weights_never_share_a_unit(model, tiny_target_dir):
    module = _module(model, tiny_target_dir)
    blocks, frozen = split_units(module)
    assert blocks == list(module.target.layers)  # one unit per target decoder block
    expected = [module.target] + ([module.draft.embed_tokens] if model == EAGLE3 else [])
    assert frozen == expected  # the rest of the target (+ EAGLE-3's frozen embedding copy)
    in_units = {id(p) for unit in blocks + frozen for p in unit.parameters()}
    for name, p in module.named_parameters():  # trainable -> root unit only; frozen -> some frozen unit
        assert (id(p) in in_units) != p.requires_grad, name
    assert all(not p.requires_grad for unit in blocks + frozen for p in unit.parameters())


def test_norm_clipping_plugin_replaces_lightnings():
    strategy = DraftFSDPStrategy()
    strategy.precision_plugin = FSDPPrecision("bf16-mixed")  # what Lightning's connector assigns
    plugin = strategy.precision_plugin
    assert isinstance(plugin, ShardedNormClipPrecision) and plugin.precision == "bf16-mixed"
    with pytest.raises(RuntimeError, match="before the model was wrapped"):
        plugin.clip_grad_by_norm(None, 1.0)


@pytest.mark.slow  # ~30 s each on 2 shared cores; the unit split and clipping checks above run by default
@pytest.mark.parametrize("model", [EAGLE3, MEDUSA], ids=["eagle3", "medusa"])
def test_fsdp_two_cpu_processes_match_one_process(model, tmp_path_factory, tiny_target_dir):
    one = one_process_run(tmp_path_factory, tiny_target_dir, model)
    two = two_process_run(tmp_path_factory, tiny_target_dir, model, "fsdp")
    assert_same_training(one, two, loss_rtol=1e-5, weight_atol=1e-4)
