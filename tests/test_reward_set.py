"""Reward names and the weighted RewardSet: validation, None handling, failure policies, timeouts."""

import functools
import math
import pickle
import threading
import time
from pathlib import Path

import pytest
import torch

from r1_lightning.rewards import (
    Accuracy,
    CosineScaledAccuracy,
    FailedScore,
    LenientFormat,
    Reward,
    RewardError,
    RewardSet,
    StrictFormat,
    TagCount,
    reward_name,
    score_each,
)

from reward_helpers import NAN, STRICT

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- names


def exact_match(completions, *, prompts, **columns):
    return [float(c == a) for c, a in zip(completions, columns["answer"])]


class HTTPStatusReward(Reward):
    def __call__(self, completions, *, prompts, **columns):
        return [1.0] * len(completions)


class Named(HTTPStatusReward):
    name = "custom"


def test_reward_names():
    assert reward_name(exact_match) == "exact_match"
    assert reward_name(functools.partial(exact_match)) == "exact_match"
    assert reward_name(lambda completions, **_: [0.0] * len(completions)) == "lambda"
    assert reward_name(HTTPStatusReward()) == "http_status_reward"
    assert reward_name(CosineScaledAccuracy()) == "cosine_scaled_accuracy"
    assert reward_name(Named()) == "custom"
    renamed = TagCount()
    renamed.name = "tags"
    assert reward_name(renamed) == "tags"


def test_reward_needs_call():
    with pytest.raises(TypeError):
        Reward()


# ---------------------------------------------------------------- RewardSet


def constant(value):
    def reward(completions, *, prompts, **columns):
        return [value] * len(completions)

    reward.__name__ = f"constant_{value}"
    return reward


def test_reward_set_weighted_total():
    # total = 1.0 * exact_match + 0.5 * lenient_format:
    #   sample 0: 1 + 0.5 * 1 = 1.5; sample 1: 0 + 0.5 * 0 = 0.
    reward_set = RewardSet([exact_match, LenientFormat()], weights=[1.0, 0.5])
    out = reward_set(
        ["<think>r</think><answer>1</answer>", "2"], prompts=["p", "p"], answer=["<think>r</think><answer>1</answer>", "1"]
    )
    assert list(out.scores) == ["exact_match", "lenient_format"]
    assert torch.equal(out.scores["exact_match"], torch.tensor([1.0, 0.0]))
    assert torch.equal(out.total, torch.tensor([1.5, 0.0]))
    assert out.failures == {"exact_match": 0, "lenient_format": 0}


def test_reward_set_none_is_nan_and_excluded_from_the_total():
    def sometimes(completions, *, prompts, **columns):
        return [None, 2.0, None]

    def never(completions, *, prompts, **columns):
        return [None, 1.0, None]

    # Sample 0: only constant_1.0 applies → 1; sample 1: 1 + 2 * 2 + 1 = 6; sample 2 as 0.
    out = RewardSet([constant(1.0), sometimes, never], weights=[1.0, 2.0, 1.0])(["a", "b", "c"], prompts=["p"] * 3)
    assert torch.equal(out.total, torch.tensor([1.0, 6.0, 1.0]))
    assert torch.isnan(out.scores["sometimes"][[0, 2]]).all()
    # No reward applies to samples 0 and 2: their total is NaN, not 0.
    out = RewardSet([sometimes, never])(["a", "b", "c"], prompts=["p"] * 3)
    assert torch.isnan(out.total[[0, 2]]).all() and out.total[1].item() == 3.0


def test_reward_set_default_weights_and_duplicate_names():
    out = RewardSet([TagCount(), TagCount()])([STRICT], prompts=["p"])
    assert list(out.scores) == ["tag_count", "tag_count_2"]
    assert out.total.item() == 2.0


def test_reward_set_accepts_tensor_output():
    out = RewardSet([lambda completions, **_: torch.ones(len(completions))])(["a", "b"], prompts=["p", "p"])
    assert torch.equal(out.total, torch.ones(2))


@pytest.mark.parametrize("bad_input", ["prompts", "answer"])
def test_reward_set_rejects_misaligned_columns(bad_input):
    columns = {"prompts": ["p", "p"], "answer": ["1", "2"]}
    columns[bad_input] = columns[bad_input][:1]
    with pytest.raises(ValueError, match=f"'{bad_input}' has 1 entries for 2 completions"):
        RewardSet([constant(1.0)])(["a", "b"], **columns)


def test_reward_set_constructor_checks():
    with pytest.raises(ValueError, match="2 reward weights for 1 rewards"):
        RewardSet([constant(1.0)], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="on_error"):
        RewardSet([constant(1.0)], on_error="zero")
    with pytest.raises(TypeError, match="callable"):
        RewardSet(["not a reward"])


def test_reward_set_wrong_count_names_the_reward():
    def two_short(completions, *, prompts, **columns):
        return [1.0] * (len(completions) - 2)

    with pytest.raises(RewardError, match="reward 'two_short' returned 1 scores for 3 completions"):
        RewardSet([two_short])(["a", "b", "c"], prompts=["p"] * 3)
    out = RewardSet([two_short, constant(1.0)], on_error="none", max_failure_frac=1.0)(["a", "b", "c"], prompts=["p"] * 3)
    assert torch.isnan(out.scores["two_short"]).all() and out.failures["two_short"] == 3
    assert torch.isnan(out.total).all() and out.failed.all()  # a failed sample is left out, not scored by the others alone


@pytest.mark.parametrize(
    ("bad_value", "message"),
    [
        # NaN and infinity would poison the group's advantages.
        (NAN, "non-finite score nan"),
        (math.inf, "non-finite score inf"),
        # A string is not a score.
        ("1.0", "non-numeric score '1.0'"),
    ],
)
def test_reward_set_invalid_scores(bad_value, message):
    def flaky(completions, *, prompts, **columns):
        return [1.0, bad_value, 1.0]

    with pytest.raises(RewardError, match=f"reward 'flaky' on sample 1 of 3 \\('b'\\) returned a {message}"):
        RewardSet([flaky])(["a", "b", "c"], prompts=["p"] * 3)
    out = RewardSet([flaky], on_error="none", max_failure_frac=1.0)(["a", "b", "c"], prompts=["p"] * 3)
    # Only the bad sample is lost.
    assert out.failures == {"flaky": 1}
    assert out.scores["flaky"][[0, 2]].tolist() == [1.0, 1.0] and torch.isnan(out.scores["flaky"][1])


class Picky(Reward):
    """Fails on one sample, scoring with `score_each` so the failure names it."""

    def __call__(self, completions, *, prompts, **columns):
        return score_each(lambda completion: 1.0 / (completion != "boom"), completions)


def test_reward_set_raising_reward_policy_raise():
    # The per-sample reward names the sample and a snippet of its completion.
    with pytest.raises(RewardError, match="reward 'picky' on sample 1 of 2 \\('boom'\\) raised ZeroDivisionError") as info:
        RewardSet([Picky()])(["fine", "boom"], prompts=["p", "p"])
    assert info.value.reward == "picky" and info.value.index == 1 and info.value.completion == "boom"
    assert isinstance(info.value.__cause__, RewardError)  # chained to the original traceback

    # A plain function that raises out of its batch: named, sample unknown.
    def broken(completions, *, prompts, **columns):
        raise KeyError("answer")

    with pytest.raises(RewardError, match="reward 'broken' raised KeyError: 'answer'") as info:
        RewardSet([broken])(["a"], prompts=["p"])
    assert info.value.index is None and isinstance(info.value.__cause__, KeyError)


def test_reward_set_raising_reward_policy_none(caplog):
    out = RewardSet([Picky(), constant(0.5)], on_error="none", max_failure_frac=1.0)(["fine", "boom"], prompts=["p", "p"])
    # The failed call's scores are None (NaN), counted, logged; never a silent 0.0.
    assert torch.isnan(out.scores["picky"]).all()
    assert out.failures == {"picky": 2, "constant_0.5": 0}
    assert torch.isnan(out.total).all()
    assert "reward 'picky' on sample 1 of 2 ('boom') raised ZeroDivisionError" in caplog.text


def sleepy(completions, *, prompts, **columns):
    time.sleep(0.3)
    return [1.0] * len(completions)


def sleeps_long(completions, *, prompts, **columns):
    time.sleep(3.0)  # far beyond the timeout below, however loaded the machine
    return [1.0] * len(completions)


def test_reward_set_timeout_policy_raise():
    reward_set = RewardSet([constant(1.0), sleeps_long], timeout=0.05)
    start = time.monotonic()
    with pytest.raises(RewardError, match="reward 'sleeps_long' exceeded the 0.05s timeout on a batch of 2 completions"):
        reward_set(["a", "b"], prompts=["p", "p"])
    assert time.monotonic() - start < 2.0  # did not wait for the sleeper


def test_reward_set_timeout_policy_none_from_a_worker_thread(caplog):
    # Thread-based timeouts work off the main thread, where signal.alarm cannot.
    reward_set = RewardSet([constant(1.0), sleepy], on_error="none", timeout=0.05, max_failure_frac=1.0)
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("out", reward_set(["a", "b"], prompts=["p", "p"])))
    thread.start()
    thread.join(timeout=5)
    out = result["out"]
    assert torch.isnan(out.scores["sleepy"]).all() and out.failures == {"constant_1.0": 0, "sleepy": 2}
    assert torch.isnan(out.total).all()
    # The abandoned call is still sleeping: the next call skips it instead of piling up threads.
    threads = threading.active_count()
    out = reward_set(["a"], prompts=["p"])
    assert out.failures["sleepy"] == 1 and threading.active_count() == threads
    assert "reward 'sleepy' is still running an earlier call that exceeded the 0.05s timeout" in caplog.text
    # Once the late call has finished, the reward is called again (and is fast enough now).
    time.sleep(0.35)
    reward_set.timeout = 1.0
    assert reward_set(["a"], prompts=["p"]).failures["sleepy"] == 0


def test_reward_set_with_accuracy_from_a_worker_thread(accuracy):
    # The set as GRPO uses it: a real math reward and a format reward, with a time limit.
    reward_set = RewardSet([accuracy, StrictFormat()], weights=[1.0, 0.5], timeout=10.0)
    result = {}
    thread = threading.Thread(
        target=lambda: result.setdefault(
            "out", reward_set([STRICT, "<think>\nr\n</think>\n<answer>\n41\n</answer>"], prompts=["p", "p"], answer=["42", "42"])
        )
    )
    thread.start()
    thread.join(timeout=30)
    assert torch.equal(result["out"].total, torch.tensor([1.5, 0.5]))


def test_reward_set_pickles():
    reward_set = RewardSet([TagCount(), exact_match], timeout=1.0)
    copy = pickle.loads(pickle.dumps(reward_set))
    assert copy.names == ["tag_count", "exact_match"]
    assert copy([STRICT], prompts=["p"], answer=[STRICT]).total.item() == 2.0


# ---------------------------------------------------------------- every failure kind, both policies


def _raises(completions, *, prompts, **columns):
    raise RuntimeError("boom")


def _wrong_count(completions, *, prompts, **columns):
    return [1.0] * (len(completions) - 1)


def _nan_one(completions, *, prompts, **columns):
    return [1.0, NAN, 1.0]


def _inf_one(completions, *, prompts, **columns):
    return [1.0, -math.inf, 1.0]


def _failed_one(completions, *, prompts, **columns):
    return [1.0, FailedScore("took longer than timeout=1s to verify"), 1.0]


def _hangs(completions, *, prompts, **columns):
    time.sleep(5.0)
    return [1.0] * len(completions)


@pytest.mark.parametrize("on_error", ["raise", "none", "auto"])
@pytest.mark.parametrize(
    ("reward", "message", "failed"),
    [
        # Raises out of its whole call: every sample of the call is lost.
        (_raises, "reward '_raises' raised RuntimeError: boom", 3),
        # One score too few: which score belongs to which sample is unknown, so all are lost.
        (_wrong_count, "reward '_wrong_count' returned 2 scores for 3 completions", 3),
        # NaN for one sample: only that sample is lost.
        (_nan_one, "reward '_nan_one' on sample 1 of 3 ('b') returned a non-finite score nan", 1),
        # -inf for one sample, likewise.
        (_inf_one, "reward '_inf_one' on sample 1 of 3 ('b') returned a non-finite score -inf", 1),
        # A FailedScore (Accuracy's verifier timed out or crashed on that sample).
        (_failed_one, "reward '_failed_one' on sample 1 of 3 ('b') took longer than timeout=1s to verify", 1),
        # Hangs past the set's timeout: abandoned, its call is lost.
        (_hangs, "reward '_hangs' exceeded the 0.2s timeout on a batch of 3 completions", 3),
    ],
)
def test_every_failure_follows_the_policy_from_a_worker_thread(reward, message, failed, on_error, caplog):
    reward_set = RewardSet([reward, constant(0.5)], on_error=on_error, timeout=0.2, max_failure_frac=1.0)
    result = {}

    def run():
        try:
            result["out"] = reward_set(["a", "b", "c"], prompts=["p"] * 3)
        except RewardError as error:
            result["error"] = error

    thread = threading.Thread(target=run)
    start = time.monotonic()
    thread.start()
    thread.join(timeout=60)
    assert time.monotonic() - start < 4.0 or reward is not _hangs  # the 5 s hang is not waited for
    # "auto" tolerates only a sample the reward reports it could not score (a user's function timing out is not built in).
    if on_error == "raise" or (on_error == "auto" and reward is not _failed_one):
        assert str(result["error"]).startswith(message) and result["error"].reward == reward.__name__
        return
    out = result["out"]
    assert out.failures == {reward.__name__: failed, "constant_0.5": 0}
    lost = torch.isnan(out.scores[reward.__name__])
    assert int(lost.sum()) == failed  # failures are None (NaN), never 0.0
    assert torch.equal(out.scores[reward.__name__][~lost], torch.ones(3 - failed))
    assert torch.equal(out.failed, lost)
    assert torch.allclose(out.total, torch.where(lost, math.nan, 1.5), equal_nan=True)  # a failed sample is left out
    assert message in caplog.text


def test_grpo_logs_reward_failures_per_reward(tmp_path):
    # Through a real GRPO step: the failure count is logged under the reward's name and the
    # failed samples are left out of its mean instead of counting as 0.
    from grpo_helpers import fit, logged_metrics, prompt_data, tiny_grpo

    def every_other_nan(completions, *, prompts, **columns):
        return [1.0 if i % 2 else NAN for i in range(len(completions))]

    module = tiny_grpo(rewards=[every_other_nan, constant(0.25)], reward_on_error="none", reward_max_failure_frac=0.5)
    logged = logged_metrics(fit(module, prompt_data(), tmp_path))
    assert logged["train/reward_failures/every_other_nan"] == [4.0]  # 2 prompts x G=4, half fail
    assert logged["train/reward_failures/constant_0.25"] == [0.0]
    assert logged["train/rewards/every_other_nan"] == [1.0]


# ---------------------------------------------------------------- the default policy: built-in failures are counted


def test_a_built_in_reward_timing_out_is_a_counted_failure_until_too_many(caplog):
    # math-verify on a power tower never ends: its sample is left out and counted, the run goes on,
    # until failures pass reward_max_failure_frac of the batch.
    from test_rewards import PATHOLOGICAL

    accuracy = Accuracy(timeout=1.0)
    try:
        reward_set = RewardSet([accuracy, StrictFormat()], weights=[1.0, 0.5], max_failure_frac=0.25)  # on_error="auto"
        batch = dict(prompts=["p"] * 4, answer=["42"] * 4)
        out = reward_set([PATHOLOGICAL, STRICT, STRICT, STRICT], **batch)
        assert out.failures == {"accuracy": 1, "strict_format": 0}
        assert out.failed.tolist() == [True, False, False, False]
        assert torch.isnan(out.total[0]) and out.total[1:].tolist() == [1.5, 1.5, 1.5]  # left out, not scored 0.5
        (warning,) = [r.getMessage() for r in caplog.records if "accuracy" in r.getMessage()]
        assert "reward 'accuracy' on sample 0 of 4" in warning and "took longer than timeout=1s" in warning
        assert "\n" not in warning  # one line
        with pytest.raises(RewardError, match=r"rewards failed on 2 of 4 samples \(accuracy 2\), more than reward_max_failure_frac=0.25"):
            reward_set([PATHOLOGICAL, PATHOLOGICAL, STRICT, STRICT], **batch)
    finally:
        accuracy.close()


def test_a_users_reward_raising_stops_the_run_with_one_line(tmp_path, capsys, monkeypatch):
    from r1_lightning.cli import main as cli_main

    extra = tmp_path / "rewards.yaml"
    extra.write_text("model:\n  init_args:\n    rewards: [user_rewards.answer_length]\n    reward_weights: [1.0]\n")
    monkeypatch.setattr("sys.argv", ["r1-lightning"])
    args = ["fit", "--config", str(ROOT / "configs" / "grpo.yaml"), "--config", str(extra),
            "--model.init_args.model_name_or_path", "builtin:tiny", "--model.init_args.max_new_tokens", "4", "--model.init_args.num_generations", "2", "--data.init_args.batch_size", "1",
            "--data.init_args.num_samples", "2", "--trainer.max_steps", "1", "--trainer.logger", "false",
            "--trainer.default_root_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "r1-lightning: error: reward 'answer_length' raised KeyError: 'reference'"
