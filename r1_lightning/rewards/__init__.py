"""Rewards for GRPO: the reward protocol, a weighted reward set, and the built-in rewards.

A reward is any callable `reward(completions, *, prompts, **columns) -> list[float | None]`;
see `r1_lightning.rewards.base`.
"""

from r1_lightning.rewards.accuracy import Accuracy, CosineScaledAccuracy
from r1_lightning.rewards.base import FailedScore, Reward, RewardError, RewardFn, reward_name, score_each
from r1_lightning.rewards.format import LenientFormat, ReasoningSteps, StrictFormat, TagCount
from r1_lightning.rewards.language import LanguageConsistency
from r1_lightning.rewards.length import SoftOverlong
from r1_lightning.rewards.parsing import extract_answer, extract_reasoning, restore_think_prefill
from r1_lightning.rewards.repetition import RepetitionPenalty
from r1_lightning.rewards.reward_model import RewardModel
from r1_lightning.rewards.reward_set import RewardScores, RewardSet

__all__ = [
    "Accuracy",
    "CosineScaledAccuracy",
    "FailedScore",
    "LanguageConsistency",
    "LenientFormat",
    "ReasoningSteps",
    "RepetitionPenalty",
    "Reward",
    "RewardError",
    "RewardModel",
    "RewardFn",
    "RewardScores",
    "RewardSet",
    "SoftOverlong",
    "StrictFormat",
    "TagCount",
    "extract_answer",
    "extract_reasoning",
    "restore_think_prefill",
    "reward_name",
    "score_each",
]
