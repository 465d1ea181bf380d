import math

import pytest
import torch

from r1_lightning.rl.advantages import ADVANTAGE_ESTIMATORS, dynamic_sampling_mask, group_advantages

NAN = float("nan")
ESTIMATORS = sorted(ADVANTAGE_ESTIMATORS)


def test_grpo_hand_values():
    # Group [0, 1, 2]: mean 1, unbiased std sqrt((1 + 0 + 1) / 2) = 1 → A = [-1, 0, 1].
    # Group [3, 3, 6]: mean 4, unbiased std sqrt((1 + 1 + 4) / 2) = sqrt(3) → A = [-1, -1, 2] / sqrt(3).
    rewards = torch.tensor([0.0, 1.0, 2.0, 3.0, 3.0, 6.0])
    advantages, metrics = group_advantages(rewards, num_generations=3, eps=0.0)
    s3 = math.sqrt(3)
    torch.testing.assert_close(advantages, torch.tensor([-1.0, 0.0, 1.0, -1 / s3, -1 / s3, 2 / s3]))
    # reward_mean = 15 / 6 = 2.5; reward_std (unbiased) = sqrt(sum((r - 2.5)²) / 5)
    #   = sqrt((6.25 + 2.25 + 0.25 + 0.25 + 0.25 + 12.25) / 5) = sqrt(4.3)
    torch.testing.assert_close(metrics["reward_mean"], torch.tensor(2.5))
    torch.testing.assert_close(metrics["reward_std"], torch.tensor(math.sqrt(4.3)))
    assert metrics["zero_std_frac"].item() == 0.0 and metrics["none_frac"].item() == 0.0


def test_grpo_default_eps_is_added_to_the_std():
    # [0, 1, 2]: A = [-1, 0, 1] / (1 + 1e-4)
    advantages, _ = group_advantages(torch.tensor([0.0, 1.0, 2.0]), num_generations=3)
    torch.testing.assert_close(advantages, torch.tensor([-1.0, 0.0, 1.0]) / (1 + 1e-4))


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_all_equal_group_gets_exactly_zero(estimator):
    # In float32, [0.9, 0.9, 0.9] - mean is 5.96e-8, not 0, and GRPO would turn that into
    # 5.96e-8 / (0 + 1e-4) ≈ 6e-4: the group must be detected as flat, not computed.
    flat = torch.tensor([0.9, 0.9, 0.9])
    assert (flat - flat.mean()).abs().max() > 0
    rewards = torch.cat([flat, torch.tensor([0.0, 1.0, 2.0])])
    advantages, metrics = group_advantages(rewards, num_generations=3, estimator=estimator)
    assert torch.equal(advantages[:3], torch.zeros(3))
    assert advantages[3:].abs().sum() > 0
    assert metrics["zero_std_frac"].item() == 0.5


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_single_sample_groups_get_zero(estimator):
    # G = 1: each "group" is one completion, no baseline is possible.
    advantages, metrics = group_advantages(torch.tensor([3.0, -1.0]), num_generations=1, estimator=estimator)
    assert torch.equal(advantages, torch.zeros(2))
    assert metrics["zero_std_frac"].item() == 1.0


def test_none_rewards_are_excluded_and_get_zero():
    # Group 1: [1, NaN, 0, 2] → statistics over [1, 0, 2]: mean 1, unbiased std 1,
    #   A = [0, 0 (NaN), -1, 1].
    # Group 2: [NaN, 5, NaN, NaN] → one valid reward: flat, all 0.
    rewards = torch.tensor([1.0, NAN, 0.0, 2.0, NAN, 5.0, NAN, NAN])
    advantages, metrics = group_advantages(rewards, num_generations=4, eps=0.0)
    assert torch.equal(advantages, torch.tensor([0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, 0.0]))
    # 4 of 8 rewards are None; reward_mean over [1, 0, 2, 5] = 2; group 2 is flat.
    assert metrics["none_frac"].item() == 0.5
    torch.testing.assert_close(metrics["reward_mean"], torch.tensor(2.0))
    assert metrics["zero_std_frac"].item() == 0.5


def test_rloo_hand_values():
    # [0, 1, 2]: baselines are the means of the others: [1.5, 1, 0.5] → A = [-1.5, 0, 1.5].
    # [0, NaN, 4]: the NaN is no "other": A = [0 - 4, 0, 4 - 0] = [-4, 0, 4].
    rewards = torch.tensor([0.0, 1.0, 2.0, 0.0, NAN, 4.0])
    advantages, _ = group_advantages(rewards, num_generations=3, estimator="rloo")
    torch.testing.assert_close(advantages, torch.tensor([-1.5, 0.0, 1.5, -4.0, 0.0, 4.0]))


def test_dr_grpo_hand_values():
    # No std division: [0, 0, 0, 4] - 1 = [-1, -1, -1, 3]; [2, 2, 2, 2] → 0.
    rewards = torch.tensor([0.0, 0.0, 0.0, 4.0, 2.0, 2.0, 2.0, 2.0])
    advantages, _ = group_advantages(rewards, num_generations=4, estimator="dr_grpo")
    torch.testing.assert_close(advantages, torch.tensor([-1.0, -1.0, -1.0, 3.0, 0.0, 0.0, 0.0, 0.0]))


def test_batch_std_hand_values():
    # Group means 1 and 5 → centred [-1, 0, 1 | 0, 0, 0].
    # Batch std over [0, 1, 2, 5, 5, 5]: mean 3, squared deviations 9 + 4 + 1 + 4 + 4 + 4 = 26,
    # unbiased variance 26 / 5 = 5.2, std 2.2803509 → A = [-0.4385290, 0, 0.4385290, 0, 0, 0].
    rewards = torch.tensor([0.0, 1.0, 2.0, 5.0, 5.0, 5.0])
    advantages, _ = group_advantages(rewards, num_generations=3, estimator="batch_std", eps=0.0)
    torch.testing.assert_close(advantages, torch.tensor([-0.4385290, 0.0, 0.4385290, 0.0, 0.0, 0.0]))


def test_grpo_matches_a_per_group_loop():
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 3, (8 * 5,), generator=gen).float()  # many ties and flat groups
    rewards[torch.rand(40, generator=gen) < 0.2] = NAN
    advantages, _ = group_advantages(rewards, num_generations=5)
    expected = torch.zeros_like(rewards)
    for start in range(0, 40, 5):
        group = rewards[start : start + 5]
        valid = ~group.isnan()
        r = group[valid]
        if len(r) > 1 and r.std() > 0:
            expected[start : start + 5][valid] = (r - r.mean()) / (r.std() + 1e-4)  # torch.std is unbiased
    torch.testing.assert_close(advantages, expected)


def test_integer_rewards_are_accepted():
    advantages, _ = group_advantages(torch.tensor([0, 1, 2]), num_generations=3, eps=0.0)
    torch.testing.assert_close(advantages, torch.tensor([-1.0, 0.0, 1.0]))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="num_generations=4"):
        group_advantages(torch.zeros(6), num_generations=4)
    with pytest.raises(ValueError, match="'ppo'"):
        group_advantages(torch.zeros(6), num_generations=3, estimator="ppo")
    with pytest.raises(ValueError, match=r"positions \[1\] are infinite"):
        group_advantages(torch.tensor([0.0, float("inf")]), num_generations=2)


def test_dynamic_sampling_mask():
    # Groups of 2: [1, 1] all solved, [0, 1] mixed, [0, 0] all failed, [NaN, 1] one valid reward.
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, NAN, 1.0])
    keep, metrics = dynamic_sampling_mask(rewards, num_generations=2)
    assert torch.equal(keep, torch.tensor([False, True, False, False]))
    assert metrics["kept_frac"].item() == 0.25
