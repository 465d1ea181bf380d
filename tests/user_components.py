"""Components as a user writes them, in a module of their own: the README's "Components" examples
verbatim (tests/test_components_cli.py checks they match), and recording subclasses the CLI test
references from YAML to see that the YAML's objects are the ones the module called.
"""

from __future__ import annotations

import json

# --- README: advantage estimator
import torch
from r1_lightning.rl.advantages import AdvantageEstimator, RewardGroups


class RankAdvantage(AdvantageEstimator):
    """Each completion's rank in its group, centred: blind to the reward's scale."""

    def advantages(self, groups: RewardGroups) -> torch.Tensor:
        ranks = groups.rewards.nan_to_num(float("-inf")).argsort(-1).argsort(-1).float()  # [B, G]
        centred = ranks - ranks.mean(-1, keepdim=True)
        return torch.where(groups.flat, torch.zeros_like(centred), centred)
# --- end


# --- README: policy loss
from r1_lightning.rl.losses import PolicyLoss, importance_ratio


class CappedPG(PolicyLoss):
    """REINFORCE with the importance weight π/π_old detached and capped at `cap`."""

    def __init__(self, cap: float = 2.0, aggregation: str = "dapo") -> None:
        super().__init__(aggregation)
        self.cap = cap

    def per_token_loss(self, logprobs, old_logprobs, advantages, completion_mask):
        weight = importance_ratio(logprobs, old_logprobs, completion_mask).detach().clamp(max=self.cap)
        return -weight * advantages[:, None] * logprobs, {}
# --- end


# --- README: KL penalty
from r1_lightning.rl.kl import KLPenalty


class CappedKL(KLPenalty):
    """β·KL in the loss, at most β·cap per token, so one runaway token cannot dominate."""

    def __init__(self, cap: float = 1.0, beta: float = 0.04, estimator: str = "k3") -> None:
        super().__init__(estimator, beta)
        self.cap = cap

    def loss_term(self, logprobs, old_logprobs, ref_logprobs, completion_mask):
        term, metrics = super().loss_term(logprobs, old_logprobs, ref_logprobs, completion_mask)
        return term.clamp(max=self.beta * self.cap), metrics
# --- end


# --- README: reward
from r1_lightning.rewards import Reward


class LengthPenalty(Reward):
    """-1 per `max_chars` characters beyond `max_chars`, 0 up to it."""

    def __init__(self, max_chars: int = 400) -> None:
        self.max_chars = max_chars

    def __call__(self, completions, *, prompts, **columns):
        return [-max(0, len(c) - self.max_chars) / self.max_chars for c in completions]
# --- end


# --- README: rollout engine
import dataclasses

from r1_lightning.engines import HFGenerateEngine, RolloutEngine


class ShortDrafts(RolloutEngine):
    """Samples from the policy itself (through HFGenerateEngine), never more than `max_new_tokens` tokens."""

    def __init__(self, max_new_tokens: int = 64) -> None:
        self.inner, self.max_new_tokens = HFGenerateEngine(), max_new_tokens

    def generate(self, model, prompt_ids, num_generations, params, generator=None):
        params = dataclasses.replace(params, max_new_tokens=min(params.max_new_tokens, self.max_new_tokens))
        return self.inner.generate(model, prompt_ids, num_generations, params, generator)
# --- end


def _record(path: str, kind: str, **values) -> None:
    with open(path, "a") as f:
        f.write(json.dumps({"kind": kind, **values}) + "\n")


class RecordedRankAdvantage(RankAdvantage):
    """`RankAdvantage` that appends each call's rewards and advantages to `record` (a JSON line)."""

    def __init__(self, record: str) -> None:
        self.record = record

    def advantages(self, groups: RewardGroups) -> torch.Tensor:
        out = super().advantages(groups)
        _record(self.record, "advantages", rewards=groups.rewards.tolist(), advantages=out.tolist())
        return out


class RecordedCappedPG(CappedPG):
    """`CappedPG` that appends each call's loss to `record`."""

    def __init__(self, record: str, cap: float = 2.0) -> None:
        super().__init__(cap)
        self.record = record

    def per_token_loss(self, logprobs, old_logprobs, advantages, completion_mask):
        _record(self.record, "loss", cap=self.cap, rows=logprobs.shape[0])
        return super().per_token_loss(logprobs, old_logprobs, advantages, completion_mask)


class RecordedCappedKL(CappedKL):
    """`CappedKL` that appends each call to `record`."""

    def __init__(self, record: str, cap: float = 1.0, beta: float = 0.04) -> None:
        super().__init__(cap, beta)
        self.record = record

    def loss_term(self, logprobs, old_logprobs, ref_logprobs, completion_mask):
        _record(self.record, "kl", cap=self.cap, beta=self.beta)
        return super().loss_term(logprobs, old_logprobs, ref_logprobs, completion_mask)


class RecordedShortDrafts(ShortDrafts):
    """`ShortDrafts` that appends each call's token budget and completion width to `record`."""

    def __init__(self, record: str, max_new_tokens: int = 64) -> None:
        super().__init__(max_new_tokens)
        self.record = record

    def generate(self, model, prompt_ids, num_generations, params, generator=None):
        rollout = super().generate(model, prompt_ids, num_generations, params, generator)
        _record(self.record, "generate", asked=params.max_new_tokens, width=rollout.completion_ids.shape[1])
        return rollout
