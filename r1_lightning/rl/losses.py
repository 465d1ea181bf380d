"""Policy losses: the per-token surrogate, and how its terms are aggregated.

A loss is a small object chosen by `class_path` (`GRPO(policy_loss=...)`). `ClippedLoss` is
GRPO's clipped surrogate (DeepSeekMath https://arxiv.org/abs/2402.03300, eq. 3) per token of
completion i:

    objective_t = min(ρ_t A_i, clip(ρ_t, 1 - ε_low, 1 + ε_high) A_i) - β KL_t,   loss = -objective

with ρ_t = π_θ(o_t) / π_old(o_t). With one update per group (μ = 1) the module passes
`old_logprobs = logprobs.detach()`: ρ is exactly 1 in value, never clipped, and its
gradient is ∇log π_θ, i.e. plain REINFORCE with the group baseline. `ε_high > ε_low` is
DAPO's clip-higher (https://arxiv.org/abs/2503.14476). `CISPOLoss` and `SAPOLoss` replace the
clipped min() by a clipped, stop-gradient importance weight (MiniMax-M1) and by a soft gate (Qwen).

Every loss shares (in `PolicyLoss.__call__`) the extras that apply to any per-token surrogate:
per-token weights (the sampler-mismatch correction of `r1_lightning.rl.sampler_correction`),
training on the top-entropy fraction of tokens only, an entropy bonus, and the KL term of a
`KLPenalty` with placement `loss`.

Completions the caller wants to ignore (truncated ones, DAPO's dynamic sampling) are removed
by zeroing their rows in `completion_mask`; nothing here looks at lengths.

Aggregations (a closed catalogue) differ in how tokens are weighted:

- `"grpo"`: mean over each sequence's tokens, then over sequences (GRPO paper). Normaliser:
  the number of sequences.
- `"dapo"`: one mean over all completion tokens of the optimizer step's batch (DAPO), so long
  completions weigh more. Normaliser: the number of completion tokens of the mini-batch, over all ranks.
- `"bnpo"`: each micro-batch's token mean, averaged over the mini-batch's micro-batches (and,
  by DDP's gradient averaging, over ranks) — what TRL and verl call `bnpo`. With one micro-batch
  per optimizer step and one process it equals `"dapo"`; otherwise a micro-batch of few tokens
  weighs as much as one of many.
- `"dr_grpo"`: sum over tokens divided by the constant B*G × max_completion_length
  (Dr. GRPO https://arxiv.org/abs/2503.20783): no length bias at all.

Every aggregation is `(sum of the per-item terms) / normalizer`; `PolicyLoss.normalizers`
gives each micro-batch the denominator that makes the micro-batch losses add up to the
aggregation over the mini-batch (gradient accumulation), counted over all ranks where the
aggregation is global (DDP averages gradients over W ranks, so the count is divided by W).

Your own loss subclasses `PolicyLoss` and implements `per_token_loss`:

    class PlainPG(PolicyLoss):
        def per_token_loss(self, logprobs, old_logprobs, advantages, completion_mask):
            return -advantages[:, None] * logprobs, {}
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from r1_lightning.errors import ConfigError
from r1_lightning.rl.collectives import all_ranks_sum, world_size
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


# name -> (sum of the items being averaged, denominator of one batch)
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
    """The denominator `aggregate_loss` uses for this batch, taken whole (one micro-batch, one rank).

    Args:
        completion_mask: `[B*G, T]`, 1 on completion tokens.
        aggregation: `"grpo"` (number of sequences), `"bnpo"`/`"dapo"` (number of
            completion tokens) or `"dr_grpo"` (B*G × max_completion_length).
        max_completion_length: The constant for `"dr_grpo"` (the generation budget,
            `max_new_tokens`); defaults to T, which varies with the batch's padding.
    """
    _check_aggregation(aggregation)
    return AGGREGATIONS[aggregation][1](completion_mask.bool(), max_completion_length)


def micro_batch_normalizers(
    completion_mask: Tensor, micro_batches: list[slice], aggregation: str = "grpo", max_completion_length: int | None = None
) -> list[Tensor]:
    """One denominator per micro-batch of a mini-batch, so that the micro-batch losses add up to its loss.

    `"bnpo"`: each micro-batch's own token count times the number of micro-batches (a mean of
    per-micro-batch means), local to the rank. The others: the whole mini-batch's denominator,
    summed over all ranks and divided by their number.

    Args:
        completion_mask: `[N, T]`; rows outside `micro_batches` are ignored.
        micro_batches: Row slices of `completion_mask`; together they are the mini-batch.
        aggregation: See the module docstring.
        max_completion_length: The `"dr_grpo"` constant.
    """
    _check_aggregation(aggregation)
    mask = completion_mask.bool()
    if aggregation == "bnpo":
        return [(len(micro_batches) * mask[rows].sum().clamp(min=1)).float() for rows in micro_batches]
    mini = torch.cat([mask[rows] for rows in micro_batches])
    count = torch.as_tensor(loss_normalizer(mini, aggregation, max_completion_length), dtype=torch.float32, device=mask.device)
    if world_size() > 1:
        count = all_ranks_sum(count) / world_size()
    return [count] * len(micro_batches)


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
        normalizer: Overrides the denominator (for micro-batches: `micro_batch_normalizers`).
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


def importance_ratio(logprobs: Tensor, old_logprobs: Tensor, completion_mask: Tensor, level: str = "token") -> Tensor:
    """ρ = exp(log ρ), `[B*G, T]`, 1 outside the mask.

    log ρ is bounded at ±`LOG_RATIO_CLAMP` before exp() (as in K3): with μ > 1 a token the
    policy has moved far from π_old would give ρ = inf, a loss of inf for A < 0 and, through
    an unselected branch, a gradient of 0 · inf = NaN. Beyond e^±20 ρ is far outside any
    clip range, so only the size of an already-clipped or runaway term changes.
    """
    return importance_log_ratio(logprobs, old_logprobs, completion_mask, level).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()


def top_entropy_mask(entropy: Tensor, completion_mask: Tensor, quantile: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Keep the `quantile` fraction of completion tokens with the highest entropy ("Beyond the 80/20 rule").

    Wang et al. (https://arxiv.org/abs/2506.01939) find that the policy gradient of the ~20%
    highest-entropy "forking" tokens carries RLVR's gains. The threshold is the (1 - quantile)
    quantile (linear interpolation, `torch.quantile`) of the entropies of the batch's completion
    tokens; a token is kept when its entropy is at least that threshold.

    Args:
        entropy: `[B*G, T]` per-token entropy of π_θ (detached).
        completion_mask: `[B*G, T]`.
        quantile: ρ in (0, 1]; 1 keeps every token.

    Returns:
        The keep mask `[B*G, T]` bool (False outside `completion_mask`) and metrics
        `entropy_kept`, `entropy_dropped` (mean entropy of each set; 0 when empty) and
        `entropy_kept_frac`.
    """
    mask = completion_mask.bool()
    values = entropy.detach()[mask].float()
    if values.numel() == 0 or quantile >= 1.0:
        keep = mask
    else:
        threshold = torch.quantile(values, 1.0 - quantile)
        keep = mask & (entropy.detach() >= threshold)
    dropped = mask & ~keep
    metrics = {
        "entropy_kept": masked_mean(entropy.detach(), keep),
        "entropy_dropped": masked_mean(entropy.detach(), dropped),
        "entropy_kept_frac": keep.sum() / mask.sum().clamp(min=1),
    }
    return keep, metrics


def entropy_bonus_surrogate(logprobs: Tensor, old_logprobs: Tensor, entropy: Tensor) -> Tensor:
    """Per token: the entropy H_t in value, an unbiased estimate of ∇H_t in gradient, `[B*G, T]`.

    The log-prob kernel gives H_t = -Σ_a π(a) log π(a) without a gradient, so the gradient comes
    from the sampled token a_t alone: ∇H_t = -E_{a~π}[(log π(a) + H_t) ∇log π(a)] (the score
    function; H_t is a baseline, since E[∇log π] = 0), estimated by -ρ (log π(a_t) + H_t) ∇log π(a_t)
    with the importance weight ρ = π/π_old (detached; 1 at μ = 1) for tokens drawn from π_old.
    This is the gradient PPO's entropy bonus follows, in expectation.
    """
    lp = logprobs.detach()
    rho = (lp - old_logprobs.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()  # [B*G, T]
    h = entropy.detach().to(logprobs.dtype)
    return h - rho * (lp + h) * (logprobs - lp)  # [B*G, T]


def _check_shapes(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, completion_mask: Tensor) -> None:
    # A [B*G, 1] advantage would silently broadcast to [B*G, B*G, T].
    if not (logprobs.shape == old_logprobs.shape == completion_mask.shape and advantages.shape == logprobs.shape[:1]):
        shapes = ", ".join(str(tuple(t.shape)) for t in (logprobs, old_logprobs, completion_mask, advantages))
        raise ValueError(
            f"policy_loss expects logprobs, old_logprobs, completion_mask [B*G, T] and advantages [B*G]; got {shapes}"
        )


class PolicyLoss:
    """A policy loss: a per-token surrogate (subclasses) plus what every surrogate shares (here).

    Subclasses implement `per_token_loss`. `__call__` weights its terms (sampler correction,
    top-entropy mask), adds the entropy bonus and the KL term, and aggregates.

    Args:
        aggregation: `"grpo"`, `"bnpo"`, `"dapo"` or `"dr_grpo"` (module docstring).
        top_entropy_quantile: Train only on this fraction of the completion tokens with the
            highest entropy (https://arxiv.org/abs/2506.01939; 0.2 there); 1.0 = every token.
            The dropped tokens still count in the aggregation's denominator (as in TRL); the entropy
            threshold is taken over the completion tokens of each call (in GRPO: each micro-batch, per rank).
        entropy_coef: Weight of an entropy bonus (loss -= coef · aggregated entropy); 0 = off.
    """

    def __init__(self, aggregation: str = "grpo", top_entropy_quantile: float = 1.0, entropy_coef: float = 0.0) -> None:
        if aggregation not in AGGREGATIONS:
            raise ConfigError(f"loss_aggregation={aggregation!r}: choose one of {', '.join(AGGREGATIONS)}")
        if not 0.0 < top_entropy_quantile <= 1.0:
            raise ConfigError(f"top_entropy_quantile={top_entropy_quantile}: must be in (0, 1]")
        if entropy_coef < 0:
            raise ConfigError(f"entropy_coef={entropy_coef}: must be >= 0")
        self.aggregation = aggregation
        self.top_entropy_quantile = top_entropy_quantile
        self.entropy_coef = entropy_coef

    def per_token_loss(
        self, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, completion_mask: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The surrogate to minimise per token.

        Args:
            logprobs: log π_θ of the completion tokens, `[B*G, T]`, with grad.
            old_logprobs: log π_old, `[B*G, T]`, detached (`logprobs.detach()` at μ = 1).
            advantages: One per completion, `[B*G]`.
            completion_mask: `[B*G, T]` bool.

        Returns:
            `[B*G, T]` per-token loss (anything outside the mask is ignored) and detached
            metrics (means over completion tokens, e.g. `clip_ratio`).
        """
        raise NotImplementedError

    def normalizers(
        self, completion_mask: Tensor, micro_batches: list[slice], max_completion_length: int | None = None
    ) -> list[Tensor]:
        """One loss denominator per micro-batch of a mini-batch (see `micro_batch_normalizers`)."""
        return micro_batch_normalizers(completion_mask, micro_batches, self.aggregation, max_completion_length)

    def __call__(
        self,
        logprobs: Tensor,
        old_logprobs: Tensor,
        advantages: Tensor,
        completion_mask: Tensor,
        *,
        penalty: Tensor | None = None,
        entropy: Tensor | None = None,
        token_weights: Tensor | None = None,
        normalizer: float | Tensor | None = None,
        max_completion_length: int | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The scalar loss of a (micro-)batch and its metrics.

        Args:
            logprobs: log π_θ, `[B*G, T]`, with grad.
            old_logprobs: log π_old, `[B*G, T]`, detached.
            advantages: `[B*G]`.
            completion_mask: `[B*G, T]`, 1 on tokens that count.
            penalty: Per-token term added to the loss unweighted, `[B*G, T]` (β·KL from `KLPenalty.loss_term`).
            entropy: Per-token entropy of π_θ, `[B*G, T]`; needed by the entropy options.
            token_weights: `[B*G, T]` detached, non-negative weights of the surrogate per token
                (e.g. `r1_lightning.rl.sampler_correction.sampler_weights`).
            normalizer: The aggregation's denominator (micro-batching, DDP: `normalizers`).
            max_completion_length: The `"dr_grpo"` constant (defaults to T) when `normalizer` is None.

        Returns:
            The loss and detached metrics: `policy_loss` (the weighted surrogate alone, aggregated
            like the loss), the subclass's metrics and, with the entropy options, `entropy_kept`,
            `entropy_dropped`, `entropy_kept_frac` and `entropy_bonus`.
        """
        _check_shapes(logprobs, old_logprobs, advantages, completion_mask)
        mask = completion_mask.bool()
        per_token, metrics = self.per_token_loss(logprobs, old_logprobs, advantages, mask)  # [B*G, T]
        if (self.top_entropy_quantile < 1.0 or self.entropy_coef > 0) and entropy is None:
            raise ValueError("top_entropy_quantile < 1 and entropy_coef > 0 need the per-token entropy")
        if self.top_entropy_quantile < 1.0:
            keep, entropy_metrics = top_entropy_mask(entropy, mask, self.top_entropy_quantile)
            token_weights = keep.to(per_token.dtype) if token_weights is None else token_weights * keep
            metrics.update(entropy_metrics)
        if token_weights is not None:
            per_token = per_token * token_weights  # weights ≥ 0 and detached
        loss_per_token = per_token
        if self.entropy_coef > 0:
            bonus = entropy_bonus_surrogate(logprobs, old_logprobs, entropy)  # [B*G, T]
            loss_per_token = loss_per_token - self.entropy_coef * bonus
            metrics["entropy_bonus"] = masked_mean(entropy.detach(), mask)
        if penalty is not None:
            loss_per_token = loss_per_token + penalty
        loss = aggregate_loss(loss_per_token, mask, self.aggregation, normalizer, max_completion_length)
        with torch.no_grad():
            metrics["policy_loss"] = aggregate_loss(per_token, mask, self.aggregation, normalizer, max_completion_length)
        return loss, {k: v.detach() for k, v in metrics.items()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


class ClippedLoss(PolicyLoss):
    """PPO/GRPO's clipped surrogate: -min(ρA, clip(ρ, 1-ε_low, 1+ε_high)A) per token.

    Covers GRPO (https://arxiv.org/abs/2402.03300), DAPO's clip-higher (`epsilon_high`,
    https://arxiv.org/abs/2503.14476) and GSPO (`ratio_level="sequence"`, https://arxiv.org/abs/2507.18071).

    Args:
        epsilon: Lower clip range ε_low.
        epsilon_high: Upper clip range ε_high; default `epsilon`.
        ratio_level: `"token"` ratios, or `"sequence"` (GSPO).
        aggregation: See `PolicyLoss`.
        top_entropy_quantile: See `PolicyLoss`.
        entropy_coef: See `PolicyLoss`.
    """

    def __init__(
        self,
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        ratio_level: str = "token",
        aggregation: str = "grpo",
        top_entropy_quantile: float = 1.0,
        entropy_coef: float = 0.0,
    ) -> None:
        super().__init__(aggregation, top_entropy_quantile, entropy_coef)
        if ratio_level not in ("token", "sequence"):
            raise ConfigError(f"importance_level={ratio_level!r}: choose token or sequence")
        self.epsilon = epsilon
        self.epsilon_high = epsilon if epsilon_high is None else epsilon_high
        self.ratio_level = ratio_level

    def per_token_loss(self, logprobs, old_logprobs, advantages, completion_mask):
        ratio = importance_ratio(logprobs, old_logprobs, completion_mask, self.ratio_level)  # [B*G, T]
        adv = advantages.unsqueeze(-1).to(ratio.dtype)  # [B*G, 1]
        clipped_ratio = ratio.clamp(1.0 - self.epsilon, 1.0 + self.epsilon_high)  # [B*G, T]
        per_token = -torch.min(ratio * adv, clipped_ratio * adv)  # [B*G, T]
        with torch.no_grad():
            low = (ratio < 1.0 - self.epsilon) & (adv < 0)  # [B*G, T]: gradient cut by the lower bound
            high = (ratio > 1.0 + self.epsilon_high) & (adv > 0)  # [B*G, T]: cut by the upper bound
            metrics = {
                "clip_ratio": masked_mean((low | high).float(), completion_mask),
                "clip_ratio_low": masked_mean(low.float(), completion_mask),
                "clip_ratio_high": masked_mean(high.float(), completion_mask),
                "ratio_mean": masked_mean(ratio, completion_mask),
            }
        return per_token, metrics


class CISPOLoss(PolicyLoss):
    """CISPO (MiniMax-M1, https://arxiv.org/abs/2506.13585, eq. 4): clip the importance weight, not the update.

    Per token: -sg(clip(ρ_t, 1 - ε_low, 1 + ε_high)) · A_i · log π_θ(o_t), with sg the stop-gradient,
    so every token keeps a gradient (A ∇log π scaled by the bounded weight), including the rare
    "fork" tokens PPO's clipping silences after the first update. The paper sets no lower bound
    (ε_low large) and tunes only ε_high, and normalises by the total token count of the batch
    (`aggregation="dapo"`, the default here).

    Args:
        epsilon_high: Upper bound of the weight is 1 + ε_high; default 0.28, DAPO's clip-higher value (the
            paper gives no number; tune it).
        epsilon_low: Lower bound 1 - ε_low; None = no lower bound (the paper's setting).
        aggregation: See `PolicyLoss`; default `"dapo"` (the paper's 1/Σ|o_i|).
        top_entropy_quantile: See `PolicyLoss`.
        entropy_coef: See `PolicyLoss`.
    """

    def __init__(
        self,
        epsilon_high: float = 0.28,
        epsilon_low: float | None = None,
        aggregation: str = "dapo",
        top_entropy_quantile: float = 1.0,
        entropy_coef: float = 0.0,
    ) -> None:
        super().__init__(aggregation, top_entropy_quantile, entropy_coef)
        if epsilon_high < 0 or (epsilon_low is not None and epsilon_low < 0):
            raise ConfigError(f"CISPOLoss: epsilon_high={epsilon_high} and epsilon_low={epsilon_low} must be >= 0")
        self.epsilon_high = epsilon_high
        self.epsilon_low = epsilon_low

    def per_token_loss(self, logprobs, old_logprobs, advantages, completion_mask):
        ratio = importance_ratio(logprobs, old_logprobs, completion_mask).detach()  # [B*G, T]
        low = None if self.epsilon_low is None else 1.0 - self.epsilon_low
        weight = ratio.clamp(min=low, max=1.0 + self.epsilon_high)  # [B*G, T], sg(r̂)
        per_token = -weight * advantages.unsqueeze(-1).to(weight.dtype) * logprobs  # [B*G, T]
        metrics = {
            "clip_ratio": masked_mean((weight != ratio).float(), completion_mask),
            "ratio_mean": masked_mean(ratio, completion_mask),
        }
        return per_token, metrics


class SAPOLoss(PolicyLoss):
    """SAPO (Soft Adaptive Policy Optimization, Qwen, https://arxiv.org/abs/2511.20347): a soft gate instead of clipping.

    Per token: -f(ρ_t) · A_i with f(x) = σ(τ (x - 1)) · 4/τ, τ = τ_pos where A > 0 and τ_neg where
    A < 0. f(1) = 2/τ in value and f'(1) = 1, so on-policy the gradient is GRPO's; away from
    ρ = 1 the gradient weight 4σ(1-σ) decays smoothly instead of dropping to 0 at a clip boundary.
    τ_neg > τ_pos damps negative-advantage tokens faster (the paper: 1.0 and 1.05). The paper
    averages over each sequence's tokens, then over the group (`aggregation="grpo"`).

    Args:
        tau_pos: Gate temperature for positive advantages.
        tau_neg: Gate temperature for negative advantages.
        aggregation: See `PolicyLoss`; default `"grpo"`.
        top_entropy_quantile: See `PolicyLoss`.
        entropy_coef: See `PolicyLoss`.
    """

    def __init__(
        self,
        tau_pos: float = 1.0,
        tau_neg: float = 1.05,
        aggregation: str = "grpo",
        top_entropy_quantile: float = 1.0,
        entropy_coef: float = 0.0,
    ) -> None:
        super().__init__(aggregation, top_entropy_quantile, entropy_coef)
        if tau_pos <= 0 or tau_neg <= 0:
            raise ConfigError(f"SAPOLoss: tau_pos={tau_pos} and tau_neg={tau_neg} must be > 0")
        self.tau_pos = tau_pos
        self.tau_neg = tau_neg

    def per_token_loss(self, logprobs, old_logprobs, advantages, completion_mask):
        ratio = importance_ratio(logprobs, old_logprobs, completion_mask)  # [B*G, T]
        adv = advantages.unsqueeze(-1).to(ratio.dtype)  # [B*G, 1]
        tau = torch.where(adv > 0, self.tau_pos, self.tau_neg).to(ratio.dtype)  # [B*G, 1]
        gate = torch.sigmoid(tau * (ratio - 1.0))  # [B*G, T]
        per_token = -gate * (4.0 / tau) * adv  # [B*G, T]
        with torch.no_grad():
            metrics = {
                "gate_gradient_weight": masked_mean(4.0 * gate * (1.0 - gate), completion_mask),  # 1 on-policy
                "ratio_mean": masked_mean(ratio, completion_mask),
            }
        return per_token, metrics


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
    """The clipped surrogate loss of GRPO as one function: `ClippedLoss(...)(...)` with a KL term.

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
    _check_aggregation(aggregation)
    if ratio_level not in ("token", "sequence"):
        raise ValueError(f"importance ratio level={ratio_level!r} must be 'token' or 'sequence'")
    loss_fn = ClippedLoss(epsilon_low, epsilon_high, ratio_level, aggregation)
    penalty = None if kl is None else beta * kl
    loss, metrics = loss_fn(
        logprobs, old_logprobs, advantages, completion_mask, penalty=penalty, token_weights=token_weights,
        normalizer=normalizer, max_completion_length=max_completion_length,
    )
    if kl is not None:
        metrics["kl"] = masked_mean(kl.detach(), completion_mask.bool())
    return loss, metrics
