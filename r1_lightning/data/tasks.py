"""The built-in task: multi-digit addition and subtraction with a worked, column-by-column solution.

Every problem is a deterministic function of (split, index, seed). The held-out evaluation
problems are those whose hash falls in bucket 0 of 10; training splits (cold-start SFT and RL
prompts) skip that bucket, so evaluation never overlaps training.

A cold-start sample looks like::

    prompt:     Compute 47+385.
    completion: <think>
                7+5+0=12: write 2, carry 1
                4+8+1=13: write 3, carry 1
                0+3+1=4: write 4, carry 0
                </think>
                <answer>
                432
                </answer>

``prompt_style="words"`` asks the same problems in English for pretrained models (a plain
"What is 47 + 385?" or a one-line word problem), for example::

    prompt:     A library has 385 books and gets 47 more. How many books does it have now?
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Literal

from r1_lightning.errors import ConfigError

Split = Literal["sft", "rl", "eval"]
_SPLIT_SEEDS = {"sft": 1, "rl": 2, "eval": 3}
_MAX_MISSES = 100_000  # draws in a row without a new problem before we call the split exhausted


@dataclass
class ArithmeticTask:
    """Multi-digit addition / subtraction (non-negative results) with step-by-step reasoning.

    Args:
        min_digits: Fewest digits of an operand.
        max_digits: Most digits of an operand.
        operations: Operators to draw from, any of ``+`` and ``-``.
        seed: Changes every problem of every split.
        prompt_style: ``compute`` ("Compute 47+385.", for the built-in character-level models) or
            ``words`` (English questions and word problems, for pretrained models). The problems,
            answers, worked solutions and held-out split are the same in both.
    """

    min_digits: int = 1
    max_digits: int = 2
    operations: str = "+-"
    seed: int = 0
    prompt_style: Literal["compute", "words"] = "compute"

    def __post_init__(self) -> None:
        if not 1 <= self.min_digits <= self.max_digits:
            raise ConfigError(f"task: need 1 <= min_digits <= max_digits, got {self.min_digits} and {self.max_digits}")
        if not self.operations or set(self.operations) - {"+", "-"}:
            raise ConfigError(f"task.operations={self.operations!r}: use a non-empty mix of '+' and '-'")
        if self.prompt_style not in ("compute", "words"):
            raise ConfigError(f"task.prompt_style={self.prompt_style!r}: choose compute or words")

    def rows(self, split: Split, num_samples: int) -> list[dict[str, str]]:
        """``num_samples`` rows ``{prompt, completion, answer}`` of one split, without repeats."""
        rng = random.Random(f"{self.seed}-{_SPLIT_SEEDS[split]}")
        rows, seen, misses = [], set(), 0
        while len(rows) < num_samples:
            a, op, b = self._draw(rng)
            if (a, op, b) in seen or (split == "eval") != is_held_out(a, op, b):
                misses += 1
                if misses > _MAX_MISSES:  # the split has fewer distinct problems than asked for
                    raise ConfigError(
                        f"task: found only {len(rows)} distinct {split!r} problems with min_digits={self.min_digits}, "
                        f"max_digits={self.max_digits}, operations={self.operations!r}; asked for {num_samples}: "
                        "ask for fewer samples or allow more digits"
                    )
                continue
            misses = 0
            seen.add((a, op, b))
            row = solve(a, op, b)
            if self.prompt_style == "words":
                row["prompt"] = word_problem(a, op, b)
            rows.append(row)
        return rows

    def _draw(self, rng: random.Random) -> tuple[int, str, int]:
        def number() -> int:
            digits = rng.randint(self.min_digits, self.max_digits)
            return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)

        a, op, b = number(), rng.choice(self.operations), number()
        if op == "-" and a < b:
            a, b = b, a
        return a, op, b


def is_held_out(a: int, op: str, b: int) -> bool:
    digest = hashlib.sha256(f"{a}{op}{b}".encode()).digest()
    return digest[0] % 10 == 0


def solve(a: int, op: str, b: int) -> dict[str, str]:
    """The prompt, the worked solution and the answer of ``a op b``."""
    width = max(len(str(a)), len(str(b)))
    xs, ys = str(a).zfill(width)[::-1], str(b).zfill(width)[::-1]
    lines, carry, written = [], 0, []
    for x, y in zip(map(int, xs), map(int, ys)):
        if op == "+":
            total = x + y + carry
            lines.append(f"{x}+{y}+{carry}={total}: write {total % 10}, carry {total // 10}")
            digit, carry = total % 10, total // 10
        else:
            borrow_out = int(x - y - carry < 0)
            digit = x + 10 * borrow_out - y - carry
            lines.append(f"{x + 10 * borrow_out}-{y}-{carry}={digit}: write {digit}, borrow {borrow_out}")
            carry = borrow_out
        written.append(str(digit))
    if op == "+" and carry:
        lines.append("0+0+1=1: write 1, carry 0")
        written.append("1")
    answer = str(int("".join(reversed(written))))
    assert answer == str(a + b if op == "+" else a - b)
    completion = "<think>\n" + "\n".join(lines) + "\n</think>\n<answer>\n" + answer + "\n</answer>"
    return {"prompt": f"Compute {a}{op}{b}.", "completion": completion, "answer": answer}



# Word problems: (template for a + b, template for a - b); {a} is the larger operand of a subtraction.
_WORDED = (
    ("What is {a} + {b}?", "What is {a} - {b}?"),
    ("Add {a} and {b}.", "Subtract {b} from {a}."),
    (
        "A library has {a} books and gets {b} more. How many books does it have now?",
        "A library has {a} books and lends out {b} of them. How many books are left on the shelves?",
    ),
    (
        "Sam has {a} marbles and finds {b} more. How many marbles does Sam have?",
        "Sam has {a} marbles and gives {b} to a friend. How many marbles does Sam have left?",
    ),
    (
        "A farm has {a} sheep and buys {b} more. How many sheep are on the farm?",
        "A farm has {a} sheep and sells {b}. How many sheep are left on the farm?",
    ),
    (
        "A train carries {a} passengers and {b} more get on. How many passengers are on the train?",
        "A train carries {a} passengers and {b} get off. How many passengers are still on the train?",
    ),
)


def word_problem(a: int, op: str, b: int) -> str:
    """``a op b`` asked in English; the wording is a fixed function of the problem."""
    digest = hashlib.sha256(f"words:{a}{op}{b}".encode()).digest()
    addition, subtraction = _WORDED[digest[1] % len(_WORDED)]
    return (addition if op == "+" else subtraction).format(a=a, b=b)
