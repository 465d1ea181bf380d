"""Tests for the evaluation metrics (`r1_lightning.metrics`): pass@k, majority vote, ReasoningMetrics."""

from __future__ import annotations

from math import comb

import pytest
import torch

from r1_lightning.metrics import ReasoningMetrics, majority_index, merge_equal_answers, pass_at_k


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (4, 1, 1, 0.25),  # pass@1 = c / n
        (4, 2, 2, 5 / 6),  # 1 - C(2,2)/C(4,2) = 1 - 1/6
        (4, 0, 2, 0.0),  # no correct sample: never passes
        (4, 4, 4, 1.0),  # all correct
        (4, 3, 2, 1.0),  # n - c = 1 < k: every draw of 2 holds a correct one
        (5, 2, 3, 1 - comb(3, 3) / comb(5, 3)),  # 1 - 1/10 = 0.9
        (8, 3, 1, 3 / 8),  # pass@1 = c / n for any n
    ],
)
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_rejects_k_above_the_number_of_samples():
    with pytest.raises(ValueError, match="k=5"):
        pass_at_k(4, 1, 5)


@pytest.mark.parametrize(
    "answers, expected",
    [
        (["3", "4", "4", "5"], 1),  # "4" twice: its first sample
        (["a", "b", "b", "a"], 0),  # tie 2-2: the answer seen first wins
        (["b", "a", "a", "b"], 0),  # the same tie the other way round: still the first seen
        (["x", "y", "z"], 0),  # all different: a tie of ones, first seen
        ([None, "7", None], 1),  # None is no answer, never the majority
        ([None, None, "7", "8", "8"], 3),  # "8" beats "7"; Nones are skipped even when most common
        ([None, None], None),  # nothing parsed at all
        ([], None),
    ],
)
def test_majority_index(answers, expected):
    assert majority_index(answers) == expected


def test_reasoning_metrics_on_a_hand_made_batch():
    metrics = ReasoningMetrics()
    # Prompt 1: samples 2 and 3 right ("5" twice wins the vote), 3 of 4 well formatted.
    # Prompt 2: one right sample ("9") loses the vote to "8" (twice) -> maj 0, pass@4 1, format 1/4.
    # Prompt 3: nothing parsed (answers None) and all wrong -> accuracy 0, maj 0, pass 0, format 0.
    metrics.update(
        correct=[[0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
        answers=[["4", "5", "5", "6"], ["8", "8", "9", None], [None, None, None, None]],
        formatted=[[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
    )
    out = metrics.compute(k=4)
    assert set(out) == {"accuracy", "maj@4", "pass@4", "format"}
    assert out["accuracy"].item() == pytest.approx((2 / 4 + 1 / 4 + 0) / 3)
    assert out["maj@4"].item() == pytest.approx((1 + 0 + 0) / 3)
    assert out["pass@4"].item() == pytest.approx((1 + 1 + 0) / 3)
    assert out["format"].item() == pytest.approx((3 / 4 + 1 / 4 + 0) / 3)


def test_prompts_with_unknown_correctness_count_for_format_only():
    metrics = ReasoningMetrics()
    metrics.update(
        correct=[[1.0, 0.0], [None, None]],  # the second prompt's reference could not be parsed
        answers=[["3", "2"], ["1", "1"]],
        formatted=[[1.0, 1.0], [0.0, 0.0]],
    )
    out = metrics.compute(k=2)
    assert out["accuracy"].item() == pytest.approx(0.5)  # prompt 1 only; counting prompt 2 as 0 would give 0.25
    assert out["maj@2"].item() == pytest.approx(1.0)  # tie "3"/"2": first seen ("3", correct)
    assert out["pass@2"].item() == pytest.approx(1.0)
    assert out["format"].item() == pytest.approx(0.5)  # both prompts: (1 + 0) / 2


def test_updates_accumulate_per_prompt_and_reset_clears():
    metrics = ReasoningMetrics()
    # Two batches (as two validation steps, or two ranks after the sync) average per prompt.
    metrics.update([[1.0, 1.0]], [["1", "1"]], [[1.0, 1.0]])
    metrics.update([[0.0, 0.0], [1.0, 0.0]], [["2", "2"], ["3", "4"]], [[0.0, 1.0], [1.0, 1.0]])
    out = metrics.compute(k=2)
    assert out["accuracy"].item() == pytest.approx((1 + 0 + 0.5) / 3)
    assert out["maj@2"].item() == pytest.approx((1 + 0 + 1) / 3)
    assert out["format"].item() == pytest.approx((1 + 0.5 + 1) / 3)
    metrics.reset()
    metrics.update([[0.0]], [["5"]], [[0.0]])
    assert metrics.compute(k=1)["accuracy"].item() == 0.0


def test_values_are_tensors_ready_for_logging():
    metrics = ReasoningMetrics()
    metrics.update([[1.0]], [["1"]], [[1.0]])
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in metrics.compute(k=1).values())


def test_log_and_reset_logs_every_metric_once_and_nothing_when_empty():
    logged = {}

    class Module:
        def log(self, name, value, prog_bar=False):
            logged[name] = (float(value), prog_bar)

    metrics = ReasoningMetrics()
    metrics.log_and_reset(Module(), "val", 2)
    assert logged == {}  # no prompt scored: no NaN metrics
    metrics.update([[1.0, 0.0]], [["4", "5"]], [[1.0, 1.0]])
    metrics.log_and_reset(Module(), "val", 2)
    assert logged == {"val/accuracy": (0.5, True), "val/maj@2": (1.0, False), "val/pass@2": (1.0, False), "val/format": (1.0, False)}
    assert metrics.format.update_count == 0  # reset


@pytest.mark.parametrize(
    "answers, equal_pairs, expected",
    [
        (["1/2", "3", "0.5"], {(0, 2)}, ["1/2", "3", "1/2"]),  # 0.5 joins 1/2's group, found first
        (["3", "3", "4"], set(), ["3", "3", "4"]),  # identical strings are equal without asking
        ([None, "0.5", "1/2"], {(1, 2)}, [None, "0.5", "0.5"]),  # None is no answer, in no group
        # j is compared with the first member of each group only: (1, 2) equal but 2 already joined 0's group.
        (["a", "b", "c"], {(0, 2), (1, 2)}, ["a", "b", "a"]),
    ],
)
def test_merge_equal_answers(answers, equal_pairs, expected):
    assert merge_equal_answers(answers, lambda i, j: (i, j) in equal_pairs) == expected


def test_majority_vote_counts_answers_math_verify_finds_equal():
    from r1_lightning.evaluation import group_equal_answers

    # Prompt 1: 0.5, 1/2 and \frac{1}{2} are one answer with three votes against "3" (once, first seen):
    # as strings every answer would have one vote and "3" would win the tie.
    # Prompt 2: 2 and 2.0 are equal, 20 is not.
    answers = ["3", "0.5", "1/2", "\\frac{1}{2}", "20", "2", "2.0", "20"]
    grouped = group_equal_answers(answers, 4)
    assert grouped == [["3", "0.5", "0.5", "0.5"], ["20", "2", "2", "20"]]
    assert majority_index(grouped[0]) == 1 and majority_index(answers[:4]) == 0
    metrics = ReasoningMetrics()
    metrics.update([[0.0, 1.0, 1.0, 1.0]], grouped[:1], [[1.0] * 4])
    assert metrics.compute(4)["maj@4"].item() == 1.0  # the string vote would pick "3": maj@4 = 0
