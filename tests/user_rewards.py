"""Rewards as a user writes them, in a module of their own (referenced from YAML by the CLI test).

`CharShare` is a `Reward` subclass with a setting; `digit_share` is a plain function. Both follow
the reward protocol: `(completions, *, prompts, **columns) -> list[float | None]`.
"""

from __future__ import annotations

from typing import Any

from r1_lightning.rewards import Reward


class CharShare(Reward):
    """The share of `char` among the completion's characters (0 for an empty completion).

    Trivially learnable from scratch: the policy only has to emit one token more often.

    Args:
        char: The character to count.
    """

    def __init__(self, char: str = "7") -> None:
        self.char = char

    def __call__(self, completions: list[str], *, prompts: list, **columns: Any) -> list[float | None]:
        return [c.count(self.char) / len(c) if c else 0.0 for c in completions]


def digit_share(completions: list[str], *, prompts: list, **columns: Any) -> list[float | None]:
    """The share of decimal digits among the completion's characters."""
    return [sum(ch.isdigit() for ch in c) / len(c) if c else 0.0 for c in completions]


def answer_length(completions: list[str], *, prompts: list, **columns: Any) -> list[float | None]:
    """A user's reward with a bug: it reads a column the data does not have (a KeyError on every call)."""
    return [float(len(a)) for a in columns["reference"]]
