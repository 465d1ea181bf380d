import math

import pytest
import torch

from r1_lightning.rl.kl import K1, K2, K3, KLEstimator, kl_reward_penalty, resolve_kl_estimator

LOG = math.log


def test_k1_k2_k3_hand_values():
    # Token 0: π_θ = 0.5, π_ref = 0.25; token 1: π_θ = 0.25, π_ref = 0.5.
    logprobs = torch.tensor([[LOG(0.5), LOG(0.25)]])
    ref_logprobs = torch.tensor([[LOG(0.25), LOG(0.5)]])
    # k1 = log π_θ - log π_ref = ±log 2
    torch.testing.assert_close(K1()(logprobs, ref_logprobs), torch.tensor([[LOG(2), -LOG(2)]]))
    # k2 = ½ (log 2)² = 0.2402265 on both tokens
    torch.testing.assert_close(K2()(logprobs, ref_logprobs), torch.tensor([[0.2402265, 0.2402265]]))
    # k3 = r - log r - 1 with r = π_ref/π_θ:
    #   r = 0.5: 0.5 + log 2 - 1 = 0.1931472;   r = 2: 2 - log 2 - 1 = 0.3068528
    torch.testing.assert_close(K3()(logprobs, ref_logprobs), torch.tensor([[0.1931472, 0.3068528]]))


def test_k3_gradient_hand_value():
    # d/d log π_θ (r - log r - 1), r = exp(ref - logprobs): -r + 1 = 1 - π_ref/π_θ.
    # π_θ = 0.5, π_ref = 0.25 → 1 - 0.5 = 0.5.
    logprobs = torch.tensor([LOG(0.5)], requires_grad=True)
    K3()(logprobs, torch.tensor([LOG(0.25)])).sum().backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([0.5]))


def test_k3_non_negative_and_zero_when_equal():
    gen = torch.Generator().manual_seed(0)
    logprobs = -5 * torch.rand(64, 16, generator=gen)
    ref_logprobs = -5 * torch.rand(64, 16, generator=gen)
    assert (K3()(logprobs, ref_logprobs) >= 0).all()
    assert torch.equal(K3()(logprobs, logprobs), torch.zeros_like(logprobs))


def test_k3_clamps_extreme_log_ratios():
    # π_θ ≈ e^-100 where π_ref = 1: unclamped exp(100) overflows float32 to inf.
    logprobs = torch.tensor([-100.0], requires_grad=True)
    kl = K3()(logprobs, torch.tensor([0.0]))
    kl.sum().backward()
    torch.testing.assert_close(kl, torch.tensor([math.exp(20) - 20 - 1]))
    assert torch.isfinite(logprobs.grad).all()


def test_k1_and_k3_are_unbiased_estimates_of_the_exact_kl():
    # p = π_θ = [.4, .3, .2, .1], q = π_ref = [.1, .2, .3, .4]:
    # KL(p‖q) = .4 log 4 + .3 log 1.5 + .2 log(2/3) + .1 log(1/4)
    #         = .5545177 + .1216395 - .0810930 - .1386294 = 0.4564348
    p = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    q = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    exact = (p * (p / q).log()).sum()
    assert exact.item() == pytest.approx(0.4564348, abs=1e-6)
    tokens = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    logprobs, ref_logprobs = p.log()[tokens][None], q.log()[tokens][None]  # [1, N]
    # std of k3 under p is ≈ 0.5, so the standard error of the mean is ≈ 0.001.
    assert K3()(logprobs, ref_logprobs).mean().item() == pytest.approx(exact.item(), abs=0.01)
    assert K1()(logprobs, ref_logprobs).mean().item() == pytest.approx(exact.item(), abs=0.01)


def test_resolve_kl_estimator():
    assert isinstance(resolve_kl_estimator("k1"), K1)
    assert isinstance(resolve_kl_estimator("K3"), K3)
    assert [resolve_kl_estimator(n).name for n in ("k1", "k2", "k3")] == ["k1", "k2", "k3"]

    class Halved(KLEstimator):
        name = "halved_k3"

        def __call__(self, logprobs, ref_logprobs):
            return 0.5 * K3()(logprobs, ref_logprobs)

    custom = Halved()
    assert resolve_kl_estimator(custom) is custom
    with pytest.raises(ValueError, match=r"kl_estimator='k4'.*\['k1', 'k2', 'k3'\]"):
        resolve_kl_estimator("k4")


def test_kl_reward_penalty_sum_and_mean():
    # k1 per token = logprobs - ref = [[.1, .3, 9], [.2, .2, .2]]; the 9 sits on padding.
    logprobs = torch.tensor([[0.1, 0.3, 9.0], [0.2, 0.2, 0.2]], requires_grad=True)
    ref_logprobs = torch.zeros(2, 3)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # sum:  β · [.1 + .3, .2 · 3] = 0.5 · [.4, .6] = [.2, .3]
    penalty, metrics = kl_reward_penalty(logprobs, ref_logprobs, mask, K1(), beta=0.5)
    torch.testing.assert_close(penalty, torch.tensor([0.2, 0.3]))
    assert not penalty.requires_grad
    # kl = mean over the 5 completion tokens = (.4 + .6) / 5 = .2; kl_penalty = mean(.2, .3)
    torch.testing.assert_close(metrics["kl"], torch.tensor(0.2))
    torch.testing.assert_close(metrics["kl_penalty"], torch.tensor(0.25))
    # mean: β · [.4 / 2, .6 / 3] = 0.5 · [.2, .2] = [.1, .1]
    penalty, _ = kl_reward_penalty(logprobs, ref_logprobs, mask, K1(), beta=0.5, reduction="mean")
    torch.testing.assert_close(penalty, torch.tensor([0.1, 0.1]))
    with pytest.raises(ValueError, match="reduction"):
        kl_reward_penalty(logprobs, ref_logprobs, mask, K1(), beta=0.5, reduction="max")
