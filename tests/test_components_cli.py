"""Components in the GRPO module: the README's examples, user components from YAML through the real CLI,
and short runs with each new built-in (CISPO, SAPO, entropy control, importance-weighted KL, GDPO)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grpo_helpers import RolloutRecorder, Snapshot, TextHash, all_finite, fit, logged_metrics, max_change, prompt_data, tiny_grpo
from r1_lightning.errors import ConfigError
from r1_lightning.rewards import RewardScores
from r1_lightning.rl.advantages import group_advantages
from r1_lightning.rl.kl import K3, KLPenalty
from r1_lightning.rl.losses import CISPOLoss, ClippedLoss, SAPOLoss
from test_reward_model import save_classifier
from user_rewards import CharShare

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = Path(__file__).resolve().parent


# -------------------------------------------------------------------------------- README examples
def readme_examples() -> list[str]:
    section = (REPO_ROOT / "README.md").read_text().split("## Components\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_examples_are_the_user_module_and_run():
    examples = readme_examples()
    source = (TESTS_DIR / "user_components.py").read_text()
    mirrored = [code.strip("\n") + "\n" for code in re.findall(r"# --- README: .*?\n(.*?)# --- end\n", source, re.S)]
    assert examples == mirrored  # the CLI test below runs exactly what the README shows
    ns: dict = {}
    for code in examples:
        exec(compile(code, "README.md", "exec"), ns)

    # RankAdvantage, G = 4. Group 0 [0.3, 0.9, 0.1, None]: None → -inf, ranks [2, 3, 1, 0], centred
    # [0.5, 1.5, -0.5, -1.5], the None's advantage then 0. Group 1 is flat: 0.
    advantages, _ = ns["RankAdvantage"]()(torch.tensor([0.3, 0.9, 0.1, math.nan, 5, 5, 5, 5]), 4)
    assert advantages.tolist() == [0.5, 1.5, -0.5, 0.0, 0, 0, 0, 0]

    # CappedPG: ρ = [3, 0.5], A = 1, cap 2 → weights [2, 0.5]; dapo mean over 2 tokens of -w·A·log π.
    old = torch.tensor([[-2.0, -1.0]])
    logprobs = old + torch.tensor([[3.0, 0.5]]).log()
    loss, _ = ns["CappedPG"]()(logprobs, old, torch.tensor([1.0]), torch.ones(1, 2))
    assert loss.item() == pytest.approx(-(2 * logprobs[0, 0] + 0.5 * logprobs[0, 1]).item() / 2)

    # CappedKL (β = 0.1, cap 0.5): k3 = 0.0 for the token π = π_ref, and a huge k3 for the other → β·cap = 0.05.
    lp, ref = torch.tensor([[-1.0, -10.0]]), torch.tensor([[-1.0, -0.1]])
    term, _ = ns["CappedKL"](cap=0.5, beta=0.1).loss_term(lp, lp, ref, torch.ones(1, 2))
    assert term[0].tolist() == pytest.approx([0.0, 0.05])
    assert K3()(lp, ref)[0, 1].item() > 100

    # LengthPenalty(4): 3 characters → 0; 6 → -(6 - 4)/4.
    assert ns["LengthPenalty"](max_chars=4)(["abc", "abcdef"], prompts=["p", "p"]) == [0.0, -0.5]

    # ShortDrafts(3) asked for 10 greedy tokens: the HF engine's rollout, cut to 3 tokens (EOS ids none, so exactly 3).
    from test_rollout import tiny_model

    from r1_lightning.engines import HFGenerateEngine, SamplingParams

    model, params = tiny_model(), SamplingParams(max_new_tokens=10, temperature=0.0)
    short = ns["ShortDrafts"](max_new_tokens=3).generate(model, [[1, 2, 3], [4, 5]], 2, params)
    full = HFGenerateEngine().generate(model, [[1, 2, 3], [4, 5]], 2, params)
    assert short.completion_ids.shape == (4, 3) and torch.equal(short.completion_ids, full.completion_ids[:, :3])


# -------------------------------------------------------------------------------- user YAML, CLI
def test_user_components_from_yaml_through_the_cli(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    save_classifier(tmp_path / "rm")
    record = tmp_path / "calls.jsonl"
    extra = tmp_path / "components.yaml"
    extra.write_text(
        "model:\n"
        "  init_args:\n"
        "    rewards:\n"
        "      - class_path: user_components.LengthPenalty\n"
        "        init_args: {max_chars: 4}\n"
        "      - class_path: r1_lightning.rewards.RewardModel\n"
        f"        init_args: {{model_name_or_path: {tmp_path / 'rm'}, batch_size: 3}}\n"
        "    reward_weights: [1.0, 0.5]\n"
        "    normalize_each_reward: true\n"
        "    advantage_estimator:\n"
        "      class_path: user_components.RecordedRankAdvantage\n"
        f"      init_args: {{record: {record}}}\n"
        "    policy_loss:\n"
        "      class_path: user_components.RecordedCappedPG\n"
        f"      init_args: {{record: {record}, cap: 1.5}}\n"
        "    kl_penalty:\n"
        "      class_path: user_components.RecordedCappedKL\n"
        f"      init_args: {{record: {record}, cap: 2.0, beta: 0.02}}\n"
        "    rollout_engine:\n"
        "      class_path: user_components.RecordedShortDrafts\n"
        f"      init_args: {{record: {record}, max_new_tokens: 4}}\n"
    )
    overrides = {
        "model.init_args.model_name_or_path": "builtin:tiny",
        "model.init_args.max_new_tokens": 8,
        "model.init_args.num_generations": 4,
        "data.init_args.batch_size": 2,
        "data.init_args.num_samples": 8,
        "data.init_args.num_val_samples": 4,
        "trainer.max_steps": 1,
        "trainer.limit_val_batches": 0,
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

    calls = [json.loads(line) for line in record.read_text().splitlines()]
    # The user's engine sampled the rollouts: GRPO asked for 8 tokens, it gave at most 4.
    generated = [c for c in calls if c["kind"] == "generate"]
    assert generated and all(c["asked"] == 8 and c["width"] <= 4 for c in generated)
    calls = [c for c in calls if c["kind"] != "generate"]
    kinds = [c["kind"] for c in calls]
    assert kinds[0] == "advantages" and kinds.count("advantages") == 1  # one batch of rollouts
    assert kinds.count("loss") == kinds.count("kl") >= 1 and calls[kinds.index("loss")]["cap"] == 1.5
    assert calls[kinds.index("kl")] == {"kind": "kl", "cap": 2.0, "beta": 0.02}
    # The advantages are RankAdvantage's: per group, centred ranks (a permutation of ±0.5, ±1.5) or all 0.
    for rewards, advantages in zip(calls[0]["rewards"], calls[0]["advantages"]):
        assert sorted(advantages) in ([-1.5, -0.5, 0.5, 1.5], [0.0] * 4), (rewards, advantages)
        # normalize_each_reward: each reward has group mean 0, so the weighted total does too.
        assert abs(sum(rewards)) < 1e-5

    (event_file,) = (tmp_path / "runs" / "grpo" / "latest").glob("events.out.tfevents.*")
    events = EventAccumulator(str(event_file))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/rewards/length_penalty", "train/rewards/reward_model", "train/kl", "train/policy_loss"):
        assert tag in tags, f"{tag} missing from {sorted(tags)}"


# ------------------------------------------------------------------------------ built-ins in GRPO
@pytest.mark.parametrize(
    "options, logged_keys",
    [
        (dict(policy_loss=CISPOLoss(epsilon_high=1.0)), ["train/clip_ratio"]),
        (dict(policy_loss=SAPOLoss()), ["train/gate_gradient_weight"]),
        (
            dict(policy_loss=ClippedLoss(top_entropy_quantile=0.5, entropy_coef=0.01)),
            ["train/entropy_kept", "train/entropy_dropped"],
        ),
        (dict(kl_penalty=KLPenalty(beta=0.04, importance_weighted=True), beta=0.04), ["train/kl"]),  # tiny_grpo sets beta 0
    ],
    ids=["cispo", "sapo", "entropy", "kl_importance_weighted"],
)
def test_component_runs_in_grpo(tmp_path, options, logged_keys):
    snapshot = Snapshot()
    module = tiny_grpo(**options)
    trainer = fit(module, prompt_data(), tmp_path, callbacks=[snapshot])
    logged = logged_metrics(trainer)
    for key in ["train/loss", "train/policy_loss", *logged_keys]:
        assert key in logged and all_finite(logged[key]), key
    assert max_change(snapshot.policy, module.model) > 0
    if "train/entropy_kept" in logged_keys:
        # The top half of the tokens by entropy is kept: their mean entropy is above the dropped half's.
        assert logged["train/entropy_kept"][0] > logged["train/entropy_dropped"][0]
        assert logged["train/entropy_kept_frac"][0] == pytest.approx(0.5, abs=0.1)


def test_normalize_each_reward_reaches_the_advantages(tmp_path):
    # TextHash in [0, 1) and CharShare (×100): unnormalised, CharShare's scale dominates the total.
    rollouts = RolloutRecorder()
    module = tiny_grpo(rewards=[TextHash(), CharShare()], reward_weights=[1.0, 100.0], normalize_each_reward=True)
    fit(module, prompt_data(), tmp_path, callbacks=[rollouts])
    (record,) = rollouts.batches
    expected = module.reward_set.group_normalized_total(RewardScores(record.reward_scores, record.rewards, {}), 4)
    torch.testing.assert_close(record.rewards, expected)
    torch.testing.assert_close(record.advantages, group_advantages(expected, 4)[0])


def test_a_component_and_the_keys_it_replaces_are_not_both_set():
    with pytest.raises(ConfigError, match="policy_loss=.*replaces epsilon, loss_aggregation"):
        tiny_grpo(policy_loss=SAPOLoss(), epsilon=0.3, loss_aggregation="dapo")
    with pytest.raises(ConfigError, match="kl_penalty=.*replaces beta"):
        tiny_grpo(kl_penalty=KLPenalty(beta=0.1), beta=0.2)
