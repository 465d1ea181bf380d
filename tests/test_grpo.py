"""Tests for the GRPO LightningModule (`r1_lightning.modules.grpo`) on the built-in tiny model.

The maths (advantages, losses, KL estimators, log-probs) and the rollout engine have their own
tests; these check how the module wires them together in real `lightning.Trainer` runs: the
reference model, LoRA, KL placement, every variant option, micro-batching, truncation masking,
the `<think>`-prefilled chat template, logged metrics, user rewards through the CLI, and learning.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from grpo_helpers import (
    GradRecorder,
    NoEOSEngine,
    RecordingReward,
    RolloutRecorder,
    Snapshot,
    TextHash,
    VariedLengthEngine,
    all_finite,
    fit,
    logged_metrics,
    max_change,
    parameters,
    prompt_data,
    tiny_grpo,
)
from r1_lightning.data.prompts import collate_prompts
from r1_lightning.evaluation import decode_completions
from r1_lightning.modules.grpo import _training_inputs
from r1_lightning.policy import CHATML_TEMPLATE, LoraSettings, build_builtin_tokenizer, encode_prompt, load_model, render_prompt, token_logprobs
from r1_lightning.rewards import Accuracy, LenientFormat, StrictFormat
from r1_lightning.rl.advantages import group_advantages
from user_rewards import CharShare

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = Path(__file__).resolve().parent
G = 4  # tiny_grpo's num_generations
ROWS = 2 * G  # completions per step: prompt_data's batch_size=2 prompts x G

# The chat template of DeepSeek-R1-Distill style models: the assistant turn opens the reasoning itself.
THINK_TEMPLATE = CHATML_TEMPLATE.replace("<|im_start|>assistant\n{% endif %}", "<|im_start|>assistant\n<think>\n{% endif %}")


# ----------------------------------------------------------------------------- one run, many checks
@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """Two steps with β > 0, four rewards (one a user reward from its own module) and a validation pass."""
    snapshot = Snapshot()
    module = tiny_grpo(rewards=[TextHash(), CharShare(), Accuracy(), LenientFormat()], beta=0.04, eval_num_samples=4)
    trainer = fit(module, prompt_data(), tmp_path_factory.mktemp("reference_run"), max_steps=2, callbacks=[snapshot], validate=True)
    return module, trainer, snapshot


def test_logged_metrics(reference_run):
    _, trainer, _ = reference_run
    logged = logged_metrics(trainer)
    train = [
        "train/reward", "train/kl", "train/loss", "train/policy_loss", "train/entropy", "train/completion_length",
        "train/clip_ratio", "train/zero_std_frac",
        "train/rewards/text_hash", "train/rewards/char_share", "train/rewards/accuracy", "train/rewards/lenient_format",
    ]  # fmt: skip
    for key in train:
        assert key in logged, f"{key} not logged; logged: {sorted(logged)}"
        assert len(logged[key]) == 2 and all_finite(logged[key]), (key, logged[key])  # once per step
    for key in ("val/accuracy", "val/maj@4", "val/pass@4", "val/format"):
        assert key in logged and len(logged[key]) == 1 and 0.0 <= logged[key][0] <= 1.0, key
    # The total is the sum of the (weight 1) rewards; every score of TextHash lies in [0, 1).
    parts = ("text_hash", "char_share", "accuracy", "lenient_format")
    for step in range(2):
        total = sum(logged[f"train/rewards/{name}"][step] for name in parts)
        assert logged["train/reward"][step] == pytest.approx(total, abs=1e-5)
    assert all(0.0 < v < 1.0 for v in logged["train/rewards/text_hash"])
    assert all(1 <= v <= 8 for v in logged["train/completion_length"])  # max_new_tokens=8


def test_reference_model_stays_frozen_while_the_policy_changes(reference_run):
    module, trainer, snapshot = reference_run
    assert module.ref_model is not None and module.ref_model is not module.model
    assert snapshot.reference is not None and snapshot.reference.keys() == snapshot.policy.keys()
    assert all(torch.equal(snapshot.reference[n], snapshot.policy[n]) for n in snapshot.policy)  # starts as the policy
    assert max_change(snapshot.reference, module.ref_model) == 0.0
    assert max_change(snapshot.policy, module.model) > 1e-4
    assert not any(p.requires_grad for p in module.ref_model.parameters())
    kl = logged_metrics(trainer)["train/kl"]
    assert kl[0] < 1e-6  # step 1: the policy is still the reference
    assert kl[1] > 100 * max(kl[0], 1e-9)  # step 2: it has moved away from the frozen reference


def test_beta_zero_loads_no_reference_model(tmp_path):
    module = tiny_grpo(beta=0.0)
    trainer = fit(module, prompt_data(), tmp_path)
    assert module.ref_model is None
    assert "train/kl" not in logged_metrics(trainer)
    assert all_finite(logged_metrics(trainer)["train/loss"])


def test_lora_reference_is_the_base_model_with_the_adapter_disabled(tmp_path):
    rollouts = RolloutRecorder()
    module = tiny_grpo(lora=LoraSettings(r=4), beta=0.04, learning_rate=1e-2)
    trainer = fit(module, prompt_data(), tmp_path, max_steps=2, callbacks=[rollouts])
    assert module.ref_model is None and module.reference_model is module.model  # no second model
    trainable = [n for n, p in module.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    inputs, target_mask, P = _training_inputs(rollouts.batches[-1].rollout)
    with torch.no_grad():
        ref = module._ref_logprobs(inputs, target_mask, P)
        policy, _ = module._policy_logprobs(inputs, target_mask, P)
        base = load_model("builtin:tiny", vocab_size=len(module.tokenizer), seed=module.hparams.seed)
        expected, _ = token_logprobs(base, inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"], target_mask)
    torch.testing.assert_close(ref, expected[:, P:], rtol=0, atol=1e-5)
    assert (policy - ref).abs().max() > 1e-3  # the trained adapter is on outside the reference context
    assert logged_metrics(trainer)["train/kl"][-1] > 0


@pytest.mark.parametrize("placement", ["loss", "reward"])
def test_kl_placement(tmp_path, placement):
    rollouts = RolloutRecorder()
    module = tiny_grpo(beta=0.1, kl_placement=placement)
    trainer = fit(module, prompt_data(), tmp_path, max_steps=2, callbacks=[rollouts])
    logged = logged_metrics(trainer)
    assert all_finite(logged["train/kl"]) and logged["train/kl"][-1] > 0
    step2 = rollouts.batches[1]
    scored = step2.reward_scores["text_hash"]  # the only reward, weight 1
    loss, policy_loss = logged["train/loss"], logged["train/policy_loss"]
    if placement == "reward":
        penalty = scored - step2.rewards  # β · Σ_t k3 per completion, subtracted from the reward
        assert (penalty > -1e-6).all() and penalty.max() > 0
        assert loss == policy_loss  # no KL term in the loss
    else:
        assert torch.equal(step2.rewards, scored)  # rewards untouched
        assert loss[1] > policy_loss[1]  # + β·KL with KL > 0


class OwnData(L.LightningDataModule):
    """A user's own data module: PromptDataModule's batches, but no `batch_size` hyperparameter."""

    def setup(self, stage: str) -> None:
        inner = prompt_data(tokenizer=self.trainer.lightning_module.tokenizer)
        inner.setup("fit")
        self.examples = inner.examples["train"]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.examples, batch_size=2, collate_fn=collate_prompts)


def test_trains_with_a_data_module_of_the_users_own(tmp_path):
    rollouts = RolloutRecorder()
    trainer = fit(tiny_grpo(), OwnData(), tmp_path, max_steps=2, callbacks=[rollouts])
    assert trainer.global_step == 2 and [len(r.texts) for r in rollouts.batches] == [ROWS, ROWS]


# ------------------------------------------------------------------------------------------- variants
def expected_policy_loss(record, aggregation: str, max_new_tokens: int = 8, keep: torch.Tensor | None = None) -> float:
    """At μ = 1 the ratio is 1, so the policy loss is -(aggregated advantages) over the completion tokens.

    grpo: -mean_i A_i (each sequence's token mean is A_i); bnpo/dapo: -Σ A_i L_i / Σ L_i;
    dr_grpo: -Σ A_i L_i / (N · max_new_tokens). GSPO's sequence ratio is 1 as well. `keep` masks rows out.
    """
    A, L = record.advantages.double(), record.rollout.completion_lengths.double()
    if keep is not None:
        L = L * keep
    if aggregation == "grpo":
        return -(A.sum() / len(A)).item()
    if aggregation in ("bnpo", "dapo"):
        return -((A * L).sum() / L.sum()).item()
    return -((A * L).sum() / (len(A) * max_new_tokens)).item()


@pytest.mark.parametrize(
    "options",
    [
        dict(loss_aggregation="grpo"),
        dict(loss_aggregation="bnpo"),
        dict(loss_aggregation="dapo"),
        dict(loss_aggregation="dr_grpo"),
        dict(importance_level="sequence", epsilon=3e-4, epsilon_high=4e-4),  # GSPO
        dict(advantage_estimator="dr_grpo"),
        dict(advantage_estimator="batch_std"),
        dict(advantage_estimator="rloo"),
        dict(beta=0.04, kl_estimator="k1"),
        dict(beta=0.04, kl_estimator="k2"),
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_variant_runs_and_uses_its_option(tmp_path, options):
    snapshot, rollouts = Snapshot(), RolloutRecorder()
    module = tiny_grpo(rollout_engine=VariedLengthEngine(), **options)
    trainer = fit(module, prompt_data(), tmp_path, callbacks=[snapshot, rollouts])
    logged = logged_metrics(trainer)
    for key in ("train/loss", "train/policy_loss", "train/entropy", "train/reward"):
        assert all_finite(logged[key]), key
    assert max_change(snapshot.policy, module.model) > 0
    (record,) = rollouts.batches
    assert record.rollout.completion_lengths.unique().numel() > 2  # lengths vary: the aggregations differ
    estimator = options.get("advantage_estimator", "grpo")
    torch.testing.assert_close(record.advantages, group_advantages(record.rewards, G, estimator)[0])
    if estimator != "grpo":  # the option reached the module: the default would give other advantages
        assert not torch.allclose(record.advantages, group_advantages(record.rewards, G, "grpo")[0])
    aggregation = options.get("loss_aggregation", "grpo")
    assert logged["train/policy_loss"][0] == pytest.approx(expected_policy_loss(record, aggregation), abs=1e-5)


def test_num_iterations_with_mini_and_micro_batches(tmp_path):
    # μ = 2 passes x 8 rows / mini-batches of 4 = 4 optimizer steps for one batch of rollouts.
    rollouts, grads = RolloutRecorder(), GradRecorder()
    module = tiny_grpo(num_iterations=2, mini_batch_size=4, micro_batch_size=2, beta=0.04)
    trainer = fit(module, prompt_data(), tmp_path, max_steps=4, callbacks=[rollouts, grads])
    assert trainer.global_step == 4 and len(rollouts.batches) == 1 and len(grads.steps) == 4
    logged = logged_metrics(trainer)
    for key in ("train/loss", "train/policy_loss", "train/kl", "train/clip_ratio", "train/entropy"):
        assert all_finite(logged[key]), key


def test_dynamic_sampling_drops_flat_groups(tmp_path):
    # A reward that is 1 for the first prompt's whole group and varies in the second: one group of two is kept.
    def half_flat(completions, *, prompts, **columns):
        first = prompts[0]
        return [1.0 if p == first else TextHash()([c], prompts=[p])[0] for c, p in zip(completions, prompts)]

    rollouts = RolloutRecorder()
    module = tiny_grpo(rewards=[half_flat], dynamic_sampling=True, loss_aggregation="dapo", rollout_engine=VariedLengthEngine())
    trainer = fit(module, prompt_data(), tmp_path, callbacks=[rollouts])
    logged = logged_metrics(trainer)
    assert logged["train/kept_frac"] == [0.5] and logged["train/zero_std_frac"] == [0.5]
    # The dropped group's tokens leave the token-mean's denominator too (its advantages are 0 anyway).
    (record,) = rollouts.batches
    keep = torch.tensor([0.0] * G + [1.0] * G, dtype=torch.float64)
    assert logged["train/policy_loss"][0] == pytest.approx(expected_policy_loss(record, "dapo", keep=keep), abs=1e-6)
    assert expected_policy_loss(record, "dapo", keep=keep) != pytest.approx(expected_policy_loss(record, "dapo"), abs=1e-4)


@pytest.mark.parametrize("aggregation", ["grpo", "dapo"])
def test_micro_batches_give_the_same_update_as_one_batch(tmp_path, aggregation):
    """Gradient accumulation over 4 micro-batches of 2 rows = one backward over all 8 rows."""
    runs = []
    for micro in (ROWS, ROWS // 4):
        snapshot, grads, rollouts = Snapshot(), GradRecorder(), RolloutRecorder()
        module = tiny_grpo(
            beta=0.04, loss_aggregation=aggregation, micro_batch_size=micro, learning_rate=1e-4,
            max_grad_norm=0.0,  # clipping would hide a wrongly scaled gradient
            rollout_engine=VariedLengthEngine(),  # micro-batches with different token counts
        )
        fit(module, prompt_data(), tmp_path / f"micro{micro}", callbacks=[snapshot, grads, rollouts])
        runs.append((module, snapshot.policy, grads.steps, rollouts.batches[0]))
    (full, start, full_grads, full_rollout), (micro, micro_start, micro_grads, micro_rollout) = runs
    assert torch.equal(full_rollout.rollout.completion_ids, micro_rollout.rollout.completion_ids)  # same seed, same rollouts
    assert all(torch.equal(start[n], micro_start[n]) for n in start)
    assert len(full_grads) == len(micro_grads) == 1  # one optimizer step in both
    for name, grad in full_grads[0].items():
        torch.testing.assert_close(micro_grads[0][name], grad, rtol=1e-4, atol=1e-7, msg=name)
    assert max_change(start, full.model) > 1e-5  # the step did something
    after = parameters(full.model)
    # Adam's first step is ≈ lr·g/(|g|+eps): for gradients near eps a 1e-4 relative difference in g
    # can move a weight by a fraction of lr, so the weights get a looser bound than the gradients above.
    assert max_change(after, micro.model) < 0.25 * max_change(start, full.model)


def test_gradient_checkpointing_auto_recomputes_groups_over_the_budget_with_the_same_update(tmp_path, monkeypatch, caplog):
    """Where one group's activations would pass the budget (here 1 byte), ``auto`` recomputes the completions' decoder
    layers in the backward, says so once, and steps as a run that keeps the activations (False)."""
    from r1_lightning.engines import compiled_forward

    monkeypatch.setattr("r1_lightning.modules.grpo_options.ACTIVATION_BUDGET_BYTES", 1)
    calls = []
    counted = compiled_forward._call
    monkeypatch.setattr(compiled_forward, "_call", lambda kind, *args: calls.append(kind) or counted(kind, *args))
    runs = []
    for setting in ("auto", False):
        calls.clear()
        snapshot, grads = Snapshot(), GradRecorder()
        module = tiny_grpo(beta=0.04, gradient_checkpointing=setting, learning_rate=1e-4, rollout_engine=VariedLengthEngine())
        with caplog.at_level("INFO"):
            fit(module, prompt_data(), tmp_path / str(setting), max_steps=2, callbacks=[snapshot, grads])
        runs.append((module, snapshot.policy, grads.steps, calls.count("suffix")))
        assert not module.model.model.gradient_checkpointing  # Hugging Face's stays off in both
    (auto, start, auto_grads, auto_calls), (kept, kept_start, kept_grads, kept_calls) = runs
    lines = [r.getMessage() for r in caplog.records if "GRPO(gradient_checkpointing='auto')" in r.getMessage()]
    assert len(lines) == 1 and "recompute their decoder layers" in lines[0] and "over the 0 GiB budget" in lines[0], lines
    assert auto._recompute and not kept._recompute
    # The policy's passes ran the layer functions, each suffix layer again in the backward; the reference's and
    # the run without recompute use the Hugging Face forward.
    layers = auto.model.config.num_hidden_layers
    assert auto_calls > 0 and auto_calls % (2 * layers) == 0 and kept_calls == 0
    assert all(torch.equal(start[n], kept_start[n]) for n in start)
    assert len(auto_grads) == len(kept_grads) == 2
    for step_auto, step_kept in zip(auto_grads, kept_grads):
        for name, grad in step_kept.items():  # the layer functions equal Hugging Face's forward to float rounding
            torch.testing.assert_close(step_auto[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert max_change(start, auto.model) > 1e-5


def test_gradient_checkpointing_true_steps_as_a_run_that_keeps_the_activations(tmp_path):
    """Hugging Face's checkpointing (``gradient_checkpointing: true``, as the real-model configs set it) in the eager
    passes: each decoder layer runs again in the backward, and the gradients equal a run without it to float rounding.
    Its recompute once ran other forwards than the pass (the lean layers' swap had ended) and raised CheckpointError
    at the first backward."""
    runs = []
    for setting in (True, False):
        snapshot, grads = Snapshot(), GradRecorder()
        module = tiny_grpo(
            beta=0.04, gradient_checkpointing=setting, compile=False, learning_rate=1e-4, rollout_engine=VariedLengthEngine()
        )
        fit(module, prompt_data(), tmp_path / str(setting), max_steps=2, callbacks=[snapshot, grads])
        assert module.model.is_gradient_checkpointing is setting
        runs.append((module, snapshot.policy, grads.steps))
    (checkpointed, start, checkpointed_grads), (kept, kept_start, kept_grads) = runs
    assert all(torch.equal(start[n], kept_start[n]) for n in start)
    assert len(checkpointed_grads) == len(kept_grads) == 2
    for step_checkpointed, step_kept in zip(checkpointed_grads, kept_grads):
        assert step_checkpointed.keys() == step_kept.keys()
        for name, grad in step_kept.items():  # the plain forwards in place of the lean ones: float rounding
            torch.testing.assert_close(step_checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert max_change(start, checkpointed.model) > 1e-5


def test_gradient_checkpointing_auto_only_where_a_group_does_not_fit_and_the_layer_functions_apply():
    from r1_lightning.modules.grpo_options import module_recompute

    module = tiny_grpo()
    module.configure_model()
    assert module.hparams.gradient_checkpointing == "auto"
    assert not module_recompute(module, 8)  # 4 x 8 tokens of the tiny model: far under the budget
    assert module_recompute(module, 10**7)  # 4 x 10^7 tokens: over it
    for options in (dict(lora=LoraSettings(r=4, target_modules=["q_proj"])), dict(gradient_checkpointing=False)):
        other = tiny_grpo(**options)
        other.configure_model()
        assert not module_recompute(other, 10**7), options  # LoRA: the layer functions do not apply; False: never
    hf = tiny_grpo(gradient_checkpointing=True)
    hf.configure_model()
    assert hf.model.model.gradient_checkpointing and not module_recompute(hf, 10**7)  # True: Hugging Face's, at load


class GradientBlocks(L.Callback):
    """How many distinct storages the gradients live in, at each optimizer step."""

    def __init__(self) -> None:
        self.storages: list[int] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for p in pl_module.model.parameters() if p.grad is not None]
        self.storages.append(len({g.untyped_storage().data_ptr() for g in grads}))


def test_optimizer_memory_placed_up_front_leaves_the_updates_bit_identical(tmp_path, monkeypatch):
    """On CPU, Adam's state is created before the first rollout and each step's gradients share one block
    (FlatGradients): the weights after 2 batches of 2 optimizer steps equal torch's lazy placement's, bit for bit."""
    runs = []
    for placed in (True, False):
        if not placed:
            monkeypatch.setattr("r1_lightning.modules.grpo.GRPO.on_train_start", lambda self: None)
        blocks, snapshot = GradientBlocks(), Snapshot()
        module = tiny_grpo(beta=0.04, mini_batch_size=ROWS // 2, micro_batch_size=ROWS // 4, rollout_engine=VariedLengthEngine())
        fit(module, prompt_data(), tmp_path / str(placed), max_steps=4, callbacks=[blocks, snapshot])
        runs.append((module, blocks.storages, snapshot.policy))
    (placed, placed_blocks, start), (lazy, lazy_blocks, _) = runs
    assert placed_blocks == [1, 1, 1, 1]  # one block (the tiny model has no parameter over glibc's heap limit)
    assert min(lazy_blocks) > 1  # torch's own: one allocation per parameter
    lazy_weights = dict(lazy.model.named_parameters())
    for name, weight in placed.model.named_parameters():
        torch.testing.assert_close(weight, lazy_weights[name], rtol=0, atol=0, msg=name)
    assert max_change(start, placed.model) > 1e-5  # the steps moved the weights


def test_sequence_level_ratio_changes_the_off_policy_update(tmp_path):
    """GSPO and token-level ratios give the same gradient at ρ = 1, but not in μ's second pass (ρ ≠ 1)."""
    modules = []
    for level in ("token", "sequence"):
        module = tiny_grpo(importance_level=level, num_iterations=2, epsilon=10.0, rollout_engine=VariedLengthEngine())
        grads = GradRecorder()
        fit(module, prompt_data(), tmp_path / level, max_steps=2, callbacks=[grads])
        modules.append(grads.steps)
    (token_first, token_second), (seq_first, seq_second) = modules
    for name, grad in token_first.items():  # first pass: identical
        torch.testing.assert_close(seq_first[name], grad, rtol=1e-4, atol=1e-7)
    assert max((seq_second[n] - g).abs().max().item() for n, g in token_second.items()) > 1e-5


def test_clip_ratio_is_exactly_zero_with_one_update_per_batch(tmp_path):
    # With ε = 1e-6 any ratio ≠ 1 would be clipped: at μ = 1 the ratio must be exactly 1 in value.
    trainer = fit(tiny_grpo(epsilon=1e-6), prompt_data(), tmp_path / "mu1", max_steps=3)
    logged = logged_metrics(trainer)
    for key in ("train/clip_ratio", "train/clip_ratio_low", "train/clip_ratio_high"):
        assert logged[key] == [0.0, 0.0, 0.0], key
    # Contrast: at μ = 2 the second pass sees a moved policy, and the same tiny ε clips tokens.
    trainer = fit(tiny_grpo(epsilon=1e-6, num_iterations=2), prompt_data(), tmp_path / "mu2", max_steps=2)
    assert logged_metrics(trainer)["train/clip_ratio"][0] > 0


@pytest.mark.parametrize(
    "option, value",
    [
        ("advantage_estimator", "x"),
        ("loss_aggregation", "y"),
        ("kl_estimator", "k9"),
        ("kl_placement", "value"),
        ("importance_level", "word"),
        ("num_generations", 0),
        ("num_iterations", 0),
        ("beta", -0.1),
        ("gradient_checkpointing", "sometimes"),
    ],
)
def test_unknown_option_values_raise_an_error_naming_the_option(option, value):
    with pytest.raises(ValueError, match=rf"{option}={value!r}".replace("-", r"\-").replace(".", r"\.")):
        tiny_grpo(**{option: value})


@pytest.mark.parametrize("mask_truncated", [True, False])
def test_mask_truncated_with_every_completion_truncated_gives_no_update(tmp_path, mask_truncated):
    snapshot, grads = Snapshot(), GradRecorder()
    module = tiny_grpo(rollout_engine=NoEOSEngine(), mask_truncated=mask_truncated, weight_decay=0.0, max_new_tokens=4)
    trainer = fit(module, prompt_data(), tmp_path, callbacks=[snapshot, grads])
    logged = logged_metrics(trainer)
    assert logged["train/truncated_frac"] == [1.0]
    assert all_finite(logged["train/loss"]) and all_finite(logged["train/entropy"])
    (step,) = grads.steps
    if mask_truncated:
        assert all(g.abs().max() == 0 for g in step.values())
        assert max_change(snapshot.policy, module.model) == 0.0
    else:  # contrast: the same rollouts do train when they are not masked
        assert any(g.abs().max() > 0 for g in step.values())
        assert max_change(snapshot.policy, module.model) > 0


# --------------------------------------------------------------------------- <think>-prefilled templates
def think_tokenizer():
    tokenizer = build_builtin_tokenizer()
    tokenizer.chat_template = THINK_TEMPLATE
    return tokenizer


def test_decode_completions_restores_a_think_opened_by_the_template():
    tokenizer, plain = think_tokenizer(), build_builtin_tokenizer()
    think_prompt = render_prompt(tokenizer, "Compute 1+2.")
    assert think_prompt.endswith("<|im_start|>assistant\n<think>\n")
    # Prompt 1 from the <think> template, prompt 2 from the plain one; G = 3 completions each.
    prompt_ids = [encode_prompt(tokenizer, think_prompt), encode_prompt(plain, render_prompt(plain, "Compute 1+2."))]
    well_formed, reopened = "1+2=3\n</think>\n<answer>\n3\n</answer>", "<think>\nopened again\n</think>\n<answer>\n3\n</answer>"
    bodies = [well_formed, reopened, "3", "3", well_formed, reopened]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    encoded = [tokenizer(body, add_special_tokens=False)["input_ids"] + [eos] for body in bodies]
    width = max(map(len, encoded)) + 2
    completion_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in encoded])  # EOS, then padding
    completion_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in encoded])

    texts = decode_completions(tokenizer, prompt_ids, completion_ids, completion_mask, num_generations=3)
    # A completion that opens <think> itself is left alone; the plain template's completions are unchanged.
    assert texts == ["<think>\n" + well_formed, reopened, "<think>\n3", "3", well_formed, reopened]
    prompts = ["Compute 1+2."] * 6
    assert StrictFormat()(texts, prompts=prompts) == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert LenientFormat()(texts, prompts=prompts) == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]


def test_rewards_get_the_restored_think_in_training(tmp_path):
    model_dir = tmp_path / "think_model"
    tokenizer = think_tokenizer()
    load_model("builtin:tiny", vocab_size=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    recorder = RecordingReward()
    module = tiny_grpo(model_name_or_path=str(model_dir), rewards=[recorder, TextHash()])
    assert module.tokenizer.chat_template == THINK_TEMPLATE
    fit(module, prompt_data(), tmp_path)
    (call,) = recorder.calls
    assert len(call["completions"]) == ROWS
    assert all(text.startswith("<think>\n") for text in call["completions"]), call["completions"]


# ---------------------------------------------------------------------------------- user rewards, CLI
def test_user_rewards_from_yaml_through_the_cli(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    extra = tmp_path / "user_rewards.yaml"
    extra.write_text(
        "model:\n"
        "  init_args:\n"
        "    rewards:\n"
        "      - class_path: user_rewards.CharShare\n"
        "        init_args: {char: '1'}\n"
        "      - user_rewards.digit_share\n"
        "    reward_weights: [1.0, 0.5]\n"
    )
    overrides = {
        "model.init_args.model_name_or_path": "builtin:tiny",
        "model.init_args.max_new_tokens": 8,
        "model.init_args.num_generations": 2,
        "model.init_args.eval_num_samples": 2,
        "data.init_args.batch_size": 2,
        "data.init_args.num_samples": 8,
        "data.init_args.num_val_samples": 4,
        "trainer.max_steps": 2,
        "trainer.val_check_interval": 2,
        "trainer.logger.init_args.save_dir": str(tmp_path / "runs"),
    }
    args = ["fit", "--config", str(REPO_ROOT / "configs" / "grpo.yaml"), "--config", str(extra)]
    for key, value in overrides.items():
        args += [f"--{key}", str(value)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    command = [str(Path(sys.executable).with_name("r1-lightning")), *args]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]

    run_dir = tmp_path / "runs" / "grpo" / "latest"
    (event_file,) = run_dir.glob("events.out.tfevents.*")
    events = EventAccumulator(str(event_file))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/rewards/char_share", "train/rewards/digit_share", "train/reward", "train/kl", "val/accuracy", "val/maj@2"):
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
    assert len(events.Scalars("train/rewards/char_share")) == 2  # one per step
    # Weighted total: char_share + 0.5 digit_share.
    for total, a, b in zip(*(events.Scalars(t) for t in ("train/reward", "train/rewards/char_share", "train/rewards/digit_share"))):
        assert total.value == pytest.approx(a.value + 0.5 * b.value, abs=1e-5)
    assert (run_dir / "hf_model" / "config.json").is_file()


# ------------------------------------------------------------------------------------------- learning
@pytest.mark.slow
def test_grpo_learns_a_trivial_reward_from_scratch(tmp_path):
    """A random tiny model rewarded for the share of '7's in its completions writes more '7's within 25 steps."""
    rollouts = RolloutRecorder()
    module = tiny_grpo(rewards=[CharShare("7")], num_generations=8, max_new_tokens=16, learning_rate=1e-3, min_lr_ratio=1.0)
    fit(module, prompt_data(batch_size=4, num_samples=100, shuffle=True), tmp_path, max_steps=25, callbacks=[rollouts])
    rewards = [record.rewards.nanmean().item() for record in rollouts.batches]
    assert len(rewards) == 25
    early, late = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert late > early + 0.05 and late > 3 * early, rewards


def test_default_micro_batch_keeps_activations_under_the_budget_in_whole_groups():
    from r1_lightning.modules.grpo_options import ACTIVATION_BUDGET_BYTES, activation_bytes_per_token, default_micro_batch
    from transformers import LlamaConfig

    # SmolLM2-135M: 30 * (10 * 576 + 4 * 1536) * 4 B = 1,428,480 B per token; 128 tokens a row = 182,845,440 B;
    # 2 GiB / that = 11.7 -> 11 rows fit: one whole group of 8; of 4 -> two groups (8); of 16 -> not one group: the
    # fewest completions whose prompt re-runs stay under 10% of the work, ceil(P / (0.1 * 128)), at most the 11 that fit.
    smollm2 = LlamaConfig(num_hidden_layers=30, hidden_size=576, intermediate_size=1536)
    per_token = activation_bytes_per_token(smollm2, 4)
    assert per_token == 1_428_480 and ACTIVATION_BUDGET_BYTES == 2 << 30
    assert default_micro_batch(32, 8, 128, per_token) == 8
    assert default_micro_batch(32, 4, 128, per_token) == 8
    assert default_micro_batch(32, 16, 128, per_token, prompt_tokens=45) == 4  # 45 / 12.8 = 3.5
    assert default_micro_batch(32, 16, 128, per_token, prompt_tokens=0) == 1
    assert default_micro_batch(32, 16, 128, per_token, prompt_tokens=1_000) == 11  # never more than fit
    # Forced 512-token completions of 40-token prompts, groups of 4: 512 * 1.43 MB = 731 MB a row, 2 GiB fits 2
    # (not a group): one completion per micro-batch (40 / 51.2 -> 1).
    assert default_micro_batch(8, 4, 512, per_token, prompt_tokens=40) == 1
    assert default_micro_batch(32, 8, 32, per_token) == 32  # 32 * 32 * 1.43 MB = 1.46 GB: all in one
    assert default_micro_batch(32, 8, 10_000, per_token) == 1  # never below one completion
    assert activation_bytes_per_token(object(), 4) is None
