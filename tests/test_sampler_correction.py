"""The sampler/trainer mismatch correction (`r1_lightning.rl.sampler_correction`) on hand-computed tensors."""

from __future__ import annotations

import math

import pytest
import torch

from r1_lightning.rl.losses import policy_loss
from r1_lightning.rl.sampler_correction import sampler_weights

LOG = math.log
# Row 0: two tokens, trainer probs (0.5, 0.25), sampler probs (0.25, 0.5): token ratios ρ = 2 and 0.5,
#        sequence ratio ρ = 2 × 0.5 = 1.
# Row 1: one real token, trainer 0.9, sampler 0.3: ρ = 3 (token and sequence); position 2 is padding
#        whose log-probs are garbage (-inf on the sampler's side) and must not matter.
OLD = torch.tensor([[LOG(0.5), LOG(0.25)], [LOG(0.9), 5.0]])
SAMPLER = torch.tensor([[LOG(0.25), LOG(0.5)], [LOG(0.3), -math.inf]])
MASK = torch.tensor([[1, 1], [1, 0]])


@pytest.mark.parametrize(
    "mode,level,expected",
    [
        ("tis", "token", [[2.0, 0.5], [2.0, 0.0]]),  # min(ρ, 2): 2 stays, 0.5 stays, 3 -> 2
        ("mis", "token", [[2.0, 0.5], [0.0, 0.0]]),  # ρ <= 2 kept (2 is at the threshold), 3 dropped
        ("tis", "sequence", [[1.0, 1.0], [2.0, 0.0]]),  # row 0: ρ = 1 for both tokens; row 1: min(3, 2)
        ("mis", "sequence", [[1.0, 1.0], [0.0, 0.0]]),  # row 1's whole sequence dropped
        ("none", "token", [[1.0, 1.0], [1.0, 0.0]]),  # metrics only
    ],
)
def test_weights_by_hand(mode, level, expected):
    weights, _ = sampler_weights(OLD, SAMPLER, MASK, mode=mode, level=level, threshold=2.0)
    torch.testing.assert_close(weights, torch.tensor(expected))


def test_metrics_by_hand():
    _, token = sampler_weights(OLD, SAMPLER, MASK, mode="tis", level="token", threshold=2.0)
    # |Δ log p| over the 3 real tokens: ln 2, ln 2, ln 3.
    assert token["sampler_logprob_diff"].item() == pytest.approx((2 * LOG(2) + LOG(3)) / 3, rel=1e-6)
    assert token["sampler_is_ratio_mean"].item() == pytest.approx((2 + 0.5 + 3) / 3, rel=1e-6)
    assert token["sampler_is_ratio_max"].item() == pytest.approx(3.0, rel=1e-6)
    assert token["sampler_masked_frac"].item() == pytest.approx(1 / 3)  # only ρ = 3 is above 2
    _, sequence = sampler_weights(OLD, SAMPLER, MASK, mode="mis", level="sequence", threshold=2.0)
    assert sequence["sampler_is_ratio_mean"].item() == pytest.approx((1 + 3) / 2, rel=1e-6)  # per sequence
    assert sequence["sampler_masked_frac"].item() == pytest.approx(1 / 2)


@pytest.mark.parametrize("mode", ["tis", "mis"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_identical_logprobs_give_the_identity(mode, level):
    logprobs = torch.randn(3, 5).log_softmax(-1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    weights, metrics = sampler_weights(logprobs, logprobs.clone(), mask, mode=mode, level=level, threshold=1.0)
    assert torch.equal(weights, mask.float())
    assert metrics["sampler_logprob_diff"].item() == 0.0
    assert metrics["sampler_is_ratio_mean"].item() == metrics["sampler_is_ratio_max"].item() == 1.0
    assert metrics["sampler_masked_frac"].item() == 0.0


def test_weights_scale_each_tokens_policy_gradient():
    # At μ = 1 (old = logprobs.detach()) ρ = 1, and the "grpo" aggregation (sequence means summed, over
    # 2 sequences) gives token t of row i the gradient -A_i·w_t/(3·2)·∂log π(o_t): weights of 1 change
    # nothing, a weight of 0 removes the token's gradient. Here token t of a row is vocabulary entry t of
    # the row's softmax, so ∂log π_t/∂logits_j = δ_tj - π_j.
    logits = torch.randn(2, 3, requires_grad=True)
    advantages, mask = torch.tensor([1.0, -0.5]), torch.ones(2, 3)

    def grad(weights):
        logits.grad = None
        logprobs = logits.log_softmax(-1)
        loss, _ = policy_loss(logprobs, logprobs.detach(), advantages, mask, token_weights=weights)
        loss.backward()
        return logits.grad.clone()

    plain = grad(None)
    torch.testing.assert_close(grad(torch.ones(2, 3)), plain)
    weighted = grad(torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]]))
    # d loss / d logits[0, j] sums over the row's tokens: token 0 doubled, token 1 removed.
    logprobs = logits.detach().log_softmax(-1)
    per_token = -(torch.eye(3) - logprobs.exp()[0]) * advantages[0] / 6  # row t: d(-A log π_t / 6)/d logits
    torch.testing.assert_close(weighted[0], 2 * per_token[0] + per_token[2])
    torch.testing.assert_close(weighted[1], plain[1])
