"""Format rewards: does the completion follow the R1 layout of reasoning then answer?

They read the completion as the model would see it in full: with a chat template that
opens `<think>` itself, call `restore_think_prefill` on the completion first (the GRPO
module does).
"""

from __future__ import annotations

import re
from typing import Any

from r1_lightning.rewards.base import Reward, score_each
from r1_lightning.rewards.parsing import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN

_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)


def _each_tag_once(text: str) -> bool:
    # Without this, a lazy `.*?` could swallow a second think/answer block.
    return all(text.count(tag) == 1 for tag in _TAGS)


class StrictFormat(Reward):
    """1.0 if the whole completion is exactly `<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>`.

    Each tag appears once, with the newlines shown; only trailing whitespace (e.g. a newline
    before end-of-sequence) is allowed after `</answer>`. The R1 format reward in its strict
    form, as in open-r1's `format_reward`.
    """

    _LAYOUT = re.compile(r"<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>\s*", re.DOTALL)

    def __call__(self, completions: list[str], *, prompts: list, **columns: Any) -> list[float | None]:
        return score_each(self._score, completions)

    def _score(self, completion: str) -> float:
        return float(_each_tag_once(completion) and self._LAYOUT.fullmatch(completion) is not None)


class LenientFormat(Reward):
    """1.0 if the completion is a `<think>...</think>` block followed by an `<answer>...</answer>` block.

    Whitespace is free around and inside the blocks, but nothing else may stand outside them
    and each tag appears once.
    """

    _LAYOUT = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL)

    def __call__(self, completions: list[str], *, prompts: list, **columns: Any) -> list[float | None]:
        return score_each(self._score, completions)

    def _score(self, completion: str) -> float:
        return float(_each_tag_once(completion) and self._LAYOUT.fullmatch(completion) is not None)


class TagCount(Reward):
    """0.25 for each of the four R1 tags that occurs exactly once with its newlines (open-r1's
    `tag_count_reward`): `<think>\\n`, `\\n</think>\\n`, `\\n<answer>\\n`, `\\n</answer>`.

    A denser signal than `StrictFormat` early in training: partial layouts earn partial credit.
    """

    _PIECES = ("<think>\n", "\n</think>\n", "\n<answer>\n", "\n</answer>")

    def __call__(self, completions: list[str], *, prompts: list, **columns: Any) -> list[float | None]:
        return score_each(self._score, completions)

    def _score(self, completion: str) -> float:
        return 0.25 * sum(completion.count(piece) == 1 for piece in self._PIECES)


class ReasoningSteps(Reward):
    """min(1, steps / `min_steps`): rewards step-by-step reasoning (open-r1's `reasoning_steps_reward`).

    A step is a "Step N:" marker, a numbered line ("2. ..."), a bullet line ("- ..." or
    "* ..."), or a sentence opening with "First,", "Second,", "Next," or "Finally,".
    Unlike open-r1's pattern, numbered lines count anywhere, not only at the very start.

    Args:
        min_steps: Number of steps that earns the full 1.0.
    """

    _STEP = re.compile(r"Step \d+:|^[ \t]*\d+\.\s|^[ \t]*[-*][ \t]|\b(?:First|Second|Next|Finally),", re.MULTILINE)

    def __init__(self, min_steps: int = 3) -> None:
        if min_steps < 1:
            raise ValueError(f"min_steps must be >= 1, got {min_steps}")
        self.min_steps = min_steps

    def __call__(self, completions: list[str], *, prompts: list, **columns: Any) -> list[float | None]:
        return score_each(self._score, completions)

    def _score(self, completion: str) -> float:
        return min(1.0, len(self._STEP.findall(completion)) / self.min_steps)
