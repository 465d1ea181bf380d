"""Per-token estimators of KL(π_θ ‖ π_ref) from the log-probs of sampled tokens.

Tokens are sampled from π_θ (or π_old ≈ π_θ), so with r = π_ref(o_t) / π_θ(o_t)
(see http://joschu.net/blog/kl-approx.html):

- `k1` = -log r: unbiased, high variance, negative on some tokens.
- `k2` = ½ (log r)²: biased, low variance, always ≥ 0.
- `k3` = r - log r - 1: unbiased and always ≥ 0; used by DeepSeekMath / DeepSeek-R1
  (https://arxiv.org/abs/2402.03300, eq. 4).

An estimator is a small object, so users plug in their own by `class_path`:

    class Clipped(KLEstimator):
        name = "k3_clipped"
        def __call__(self, logprobs, ref_logprobs):
            return K3()(logprobs, ref_logprobs).clamp(max=10.0)

Where the estimate goes (the loss, GRPO/R1, or the reward, PPO-style), with which β,
is a `KLPenalty` (also chosen by `class_path`); `kl_reward_penalty` serves the reward placement.
"""

from __future__ import annotations

import torch
from torch import Tensor

from r1_lightning.errors import ConfigError
from r1_lightning.rl.masked import masked_mean, masked_sum

# exp(20) ≈ 4.9e8 is finite in float32, bfloat16 and float16 alike. Without a bound,
# a token that π_θ has all but ruled out while π_ref still likes it gives exp(huge) =
# inf, and inf reaches the gradient even at masked positions (0 · inf = NaN).
LOG_RATIO_CLAMP = 20.0


class KLEstimator:
    """A per-token KL(π_θ ‖ π_ref) estimate from the sampled tokens' log-probs.

    Subclasses set `name` (used in logs) and implement `__call__`.
    """

    name: str = "kl"

    def __call__(self, logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
        """Return the estimate per token.

        Args:
            logprobs: log π_θ of the sampled tokens, `[B*G, T]`.
            ref_logprobs: log π_ref of the same tokens, `[B*G, T]`.

        Returns:
            The per-token estimate, `[B*G, T]`, differentiable wrt `logprobs`.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class K1(KLEstimator):
    """log π_θ - log π_ref. Unbiased; negative on some tokens."""

    name = "k1"

    def __call__(self, logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
        return logprobs - ref_logprobs  # [B*G, T]


class K2(KLEstimator):
    """½ (log π_θ - log π_ref)². Biased, low variance, ≥ 0."""

    name = "k2"

    def __call__(self, logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
        return 0.5 * (logprobs - ref_logprobs).square()  # [B*G, T]


class K3(KLEstimator):
    """π_ref/π_θ - log(π_ref/π_θ) - 1 (Schulman). Unbiased and ≥ 0; R1's choice.

    The log-ratio is clamped to ±`LOG_RATIO_CLAMP` so that exp() stays finite; outside
    that band (a probability ratio beyond e^20) the estimate stops growing and carries
    no gradient, which only ever happens to tokens the policy has already abandoned.
    """

    name = "k3"

    def __call__(self, logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
        log_ratio = (ref_logprobs - logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # [B*G, T]
        return torch.exp(log_ratio) - log_ratio - 1.0  # [B*G, T]


KL_ESTIMATORS: dict[str, type[KLEstimator]] = {"k1": K1, "k2": K2, "k3": K3}


def resolve_kl_estimator(spec: str | KLEstimator) -> KLEstimator:
    """Turn `"k1"`/`"k2"`/`"k3"` (or an estimator instance, returned as is) into an estimator."""
    if isinstance(spec, KLEstimator):
        return spec
    if isinstance(spec, str) and spec.lower() in KL_ESTIMATORS:
        return KL_ESTIMATORS[spec.lower()]()
    raise ConfigError(  # a ValueError the CLI prints as one line
        f"kl_estimator={spec!r} is not one of {sorted(KL_ESTIMATORS)}; for your own estimator pass an "
        "instance of r1_lightning.rl.kl.KLEstimator (in YAML: class_path/init_args)."
    )


def kl_reward_penalty(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    completion_mask: Tensor,
    estimator: KLEstimator,
    beta: float,
    reduction: str = "sum",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-sequence KL penalty for the PPO-style "reward" placement: `rewards - penalty`.

    `"sum"` (default) adds the per-token estimates over the completion: for `k1` and
    `k3` that is an unbiased estimate of the KL between the two sequence distributions,
    the quantity PPO-RLHF penalises, so long completions pay for every token.
    `"mean"` averages over the completion's tokens instead, which makes the penalty
    length-independent (KL per token) at the price of no longer being a sequence KL.
    The penalty is detached: rewards are not differentiated.

    Args:
        logprobs: log π_θ (or π_old) of the sampled tokens, `[B*G, T]`.
        ref_logprobs: log π_ref, `[B*G, T]`.
        completion_mask: 1 on completion tokens, `[B*G, T]`.
        estimator: The per-token estimator.
        beta: KL coefficient.
        reduction: `"sum"` or `"mean"` over each completion's tokens.

    Returns:
        `beta * KL` per sequence, `[B*G]`, and metrics `kl` (mean per-token estimate)
        and `kl_penalty` (mean penalty per sequence).
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction={reduction!r} must be 'sum' or 'mean'")
    per_token = estimator(logprobs.detach(), ref_logprobs.detach())  # [B*G, T]
    reduce = masked_sum if reduction == "sum" else masked_mean
    penalty = beta * reduce(per_token, completion_mask, dim=-1)  # [B*G]
    return penalty, {"kl": masked_mean(per_token, completion_mask), "kl_penalty": penalty.mean()}


class KLPenalty:
    """The KL-to-reference term of an RL objective: estimator, coefficient β and where it goes.

    `placement="loss"` (GRPO / DeepSeek-R1) adds β·KL_t to each token's loss;
    `placement="reward"` (PPO-RLHF) subtracts β·KL of the whole completion from its reward
    before the advantages (`kl_reward_penalty`).

    `importance_weighted` multiplies the per-token estimate by ρ_t = π_θ/π_old (in the loss,
    differentiated through ρ), TRL's `use_bias_correction_kl` (DeepSeek-V3.2,
    https://arxiv.org/abs/2512.02556). The tokens come from π_old, and the plain k3 term's gradient,
    E[∇k3] = E[(1 - π_ref/π_θ) ∇log π_θ], is in expectation the gradient of the reverse
    KL(π_ref‖π_θ), not of KL(π_θ‖π_ref); with ρ in front,
    ∇(ρ k3) at ρ = 1 is (log π_θ - log π_ref) ∇log π_θ, whose expectation is exactly ∇KL(π_θ‖π_ref).
    Our default is off (as TRL's): DeepSeekMath and R1, which this package reproduces, publish the
    plain k3 term, and turning it on changes the numbers of every run with β > 0 (2-5% of the
    gradient, measured against TRL in issue 15). Turn it on when the KL itself, rather than R1's
    published objective, is what you want to control.

    Args:
        estimator: `k1`, `k2`, `k3` or a `KLEstimator`.
        beta: β; 0 turns the penalty (and the reference model) off.
        placement: `loss` or `reward`.
        importance_weighted: Multiply the per-token estimate by ρ_t (placement `loss` only).
        reward_reduction: For placement `reward`: `sum` (sequence KL) or `mean` over the completion's tokens.
    """

    def __init__(
        self,
        estimator: str | KLEstimator = "k3",
        beta: float = 0.04,
        placement: str = "loss",
        importance_weighted: bool = False,
        reward_reduction: str = "sum",
    ) -> None:
        if beta < 0:
            raise ConfigError(f"beta={beta}: must be >= 0")
        if placement not in ("loss", "reward"):
            raise ConfigError(f"kl_placement={placement!r}: choose loss or reward")
        if reward_reduction not in ("sum", "mean"):
            raise ConfigError(f"reward_reduction={reward_reduction!r}: choose sum or mean")
        if importance_weighted and placement != "loss":
            raise ConfigError("KLPenalty(importance_weighted=True) needs placement='loss'")
        self.estimator = resolve_kl_estimator(estimator)
        self.beta = beta
        self.placement = placement
        self.importance_weighted = importance_weighted
        self.reward_reduction = reward_reduction

    def loss_term(
        self, logprobs: Tensor, old_logprobs: Tensor, ref_logprobs: Tensor, completion_mask: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """β·KL_t (× ρ_t when importance-weighted) per token, for `PolicyLoss(penalty=...)`.

        Args:
            logprobs: log π_θ, `[B*G, T]`, with grad.
            old_logprobs: log π_old, `[B*G, T]`, detached.
            ref_logprobs: log π_ref, `[B*G, T]`.
            completion_mask: `[B*G, T]`.

        Returns:
            `[B*G, T]` penalty and the metric `kl` (mean per-token estimate, unweighted).
        """
        kl = self.estimator(logprobs, ref_logprobs)  # [B*G, T]
        mask = completion_mask.bool()
        term = kl
        if self.importance_weighted:
            log_ratio = torch.where(mask, logprobs - old_logprobs, torch.zeros_like(logprobs))
            term = kl * log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()  # [B*G, T]
        return self.beta * term, {"kl": masked_mean(kl.detach(), mask)}

    def reward_penalty(self, logprobs: Tensor, ref_logprobs: Tensor, completion_mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """β·KL per completion for the `reward` placement (see `kl_reward_penalty`)."""
        return kl_reward_penalty(logprobs, ref_logprobs, completion_mask, self.estimator, self.beta, self.reward_reduction)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"
