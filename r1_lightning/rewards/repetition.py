"""Penalty for repetitive text, a common failure of RL-trained reasoning models."""

from __future__ import annotations

from typing import Any

from r1_lightning.rewards.base import Reward, score_each


class RepetitionPenalty(Reward):
    """N-gram repetition penalty (open-r1's `repetition_penalty_reward`; Yeo et al. 2025,
    https://arxiv.org/abs/2502.03373).

    Over the lowercased whitespace-separated words of the completion:

        penalty = max_penalty * (1 - unique n-grams / total n-grams)

    0 for text with no repeated n-gram (or fewer than n words), approaching `max_penalty`
    for text that repeats one phrase over and over.

    Args:
        ngram_size: n, the number of words per n-gram.
        max_penalty: The penalty (<= 0) approached by fully repetitive text.
    """

    def __init__(self, ngram_size: int = 3, max_penalty: float = -1.0) -> None:
        if ngram_size < 1:
            raise ValueError(f"ngram_size must be >= 1, got {ngram_size}")
        if max_penalty > 0:
            raise ValueError(f"max_penalty is a penalty and must be <= 0, got {max_penalty}")
        self.ngram_size = ngram_size
        self.max_penalty = max_penalty

    def __call__(self, completions: list[str], *, prompts: list, **columns: Any) -> list[float | None]:
        return score_each(self._score, completions)

    def _score(self, completion: str) -> float:
        words = completion.lower().split()
        ngrams = [tuple(words[i : i + self.ngram_size]) for i in range(len(words) - self.ngram_size + 1)]
        if not ngrams:
            return 0.0
        return self.max_penalty * (1.0 - len(set(ngrams)) / len(ngrams))
