"""Evaluation metrics for reasoning: pass@1 averaged over k samples, pass@k, and majority vote (maj@k).

The per-prompt numbers are computed by plain functions; torchmetrics ``MeanMetric``s average
them, so the results are correct across ranks (each rank adds its prompts, the sync sums).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from math import comb

import torch
from torchmetrics import MeanMetric


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if k > num_samples:
        raise ValueError(f"pass@k needs k <= samples per prompt, got k={k} and {num_samples} samples")
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - comb(num_samples - num_correct, k) / comb(num_samples, k)


def majority_index(answers: list[str | None]) -> int | None:
    """Index of a sample whose answer is the most common one (first seen wins ties); None if no answers."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    top = max(counts.values())
    return next(i for i, a in enumerate(answers) if a is not None and counts[a] == top)


def merge_equal_answers(answers: list[str | None], equal: Callable[[int, int], bool]) -> list[str | None]:
    """Answers with each one replaced by the first earlier answer it equals, so that votes count meanings.

    ``equal(i, j)`` (i < j) says whether answers i and j mean the same (e.g. math-verify's ``1/2`` and
    ``0.5``); identical strings are always equal. Each answer is compared with the first member of each
    group seen so far, in order. For example, ``["1/2", "3", "0.5"]`` with ``1/2 == 0.5`` becomes
    ``["1/2", "3", "1/2"]``, and then ``majority_index`` picks sample 0.
    """
    merged: list[str | None] = []
    firsts: list[int] = []  # the first member of each group
    for j, answer in enumerate(answers):
        if answer is None:
            merged.append(None)
            continue
        group = next((i for i in firsts if answers[i] == answer or equal(i, j)), None)
        if group is None:
            firsts.append(j)
        merged.append(answer if group is None else answers[group])
    return merged


class ReasoningMetrics(torch.nn.Module):
    """``accuracy`` (pass@1 over k samples), ``maj@k``, ``pass@k`` and ``format``, synced across ranks."""

    def __init__(self) -> None:
        super().__init__()
        self.accuracy, self.majority, self.pass_k, self.format = MeanMetric(), MeanMetric(), MeanMetric(), MeanMetric()
        self.reasoning_length = MeanMetric()

    def update(
        self,
        correct: list[list[float | None]],
        answers: list[list[str | None]],
        formatted: list[list[float]],
        reasoning_lengths: list[list[int]] | None = None,
    ) -> None:
        """Per prompt: correctness (0/1) of each of its k samples, their normalised answers and format scores.

        A prompt whose correctness is None (its reference answer cannot be parsed) counts for
        ``format`` only.
        """
        for lengths in reasoning_lengths or []:
            self.reasoning_length.update(sum(lengths) / len(lengths))
        for scores, prompt_answers, fmt in zip(correct, answers, formatted):
            self.format.update(sum(fmt) / len(fmt))
            if any(s is None for s in scores):
                continue
            self.accuracy.update(sum(scores) / len(scores))
            winner = majority_index(prompt_answers)
            self.majority.update(0.0 if winner is None else scores[winner])
            self.pass_k.update(pass_at_k(len(scores), int(sum(scores)), len(scores)))

    def compute(self, k: int) -> dict[str, torch.Tensor]:
        values = {"accuracy": self.accuracy, f"maj@{k}": self.majority, f"pass@{k}": self.pass_k, "format": self.format}
        if self.reasoning_length.update_count:
            values["reasoning_length"] = self.reasoning_length
        return {name: metric.compute() for name, metric in values.items()}

    def log_and_reset(self, module, prefix: str, k: int, prog_bar: tuple[str, ...] = ("accuracy",)) -> None:
        """Log ``<prefix>/<name>`` for every metric through ``module.log`` (nothing if no prompt was scored), then reset."""
        if self.format.update_count:
            for name, value in self.compute(k).items():
                module.log(f"{prefix}/{name}", value, prog_bar=name in prog_bar)
        self.reset()

    def reset(self) -> None:
        for metric in (self.accuracy, self.majority, self.pass_k, self.format, self.reasoning_length):
            metric.reset()
