"""Correctness rewards: the final answer checked against the reference with math-verify."""

from __future__ import annotations

import logging
import math
import threading
from typing import Any, Literal

from r1_lightning.rewards.base import FailedScore, Reward
from r1_lightning.rewards.length import text_lengths
from r1_lightning.rewards.parsing import extract_answer
from r1_lightning.rewards.process_pool import TimeoutPool

_POOL_LOCK = threading.Lock()  # two threads' first calls must not start two pools

# Short texts without math delimiters are also tried as inline math ("$...$"): math-verify
# reads undelimited LaTeX poorly (`3\sqrt{2}` → 3, `\pi` → nothing). Long texts are prose.
_MAX_BARE_MATH_CHARS = 200
_LATEX_MARKUP = ("\\", "^", "_", "{", "=")


def _parse_math(text: str, *, reference: bool = False) -> list:
    """math-verify's parse of `text`, trying it as inline math where that reads better.

    Args:
        text: A reference answer or the answer part of a completion.
        reference: `text` is a reference answer, which is never prose, so inline math is
            tried first; for a prediction only when it carries LaTeX markup.
    """
    from math_verify import parse

    text = text.strip()
    candidates = [text]
    if "$" not in text and "\\boxed" not in text and len(text) <= _MAX_BARE_MATH_CHARS:
        as_math = reference or any(mark in text for mark in _LATEX_MARKUP)
        candidates = [f"${text}$", text] if as_math else [text, f"${text}$"]
    for candidate in candidates:
        # parsing_timeout=None: no signal.alarm (main thread only); the worker process is the limit.
        parsed = parse(candidate, parsing_timeout=None)
        if _has_math(parsed):
            break
    return parsed


def _has_math(parsed: list) -> bool:
    # math-verify also returns the matched string; only a sympy object is a parsed answer.
    return any(not isinstance(item, str) for item in parsed)


def _verify_sample(prediction: str, reference: str) -> float | None:
    """1.0 if `prediction` matches `reference`, 0.0 if not, None if `reference` does not parse."""
    from math_verify import verify

    gold = _parse_math(reference, reference=True)
    if not _has_math(gold):
        return None
    return float(verify(gold, _parse_math(prediction), timeout_seconds=None))


def _prepare_worker() -> None:
    """Runs in each worker process before its first sample (not in the caller)."""
    # Our time limit is the worker kill, so math-verify's "timeout disabled" warning is noise.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    _verify_sample("1", "1")  # import and warm up the LaTeX parser off the clock


class Accuracy(Reward):
    """1.0 if the final answer equals the reference answer, else 0.0 (DeepSeek-R1's accuracy reward).

    The answer is read from `<answer>...</answer>`, else after `</think>`, else (if
    `fallback_to_completion`) from the whole completion. Both sides are parsed and
    compared with math-verify (https://github.com/huggingface/Math-Verify), so
    `\\frac{1}{2}`, `0.5`, `\\boxed{1/2}` and `$\\frac12$` all match. A reference that does
    not parse as math gives `None` (not applicable) for its samples.

    Time limit and threads: math-verify's own timeouts use `signal.alarm`, which only
    works in the main thread, and sympy can hang on a pathological expression. So every
    sample is verified in a small pool of worker processes (started on the first call);
    a sample that takes longer than `timeout` seconds has its worker killed and replaced.
    Such a sample, and one whose verification raised or crashed its worker, gets a
    `FailedScore` naming the reason instead of a score: `RewardSet` applies its `on_error`
    policy to it and counts it in `train/reward_failures/accuracy` (it is not scored 0.0,
    which would be indistinguishable from a wrong answer). The reward can therefore be
    called from any thread and never takes more than about `timeout` seconds per sample.
    Calls are serialised; the object pickles without its pool. Workers are killed with
    the object, at interpreter exit (daemon processes), and exit by themselves within about
    a second when the parent process dies.

    Args:
        answer_column: Column holding the reference answer (string or number).
        timeout: Seconds allowed to parse and verify one sample.
        fallback_to_completion: Without `<answer>` tags or `</think>`, look for the answer
            in the whole completion; if False, such a completion scores 0.0.
        num_workers: Worker processes verifying samples in parallel.
        start_method: multiprocessing start method of the workers ("fork", "spawn",
            "forkserver"); default "fork" where available, which starts in milliseconds.
    """

    def __init__(
        self,
        answer_column: str = "answer",
        timeout: float = 5.0,
        fallback_to_completion: bool = True,
        num_workers: int = 1,
        start_method: Literal["fork", "spawn", "forkserver"] | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.answer_column = answer_column
        self.timeout = timeout
        self.fallback_to_completion = fallback_to_completion
        self.num_workers = num_workers
        self.start_method = start_method
        self._pool: TimeoutPool | None = None

    def __call__(self, completions: list[str], *, prompts: list, **columns: Any) -> list[float | None | FailedScore]:
        if self.answer_column not in columns:
            raise KeyError(
                f"{type(self).__name__} reads the reference answer from column {self.answer_column!r}, "
                f"but the batch has columns {sorted(columns)}; set answer_column"
            )
        references = columns[self.answer_column]
        scores: list[float | None] = [None] * len(completions)
        jobs, indices = [], []
        for i, (completion, reference) in enumerate(zip(completions, references)):
            if reference is None or not str(reference).strip():
                continue  # no reference: not applicable
            answer = extract_answer(completion)
            if answer is None:
                if not self.fallback_to_completion:
                    scores[i] = 0.0
                    continue
                answer = completion
            jobs.append((answer, str(reference)))
            indices.append(i)
        outcomes = self._get_pool().map(jobs, self.timeout) if jobs else []
        for i, outcome in zip(indices, outcomes):
            scores[i] = self._score(outcome)
        return scores

    def equal_answers(self, pairs: list[tuple[str, str]]) -> list[bool]:
        """For each ``(answer, other)``, whether math-verify finds them equal (``0.5``, ``1/2``, ``\\frac{1}{2}``).

        Verified in the same worker processes as the rewards; a pair that fails or times out is not equal.
        """
        outcomes = self._get_pool().map([(other, answer) for answer, other in pairs], self.timeout) if pairs else []
        return [outcome.status == "ok" and outcome.value == 1.0 for outcome in outcomes]

    def _score(self, outcome: Any) -> float | None | FailedScore:
        if outcome.status == "ok":
            return outcome.value
        if outcome.status == "error":
            return FailedScore(f"raised {outcome.value} in math-verify")
        if outcome.status == "timeout":
            return FailedScore(f"took longer than timeout={self.timeout:g}s to verify (its worker process was killed)")
        return FailedScore("crashed its math-verify worker process")

    def _get_pool(self) -> TimeoutPool:
        with _POOL_LOCK:
            if self._pool is None:
                import math_verify  # noqa: F401  imported before the workers fork, so they inherit it

                self._pool = TimeoutPool(
                    _verify_sample, num_workers=self.num_workers, initializer=_prepare_worker, start_method=self.start_method
                )
            return self._pool

    def close(self) -> None:
        """Stop the worker processes (they also stop when this object is garbage collected)."""
        if self._pool is not None:
            self._pool.close()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_pool": None}


class CosineScaledAccuracy(Reward):
    """Length-scaled correctness (Yeo et al. 2025, "Demystifying Long Chain-of-Thought
    Reasoning in LLMs", https://arxiv.org/abs/2502.03373, the cosine length-scaling reward).

    Correct answers earn more when shorter, wrong answers are punished less when longer
    (more thinking is encouraged only where it is needed). With L the completion length,
    L_max = `max_length`, and r_0 / r_L the values at length 0 / L_max for the outcome
    (`correct_short`/`correct_long` or `wrong_short`/`wrong_long`):

        r(L) = r_L + (r_0 - r_L) * (1 + cos(pi * min(L, L_max) / L_max)) / 2

    A completion longer than `max_length` gets `exceed_value` if set, else r_L. `None`
    where `Accuracy` is `None` (unparsable reference). Defaults follow open-r1's.

    Args:
        max_length: L_max, in characters, or in tokens when `tokenizer` is set.
        correct_short: Reward of a correct answer of length 0.
        correct_long: Reward of a correct answer of length `max_length`.
        wrong_short: Reward of a wrong answer of length 0.
        wrong_long: Reward of a wrong answer of length `max_length`.
        exceed_value: Reward beyond `max_length` (the paper's r_exceed); `None` keeps r_L.
        tokenizer: Hugging Face tokenizer name or local directory to count tokens with;
            `None` counts characters.
        answer_column: Column holding the reference answer.
        timeout: Seconds allowed to verify one sample (see `Accuracy`).
        fallback_to_completion: See `Accuracy`.
        num_workers: See `Accuracy`.
    """

    def __init__(
        self,
        max_length: int = 4000,
        correct_short: float = 1.0,
        correct_long: float = 0.5,
        wrong_short: float = -1.0,
        wrong_long: float = -0.5,
        exceed_value: float | None = None,
        tokenizer: str | None = None,
        answer_column: str = "answer",
        timeout: float = 5.0,
        fallback_to_completion: bool = True,
        num_workers: int = 1,
    ) -> None:
        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.max_length = max_length
        self.correct = (correct_short, correct_long)
        self.wrong = (wrong_short, wrong_long)
        self.exceed_value = exceed_value
        self.tokenizer = tokenizer
        self.accuracy = Accuracy(answer_column, timeout, fallback_to_completion, num_workers)

    def __call__(self, completions: list[str], *, prompts: list, **columns: Any) -> list[float | None]:
        correct = self.accuracy(completions, prompts=prompts, **columns)
        lengths = text_lengths(completions, self.tokenizer)
        # None and a FailedScore pass through: an unverified answer is neither right nor wrong.
        return [
            c if c is None or isinstance(c, FailedScore) else self._scale(c == 1.0, length) for c, length in zip(correct, lengths)
        ]

    def _scale(self, correct: bool, length: int) -> float:
        if length > self.max_length and self.exceed_value is not None:
            return self.exceed_value
        short, long = self.correct if correct else self.wrong
        progress = min(length, self.max_length) / self.max_length
        return long + (short - long) * (1.0 + math.cos(math.pi * progress)) / 2.0
