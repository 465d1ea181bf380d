"""Moved to `r1_lightning.engines`; these names stay importable from here."""

from r1_lightning.engines.base import Rollout, RolloutEngine, SamplingParams, build_model_inputs, left_pad
from r1_lightning.engines.hf import HFGenerateEngine, any_rank_running, sample_next_token

__all__ = [
    "HFGenerateEngine", "Rollout", "RolloutEngine", "SamplingParams", "any_rank_running", "build_model_inputs", "left_pad",
    "sample_next_token",
]
