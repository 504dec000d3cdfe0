"""Lossless speculative decoding (chain and tree) with any HF target and a draft (EAGLE-3, Medusa, a draft LM).

No Lightning here: the training callback (``spec_lightning.callbacks.acceptance``) and the ``evaluate``
subcommand build on these functions; a LightningModule says how it is decoded (``make_drafter``).
"""

from spec_lightning.speculate.decode import GenerationResult, speculative_generate, target_generate
from spec_lightning.speculate.eagle3 import Eagle3Drafter
from spec_lightning.speculate.evaluate import AcceptanceStats, EvalReport, eos_token_ids, evaluate_acceptance
from spec_lightning.speculate.medusa import MedusaDrafter
from spec_lightning.speculate.skinny import cpu_decode_kernels
from spec_lightning.speculate.tree import DEFAULT_MEDUSA_CHOICES, DraftTree

__all__ = [
    "DEFAULT_MEDUSA_CHOICES", "AcceptanceStats", "DraftTree", "Eagle3Drafter", "EvalReport", "GenerationResult",
    "MedusaDrafter", "cpu_decode_kernels", "eos_token_ids", "evaluate_acceptance", "speculative_generate",
    "target_generate",
]
