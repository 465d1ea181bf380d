"""Importance weights that correct for a sampler whose probabilities are not the trainer's.

An inference engine (vLLM) samples with other kernels and often another precision than the trainer,
so the completions come from π_sampler, not from π_old, the trainer's policy before the update.
The policy gradient is then biased; weighting each term by ρ = π_old / π_sampler removes the bias
(Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training",
https://fengyao.notion.site/off-policy-rl; Liu et al. 2025, "When Speed Kills Stability"). ρ is
taken per token, or per sequence (the product over the sequence's tokens), and bounded at a
threshold C to keep the variance down:

- ``tis`` (truncated importance sampling): weight = min(ρ, C);
- ``mis`` (masked importance sampling): weight = ρ where ρ <= C, else 0 (the term is dropped).

With identical log-probs ρ = 1 everywhere and the weights are exactly 1.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from r1_lightning.rl.masked import masked_mean

CorrectionMode = Literal["tis", "mis", "none"]
CorrectionLevel = Literal["token", "sequence"]
# log ρ is clamped before exp(): a sequence-level sum over hundreds of tokens can overflow float32.
LOG_RATIO_LIMIT = 20.0


def sampler_weights(
    old_logprobs: Tensor,
    sampler_logprobs: Tensor,
    completion_mask: Tensor,
    mode: CorrectionMode = "tis",
    level: CorrectionLevel = "token",
    threshold: float = 2.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token importance weights π_old / π_sampler, truncated or masked at ``threshold``.

    Args:
        old_logprobs: `[B*G, T]` the trainer's log-probs of the sampled tokens (detached).
        sampler_logprobs: `[B*G, T]` the sampler's log-probs of the same tokens.
        completion_mask: `[B*G, T]`, 1 on tokens that count.
        mode: ``tis`` (truncate at the threshold), ``mis`` (drop terms above it) or ``none`` (weights 1, metrics only).
        level: ``token`` (one ratio per token) or ``sequence`` (one ratio per completion, the
            product of its tokens' ratios, shared by its tokens).
        threshold: C, the largest weight kept.

    Returns:
        `[B*G, T]` detached weights (0 outside the mask) and the metrics ``sampler_logprob_diff``
        (mean |log π_old - log π_sampler| per token), ``sampler_is_ratio_mean`` / ``_max`` (ρ over
        tokens or sequences, before bounding) and ``sampler_masked_frac`` (share of tokens or
        sequences with ρ > C: dropped under ``mis``, truncated under ``tis``).
    """
    if mode not in ("tis", "mis", "none"):
        raise ValueError(f"sampler correction mode={mode!r} must be 'tis', 'mis' or 'none'")
    if level not in ("token", "sequence"):
        raise ValueError(f"sampler correction level={level!r} must be 'token' or 'sequence'")
    mask = completion_mask.bool()
    with torch.no_grad():
        log_ratio = torch.where(mask, old_logprobs.float() - sampler_logprobs.float(), torch.zeros((), device=mask.device))  # [B*G, T]
        if level == "token":
            ratio, units = log_ratio.clamp(max=LOG_RATIO_LIMIT).exp(), mask  # [B*G, T]
        else:
            ratio = log_ratio.sum(-1, keepdim=True).clamp(max=LOG_RATIO_LIMIT).exp().expand_as(log_ratio)  # [B*G, T]
            units = torch.zeros_like(mask)
            units[:, 0] = mask.any(-1)  # one entry per non-empty sequence for the ratio statistics
        above = ratio > threshold  # [B*G, T]
        if mode == "tis":
            weights = ratio.clamp(max=threshold)
        elif mode == "mis":
            weights = torch.where(above, torch.zeros_like(ratio), ratio)
        else:
            weights = torch.ones_like(ratio)
        weights = torch.where(mask, weights, torch.zeros_like(weights))
        metrics = {
            "sampler_logprob_diff": masked_mean(log_ratio.abs(), mask),
            "sampler_is_ratio_mean": masked_mean(ratio, units),
            "sampler_is_ratio_max": torch.where(units, ratio, torch.zeros_like(ratio)).max(),
            "sampler_masked_frac": masked_mean(above.float(), units),
        }
    return weights, metrics
