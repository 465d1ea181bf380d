"""Callbacks for the R1 pipeline."""

from r1_lightning.callbacks.preemption import PreemptionCheckpoint
from r1_lightning.callbacks.reasoning_length import ReasoningLengthLogger
from r1_lightning.callbacks.reference_refresh import ReferenceModelRefresh
from r1_lightning.callbacks.rejection_sampling import RejectionSamplingWriter

__all__ = ["PreemptionCheckpoint", "ReasoningLengthLogger", "ReferenceModelRefresh", "RejectionSamplingWriter"]
