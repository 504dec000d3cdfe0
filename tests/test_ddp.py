"""DDP on 2 CPU processes (gloo) trains like one process with the same global batch; the trainer presets parse.

Data-parallel property (``spec_lightning.datamodules.sampling``): with R ranks of batch b, global step s covers
exactly the samples of step s of one process with batch R*b (checked per step from digests of every row). With equal
token counts per rank (``letters_chat_file``) the mean of the ranks' losses is the one-process loss, so the two runs
differ only by float32 rounding: DDP all-reduces (sums) the two ranks' gradients, one process sums the same terms in
one batched reduction in another order. Measured here (4 steps): per-step losses within 1.9e-6 absolute (1.2e-7
relative), final weights within 4.5e-8; asserted: rtol 1e-5 on losses, atol 1e-5 on weights (margin for other CPUs'
kernels).
"""

from __future__ import annotations

import pytest
from ddp_helpers import CONFIGS, EAGLE3, MEDUSA, assert_same_training, one_process_run, two_process_run
from lightning.pytorch.strategies import DDPStrategy

from cli import main
from spec_lightning.strategies import DraftFSDPStrategy

PRESETS = sorted((CONFIGS / "trainer").glob("*.yaml"))


@pytest.mark.parametrize("model", [EAGLE3, MEDUSA], ids=["eagle3", "medusa"])
def test_ddp_two_cpu_processes_match_one_process(model, tmp_path_factory, tiny_target_dir):
    one = one_process_run(tmp_path_factory, tiny_target_dir, model)
    two = two_process_run(tmp_path_factory, tiny_target_dir, model, "ddp")
    assert_same_training(one, two, loss_rtol=1e-5, weight_atol=1e-5)


def test_ddp_feature_scaling_reduces_the_first_batch_over_ranks(tmp_path_factory, tiny_target_dir):
    # each rank sees half of the first global batch; the scale must be the one process's (sums all-reduced)
    extra = ("--model.feature_scaling=true",)
    one = one_process_run(tmp_path_factory, tiny_target_dir, EAGLE3, extra)
    two = two_process_run(tmp_path_factory, tiny_target_dir, EAGLE3, "ddp", extra)
    assert_same_training(one, two, loss_rtol=1e-5, weight_atol=1e-5)


@pytest.mark.parametrize("algorithm", ["eagle3", "medusa"])
@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_trainer_presets_combine_with_algorithm_configs(preset, algorithm):
    overrides = ["--trainer.accelerator=cpu", "--trainer.logger=false"]
    if preset.stem == "gpu":
        overrides += ["--trainer.precision=32-true"]  # bf16-mixed autocast is a GPU setting
    cli = main(args=["--config", str(CONFIGS / f"{algorithm}.yaml"), "--config", str(preset), *overrides], run=False)
    expected = {"cpu": "SingleDeviceStrategy", "gpu": "SingleDeviceStrategy", "ddp": DDPStrategy.__name__,
                "fsdp": DraftFSDPStrategy.__name__}[preset.stem]
    assert type(cli.trainer.strategy).__name__ == expected
    assert type(cli.model).__name__ == {"eagle3": "Eagle3Module", "medusa": "Medusa1Module"}[algorithm]
    assert cli.trainer.max_steps > 0 and cli.trainer.gradient_clip_val  # the algorithm config's trainer settings stay
