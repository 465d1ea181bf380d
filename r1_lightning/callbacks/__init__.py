"""Callbacks for the R1 pipeline."""

from r1_lightning.callbacks.reasoning_length import ReasoningLengthLogger
from r1_lightning.callbacks.reference_refresh import ReferenceModelRefresh
from r1_lightning.callbacks.rejection_sampling import RejectionSamplingWriter

__all__ = ["ReasoningLengthLogger", "ReferenceModelRefresh", "RejectionSamplingWriter"]
