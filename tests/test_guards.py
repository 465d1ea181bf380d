"""Numerical guards: finite losses on degenerate batches, no update without signal, NaN stops or skips.

Hand-made tensors first (the loss functions on each degenerate case), then real tiny-model steps
of GRPO, PolicySFT and Distillation in a `lightning.Trainer`.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from r1_lightning import ColdStartDataModule, Distillation, PolicySFT
from r1_lightning.guards import NonFiniteError, StepGuard, decide, drop_gradients, gradient_flags, nonfinite_names
from r1_lightning.rl.advantages import dynamic_sampling_mask, group_advantages
from r1_lightning.rl.kl import K1, K2, K3, kl_reward_penalty
from r1_lightning.rl.losses import AGGREGATIONS, loss_normalizer, policy_loss

from grpo_helpers import NoEOSEngine, TextHash, fit, logged_metrics, max_change, parameters, prompt_data, tiny_grpo

G = 4
NAN, INF = float("nan"), float("inf")


def _loss_and_grad(logprobs, old, advantages, mask, aggregation="grpo", ref=None, level="token"):
    """The policy loss (with k3 KL to `ref` if given) and its gradient wrt `logprobs`."""
    logprobs = logprobs.clone().requires_grad_(True)
    kl = None if ref is None else K3()(logprobs, ref)
    loss, metrics = policy_loss(
        logprobs, old, advantages, mask, kl=kl, beta=0.04, aggregation=aggregation, ratio_level=level,
        normalizer=loss_normalizer(mask, aggregation, mask.shape[1]), max_completion_length=mask.shape[1],
    )
    loss.backward()
    return loss.detach(), logprobs.grad, metrics


# --------------------------------------------------------------------------- hand-made tensors
def _degenerate_case(case: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages [8], loss mask [8, 3]) for two groups of G = 4 in each degenerate case."""
    mask = torch.ones(8, 3, dtype=torch.bool)
    rewards = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    if case == "all_equal_rewards":
        rewards = torch.full((8,), 0.7)
    elif case == "all_truncated_masked":  # mask_truncated removes every row
        mask &= ~torch.ones(8, dtype=torch.bool)[:, None]
    elif case == "empty_completions":  # EOS first, then nothing: no token reaches the loss
        mask[:] = False
    elif case == "dynamic_sampling_drops_all":
        rewards = torch.tensor([1.0] * 4 + [0.0] * 4)  # both groups flat
        keep, _ = dynamic_sampling_mask(rewards, G)
        assert not keep.any()
        mask &= keep.repeat_interleave(G)[:, None]
    advantages, _ = group_advantages(rewards, G)
    return advantages, mask


@pytest.mark.parametrize("aggregation", sorted(AGGREGATIONS))
@pytest.mark.parametrize("case", ["all_equal_rewards", "all_truncated_masked", "empty_completions", "dynamic_sampling_drops_all"])
def test_no_signal_batches_give_a_finite_loss_and_an_exactly_zero_gradient(case, aggregation):
    advantages, mask = _degenerate_case(case)
    logprobs = torch.log(torch.rand(8, 3, generator=torch.Generator().manual_seed(0)))
    logprobs[~mask] = -INF  # garbage at masked positions must not leak (0 · inf = NaN)
    # μ = 1: π_old = π_θ detached, no KL term. The loss is 0 and its gradient exactly 0, not tiny.
    loss, grad, metrics = _loss_and_grad(logprobs, logprobs.detach(), advantages, mask, aggregation)
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))
    assert all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("gap", [1e4, -1e4, 88.0, -88.0])
def test_extreme_log_prob_gaps_give_finite_losses_and_gradients(gap, sign, level):
    # π_θ far from π_old (μ > 1) and from π_ref: log-ratios of ±1e4 overflow exp() in float32
    # (exp(88.8) = inf) unless bounded. A = ±1 on every row.
    logprobs = torch.full((2, 3), -1.0)
    old, ref = logprobs - gap, logprobs + gap
    mask = torch.tensor([[True, True, False], [True, True, True]])
    loss, grad, metrics = _loss_and_grad(logprobs, old, torch.tensor([sign, sign]), mask, ref=ref, level=level)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("estimator", [K1(), K2(), K3()])
def test_kl_estimators_are_finite_at_extreme_gaps(estimator):
    logprobs = torch.tensor([[-1e4, -1.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[0.0, -1e4, 5e3]])  # the last position is padding (masked below)
    mask = torch.tensor([[True, True, False]])
    kl = estimator(logprobs, ref)
    torch.where(mask, kl, 0.0).sum().backward()
    assert torch.isfinite(kl[mask]).all() and torch.isfinite(logprobs.grad).all()
    penalty, metrics = kl_reward_penalty(logprobs, ref, mask, estimator, beta=0.04)
    assert torch.isfinite(penalty).all() and all(torch.isfinite(v) for v in metrics.values())


def test_k3_at_the_clamp_by_hand():
    # log r = ref - logp = 1e4 is clamped to 20: k3 = e^20 - 20 - 1; at -1e4 (and at a reference
    # log-prob of -inf) to -20: e^-20 + 20 - 1. Beyond the clamp the gradient is 0, not NaN.
    logprobs = torch.tensor([-1e4, 0.0, 0.0], requires_grad=True)
    kl = K3()(logprobs, torch.tensor([0.0, -1e4, -INF]))
    torch.testing.assert_close(kl, torch.tensor([torch.e**20 - 21.0, torch.e**-20 + 19.0, torch.e**-20 + 19.0]))
    kl.sum().backward()
    assert torch.equal(logprobs.grad, torch.zeros(3))


@pytest.mark.parametrize(
    ("loss_finite", "grads_finite", "grads_nonzero", "scaler", "expected"),
    [
        # An ordinary step.
        (True, True, True, False, "step"),
        # An exactly zero gradient: nothing to learn, so no AdamW step.
        (True, True, False, False, "no_signal"),
        # A NaN loss wins over everything.
        (False, True, True, False, "nonfinite"),
        # An inf gradient with plain precision.
        (True, False, True, False, "nonfinite"),
        # An inf gradient under fp16 loss scaling is the scaler's business (it skips the step itself).
        (True, False, True, True, "step"),
        # A NaN loss under loss scaling is still ours.
        (False, True, True, True, "nonfinite"),
    ],
)
def test_decide(loss_finite, grads_finite, grads_nonzero, scaler, expected):
    assert decide(loss_finite, grads_finite, grads_nonzero, scaler) == expected


def test_gradient_flags_and_nonfinite_names():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    assert [bool(f) for f in gradient_flags([a, b])] == [False, False]  # no gradients at all: no signal
    a.grad, b.grad = torch.zeros(2), torch.zeros(3)
    assert [bool(f) for f in gradient_flags([a, b])] == [False, False]
    b.grad = torch.tensor([0.0, -1e-30, 0.0])  # tiny but non-zero is signal
    assert [bool(f) for f in gradient_flags([a, b])] == [False, True]
    b.grad = torch.tensor([0.0, NAN, 1.0])
    assert bool(gradient_flags([a, b])[0])
    assert nonfinite_names([("a", a.grad), ("b", b.grad), ("none", None)]) == ["b"]


def test_adamw_moves_weights_on_a_zero_gradient_unless_the_gradients_are_dropped():
    # Why a no-signal step is skipped rather than taken with a zero gradient.
    def run(drop: bool) -> float:
        w = torch.nn.Parameter(torch.ones(3))
        opt = torch.optim.AdamW([w], lr=0.1, weight_decay=0.1)
        w.grad = torch.ones(3)
        opt.step()  # a real step: non-zero moments from now on
        before = w.detach().clone()
        w.grad = torch.zeros(3)
        if drop:
            drop_gradients(opt)
        opt.step()
        return (w.detach() - before).abs().max().item()

    assert run(drop=False) > 0.01  # momentum and weight decay move it
    assert run(drop=True) == 0.0


def test_nonfinite_option_is_checked():
    with pytest.raises(ValueError, match="nonfinite='ignore': choose raise"):
        StepGuard("ignore")


# --------------------------------------------------------------------------- real GRPO steps
class FlatAfterFirst(TextHash):
    """Varied scores on the first call (a real update that leaves AdamW moments), then all 0.5."""

    calls = 0

    def __call__(self, completions, *, prompts, **columns):
        self.calls += 1
        return super().__call__(completions, prompts=prompts) if self.calls == 1 else [0.5] * len(completions)


class Weights(L.Callback):
    """The policy's (student's) weights when training starts."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.policy = parameters(pl_module.model)


class ParamsAfterEachStep(Weights):
    def __init__(self) -> None:
        self.after: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after.append(parameters(pl_module.model))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[n] - b[n]).abs().max().item() for n in a)


@pytest.mark.parametrize(
    "case",
    [
        # Every group's rewards equal (after a first step with signal, so AdamW has momentum).
        "all_equal_rewards",
        # Every completion hits max_new_tokens and mask_truncated removes them all.
        "all_truncated_masked",
        # DAPO dynamic sampling drops every (flat) group.
        "dynamic_sampling_drops_all",
    ],
)
def test_grpo_step_without_signal_leaves_the_weights_alone(tmp_path, case):
    options = dict(rewards=[FlatAfterFirst()], weight_decay=0.1, learning_rate=1e-2)
    if case == "all_truncated_masked":
        options.update(rollout_engine=NoEOSEngine(), mask_truncated=True, rewards=[TextHash()])
    if case == "dynamic_sampling_drops_all":
        options.update(dynamic_sampling=True)
    recorder = ParamsAfterEachStep()
    module = tiny_grpo(**options)
    trainer = fit(module, prompt_data(), tmp_path, max_steps=2, callbacks=[recorder])
    logged = logged_metrics(trainer)
    assert all(torch.isfinite(torch.tensor(logged["train/loss"])))
    if case == "all_truncated_masked":  # no signal from the start
        assert logged["train/skipped_steps/no_signal"] == [1.0, 1.0]
        assert max_change(recorder.policy, module.model) == 0.0
    else:  # the first step learns, the second has nothing to learn from
        assert logged["train/skipped_steps/no_signal"] == [0.0, 1.0]
        assert _max_diff(recorder.policy, recorder.after[0]) > 0
        assert _max_diff(recorder.after[0], recorder.after[1]) == 0.0
    assert trainer.global_step == 2  # skipped steps still count toward max_steps


@pytest.mark.parametrize("gap", ["reference", "old_policy"])
def test_grpo_step_with_extreme_log_prob_gaps_is_finite(tmp_path, gap):
    # A real step where π_ref (k3 in the loss) or π_old (μ = 2) gives every sampled token 1e4 nats
    # less than π_θ does. nonfinite="raise" (the default) would stop the run on a NaN/inf.
    weights = Weights()
    if gap == "reference":
        module = tiny_grpo(beta=0.04)
        shifted = module._ref_logprobs
        module._ref_logprobs = lambda *args: shifted(*args) - 1e4
    else:
        module = tiny_grpo(num_iterations=2)
        shifted = module._old_logprobs
        module._old_logprobs = lambda *args: shifted(*args) - 1e4
    trainer = fit(module, prompt_data(), tmp_path, callbacks=[weights])
    logged = logged_metrics(trainer)
    assert all(torch.isfinite(torch.tensor(logged[key])).all() for key in ("train/loss", "train/policy_loss"))
    assert logged["train/skipped_steps/nonfinite"] == [0.0]
    if gap == "reference":
        # log r = ref - logp ≈ -1e4 is clamped to -20: k3 = e^-20 + 20 - 1 ≈ 19 on every token, with no
        # gradient; the policy term still trains.
        assert logged["train/kl"][0] == pytest.approx(19.0, abs=1e-3)
        assert max_change(weights.policy, module.model) > 0
    else:
        # ρ = e^1e4 is clamped to e^20, far outside the clip range: no gradient, so both updates are skipped.
        assert logged["train/skipped_steps/no_signal"] == [2.0]
        assert max_change(weights.policy, module.model) == 0.0


def _poison_gradient(model: torch.nn.Module) -> str:
    """Make one weight's gradient NaN (as an overflow in the backward would); returns its name."""
    name, param = next((n, p) for n, p in model.named_parameters() if "layers.1.mlp" in n)
    param.register_hook(lambda grad: grad * NAN)
    return name


class PoisonOnStart(Weights):
    def __init__(self, where: str = "grad") -> None:
        self.where, self.name = where, None

    def on_train_start(self, trainer, pl_module) -> None:
        if self.where == "weights":
            with torch.no_grad():
                next(pl_module.model.parameters())[0, 0] = NAN
        super().on_train_start(trainer, pl_module)
        if self.where == "grad":
            self.name = _poison_gradient(pl_module.model)
        elif self.where == "loss":  # the final norm's output: every logit, the loss and all gradients NaN
            pl_module.model.model.norm.register_forward_hook(lambda module, args, out: out * NAN)


def test_grpo_nan_gradient_raises_naming_step_and_rank_before_the_weights_change(tmp_path):
    poison = PoisonOnStart("grad")
    module = tiny_grpo(weight_decay=0.1)
    message = r"non-finite gradient at global_step=0 on rank 0 \(\d+ of \d+ gradient tensors, the first model\."
    with pytest.raises(NonFiniteError, match=message):
        fit(module, prompt_data(), tmp_path, max_steps=2, callbacks=[poison])
    assert max_change(poison.policy, module.model) == 0.0


def test_grpo_nan_gradient_with_skip_trains_on_and_never_touches_the_weights(tmp_path):
    poison = PoisonOnStart("grad")
    module = tiny_grpo(nonfinite="skip", weight_decay=0.1)
    trainer = fit(module, prompt_data(), tmp_path, max_steps=2, callbacks=[poison])
    assert logged_metrics(trainer)["train/skipped_steps/nonfinite"] == [1.0, 1.0]
    assert max_change(poison.policy, module.model) == 0.0 and trainer.global_step == 2


def test_nan_weights_stop_the_run_even_with_skip(tmp_path):
    module = tiny_grpo(nonfinite="skip")
    with pytest.raises(NonFiniteError, match="global_step=0 on rank 0.*weights are already non-finite"):
        fit(module, prompt_data(), tmp_path, max_steps=2, callbacks=[PoisonOnStart("weights")])


# --------------------------------------------------------------------------- real SFT / distillation steps
def _sft_data():
    return ColdStartDataModule(num_samples=4, num_val_samples=2, batch_size=2, max_length=256)


def test_sft_nan_loss_raises_naming_step_and_rank(tmp_path):
    poison = PoisonOnStart("loss")
    module = PolicySFT(warmup_steps=0, export_hf=False)
    message = r"non-finite loss at global_step=0 on rank 0 \(.*\): stopping before the optimizer step"
    with pytest.raises(NonFiniteError, match=message):
        fit(module, _sft_data(), tmp_path, max_steps=2, callbacks=[poison])
    assert max_change(poison.policy, module.model) == 0.0


def test_sft_skipped_nan_steps_leave_the_weights_alone(tmp_path):
    # Both steps have a NaN gradient and are skipped; weight decay would shrink every weight otherwise.
    poison = PoisonOnStart("grad")
    module = PolicySFT(warmup_steps=0, weight_decay=0.1, export_hf=False, nonfinite="skip")
    trainer = fit(module, _sft_data(), tmp_path, max_steps=2, callbacks=[poison])
    logged = logged_metrics(trainer)
    assert logged["train/skipped_steps/nonfinite"] == [1.0, 1.0] and logged["train/skipped_steps/no_signal"] == [0.0, 0.0]
    assert max_change(poison.policy, module.model) == 0.0


class ZeroGradients(Weights):
    """Every gradient exactly zero, as a batch without completion tokens would give."""

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        for p in pl_module.model.parameters():
            p.register_hook(torch.zeros_like)


@pytest.mark.parametrize("make", [lambda: PolicySFT(warmup_steps=0, weight_decay=0.1, export_hf=False),
                                  lambda: Distillation(warmup_steps=0, weight_decay=0.1, export_hf=False)])
def test_automatic_optimization_skips_a_zero_gradient_step(tmp_path, make):
    zero = ZeroGradients()
    module = make()
    trainer = fit(module, _sft_data(), tmp_path, max_steps=2, callbacks=[zero])
    assert logged_metrics(trainer)["train/skipped_steps/no_signal"] == [1.0, 1.0]
    assert max_change(zero.policy, module.model) == 0.0 and trainer.global_step == 2


def test_distillation_nan_gradient_raises(tmp_path):
    with pytest.raises(NonFiniteError, match="non-finite gradient at global_step=0 on rank 0"):
        fit(Distillation(warmup_steps=0, export_hf=False), _sft_data(), tmp_path, max_steps=1, callbacks=[PoisonOnStart("grad")])
