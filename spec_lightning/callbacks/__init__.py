"""Lightning callbacks."""

from spec_lightning.callbacks.acceptance import AcceptanceLengthCallback
from spec_lightning.callbacks.preemption import PREEMPTED_EXIT_CODE, PreemptionCheckpoint
from spec_lightning.callbacks.summary import DraftModelSummary

__all__ = ["PREEMPTED_EXIT_CODE", "AcceptanceLengthCallback", "DraftModelSummary", "PreemptionCheckpoint"]
