import math

import pytest
import torch

from r1_lightning.rl.kl import K3
from r1_lightning.rl.losses import aggregate_loss, importance_log_ratio, loss_normalizer, policy_loss

# Two completions of 2 and 3 tokens (T = 3), advantages [2, -1]. At μ = 1 every ratio is 1,
# so the per-token loss is -A: [-2, -2, pad] and [1, 1, 1].
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])
ADVANTAGES = torch.tensor([2.0, -1.0])


def _leaf(values):
    return torch.tensor(values, requires_grad=True)


@pytest.mark.parametrize(
    ("aggregation", "max_len", "expected_loss", "expected_grad"),
    [
        # grpo: mean over each sequence then over sequences: (-2 + 1) / 2 = -0.5;
        #   d/d logp_it = -A_i / (n_i · B): -2 / (2·2) = -0.5 and 1 / (3·2) = 1/6.
        ("grpo", None, -0.5, [[-0.5, -0.5, 0.0], [1 / 6, 1 / 6, 1 / 6]]),
        # bnpo / dapo: one mean over the 5 tokens: (-2·2 + 1·3) / 5 = -0.2;  grad -A_i / 5.
        ("bnpo", None, -0.2, [[-0.4, -0.4, 0.0], [0.2, 0.2, 0.2]]),
        ("dapo", None, -0.2, [[-0.4, -0.4, 0.0], [0.2, 0.2, 0.2]]),
        # dr_grpo: token sum over B · L = 2 · 4: (-4 + 3) / 8 = -0.125;  grad -A_i / 8.
        ("dr_grpo", 4, -0.125, [[-0.25, -0.25, 0.0], [0.125, 0.125, 0.125]]),
        # dr_grpo without max_completion_length uses T = 3: -1 / 6;  grad -A_i / 6.
        ("dr_grpo", None, -1 / 6, [[-1 / 3, -1 / 3, 0.0], [1 / 6, 1 / 6, 1 / 6]]),
    ],
)
def test_aggregations_at_mu_1(aggregation, max_len, expected_loss, expected_grad):
    logprobs = _leaf([[-1.0, -2.0, -9.0], [-0.5, -1.5, -0.1]])
    loss, metrics = policy_loss(
        logprobs, logprobs.detach(), ADVANTAGES, MASK, aggregation=aggregation, max_completion_length=max_len
    )
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(expected_loss))
    # ρ = exp(logp - logp.detach()) is exactly 1, so ∇ρ = ∇logp and the gradient is -A ∇logp / normaliser.
    torch.testing.assert_close(logprobs.grad, torch.tensor(expected_grad))
    assert metrics["ratio_mean"].item() == 1.0
    assert metrics["clip_ratio"].item() == 0.0
    torch.testing.assert_close(metrics["policy_loss"], torch.tensor(expected_loss))
    assert "kl" not in metrics


# One completion of 4 tokens with ratios ρ = [0.5, 0.9, 1.1, 1.5] and ε = 0.2 (band [0.8, 1.2]).
RATIOS = torch.tensor([[0.5, 0.9, 1.1, 1.5]])


def _clip_case(advantage, **kwargs):
    old = torch.tensor([[-1.0, -2.0, -3.0, -4.0]])
    logprobs = (old + RATIOS.log()).requires_grad_()
    loss, metrics = policy_loss(
        logprobs, old, torch.tensor([advantage]), torch.ones(1, 4), epsilon_low=0.2, aggregation="bnpo", **kwargs
    )
    loss.backward()
    return loss, metrics, logprobs.grad


def test_clipping_with_positive_advantage():
    # A = +1: min(ρ, clip(ρ)) = [0.5, 0.9, 1.1, min(1.5, 1.2) = 1.2]; only ρ = 1.5 is clipped
    # (ρ = 0.5 < 0.8 is not: for A > 0 the unclipped term is already the smaller one).
    # loss = -(0.5 + 0.9 + 1.1 + 1.2) / 4 = -0.925; grad = -ρ / 4 where unclipped, 0 where clipped.
    loss, metrics, grad = _clip_case(1.0)
    torch.testing.assert_close(loss, torch.tensor(-0.925))
    torch.testing.assert_close(grad, torch.tensor([[-0.125, -0.225, -0.275, 0.0]]))
    assert metrics["clip_ratio"].item() == 0.25 and metrics["clip_ratio_high"].item() == 0.25
    assert metrics["clip_ratio_low"].item() == 0.0
    torch.testing.assert_close(metrics["ratio_mean"], torch.tensor(1.0))  # (0.5 + 0.9 + 1.1 + 1.5) / 4


def test_clipping_with_negative_advantage():
    # A = -1: min(-ρ, -clip(ρ)) = -max(ρ, clip(ρ)) = -[0.8, 0.9, 1.1, 1.5]; only ρ = 0.5 is clipped.
    # loss = (0.8 + 0.9 + 1.1 + 1.5) / 4 = 1.075; grad = ρ / 4 where unclipped.
    loss, metrics, grad = _clip_case(-1.0)
    torch.testing.assert_close(loss, torch.tensor(1.075))
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.225, 0.275, 0.375]]))
    assert metrics["clip_ratio"].item() == 0.25 and metrics["clip_ratio_low"].item() == 0.25
    assert metrics["clip_ratio_high"].item() == 0.0


def test_clip_higher():
    # DAPO ε_high = 0.6: band [0.8, 1.6] contains 1.5, nothing is clipped for A = +1:
    # loss = -(0.5 + 0.9 + 1.1 + 1.5) / 4 = -1.0.
    loss, metrics, _ = _clip_case(1.0, epsilon_high=0.6)
    torch.testing.assert_close(loss, torch.tensor(-1.0))
    assert metrics["clip_ratio"].item() == 0.0


def test_kl_in_the_loss():
    # One completion, 2 tokens + padding, A = 1, ρ = 1, KL = [0.2, 0.4, 99 (padding)], β = 0.1:
    # per token: -1 + 0.1·0.2 = -0.98 and -1 + 0.1·0.4 = -0.96 → token mean -0.97.
    logprobs = _leaf([[-1.0, -1.0, -1.0]])
    kl = torch.tensor([[0.2, 0.4, 99.0]])
    loss, metrics = policy_loss(
        logprobs, logprobs.detach(), torch.tensor([1.0]), torch.tensor([[1, 1, 0]]), kl=kl, beta=0.1, aggregation="bnpo"
    )
    torch.testing.assert_close(loss, torch.tensor(-0.97))
    torch.testing.assert_close(metrics["policy_loss"], torch.tensor(-1.0))
    torch.testing.assert_close(metrics["kl"], torch.tensor(0.3))  # (0.2 + 0.4) / 2


def test_sequence_level_ratio_gspo():
    # Token log-ratios [0.1, 0.3] (third position is padding with a garbage ratio):
    # log ρ = mean = 0.2, ρ = e^0.2 = 1.2214028 on both tokens.
    old = torch.tensor([[-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0]])

    def run(eps):
        logprobs = (old + torch.tensor([[0.1, 0.3, 5.0]])).requires_grad_()
        loss, metrics = policy_loss(
            logprobs, old, torch.tensor([1.0]), mask, epsilon_low=eps, ratio_level="sequence"
        )
        loss.backward()
        return loss, metrics, logprobs.grad

    # ε = 0.3: not clipped, loss = -ρ; dρ/d logp_t = ρ / 2 (mean over 2 tokens) → grad = -ρ / 2.
    rho = math.exp(0.2)
    loss, metrics, grad = run(0.3)
    torch.testing.assert_close(loss, torch.tensor(-rho))
    torch.testing.assert_close(grad, torch.tensor([[-rho / 2, -rho / 2, 0.0]]))
    torch.testing.assert_close(metrics["ratio_mean"], torch.tensor(rho))
    # ε = 0.2: ρ > 1.2 with A > 0 → clipped on every token: loss = -1.2, no gradient.
    loss, metrics, grad = run(0.2)
    torch.testing.assert_close(loss, torch.tensor(-1.2))
    torch.testing.assert_close(grad, torch.zeros(1, 3))
    assert metrics["clip_ratio"].item() == 1.0


def test_sequence_level_at_mu_1_equals_token_level():
    logprobs = _leaf([[-1.0, -2.0, -9.0], [-0.5, -1.5, -0.1]])
    grads = []
    for level in ("token", "sequence"):
        loss, _ = policy_loss(logprobs, logprobs.detach(), ADVANTAGES, MASK, ratio_level=level)
        grads.append(torch.autograd.grad(loss, logprobs)[0])
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("aggregation", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_micro_batches_with_the_full_normalizer_sum_to_the_full_batch(aggregation):
    gen = torch.Generator().manual_seed(0)
    logprobs = (-2 * torch.rand(6, 5, generator=gen)).requires_grad_()
    old = logprobs.detach() + 0.3 * torch.randn(6, 5, generator=gen)  # μ > 1: some tokens clip
    advantages = torch.randn(6, generator=gen)
    mask = (torch.rand(6, 5, generator=gen) < 0.7).long()
    kl = K3()(logprobs, torch.zeros(6, 5))  # [6, 5], with grad
    kwargs = dict(aggregation=aggregation, max_completion_length=8, beta=0.05)

    full, _ = policy_loss(logprobs, old, advantages, mask, kl=kl, **kwargs)
    (full_grad,) = torch.autograd.grad(full, logprobs, retain_graph=True)

    normalizer = loss_normalizer(mask, aggregation, max_completion_length=8)
    parts = [slice(0, 2), slice(2, 3), slice(3, 6)]  # uneven micro-batches
    micro = sum(
        policy_loss(logprobs[p], old[p], advantages[p], mask[p], kl=kl[p], normalizer=normalizer, **kwargs)[0]
        for p in parts
    )
    (micro_grad,) = torch.autograd.grad(micro, logprobs, retain_graph=True)
    torch.testing.assert_close(micro, full)
    torch.testing.assert_close(micro_grad, full_grad)
    # Each micro-batch normalised by its own size would not add up to the full batch.
    local = sum(policy_loss(logprobs[p], old[p], advantages[p], mask[p], kl=kl[p], **kwargs)[0] for p in parts)
    assert not torch.allclose(local, full)


def test_padding_garbage_does_not_leak():
    # -inf log-probs and NaN KL at padding: the loss and its gradient stay finite.
    logprobs = _leaf([[-1.0, float("-inf")], [-0.5, -0.7]])
    kl = torch.tensor([[0.1, float("nan")], [0.2, 0.3]])
    mask = torch.tensor([[1, 0], [1, 1]])
    for level in ("token", "sequence"):
        loss, metrics = policy_loss(logprobs, torch.full((2, 2), -1.0), ADVANTAGES, mask, kl=kl, beta=0.1, ratio_level=level)
        (grad,) = torch.autograd.grad(loss, logprobs)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert grad[0, 1] == 0 and all(torch.isfinite(v) for v in metrics.values())


def test_empty_completion_counts_as_zero():
    # A completion with no tokens adds 0 to the grpo sum but still counts as a sequence:
    # (-A_0 · 1 + 0) / 2 with A_0 = 2 → -1.
    logprobs = _leaf([[-1.0, -1.0], [-1.0, -1.0]])
    loss, _ = policy_loss(logprobs, logprobs.detach(), ADVANTAGES, torch.tensor([[1, 1], [0, 0]]))
    torch.testing.assert_close(loss, torch.tensor(-1.0))


def test_helpers_and_errors():
    assert loss_normalizer(MASK, "grpo") == 2
    assert loss_normalizer(MASK, "dapo").item() == 5
    assert loss_normalizer(MASK, "dr_grpo", max_completion_length=10) == 20
    # aggregate_loss with an explicit normaliser: (1 + 2 + 4 + 5 + 6) / 9 = 2
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    torch.testing.assert_close(aggregate_loss(values, MASK, "bnpo", normalizer=9), torch.tensor(2.0))
    with pytest.raises(ValueError, match="'seq_mean'"):
        aggregate_loss(values, MASK, "seq_mean")
    with pytest.raises(ValueError, match=r"advantages \[B\*G\]; got \(2, 3\), \(2, 3\), \(2, 3\), \(2, 1\)"):
        policy_loss(values, values, ADVANTAGES[:, None], MASK)
    with pytest.raises(ValueError, match="'group'"):
        importance_log_ratio(values, values, MASK, level="group")


def test_extreme_ratio_is_bounded_at_e_to_the_20_by_hand():
    # μ > 1 with π_θ and π_old 1e4 nats apart on one token (one completion, one token, grpo).
    # A = -1: log ρ = +1e4 is clamped to 20, the unclipped branch wins: loss = -min(ρA, clip(ρ)A) = e^20
    # (not inf). A = +1: log ρ = +1e4 → ρ = e^20 > 1 + ε, the clipped branch (1.2) wins: loss = -1.2,
    # and its gradient is exactly 0, not 0 · inf = NaN from the unselected branch.
    # A = +1 with log ρ = -1e4: ρ = e^-20, the unclipped branch ρA wins: loss = -e^-20, gradient -e^-20 · 0 (clamped) = 0.
    mask = torch.tensor([[1]])
    for gap, advantage, expected in [(1e4, -1.0, math.exp(20)), (1e4, 1.0, -1.2), (-1e4, 1.0, -math.exp(-20))]:
        logprobs = _leaf([[0.0]])
        loss, metrics = policy_loss(logprobs, torch.tensor([[-gap]]), torch.tensor([advantage]), mask)
        (grad,) = torch.autograd.grad(loss, logprobs)
        torch.testing.assert_close(loss, torch.tensor(expected))
        assert torch.equal(grad, torch.zeros(1, 1)) and all(torch.isfinite(v) for v in metrics.values())
