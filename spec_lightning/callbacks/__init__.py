"""Lightning callbacks."""

from spec_lightning.callbacks.acceptance import AcceptanceLengthCallback

__all__ = ["AcceptanceLengthCallback"]
