"""Lossless speculative decoding (chain and tree) with any HF target and an EAGLE-3 or Medusa draft.

No Lightning here: the training callback (``spec_lightning.callbacks.acceptance``) and the ``evaluate``
subcommand build on these functions.
"""

from spec_lightning.speculate.decode import GenerationResult, speculative_generate, target_generate
from spec_lightning.speculate.eagle3 import Eagle3Drafter
from spec_lightning.speculate.evaluate import (
    AcceptanceStats,
    EvalReport,
    evaluate_acceptance,
    prompt_from_messages,
    prompts_from_dataset,
    runner_and_drafter,
)
from spec_lightning.speculate.medusa import MedusaDrafter
from spec_lightning.speculate.target import TargetRunner
from spec_lightning.speculate.tree import DEFAULT_MEDUSA_CHOICES, DraftTree

__all__ = [
    "DEFAULT_MEDUSA_CHOICES", "AcceptanceStats", "DraftTree", "Eagle3Drafter", "EvalReport", "GenerationResult",
    "MedusaDrafter", "TargetRunner", "evaluate_acceptance", "prompt_from_messages", "prompts_from_dataset",
    "runner_and_drafter", "speculative_generate", "target_generate",
]
