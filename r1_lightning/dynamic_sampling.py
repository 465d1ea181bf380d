"""DAPO dynamic sampling with re-drawing: keep drawing prompt groups until the batch is informative.

DAPO (https://arxiv.org/abs/2503.14476, §3.2) over-samples: a group whose rewards are all equal
(all solved, all failed) has zero advantages and no gradient, so it keeps sampling prompts and
drops such groups until the batch holds B groups with reward spread. Here each rank fills its own
B prompts: after the batch from the data loader, every rank draws a further batch of prompts (and
samples and scores their groups) while any rank still has fewer than B informative groups, at
most `max_draws` times; then each rank keeps its first B informative groups, in draw order, and
tops up with flat groups (which the loss mask then drops) if the draws ran out. All ranks draw
the same number of times, so collectives in generation (FSDP) stay in step.

A rollout's rows follow `r1_lightning.rl.groups`: the G completions of prompt b are rows b*G..b*G+G-1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from r1_lightning.engines import Rollout
from r1_lightning.rewards import RewardScores
from r1_lightning.rl.advantages import group_rewards
from r1_lightning.rl.collectives import all_ranks_sum
from r1_lightning.rl.groups import group_rows


@dataclass
class SampledGroups:
    """Prompts (in `collate_prompts` layout), their G completions each, the texts the rewards saw and the scores."""

    batch: dict[str, Any]
    rollout: Rollout
    texts: list[str]
    scores: RewardScores

    @property
    def num_prompts(self) -> int:
        return len(self.batch["prompt_ids"])


def _pad(tensor: Tensor, width: int, value: float, left: bool) -> Tensor:
    extra = width - tensor.shape[1]
    if extra == 0:
        return tensor
    fill = torch.full((tensor.shape[0], extra), value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([fill, tensor] if left else [tensor, fill], dim=1)


def concat_rollouts(rollouts: list[Rollout], pad_token_id: int) -> Rollout:
    """Rows of several rollouts in one: prompts re-padded on the left, completions on the right."""
    P = max(r.prompt_ids.shape[1] for r in rollouts)
    T = max(r.completion_ids.shape[1] for r in rollouts)
    return Rollout(
        prompt_ids=torch.cat([_pad(r.prompt_ids, P, pad_token_id, left=True) for r in rollouts]),
        prompt_mask=torch.cat([_pad(r.prompt_mask, P, 0, left=True) for r in rollouts]),
        completion_ids=torch.cat([_pad(r.completion_ids, T, pad_token_id, left=False) for r in rollouts]),
        completion_mask=torch.cat([_pad(r.completion_mask, T, 0, left=False) for r in rollouts]),
        logprobs=torch.cat([_pad(r.logprobs, T, 0.0, left=False) for r in rollouts]),
        truncated=torch.cat([r.truncated for r in rollouts]),
    )


def concat_sampled(parts: list[SampledGroups], pad_token_id: int) -> SampledGroups:
    """Several draws as one `SampledGroups`, in order."""
    keys = [key for key in parts[0].batch if key != "columns"]
    batch: dict[str, Any] = {key: [v for p in parts for v in p.batch[key]] for key in keys}
    batch["columns"] = {name: [v for p in parts for v in p.batch["columns"][name]] for name in parts[0].batch["columns"]}
    scores = RewardScores(
        scores={name: torch.cat([p.scores.scores[name] for p in parts]) for name in parts[0].scores.scores},
        total=torch.cat([p.scores.total for p in parts]),
        failures={name: sum(p.scores.failures[name] for p in parts) for name in parts[0].scores.failures},
    )
    rollout = concat_rollouts([p.rollout for p in parts], pad_token_id)
    return SampledGroups(batch, rollout, [t for p in parts for t in p.texts], scores)


def select_groups(sampled: SampledGroups, groups: list[int], num_generations: int) -> SampledGroups:
    """The given prompts (by position) and their groups' rows, in the given order."""
    spans = [group_rows(g, num_generations) for g in groups]
    rows = [row for span in spans for row in range(span.start, span.stop)]
    index = torch.tensor(rows, dtype=torch.long)

    def pick(values: Tensor) -> Tensor:
        return values.index_select(0, index.to(values.device))

    rollout = Rollout(**{f.name: pick(getattr(sampled.rollout, f.name)) for f in fields(Rollout)})
    batch = {key: [values[g] for g in groups] for key, values in sampled.batch.items() if key != "columns"}
    batch["columns"] = {name: [values[g] for g in groups] for name, values in sampled.batch["columns"].items()}
    picked = {name: pick(values) for name, values in sampled.scores.scores.items()}
    scores = RewardScores(picked, pick(sampled.scores.total), sampled.scores.failures)
    return SampledGroups(batch, rollout, [sampled.texts[i] for i in rows], scores)


def refill_informative_groups(
    first: SampledGroups,
    draw: Callable[[int], SampledGroups],
    reward_total: Callable[[RewardScores], Tensor],
    num_generations: int,
    max_draws: int,
    pad_token_id: int,
) -> tuple[SampledGroups, int]:
    """Draw more groups until this rank (and every other) holds `first.num_prompts` informative ones.

    Args:
        first: The data loader's batch, sampled and scored.
        draw: `draw(k)` samples and scores the k-th extra batch of prompts (k = 1, 2, ...); the same
            k on every rank, each rank drawing its own prompts.
        reward_total: The per-completion reward whose spread makes a group informative.
        num_generations: G.
        max_draws: Most extra batches.
        pad_token_id: For re-padding the combined rollouts.

    Returns:
        B groups (informative first, in draw order) and the number of extra draws made.
    """
    target = first.num_prompts
    parts, informative, draws = [first], 0, 0
    while True:
        informative += int((~group_rewards(reward_total(parts[-1].scores), num_generations).flat).sum())
        short = torch.tensor(float(informative < target))
        if draws >= max_draws or all_ranks_sum(short).item() == 0:
            break
        draws += 1
        parts.append(draw(draws))
    combined = concat_sampled(parts, pad_token_id) if len(parts) > 1 else first
    flat = group_rewards(reward_total(combined.scores), num_generations).flat.squeeze(-1).tolist()  # [groups]
    order = [g for g, f in enumerate(flat) if not f] + [g for g, f in enumerate(flat) if f]
    return select_groups(combined, order[:target], num_generations), draws
