"""The clipped GRPO policy loss and how its per-token terms are aggregated.

Per token of completion i (DeepSeekMath https://arxiv.org/abs/2402.03300, eq. 3):

    objective_t = min(ρ_t A_i, clip(ρ_t, 1 - ε_low, 1 + ε_high) A_i) - β KL_t,   loss = -objective

with ρ_t = π_θ(o_t) / π_old(o_t). With one update per group (μ = 1) the module passes
`old_logprobs = logprobs.detach()`: ρ is exactly 1 in value, never clipped, and its
gradient is ∇log π_θ, i.e. plain REINFORCE with the group baseline. `ε_high > ε_low` is
DAPO's clip-higher (https://arxiv.org/abs/2503.14476).

Completions the caller wants to ignore (e.g. truncated ones, DAPO's overlong filtering)
are removed by zeroing their rows in `completion_mask`; nothing here looks at lengths.

Aggregations (a closed catalogue) differ in how tokens are weighted:

- `"grpo"`: mean over each sequence's tokens, then over sequences (GRPO paper). Normaliser:
  the number of sequences.
- `"bnpo"` / `"dapo"`: one mean over all completion tokens of the batch (DAPO), so long
  completions weigh more. Normaliser: the number of completion tokens.
- `"dr_grpo"`: sum over tokens divided by the constant B*G × max_completion_length
  (Dr. GRPO https://arxiv.org/abs/2503.20783): no length bias at all.

Every aggregation is `(sum of the per-item terms) / normalizer`, so a batch split into
micro-batches gets the full batch's gradient when each micro-batch is given the full
batch's normaliser (`loss_normalizer(full_completion_mask, ...)`): the micro-batch losses
then sum to the full-batch loss. Under DDP, where gradients are averaged over W ranks,
pass the global normaliser divided by W (TRL does the same for `"dapo"`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from r1_lightning.rl.kl import LOG_RATIO_CLAMP
from r1_lightning.rl.masked import masked_mean, masked_sum

def _sum_of_sequence_means(per_token: Tensor, mask: Tensor) -> Tensor:
    return masked_mean(per_token, mask, dim=-1).sum()  # Σ_i mean_t over completion i's tokens


def _num_sequences(mask: Tensor, max_completion_length: int | None) -> int:
    return mask.shape[0]


def _num_tokens(mask: Tensor, max_completion_length: int | None) -> Tensor:
    return mask.sum().clamp(min=1)


def _num_token_slots(mask: Tensor, max_completion_length: int | None) -> int:
    return mask.shape[0] * (max_completion_length if max_completion_length is not None else mask.shape[-1])


# name -> (sum of the items being averaged, default denominator)
AGGREGATIONS: dict[str, tuple[Callable[[Tensor, Tensor], Tensor], Callable[[Tensor, int | None], Tensor | int]]] = {
    "grpo": (_sum_of_sequence_means, _num_sequences),
    "bnpo": (masked_sum, _num_tokens),
    "dapo": (masked_sum, _num_tokens),
    "dr_grpo": (masked_sum, _num_token_slots),
}


def _check_aggregation(aggregation: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"loss aggregation={aggregation!r} is not one of {sorted(AGGREGATIONS)}")


def loss_normalizer(
    completion_mask: Tensor, aggregation: str = "grpo", max_completion_length: int | None = None
) -> Tensor | int:
    """The denominator `aggregate_loss` uses for this (full) batch by default.

    Args:
        completion_mask: `[B*G, T]`, 1 on completion tokens.
        aggregation: `"grpo"` (number of sequences), `"bnpo"`/`"dapo"` (number of
            completion tokens) or `"dr_grpo"` (B*G × max_completion_length).
        max_completion_length: The constant for `"dr_grpo"` (the generation budget,
            `max_new_tokens`); defaults to T, which varies with the batch's padding.
    """
    _check_aggregation(aggregation)
    return AGGREGATIONS[aggregation][1](completion_mask.bool(), max_completion_length)


def aggregate_loss(
    per_token_loss: Tensor,
    completion_mask: Tensor,
    aggregation: str = "grpo",
    normalizer: float | Tensor | None = None,
    max_completion_length: int | None = None,
) -> Tensor:
    """Reduce `[B*G, T]` per-token terms to a scalar: `sum of items / normalizer`.

    Args:
        per_token_loss: `[B*G, T]`.
        completion_mask: `[B*G, T]`.
        aggregation: See the module docstring.
        normalizer: Overrides the denominator (for micro-batches: the full batch's).
        max_completion_length: The `"dr_grpo"` constant when `normalizer` is not given.
    """
    _check_aggregation(aggregation)
    mask = completion_mask.bool()
    total = AGGREGATIONS[aggregation][0](per_token_loss, mask)  # []
    if normalizer is None:
        normalizer = loss_normalizer(mask, aggregation, max_completion_length)
    return total / normalizer


def importance_log_ratio(logprobs: Tensor, old_logprobs: Tensor, completion_mask: Tensor, level: str = "token") -> Tensor:
    """log ρ per token, `[B*G, T]`; 0 at positions outside the mask.

    `"token"`: log π_θ(o_t) - log π_old(o_t). `"sequence"` (GSPO,
    https://arxiv.org/abs/2507.18071): the length-normalised sequence ratio
    log ρ_i = mean_t(log π_θ - log π_old), broadcast over the sequence's tokens, with the
    gradient flowing through the mean as in the paper. GSPO uses much smaller clip ranges
    (ε ≈ 3e-4 / 4e-4) and the `"grpo"` aggregation.
    """
    mask = completion_mask.bool()
    # Zeroed (not just masked later) so garbage log-probs at padding give ρ = 1 there
    # and cannot turn a zero gradient into 0 · inf = NaN.
    log_ratio = torch.where(mask, logprobs - old_logprobs, torch.zeros_like(logprobs))  # [B*G, T]
    if level == "token":
        return log_ratio
    if level == "sequence":
        per_seq = masked_mean(log_ratio, mask, dim=-1, keepdim=True)  # [B*G, 1]
        return torch.where(mask, per_seq.expand_as(log_ratio), torch.zeros_like(log_ratio))  # [B*G, T]
    raise ValueError(f"importance ratio level={level!r} must be 'token' or 'sequence'")


def _check_shapes(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, completion_mask: Tensor) -> None:
    # A [B*G, 1] advantage would silently broadcast to [B*G, B*G, T].
    if not (logprobs.shape == old_logprobs.shape == completion_mask.shape and advantages.shape == logprobs.shape[:1]):
        shapes = ", ".join(str(tuple(t.shape)) for t in (logprobs, old_logprobs, completion_mask, advantages))
        raise ValueError(
            f"policy_loss expects logprobs, old_logprobs, completion_mask [B*G, T] and advantages [B*G]; got {shapes}"
        )


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    completion_mask: Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    kl: Tensor | None = None,
    beta: float = 0.0,
    aggregation: str = "grpo",
    ratio_level: str = "token",
    normalizer: float | Tensor | None = None,
    max_completion_length: int | None = None,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped surrogate loss of GRPO (with optional KL-in-loss, DAPO, Dr. GRPO, GSPO).

    Args:
        logprobs: log π_θ of the completion tokens, `[B*G, T]`, with grad.
        old_logprobs: log π_old, `[B*G, T]`, detached (`logprobs.detach()` at μ = 1).
        advantages: One per completion, `[B*G]`.
        completion_mask: `[B*G, T]`, 1 on tokens that count.
        epsilon_low: Lower clip range ε_low.
        epsilon_high: Upper clip range ε_high; defaults to `epsilon_low`.
        kl: Per-token KL estimate to π_ref, `[B*G, T]` (e.g. `K3()(logprobs, ref_logprobs)`).
        beta: KL coefficient; the KL term is added only when `kl` is given.
        aggregation: `"grpo"`, `"bnpo"`, `"dapo"` or `"dr_grpo"` (module docstring).
        ratio_level: `"token"` (PPO/GRPO) or `"sequence"` (GSPO).
        normalizer: Overrides the aggregation's denominator (micro-batching, DDP).
        max_completion_length: The `"dr_grpo"` constant (defaults to T).
        token_weights: `[B*G, T]` detached, non-negative weights of the clipped term per token, e.g.
            the sampler-mismatch importance weights of `r1_lightning.rl.sampler_correction`.

    Returns:
        The scalar loss and detached metrics: `policy_loss` (the clipped term alone,
        aggregated like the loss), `kl` (mean per-token KL over completion tokens, only
        when `kl` is given), `clip_ratio` (share of completion tokens whose gradient is cut
        by clipping), `clip_ratio_low` (ρ < 1 - ε_low with A < 0), `clip_ratio_high`
        (ρ > 1 + ε_high with A > 0) and `ratio_mean`.
    """
    _check_shapes(logprobs, old_logprobs, advantages, completion_mask)
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    mask = completion_mask.bool()
    # Bounded before exp() (as in K3): with μ > 1 a token the policy has moved far from π_old
    # would give ρ = inf, a loss of inf for A < 0 and, through the unselected branch of
    # min(), a gradient of 0 · inf = NaN for A > 0. Beyond e^±20 ρ is far outside any clip
    # range, so only the size of an already-clipped or runaway term changes.
    log_ratio = importance_log_ratio(logprobs, old_logprobs, mask, ratio_level).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)  # [B*G, T]
    adv = advantages.unsqueeze(-1).to(ratio.dtype)  # [B*G, 1]
    clipped_ratio = ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high)  # [B*G, T]
    per_token_policy = -torch.min(ratio * adv, clipped_ratio * adv)  # [B*G, T]
    if token_weights is not None:
        per_token_policy = per_token_policy * token_weights  # w >= 0: w·min(a, b) = min(w·a, w·b)
    per_token_loss = per_token_policy if kl is None else per_token_policy + beta * kl  # [B*G, T]
    loss = aggregate_loss(per_token_loss, mask, aggregation, normalizer, max_completion_length)

    with torch.no_grad():
        low = (ratio < 1.0 - epsilon_low) & (adv < 0)  # [B*G, T]
        high = (ratio > 1.0 + epsilon_high) & (adv > 0)  # [B*G, T]
        metrics = {
            "policy_loss": aggregate_loss(per_token_policy, mask, aggregation, normalizer, max_completion_length),
            "clip_ratio": masked_mean((low | high).float(), mask),
            "clip_ratio_low": masked_mean(low.float(), mask),
            "clip_ratio_high": masked_mean(high.float(), mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
        if kl is not None:
            metrics["kl"] = masked_mean(kl, mask)
    return loss, metrics
