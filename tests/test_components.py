"""Algorithm components (`r1_lightning.rl`): CISPO, SAPO, entropy control, the KL penalty, bnpo,
GDPO reward normalisation and a parity test of every variant against the papers' formulas.

Hand-derived numbers throughout; the derivation is in the comment above each check.
"""

from __future__ import annotations

import math
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from r1_lightning.dynamic_sampling import SampledGroups, refill_informative_groups
from r1_lightning.engines import Rollout
from r1_lightning.errors import ConfigError
from r1_lightning.rewards import RewardScores, RewardSet
from r1_lightning.rl.advantages import (
    AdvantageEstimator,
    BatchStd,
    GroupCentred,
    GroupNormalized,
    LeaveOneOut,
    RewardGroups,
    normalize_in_groups,
    resolve_advantage_estimator,
)
from r1_lightning.rl.groups import group_rows, group_view, per_completion, repeat_per_completion
from r1_lightning.rl.kl import KLPenalty
from r1_lightning.rl.losses import (
    CISPOLoss,
    ClippedLoss,
    PolicyLoss,
    SAPOLoss,
    entropy_bonus_surrogate,
    micro_batch_normalizers,
    top_entropy_mask,
)


# ---------------------------------------------------------------------------------------- groups
def test_group_helpers():
    x = torch.arange(6.0)
    assert group_view(x, 3).tolist() == [[0, 1, 2], [3, 4, 5]]
    assert per_completion(torch.tensor([7, 8]), 2).tolist() == [7, 7, 8, 8]
    assert repeat_per_completion(["a", "b"], 2) == ["a", "a", "b", "b"]
    assert group_rows(1, 3) == slice(3, 6)
    with pytest.raises(ValueError, match="num_generations=4"):
        group_view(x, 4)


# ------------------------------------------------------------------------------------------ CISPO
def test_cispo_by_hand():
    # One completion, ratios ρ = [0.5, 1.0, 3.0], A = 2, ε_high = 1 (weights clipped at 2), no lower bound:
    # weights sg(clip(ρ)) = [0.5, 1, 2]. Per token -w·A·log π; with aggregation dapo the loss is their mean.
    old = torch.tensor([[-1.0, -2.0, -3.0]])
    logprobs = (old + torch.tensor([[0.5, 1.0, 3.0]]).log()).requires_grad_()
    loss, metrics = CISPOLoss(epsilon_high=1.0)(logprobs, old, torch.tensor([2.0]), torch.ones(1, 3))
    loss.backward()
    lp = logprobs.detach()[0]
    expected = -(0.5 * 2 * lp[0] + 1 * 2 * lp[1] + 2 * 2 * lp[2]) / 3
    torch.testing.assert_close(loss, expected)
    # The gradient goes through log π only: -w·A/3 per token; the clipped token keeps -2·2/3 (PPO would give 0).
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1 / 3, -2 / 3, -4 / 3]]))
    assert metrics["clip_ratio"].item() == pytest.approx(1 / 3)  # only ρ = 3 was clipped
    # With a lower bound ε_low = 0.2 the first weight becomes 0.8: gradient -0.8·2/3.
    logprobs.grad = None
    CISPOLoss(epsilon_high=1.0, epsilon_low=0.2)(logprobs, old, torch.tensor([2.0]), torch.ones(1, 3))[0].backward()
    assert logprobs.grad[0, 0].item() == pytest.approx(-1.6 / 3)


# ------------------------------------------------------------------------------------------- SAPO
def test_sapo_by_hand():
    # f(ρ) = σ(τ(ρ - 1))·4/τ; loss per token -f(ρ)·A; grpo aggregation = mean over the 2 tokens of the one row.
    # Row 0: A = 1 (τ_pos = 1), ρ = [1, 2]: f = [σ(0)·4, σ(1)·4] = [2, 2.9242]; loss = -(2 + 2.9242)/2.
    # d loss / d log ρ_t = -A·f'(ρ)·ρ/2 with f'(ρ) = 4σ(τ(ρ-1))(1-σ(τ(ρ-1))): token 0: -1·1·1/2 = -0.5.
    old = torch.zeros(1, 2)
    logprobs = torch.tensor([[0.0, math.log(2.0)]], requires_grad=True)
    loss, metrics = SAPOLoss(tau_pos=1.0, tau_neg=2.0)(logprobs, old, torch.tensor([1.0]), torch.ones(1, 2))
    loss.backward()
    s1 = 1 / (1 + math.exp(-1.0))
    assert loss.item() == pytest.approx(-(2.0 + 4 * s1) / 2)
    assert logprobs.grad[0, 0].item() == pytest.approx(-0.5)
    assert logprobs.grad[0, 1].item() == pytest.approx(-4 * s1 * (1 - s1) * 2 / 2)
    # A = -1 uses τ_neg = 2: f(2) = σ(2)·2, loss = +(σ(0)·2 + σ(2)·2)/2.
    loss, _ = SAPOLoss(tau_pos=1.0, tau_neg=2.0)(logprobs, old, torch.tensor([-1.0]), torch.ones(1, 2))
    s2 = 1 / (1 + math.exp(-2.0))
    assert loss.item() == pytest.approx((1.0 + 2 * s2) / 2)
    # On-policy (ρ = 1) the gradient weight 4σ(0)(1-σ(0)) is 1: SAPO's gradient is GRPO's.
    lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    assert SAPOLoss()(lp, lp.detach(), torch.tensor([1.0]), torch.ones(1, 2))[1]["gate_gradient_weight"].item() == 1.0


# -------------------------------------------------------------------------------- entropy control
def test_top_entropy_mask_by_hand():
    # Completion entropies [0.1, 0.5, 0.9, 0.3] (the 5th position is padding with a huge entropy, ignored).
    # quantile 0.5 → threshold = torch.quantile([0.1, 0.3, 0.5, 0.9], 0.5) = (0.3 + 0.5)/2 = 0.4: keep 0.5, 0.9.
    entropy = torch.tensor([[0.1, 0.5, 0.9, 0.3, 99.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    keep, metrics = top_entropy_mask(entropy, mask, 0.5)
    assert keep.tolist() == [[False, True, True, False, False]]
    assert metrics["entropy_kept"].item() == pytest.approx(0.7)
    assert metrics["entropy_dropped"].item() == pytest.approx(0.2)
    assert metrics["entropy_kept_frac"].item() == 0.5


def test_top_entropy_quantile_removes_the_dropped_tokens_gradient():
    # μ = 1, A = 1, grpo aggregation over one row of 4 tokens: gradient -A/4 on kept tokens, 0 on dropped ones;
    # the dropped tokens still count in the denominator (4).
    logprobs = torch.tensor([[-1.0, -1.0, -1.0, -1.0]], requires_grad=True)
    entropy = torch.tensor([[0.1, 0.5, 0.9, 0.3]])
    loss_fn = ClippedLoss(top_entropy_quantile=0.5)
    loss, metrics = loss_fn(logprobs, logprobs.detach(), torch.tensor([1.0]), torch.ones(1, 4), entropy=entropy)
    loss.backward()
    assert logprobs.grad.tolist() == [[0.0, -0.25, -0.25, 0.0]]
    assert loss.item() == pytest.approx(-0.5)  # -(1 + 1)/4
    assert {"entropy_kept", "entropy_dropped", "entropy_kept_frac"} <= set(metrics)
    with pytest.raises(ValueError, match="entropy"):
        ClippedLoss(top_entropy_quantile=0.5)(logprobs, logprobs.detach(), torch.tensor([1.0]), torch.ones(1, 4))


def test_entropy_bonus_gradient_is_the_entropy_gradient_in_expectation():
    # One state with logits z over 3 actions. Averaging the surrogate's gradient over a ~ π (exactly, weights π(a))
    # gives ∇H(π) computed directly by autograd: the score-function estimate with baseline H is unbiased.
    z = torch.tensor([0.3, -1.0, 1.2], dtype=torch.float64, requires_grad=True)
    log_pi = z.log_softmax(-1)
    entropy = -(log_pi.exp() * log_pi).sum()
    (exact,) = torch.autograd.grad(entropy, z)
    expected_grad = torch.zeros(3, dtype=torch.float64)
    for a in range(3):
        lp = z.log_softmax(-1)[a].reshape(1, 1)
        bonus = entropy_bonus_surrogate(lp, lp.detach(), entropy.detach().reshape(1, 1))
        assert bonus.item() == pytest.approx(entropy.item())  # its value is H
        (g,) = torch.autograd.grad(bonus.sum(), z)
        expected_grad += log_pi.exp()[a].detach() * g
    torch.testing.assert_close(expected_grad, exact)
    # In a loss: loss = policy - coef·H; metric entropy_bonus = mean H.
    lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    h = torch.tensor([[0.5, 0.7]])
    loss, metrics = ClippedLoss(entropy_coef=0.1)(lp, lp.detach(), torch.tensor([0.0]), torch.ones(1, 2), entropy=h)
    assert loss.item() == pytest.approx(-0.1 * 0.6) and metrics["entropy_bonus"].item() == pytest.approx(0.6)


# ------------------------------------------------------------------------------------- KL penalty
def test_importance_weighted_kl_by_hand():
    # One token: log π = log 0.5, log π_ref = log 0.25, so r = π_ref/π = 0.5 and k3 = 0.5 - log 0.5 - 1 = log 2 - 0.5.
    lp = torch.tensor([[math.log(0.5)]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25)]])
    mask = torch.ones(1, 1)
    k3 = math.log(2) - 0.5
    plain, metrics = KLPenalty("k3", beta=1.0).loss_term(lp, lp.detach(), ref, mask)
    (g_plain,) = torch.autograd.grad(plain.sum(), lp)
    # d k3 / d log π = 1 - r = 0.5 (the gradient of KL(π_ref‖π) in expectation).
    assert plain.item() == pytest.approx(k3) and g_plain.item() == pytest.approx(0.5)
    weighted, _ = KLPenalty("k3", beta=1.0, importance_weighted=True).loss_term(lp, lp.detach(), ref, mask)
    (g_weighted,) = torch.autograd.grad(weighted.sum(), lp)
    # ρ = 1 in value; d(ρ k3)/d log π = k3 + 1 - r = -log r = log π - log π_ref = log 2.
    assert weighted.item() == pytest.approx(k3) and g_weighted.item() == pytest.approx(math.log(2))
    # Off-policy, ρ = π/π_old = 2 doubles the term's value.
    off, _ = KLPenalty("k3", beta=0.5, importance_weighted=True).loss_term(lp, lp.detach() - math.log(2), ref, mask)
    assert off.item() == pytest.approx(0.5 * 2 * k3)
    assert metrics["kl"].item() == pytest.approx(k3)
    with pytest.raises(ConfigError, match="placement"):
        KLPenalty(placement="reward", importance_weighted=True)


# ------------------------------------------------------------------------------------------- bnpo
def test_bnpo_is_the_mean_of_micro_batch_token_means():
    # Rows of 1, 3 and 2 tokens in micro-batches [row 0, row 1] and [row 2]:
    # bnpo: each micro-batch's own tokens x 2 micro-batches = [4·2, 2·2]; dapo: all 6 tokens for both.
    mask = torch.tensor([[1, 0, 0], [1, 1, 1], [1, 1, 0]])
    micro = [slice(0, 2), slice(2, 3)]
    assert [n.item() for n in micro_batch_normalizers(mask, micro, "bnpo")] == [8.0, 4.0]
    assert [n.item() for n in micro_batch_normalizers(mask, micro, "dapo")] == [6.0, 6.0]
    assert [n.item() for n in micro_batch_normalizers(mask, micro, "grpo")] == [3.0, 3.0]
    assert [n.item() for n in micro_batch_normalizers(mask, micro, "dr_grpo", 5)] == [15.0, 15.0]


# ------------------------------------------------------------------------- components and aliases
def test_string_aliases_and_user_components():
    assert isinstance(resolve_advantage_estimator("grpo"), GroupNormalized)
    assert isinstance(resolve_advantage_estimator("dr_grpo"), GroupCentred)
    assert isinstance(resolve_advantage_estimator("batch_std"), BatchStd)
    assert isinstance(resolve_advantage_estimator("rloo"), LeaveOneOut)
    with pytest.raises(ConfigError, match="advantage_estimator='ppo'"):
        resolve_advantage_estimator("ppo")
    with pytest.raises(ConfigError, match="loss_aggregation='mean'"):
        ClippedLoss(aggregation="mean")
    with pytest.raises(ConfigError, match="top_entropy_quantile=0"):
        ClippedLoss(top_entropy_quantile=0)

    class Best(AdvantageEstimator):  # +1 for the group's best valid reward, 0 elsewhere
        def advantages(self, groups: RewardGroups) -> torch.Tensor:
            best = groups.rewards.nan_to_num(-math.inf).amax(-1, keepdim=True)
            return (groups.rewards == best).float()

    advantages, metrics = Best()(torch.tensor([0.0, 2.0, float("nan"), 1.0]), 2)
    assert advantages.tolist() == [0.0, 1.0, 0.0, 1.0]  # the NaN reward's advantage is 0
    assert metrics["none_frac"].item() == 0.25

    class PlainPG(PolicyLoss):  # REINFORCE: -A log π
        def per_token_loss(self, logprobs, old_logprobs, advantages, completion_mask):
            return -advantages[:, None] * logprobs, {}

    lp = torch.tensor([[-1.0, -3.0]], requires_grad=True)
    loss, metrics = PlainPG(aggregation="dapo")(lp, lp.detach(), torch.tensor([2.0]), torch.ones(1, 2))
    assert loss.item() == pytest.approx(4.0) and metrics["policy_loss"].item() == pytest.approx(4.0)  # -2·(-4)/2


# ------------------------------------------------------------------------------------------- GDPO
def test_group_normalized_total_by_hand():
    # Two rewards on one group of 3 (G = 3), weights [1, 0.5]. a = [0, 1, 2]: mean 1, unbiased std 1 → [-1, 0, 1].
    # b = [10, 30, None]: mean 20, std √200 = 14.142 → [-0.7071, 0.7071, NaN]. Total: a + 0.5·b, the third
    # sample only from a: [-1.3536, 0.3536, 1].
    def a(completions, *, prompts, **_):
        return [0.0, 1.0, 2.0]

    def b(completions, *, prompts, **_):
        return [10.0, 30.0, None]

    reward_set = RewardSet([a, b], weights=[1.0, 0.5])
    scores = reward_set(["x", "y", "z"], prompts=["p"] * 3)
    total = reward_set.group_normalized_total(scores, 3, eps=0.0)
    torch.testing.assert_close(total, torch.tensor([-1 - 0.5 / math.sqrt(2), 0.5 / math.sqrt(2), 1.0]))
    assert scores.total.tolist() == [5.0, 16.0, 2.0]  # the raw total is unchanged
    # A constant reward contributes 0 (flat group), and NaN stays NaN.
    assert normalize_in_groups(torch.tensor([3.0, 3.0, float("nan"), 1.0]), 2).tolist()[:2] == [0.0, 0.0]
    assert math.isnan(normalize_in_groups(torch.tensor([3.0, 3.0, float("nan"), 1.0]), 2)[2].item())



# --------------------------------------------------------------------------- parity with the papers
# 3 prompts x G = 4 completions of up to 5 tokens; off-policy old log-probs (some ratios beyond the clip band);
# group 0 has a None reward, group 2 is flat. Mini-batch = all 12 rows in micro-batches of 5 and 7 rows.
G, MICRO = 4, [slice(0, 5), slice(5, 12)]
REWARDS = [1.0, 0.0, float("nan"), 1.0, 0.2, 0.9, 0.4, 0.4, 1.0, 1.0, 1.0, 1.0]
LENGTHS = [5, 2, 3, 4, 1, 5, 5, 3, 2, 4, 5, 1]
EPS_LOW, EPS_HIGH, BETA = 0.2, 0.28, 0.04


def _inputs():
    g = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(12, 5, generator=g, dtype=torch.float64) * 3
    old = logprobs + (torch.rand(12, 5, generator=g, dtype=torch.float64) - 0.5) * 0.8  # log ρ in [-0.4, 0.4]
    ref = logprobs + (torch.rand(12, 5, generator=g, dtype=torch.float64) - 0.5)
    mask = torch.tensor([[t < n for t in range(5)] for n in LENGTHS])
    return logprobs, old, ref, mask


def _paper_advantages(name):
    """Per group: GRPO (r - mean)/(std + 1e-4) (unbiased std), Dr. GRPO r - mean, RLOO r - mean(others),
    batch: (r - group mean)/(std of all valid rewards + 1e-4). None rewards: left out, advantage 0."""
    valid_all = [r for r in REWARDS if not math.isnan(r)]
    batch_mean = sum(valid_all) / len(valid_all)
    batch_std = math.sqrt(sum((r - batch_mean) ** 2 for r in valid_all) / (len(valid_all) - 1))
    out = []
    for b in range(3):
        group = REWARDS[b * G:(b + 1) * G]
        valid = [r for r in group if not math.isnan(r)]
        n, mean = len(valid), sum(valid) / len(valid)
        std = math.sqrt(sum((r - mean) ** 2 for r in valid) / (n - 1))
        for r in group:
            if math.isnan(r) or max(valid) == min(valid):
                out.append(0.0)
            elif name == "grpo":
                out.append((r - mean) / (std + 1e-4))
            elif name == "dr_grpo":
                out.append(r - mean)
            elif name == "rloo":
                out.append(r - (sum(valid) - r) / (n - 1))
            else:
                out.append((r - mean) / (batch_std + 1e-4))
    return out


def _paper_loss(advantages, logprobs, old, ref, aggregation, level):
    """min(ρA, clip(ρ)A) - β k3 per token (GRPO eq. 3; GSPO: ρ_i = exp(mean_t log ρ_t) for every token),
    aggregated: grpo mean_i mean_t; dapo Σ/Σ|o_i|; dr_grpo Σ/(N·L_max); bnpo mean over micro-batches of Σ/Σ|o_i|."""
    terms = []  # terms[i][t]
    for i in range(12):
        n = LENGTHS[i]
        seq_log_ratio = sum(float(logprobs[i, t] - old[i, t]) for t in range(n)) / n
        row = []
        for t in range(n):
            log_ratio = seq_log_ratio if level == "sequence" else float(logprobs[i, t] - old[i, t])
            rho, a = math.exp(log_ratio), advantages[i]
            surrogate = min(rho * a, min(max(rho, 1 - EPS_LOW), 1 + EPS_HIGH) * a)
            r = math.exp(float(ref[i, t] - logprobs[i, t]))
            row.append(-surrogate + BETA * (r - math.log(r) - 1))
        terms.append(row)
    if aggregation == "grpo":
        return sum(sum(row) / len(row) for row in terms) / 12
    if aggregation == "dapo":
        return sum(map(sum, terms)) / sum(LENGTHS)
    if aggregation == "dr_grpo":
        return sum(map(sum, terms)) / (12 * 5)
    means = [sum(sum(terms[i]) for i in range(m.start, m.stop)) / sum(LENGTHS[m]) for m in MICRO]
    return sum(means) / len(means)


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "batch_std", "rloo"])
def test_advantages_match_the_paper_formulas(estimator):
    advantages, _ = resolve_advantage_estimator(estimator)(torch.tensor(REWARDS, dtype=torch.float64), G)
    torch.testing.assert_close(advantages, torch.tensor(_paper_advantages(estimator), dtype=torch.float64))


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("aggregation", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_losses_match_the_paper_formulas(aggregation, level):
    logprobs, old, ref, mask = _inputs()
    advantages = _paper_advantages("grpo")
    loss_fn = ClippedLoss(EPS_LOW, EPS_HIGH, level, aggregation)
    kl = KLPenalty("k3", beta=BETA)
    total = torch.zeros((), dtype=torch.float64)
    for rows, normalizer in zip(MICRO, loss_fn.normalizers(mask, MICRO, max_completion_length=5)):
        penalty, _ = kl.loss_term(logprobs[rows], old[rows], ref[rows], mask[rows])
        loss, _ = loss_fn(
            logprobs[rows], old[rows], torch.tensor(advantages, dtype=torch.float64)[rows], mask[rows],
            penalty=penalty, normalizer=normalizer,
        )
        total = total + loss
    assert total.item() == pytest.approx(_paper_loss(advantages, logprobs, old, ref, aggregation, level), rel=1e-6)



# ------------------------------------------------------------------ batch_std and DAPO draws over ranks
# Scripted draws for the dynamic-sampling tests (here, so spawned ranks import little).
PAD = 0


def rollout(prompt_len: int, completion_len: int, rows: int, first_id: int) -> Rollout:
    ids = torch.arange(first_id, first_id + rows)[:, None]  # row r's tokens are all first_id + r
    return Rollout(
        prompt_ids=ids.expand(rows, prompt_len).clone(), prompt_mask=torch.ones(rows, prompt_len, dtype=torch.long),
        completion_ids=ids.expand(rows, completion_len).clone(),
        completion_mask=torch.ones(rows, completion_len, dtype=torch.long),
        logprobs=-torch.ones(rows, completion_len), truncated=torch.zeros(rows, dtype=torch.bool),
    )


def sampled(rewards: list[float], first_index: int, prompt_len: int = 1, completion_len: int = 1) -> SampledGroups:
    # Groups of G = 2; prompt k has dataset index first_index + k; texts name their row.
    prompts = len(rewards) // 2
    batch = {
        "indices": list(range(first_index, first_index + prompts)), "prompts": [f"p{first_index + k}" for k in range(prompts)],
        "prompt_texts": [""] * prompts, "prompt_ids": [[1]] * prompts, "columns": {"answer": list(range(prompts))},
    }
    scores = torch.tensor(rewards)
    texts = [f"{first_index}:{i}" for i in range(len(rewards))]
    return SampledGroups(batch, rollout(prompt_len, completion_len, len(rewards), 10 * first_index + 1), texts,
                         RewardScores({"r": scores}, scores, {"r": 0}))


def _batch_std_worker(rank: int, world_size: int, init_file: str, results: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    try:
        groups = torch.tensor(REWARDS, dtype=torch.float64).reshape(3, G)[rank::world_size]  # a sampler's interleaved share
        advantages, _ = BatchStd()(groups.reshape(-1), G)
        loss_fn = ClippedLoss(aggregation="dapo")
        logprobs, _, _, mask = _inputs()
        rows = torch.arange(12).reshape(3, G)[rank::world_size].reshape(-1)
        normalizer = loss_fn.normalizers(mask[rows], [slice(0, len(rows))])[0]
        # DAPO refill: rank 0's loader batch is flat and its draws stay flat; rank 1's is informative. Both must
        # draw as often (generation may be a collective): until the draws run out, 3 times.
        calls = []
        first = sampled([1.0, 1.0, 1.0, 1.0] if rank == 0 else [0.0, 1.0, 0.0, 1.0], 0)
        _, draws = refill_informative_groups(
            first, lambda k: calls.append(k) or sampled([2.0] * 4, 10 * k), lambda s: s.total, 2, max_draws=3, pad_token_id=0
        )
        torch.save({"advantages": advantages, "normalizer": normalizer, "draws": (draws, calls)}, f"{results}/rank{rank}.pt")
        dist.barrier()  # neither rank tears gloo down while the other still has collectives in flight
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes
def test_two_processes_batch_std_token_counts_and_refill_draws(tmp_path):
    # Rank 0 holds groups 0 and 2, rank 1 group 1 (DistributedSampler's interleaving).
    mp.spawn(_batch_std_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    one_process, _ = BatchStd()(torch.tensor(REWARDS, dtype=torch.float64), G)
    gathered = torch.cat([rank0["advantages"][:G], rank1["advantages"], rank0["advantages"][G:]])
    torch.testing.assert_close(gathered, one_process)
    # Rank 1's own rewards alone would give another scale: the gather is what makes them equal.
    local, _ = BatchStd()(torch.tensor(REWARDS[G:2 * G], dtype=torch.float64), G)
    assert not torch.allclose(local, one_process[G:2 * G])
    # dapo's token count: all 31 tokens of the 12 rows, over 2 ranks (DDP averages the gradients): 31 / 2.
    assert rank0["normalizer"].item() == rank1["normalizer"].item() == sum(LENGTHS) / 2
    assert rank0["draws"] == rank1["draws"] == (3, [1, 2, 3])
