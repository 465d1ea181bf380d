"""Group-relative advantages: GRPO replaces PPO's value model with the group's rewards.

Rewards arrive flat, `[B*G]`, a prompt's G completions in one consecutive block (the
order the rollout produces). NaN marks a reward that was `None` (not applicable): it is
left out of its group's statistics and its completion gets advantage 0.

A group whose valid rewards are all equal (all right, all wrong, or a single valid
sample) carries no signal; its advantages are exactly 0, never NaN or 1e-8-ish, so
those completions contribute nothing to the policy gradient.

Estimators (a closed catalogue, chosen by name):

- `"grpo"`: (r_i - mean(r)) / (std(r) + eps), DeepSeekMath https://arxiv.org/abs/2402.03300.
  std is the unbiased (Bessel, n - 1) sample std over the group's valid rewards, as
  `torch.std` computes it and as TRL and verl do, so numbers match those frameworks.
- `"dr_grpo"`: r_i - mean(r), no std division (Dr. GRPO, https://arxiv.org/abs/2503.20783):
  dividing by std up-weights prompts that are too easy or too hard.
- `"batch_std"`: (r_i - group mean) / (std of all valid rewards in the batch + eps)
  (unbiased), TRL's `scale_rewards="batch"`; the REINFORCE++-baseline flavour of
  keeping group baselines but a batch-wide scale.
- `"rloo"`: r_i - mean of the group's *other* valid rewards (leave-one-out,
  https://arxiv.org/abs/2402.14740) = n/(n-1) · (r_i - mean(r)).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from r1_lightning.rl.masked import masked_mean, masked_sum, masked_var


class _Groups(NamedTuple):
    rewards: Tensor  # [B, G], NaN where None
    valid: Tensor  # [B, G] bool
    count: Tensor  # [B, 1] valid rewards per group
    centred: Tensor  # [B, G] r - group mean; exactly 0 for invalid entries and flat groups
    flat: Tensor  # [B, 1] bool: the group's valid rewards are all equal (or fewer than 2)


def _group(rewards: Tensor, num_generations: int) -> _Groups:
    if num_generations < 1 or rewards.dim() != 1 or rewards.numel() % num_generations:
        raise ValueError(
            f"rewards of shape {tuple(rewards.shape)} cannot be split into groups of "
            f"num_generations={num_generations} consecutive completions"
        )
    if not rewards.is_floating_point():
        rewards = rewards.float()
    if torch.isinf(rewards).any():
        positions = torch.isinf(rewards).nonzero().flatten().tolist()
        raise ValueError(f"rewards at positions {positions} are infinite; use NaN (None) for 'not applicable'")
    grouped = rewards.reshape(-1, num_generations)  # [B, G]
    valid = ~torch.isnan(grouped)  # [B, G]
    inf = torch.tensor(float("inf"), dtype=grouped.dtype, device=grouped.device)
    hi = torch.where(valid, grouped, -inf).amax(dim=-1, keepdim=True)  # [B, 1]
    lo = torch.where(valid, grouped, inf).amin(dim=-1, keepdim=True)  # [B, 1]
    # Decided by comparison, not by the std: r - mean(r) is not exactly 0 in floating
    # point even when all r are equal (0.1 + 0.1 + 0.1 = 0.30000000000000004).
    flat = ~(hi > lo)  # [B, 1]
    mean = masked_mean(grouped, valid, dim=-1, keepdim=True)  # [B, 1]
    centred = torch.where(valid & ~flat, grouped - mean, torch.zeros_like(grouped))  # [B, G]
    return _Groups(grouped, valid, valid.sum(dim=-1, keepdim=True), centred, flat)


def _grpo(g: _Groups, eps: float) -> Tensor:
    sum_sq = masked_sum(g.centred.square(), g.valid, dim=-1, keepdim=True)  # [B, 1]
    std = (sum_sq / (g.count - 1).clamp(min=1)).sqrt()  # [B, 1], unbiased
    return torch.where(g.flat, torch.zeros_like(g.centred), g.centred / (std + eps))  # [B, G]


def _dr_grpo(g: _Groups, eps: float) -> Tensor:
    return g.centred  # [B, G]


def _batch_std(g: _Groups, eps: float) -> Tensor:
    std = masked_var(g.rewards, g.valid, unbiased=True).sqrt()  # []
    return torch.where(g.flat, torch.zeros_like(g.centred), g.centred / (std + eps))  # [B, G]


def _rloo(g: _Groups, eps: float) -> Tensor:
    # r_i - (S - r_i)/(n-1) = (n r_i - S)/(n-1) = n/(n-1) · (r_i - S/n); flat groups
    # (including n ≤ 1) already have centred == 0.
    n = g.count.to(g.centred.dtype)  # [B, 1]
    return g.centred * n / (n - 1).clamp(min=1)  # [B, G]


ADVANTAGE_ESTIMATORS: dict[str, Callable[[_Groups, float], Tensor]] = {
    "grpo": _grpo,
    "dr_grpo": _dr_grpo,
    "batch_std": _batch_std,
    "rloo": _rloo,
}


def group_advantages(
    rewards: Tensor, num_generations: int, estimator: str = "grpo", eps: float = 1e-4
) -> tuple[Tensor, dict[str, Tensor]]:
    """Advantage per completion from its group's rewards.

    Args:
        rewards: Total reward per completion, `[B*G]`, groups in consecutive blocks;
            NaN where the reward was `None`.
        num_generations: G, completions per prompt.
        estimator: `"grpo"`, `"dr_grpo"`, `"batch_std"` or `"rloo"` (see the module docstring).
        eps: Added to the std before dividing (`"grpo"`, `"batch_std"`).

    Returns:
        Advantages `[B*G]` (0 for NaN rewards and zero-variance groups) and metrics:
        `reward_mean`, `reward_std` (over valid rewards of the batch), `zero_std_frac`
        (share of groups with zero variance), `none_frac` (share of NaN rewards).
    """
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"advantage estimator={estimator!r} is not one of {sorted(ADVANTAGE_ESTIMATORS)}")
    g = _group(rewards, num_generations)
    advantages = ADVANTAGE_ESTIMATORS[estimator](g, eps).reshape(-1)  # [B*G]
    metrics = {
        "reward_mean": masked_mean(g.rewards, g.valid),
        "reward_std": masked_var(g.rewards, g.valid, unbiased=True).sqrt(),
        "zero_std_frac": g.flat.float().mean(),
        "none_frac": (~g.valid).float().mean(),
    }
    return advantages, metrics


def dynamic_sampling_mask(rewards: Tensor, num_generations: int) -> tuple[Tensor, dict[str, Tensor]]:
    """DAPO dynamic sampling (https://arxiv.org/abs/2503.14476): keep groups with signal.

    A group whose valid rewards are all equal (all solved, all failed, or fewer than two
    valid) has zero advantages and so no gradient; DAPO over-samples prompts and drops
    those groups.

    Args:
        rewards: `[B*G]`, consecutive groups, NaN where `None`.
        num_generations: G.

    Returns:
        Keep-mask per group, `[B]` bool (`keep.repeat_interleave(G)` for completions),
        and the metric `kept_frac`.
    """
    keep = ~_group(rewards, num_generations).flat.squeeze(-1)  # [B]
    return keep, {"kept_frac": keep.float().mean()}
