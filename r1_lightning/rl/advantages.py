"""Group-relative advantages: GRPO replaces PPO's value model with the group's rewards.

Rewards arrive flat, `[B*G]`, a prompt's G completions in one consecutive block (the
order the rollout produces; see `r1_lightning.rl.groups`). NaN marks a reward that was
`None` (not applicable): it is left out of its group's statistics and its completion gets
advantage 0.

A group whose valid rewards are all equal (all right, all wrong, or a single valid
sample) carries no signal; the built-in estimators give it advantages of exactly 0, never
NaN or 1e-8-ish, so those completions contribute nothing to the policy gradient.

An estimator is a small object chosen by `class_path` (`GRPO(advantage_estimator=...)`);
the strings `"grpo"`, `"dr_grpo"`, `"batch_std"` and `"rloo"` name the built-ins:

- `GroupNormalized` (`"grpo"`): (r_i - mean(r)) / (std(r) + eps), DeepSeekMath
  https://arxiv.org/abs/2402.03300. std is the unbiased (Bessel, n - 1) sample std over the
  group's valid rewards, as `torch.std` computes it and as TRL and verl do.
- `GroupCentred` (`"dr_grpo"`): r_i - mean(r), no std division (Dr. GRPO,
  https://arxiv.org/abs/2503.20783): dividing by std up-weights prompts that are too easy or too hard.
- `BatchStd` (`"batch_std"`): (r_i - group mean) / (std of all valid rewards of the *global*
  batch + eps) (unbiased), TRL's `scale_rewards="batch"`; the std is summed over all ranks,
  so N processes compute what one process holding the whole batch would.
- `LeaveOneOut` (`"rloo"`): r_i - mean of the group's *other* valid rewards
  (https://arxiv.org/abs/2402.14740) = n/(n-1) · (r_i - mean(r)).

Your own estimator subclasses `AdvantageEstimator` and implements `advantages(groups)`:

    class RankAdvantage(AdvantageEstimator):
        def advantages(self, groups: RewardGroups) -> Tensor:
            ranks = groups.rewards.nan_to_num(-1e9).argsort(-1).argsort(-1).float()  # [B, G]
            return torch.where(groups.flat, 0.0, ranks - ranks.mean(-1, keepdim=True))
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from r1_lightning.errors import ConfigError
from r1_lightning.rl.collectives import all_ranks_sum
from r1_lightning.rl.groups import check_groups, group_view
from r1_lightning.rl.masked import masked_mean, masked_sum, masked_var


class RewardGroups(NamedTuple):
    """A batch's rewards as B groups of G, with the statistics every estimator needs.

    Attributes:
        rewards: `[B, G]`, NaN where the reward was `None`.
        valid: `[B, G]` bool, the non-NaN rewards.
        count: `[B, 1]` valid rewards per group.
        centred: `[B, G]` r - group mean; exactly 0 for invalid entries and flat groups.
        flat: `[B, 1]` bool, the group's valid rewards are all equal (or fewer than 2).
    """

    rewards: Tensor
    valid: Tensor
    count: Tensor
    centred: Tensor
    flat: Tensor


def group_rewards(rewards: Tensor, num_generations: int) -> RewardGroups:
    """Split `[B*G]` rewards into their groups (see `RewardGroups`); infinite rewards are refused."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be flat [B*G], got shape {tuple(rewards.shape)}")
    check_groups(rewards.numel(), num_generations, "rewards")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    if torch.isinf(rewards).any():
        positions = torch.isinf(rewards).nonzero().flatten().tolist()
        raise ValueError(f"rewards at positions {positions} are infinite; use NaN (None) for 'not applicable'")
    grouped = group_view(rewards, num_generations)  # [B, G]
    valid = ~torch.isnan(grouped)  # [B, G]
    inf = torch.tensor(float("inf"), dtype=grouped.dtype, device=grouped.device)
    hi = torch.where(valid, grouped, -inf).amax(dim=-1, keepdim=True)  # [B, 1]
    lo = torch.where(valid, grouped, inf).amin(dim=-1, keepdim=True)  # [B, 1]
    # Decided by comparison, not by the std: r - mean(r) is not exactly 0 in floating
    # point even when all r are equal (0.1 + 0.1 + 0.1 = 0.30000000000000004).
    flat = ~(hi > lo)  # [B, 1]
    mean = masked_mean(grouped, valid, dim=-1, keepdim=True)  # [B, 1]
    centred = torch.where(valid & ~flat, grouped - mean, torch.zeros_like(grouped))  # [B, G]
    return RewardGroups(grouped, valid, valid.sum(dim=-1, keepdim=True), centred, flat)


def group_std(groups: RewardGroups) -> Tensor:
    """Unbiased std of each group's valid rewards, `[B, 1]` (0 for a group with fewer than 2)."""
    sum_sq = masked_sum(groups.centred.square(), groups.valid, dim=-1, keepdim=True)  # [B, 1]
    return (sum_sq / (groups.count - 1).clamp(min=1)).sqrt()


class AdvantageEstimator:
    """Turns a batch's rewards into one advantage per completion.

    Subclasses implement `advantages(groups)`; `__call__` groups the flat rewards, calls it,
    sets the advantage of every `None` (NaN) reward to 0 and adds the batch metrics.
    """

    def advantages(self, groups: RewardGroups) -> Tensor:
        """Return the advantages, `[B, G]`, from the grouped rewards (see `RewardGroups`)."""
        raise NotImplementedError

    def __call__(self, rewards: Tensor, num_generations: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Advantage per completion.

        Args:
            rewards: Total reward per completion, `[B*G]`, groups in consecutive blocks; NaN
                where the reward was `None`.
            num_generations: G, completions per prompt.

        Returns:
            Advantages `[B*G]` (0 for NaN rewards) and metrics: `reward_mean`, `reward_std`
            (over the valid rewards of the batch), `zero_std_frac` (share of groups whose valid
            rewards are all equal), `none_frac` (share of NaN rewards).
        """
        groups = group_rewards(rewards, num_generations)
        advantages = self.advantages(groups)  # [B, G]
        advantages = torch.where(groups.valid, advantages, torch.zeros_like(advantages)).reshape(-1)  # [B*G]
        metrics = {
            "reward_mean": masked_mean(groups.rewards, groups.valid),
            "reward_std": masked_var(groups.rewards, groups.valid, unbiased=True).sqrt(),
            "zero_std_frac": groups.flat.float().mean(),
            "none_frac": (~groups.valid).float().mean(),
        }
        return advantages, metrics

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


class GroupNormalized(AdvantageEstimator):
    """GRPO: (r_i - mean(r)) / (std(r) + eps) within the group (https://arxiv.org/abs/2402.03300).

    Args:
        eps: Added to the (unbiased) group std before dividing.
    """

    def __init__(self, eps: float = 1e-4) -> None:
        self.eps = eps

    def advantages(self, groups: RewardGroups) -> Tensor:
        scaled = groups.centred / (group_std(groups) + self.eps)  # [B, G]
        return torch.where(groups.flat, torch.zeros_like(scaled), scaled)


class GroupCentred(AdvantageEstimator):
    """Dr. GRPO: r_i - mean(r), no std division (https://arxiv.org/abs/2503.20783)."""

    def advantages(self, groups: RewardGroups) -> Tensor:
        return groups.centred  # [B, G]


class BatchStd(AdvantageEstimator):
    """(r_i - group mean) / (std of all valid rewards of the global batch + eps): TRL's `scale_rewards="batch"`.

    The std is unbiased and taken over every rank's rewards (two sums over ranks: count and
    sum, then squared deviations from the global mean), so N processes give what one would.
    Every rank must call it at the same step (GRPO's training step does).

    Args:
        eps: Added to the std before dividing.
    """

    def __init__(self, eps: float = 1e-4) -> None:
        self.eps = eps

    def advantages(self, groups: RewardGroups) -> Tensor:
        valid = groups.valid
        totals = all_ranks_sum(torch.stack([masked_sum(groups.rewards, valid), valid.sum().to(groups.rewards.dtype)]))
        mean = totals[0] / totals[1].clamp(min=1)  # []
        sum_sq = all_ranks_sum(masked_sum((groups.rewards - mean).square(), valid))  # []
        std = (sum_sq / (totals[1] - 1).clamp(min=1)).sqrt()  # []
        return torch.where(groups.flat, torch.zeros_like(groups.centred), groups.centred / (std + self.eps))  # [B, G]


class LeaveOneOut(AdvantageEstimator):
    """RLOO: r_i - mean of the group's other valid rewards (https://arxiv.org/abs/2402.14740)."""

    def advantages(self, groups: RewardGroups) -> Tensor:
        # r_i - (S - r_i)/(n-1) = (n r_i - S)/(n-1) = n/(n-1) · (r_i - S/n); flat groups
        # (including n ≤ 1) already have centred == 0.
        n = groups.count.to(groups.centred.dtype)  # [B, 1]
        return groups.centred * n / (n - 1).clamp(min=1)  # [B, G]


ADVANTAGE_ESTIMATORS: dict[str, type[AdvantageEstimator]] = {
    "grpo": GroupNormalized,
    "dr_grpo": GroupCentred,
    "batch_std": BatchStd,
    "rloo": LeaveOneOut,
}


def resolve_advantage_estimator(spec: str | AdvantageEstimator, eps: float | None = None) -> AdvantageEstimator:
    """`"grpo"`/`"dr_grpo"`/`"batch_std"`/`"rloo"` (or an estimator, returned as is) → an estimator.

    Args:
        spec: A name or an `AdvantageEstimator`.
        eps: For a name whose estimator divides by a std: the eps to use (default its own).
    """
    if isinstance(spec, AdvantageEstimator):
        return spec
    if isinstance(spec, str) and spec in ADVANTAGE_ESTIMATORS:
        cls = ADVANTAGE_ESTIMATORS[spec]
        return cls(eps=eps) if eps is not None and cls in (GroupNormalized, BatchStd) else cls()
    raise ConfigError(
        f"advantage_estimator={spec!r}: choose one of {', '.join(ADVANTAGE_ESTIMATORS)}, or an instance of "
        "r1_lightning.rl.advantages.AdvantageEstimator (in YAML: class_path/init_args)"
    )


def group_advantages(
    rewards: Tensor, num_generations: int, estimator: str | AdvantageEstimator = "grpo", eps: float = 1e-4
) -> tuple[Tensor, dict[str, Tensor]]:
    """Advantage per completion from its group's rewards: `resolve_advantage_estimator(estimator, eps)(rewards, G)`.

    Args:
        rewards: `[B*G]`, groups in consecutive blocks; NaN where the reward was `None`.
        num_generations: G, completions per prompt.
        estimator: A name (see the module docstring) or an `AdvantageEstimator`.
        eps: Added to the std before dividing (`"grpo"`, `"batch_std"`).

    Returns:
        Advantages `[B*G]` and metrics (see `AdvantageEstimator.__call__`).
    """
    if isinstance(estimator, str) and estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"advantage estimator={estimator!r} is not one of {sorted(ADVANTAGE_ESTIMATORS)}")
    return resolve_advantage_estimator(estimator, eps)(rewards, num_generations)


def normalize_in_groups(values: Tensor, num_generations: int, eps: float = 1e-4) -> Tensor:
    """(v_i - mean(v)) / (std(v) + eps) within each group, NaN kept as NaN, flat groups → 0.

    GDPO-style multi-reward training normalises each reward this way before the weighted sum,
    so a reward with a large scale or spread cannot drown the others.

    Args:
        values: `[B*G]`, one reward's scores, NaN where `None`.
        num_generations: G.
        eps: Added to the group std.

    Returns:
        `[B*G]` normalised scores.
    """
    groups = group_rewards(values, num_generations)
    scaled = GroupNormalized(eps).advantages(groups)  # [B, G]
    return torch.where(groups.valid, scaled, torch.full_like(scaled, float("nan"))).reshape(-1)


def dynamic_sampling_mask(rewards: Tensor, num_generations: int) -> tuple[Tensor, dict[str, Tensor]]:
    """DAPO dynamic sampling (https://arxiv.org/abs/2503.14476): keep groups with signal.

    A group whose valid rewards are all equal (all solved, all failed, or fewer than two
    valid) has zero advantages and so no gradient; DAPO over-samples prompts and drops
    those groups.

    Args:
        rewards: `[B*G]`, consecutive groups, NaN where `None`.
        num_generations: G.

    Returns:
        Keep-mask per group, `[B]` bool (`per_completion(keep, G)` for completions),
        and the metric `kept_frac`.
    """
    keep = ~group_rewards(rewards, num_generations).flat.squeeze(-1)  # [B]
    return keep, {"kept_frac": keep.float().mean()}
