"""The reward protocol: what a reward is, what it is called, and how a failure names its sample.

A reward is any callable

    reward(completions: list[str], *, prompts: list, **columns) -> list[float | None]

returning one score per completion (`None` = not applicable). `prompts` and every column
(e.g. `answer`) hold one entry per completion, and a call always covers whole groups of
G completions. A plain function works; subclass `Reward` for a reward with settings.

A reward that cannot score one sample (its verifier timed out or crashed) returns a
`FailedScore` in that sample's place: `RewardSet` then applies its `on_error` policy to that
sample alone and counts it, instead of the sample getting a made-up 0.0.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from r1_lightning.errors import UserError

RewardFn = Callable[..., list[float | None]]
"""Type of a reward: `(completions, *, prompts, **columns) -> list[float | None]`."""


class FailedScore(NamedTuple):
    """Returned in place of a score when one sample could not be scored.

    `RewardSet` treats it as a failure of that sample (raise, or `None` and counted, by its
    `on_error`); it is never a number, so it cannot pass for a 0.0.

    Attributes:
        reason: What went wrong, e.g. "took longer than 5s to verify".
    """

    reason: str


class Reward(ABC):
    """Base class for rewards with settings, referenced from YAML by `class_path`.

    Subclasses implement `__call__` with the reward signature and accept (and ignore)
    columns they do not use. The constructor takes no arguments from this class, so a
    subclass's `__init__` is all jsonargparse sees.

    `name` (used for logging as `train/rewards/<name>`) defaults to the class name in
    snake_case; override it with a class attribute (`name = "acc"`) or by assignment.

    Example:
        >>> class Short(Reward):
        ...     def __call__(self, completions, *, prompts, **columns):
        ...         return [float(len(c) < 100) for c in completions]
        >>> Short().name
        'short'
    """

    @abstractmethod
    def __call__(self, completions: list[str], *, prompts: list, **columns: Any) -> list[float | None]:
        """Score each completion.

        Args:
            completions: Generated texts, G consecutive ones per prompt.
            prompts: The prompt of each completion.
            **columns: Extra dataset columns (e.g. `answer`), one entry per completion.

        Returns:
            One score per completion, `None` where the reward does not apply.
        """

    @property
    def name(self) -> str:
        """The name used for logging; the class name in snake_case unless overridden."""
        return getattr(self, "_name", None) or snake_case(type(self).__name__)

    @name.setter
    def name(self, value: str) -> None:
        self._name = value


def snake_case(name: str) -> str:
    """`CosineScaledAccuracy` → `cosine_scaled_accuracy`, `HTTPReward` → `http_reward`."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def reward_name(fn: RewardFn) -> str:
    """The logging name of a reward.

    A `name` string attribute wins (every `Reward` has one); a function gives its
    `__name__`, a `functools.partial` its function's, any other callable object its
    class name in snake_case.
    """
    name = getattr(fn, "name", None)
    if isinstance(name, str) and name:
        return name
    func = getattr(fn, "func", None)  # functools.partial
    if func is not None and callable(func):
        return reward_name(func)
    name = getattr(fn, "__name__", None)
    if isinstance(name, str) and name:
        return name.strip("<>")  # "<lambda>" would make an awkward metric name
    return snake_case(type(fn).__name__)


class RewardError(UserError, RuntimeError):
    """A reward failed: it raised, ran past its time limit, or returned bad scores.

    A ``UserError``: the CLI prints its message as one line (``R1_DEBUG=1`` shows the traceback).

    Attributes:
        reward: Name of the failing reward, when known.
        index: Index of the failing sample in the batch, when known.
        completion: The failing sample's completion, when known.
    """

    def __init__(
        self,
        message: str,
        *,
        reward: str | None = None,
        index: int | None = None,
        completion: str | None = None,
    ) -> None:
        super().__init__(message)
        self.reward = reward
        self.index = index
        self.completion = completion


def snippet(text: str, limit: int = 80) -> str:
    """A short quoted preview of a completion for error messages."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


def score_each(score: Callable[..., float | None], completions: Sequence[str], **columns: Sequence[Any]) -> list[float | None]:
    """Score completions one at a time, so that a failure names its sample.

    Args:
        score: Called as `score(completion, **row)` where `row` maps each column name to
            this sample's entry.
        completions: The completions to score.
        **columns: Per-completion columns to pass on, e.g. `answer=answers`.

    Returns:
        `[score(c_0, ...), score(c_1, ...), ...]`.

    Raises:
        RewardError: `score` raised; the error carries the sample's index and completion
            and chains the original exception.
    """
    scores = []
    for i, completion in enumerate(completions):
        row = {key: values[i] for key, values in columns.items()}
        try:
            scores.append(score(completion, **row))
        except Exception as exc:
            raise RewardError(
                f"sample {i} ({snippet(completion)}): {type(exc).__name__}: {exc}", index=i, completion=completion
            ) from exc
    return scores
