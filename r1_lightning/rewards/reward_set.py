"""A weighted set of rewards: calls each on a batch, checks what comes back, and sums."""

from __future__ import annotations

import logging
import math
import numbers
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from r1_lightning.errors import ConfigError
from r1_lightning.rewards.base import FailedScore, RewardError, RewardFn, reward_name, snippet
from r1_lightning.rl.advantages import normalize_in_groups

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RewardScores:
    """What `RewardSet` returns for a batch of N completions.

    Attributes:
        scores: Reward name → its scores, float32 `[N]`, NaN where the reward returned
            `None` or failed.
        total: Weighted sum over the rewards that scored each sample, float32 `[N]`; NaN
            where no reward did.
        failures: Reward name → number of samples whose score was lost to a failure
            (always 0 with `on_error="raise"`, which raises instead).
        failed: bool `[N]`, True where any reward failed on the sample (its total is then NaN:
            the sample is left out of the advantages rather than scored by the other rewards alone).
    """

    scores: dict[str, Tensor]
    total: Tensor
    failures: dict[str, int]
    failed: Tensor | None = None


class _Failure(Exception):
    """A reward's whole call failed: it timed out or returned something that is not N scores."""


class _TimedOut(_Failure):
    """A reward's whole call ran past the set's `timeout`."""


class RewardSet:
    """Weighted rewards scored together, with validation and a failure policy.

    A reward *fails* when it raises, runs past `timeout`, returns the wrong number of
    scores (whole call), or returns a non-numeric, NaN or infinite score or a `FailedScore`
    (that sample). What a failure does (`on_error`):

    - `"auto"` (the default): a sample a reward reports it could not score (a `FailedScore`:
      math-verify timed out or crashed on it) and a built-in reward (`r1_lightning.rewards`)
      running past `timeout` are *tolerated*; a reward that raises, returns the wrong
      number of scores or a NaN/non-numeric score (a bug, usually in the user's own reward)
      raises.
    - `"none"`: every failure is tolerated.
    - `"raise"`: every failure raises.

    A tolerated failure makes that sample's score `None` and its total NaN (the sample is
    left out of the group's advantages, never scored 0.0 or by the other rewards alone),
    logs one warning line, and is counted in `RewardScores.failures`. When more than
    `max_failure_frac` of a batch's samples failed, the call raises anyway: something is
    systematically wrong (a verifier that always times out, a missing column). A raise is
    one `RewardError` naming the reward and, where known, the sample.

    Timeouts: with `timeout` set, each reward runs in its own daemon thread and the
    caller waits at most `timeout` seconds for it, so this works from any thread (no
    signals). Python cannot kill a thread: a reward that runs late is abandoned, keeps
    running in the background and its result is discarded. Until that thread finishes,
    further calls of that reward fail at once ("still running") instead of piling up
    threads. Rewards that may hang for good should bound their own work (`Accuracy`
    runs math-verify in worker processes that are killed at a per-sample limit). Rewards
    are called one after another, so each one's limit measures its own time.

    Args:
        rewards: The rewards (plain functions or `Reward` objects). Names are
            `reward_name(r)`; a repeated name gets a suffix (`_2`, `_3`, ...).
        weights: One weight per reward; default 1.0 each.
        on_error: What a failure does: "auto", "none" or "raise" (see above).
        timeout: Seconds each reward may take per call; `None` runs rewards directly in
            the calling thread with no limit.
        max_failure_frac: The largest share of a batch's samples whose failures are
            tolerated (0 to 1); more raises.

    Example:
        >>> from r1_lightning.rewards import Accuracy, LenientFormat
        >>> reward_set = RewardSet([Accuracy(), LenientFormat()], weights=[1.0, 0.5])
        >>> out = reward_set(["<think>2+2</think><answer>4</answer>"], prompts=["2+2?"], answer=["4"])
        >>> out.total
        tensor([1.5000])
    """

    def __init__(
        self,
        rewards: Sequence[RewardFn],
        weights: Sequence[float] | None = None,
        on_error: Literal["auto", "none", "raise"] = "auto",
        timeout: float | None = None,
        max_failure_frac: float = 0.1,
    ) -> None:
        # ConfigError (a ValueError): the CLI prints it as one line naming the option.
        if not rewards:
            raise ConfigError("rewards: the list is empty; give at least one reward")
        for fn in rewards:
            if not callable(fn):
                raise TypeError(f"a reward must be callable, got {fn!r} ({type(fn).__name__})")
        weights = [1.0] * len(rewards) if weights is None else [float(w) for w in weights]
        if len(weights) != len(rewards):
            raise ConfigError(f"reward_weights={weights}: got {len(weights)} reward weights for {len(rewards)} rewards")
        if not all(math.isfinite(w) for w in weights):
            raise ConfigError(f"reward_weights={weights}: reward weights must be finite")
        if on_error not in ("auto", "none", "raise"):
            raise ConfigError(f'reward_on_error={on_error!r}: on_error must be "auto", "none" or "raise"')
        if not 0.0 <= max_failure_frac <= 1.0:
            raise ConfigError(f"reward_max_failure_frac={max_failure_frac}: must be in [0, 1]")
        if timeout is not None and timeout <= 0:
            raise ConfigError(f"reward_timeout={timeout}: the reward timeout must be positive or None")
        self.rewards = list(rewards)
        self.weights = weights
        self.names = _unique_names([reward_name(fn) for fn in rewards])
        self.on_error = on_error
        self.timeout = timeout
        self.max_failure_frac = max_failure_frac
        self._late: dict[str, threading.Thread] = {}  # name → abandoned call still running

    def __call__(self, completions: list[str], *, prompts: list, **columns: Any) -> RewardScores:
        """Score a batch with every reward.

        Args:
            completions: N generated texts, whole groups of G per prompt.
            prompts: N prompts, one per completion.
            **columns: Extra columns (e.g. `answer`), N entries each, passed to every reward.

        Returns:
            The per-reward scores, the weighted total and the failure counts.

        Raises:
            ValueError: `prompts` or a column does not have one entry per completion.
            RewardError: A failure `on_error` does not tolerate, or tolerated failures on more
                than `max_failure_frac` of the samples.
        """
        n = len(completions)
        for key, values in {"prompts": prompts, **columns}.items():
            if len(values) != n:
                raise ValueError(f"{key!r} has {len(values)} entries for {n} completions (need one per completion)")
        scores, failures, failed, first = {}, {}, torch.zeros(n, dtype=torch.bool), None
        for name, fn in zip(self.names, self.rewards):
            values, lost, problem = self._score(name, fn, completions, prompts, columns)
            scores[name] = torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float32)  # [N]
            failures[name] = len(lost)
            failed[lost] = True
            first = first or problem
        count = int(failed.sum())
        if count > self.max_failure_frac * n:
            per_reward = ", ".join(f"{k} {v}" for k, v in failures.items() if v)
            raise RewardError(
                f"rewards failed on {count} of {n} samples ({per_reward}), more than reward_max_failure_frac="
                f"{self.max_failure_frac:g} of the batch; first: {first}"
            )
        total = torch.where(failed, torch.full((n,), math.nan), self._total(scores))  # [N]
        return RewardScores(scores, total, failures, failed)

    def _score(
        self, name: str, fn: RewardFn, completions: list[str], prompts: list, columns: dict[str, Any]
    ) -> tuple[list[float | None], list[int], str | None]:
        """One reward's validated scores, the samples whose score was lost, and the first problem."""
        n = len(completions)
        try:
            output = _as_list(self._call(name, fn, completions, prompts, columns))
            if len(output) != n:
                raise _Failure(f"returned {len(output)} scores for {n} completions (expected one per completion)")
        except _Failure as failure:
            tolerated = isinstance(failure, _TimedOut) and _is_builtin(fn)
            return [None] * n, list(range(n)), self._fail(name, str(failure), n, tolerated=tolerated)
        except Exception as exc:  # noqa: BLE001  any error in user code is a reward failure
            if isinstance(exc, RewardError) and exc.index is not None:  # from `score_each`: names its sample
                cause = exc.__cause__ or exc
                problem = self._fail(name, f"raised {type(cause).__name__}: {cause}", n, exc.index, exc.completion, exc)
            else:
                problem = self._fail(name, f"raised {type(exc).__name__}: {exc}", n, cause=exc)
            return [None] * n, list(range(n)), problem
        values, lost, first = [], [], None
        for i, value in enumerate(output):
            problem = _check_score(value)
            if problem is not None:
                message = self._fail(name, problem, n, i, completions[i], tolerated=isinstance(value, FailedScore))
                first, value = first or message, None
                lost.append(i)
            values.append(None if value is None else float(value))
        return values, lost, first

    def _call(self, name: str, fn: RewardFn, completions: list[str], prompts: list, columns: dict[str, Any]) -> Any:
        if self.timeout is None:
            return fn(completions, prompts=prompts, **columns)
        late = self._late.get(name)
        if late is not None and late.is_alive():
            raise _TimedOut(f"is still running an earlier call that exceeded the {self.timeout:g}s timeout")
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                result["output"] = fn(completions, prompts=prompts, **columns)
            except BaseException as exc:  # noqa: BLE001  re-raised in the calling thread
                result["error"] = exc

        thread = threading.Thread(target=run, name=f"reward-{name}", daemon=True)
        thread.start()
        thread.join(self.timeout)
        if thread.is_alive():
            self._late[name] = thread
            raise _TimedOut(f"exceeded the {self.timeout:g}s timeout on a batch of {len(completions)} completions")
        if "error" in result:
            raise result["error"]
        return result["output"]

    def _fail(
        self,
        name: str,
        problem: str,
        n: int,
        index: int | None = None,
        completion: str | None = None,
        cause: BaseException | None = None,
        tolerated: bool = False,
    ) -> str:
        """Raise, or log one line and return it (by `on_error`): "reward 'x' [on sample i of n ('...')] <problem>".

        ``tolerated``: the failure is one that ``on_error="auto"`` tolerates.
        """
        where = ""
        if index is not None:
            where = f" on sample {index} of {n}" + (f" ({snippet(completion)})" if completion is not None else "")
        message = f"reward {name!r}{where} {problem}"
        if self.on_error == "raise" or (self.on_error == "auto" and not tolerated):
            raise RewardError(message, reward=name, index=index, completion=completion) from cause
        log.warning("%s; the sample is left out (reward_on_error=%r)", message, self.on_error)
        return message

    def group_normalized_total(self, scores: RewardScores, num_generations: int, eps: float = 1e-4) -> Tensor:
        """The weighted sum of each reward normalised within its group (GDPO-style multi-reward training).

        Each reward's scores become (r - group mean) / (group std + eps) (`normalize_in_groups`)
        before weighting, so a reward with a wide range or spread cannot drown one with a narrow
        one; a group where a reward is constant contributes 0 for it. `None` stays left out.

        Args:
            scores: What `__call__` returned for whole groups of `num_generations` consecutive completions.
            num_generations: G.
            eps: Added to each group std.

        Returns:
            `[N]` float32, NaN where no reward scored the sample.
        """
        return self._total({name: normalize_in_groups(values, num_generations, eps) for name, values in scores.scores.items()})

    def _total(self, scores: dict[str, Tensor]) -> Tensor:
        stacked = torch.stack(list(scores.values()))  # [R, N]
        weights = torch.tensor(self.weights, dtype=torch.float32).unsqueeze(-1)  # [R, 1]
        valid = ~torch.isnan(stacked)  # [R, N]
        total = torch.where(valid, stacked * weights, torch.zeros_like(stacked)).sum(0)  # [N]
        return torch.where(valid.any(0), total, torch.full_like(total, math.nan))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_late"] = {}  # threads cannot be pickled or copied
        return state


def _is_builtin(fn: RewardFn) -> bool:
    """A reward of this package (its class or function lives in ``r1_lightning.rewards``)."""
    return str(getattr(fn, "__module__", "")).startswith("r1_lightning.rewards")


def _as_list(output: Any) -> list:
    if hasattr(output, "tolist"):  # a tensor or an array
        output = output.tolist()
    if isinstance(output, (str, bytes)) or not isinstance(output, Sequence):
        raise _Failure(f"returned {type(output).__name__} instead of a list of scores")
    return list(output)


def _check_score(value: Any) -> str | None:
    """Why `value` is not a valid score, or None if it is."""
    if value is None:
        return None
    if isinstance(value, FailedScore):
        return value.reason
    if not isinstance(value, numbers.Real):
        return f"returned a non-numeric score {value!r} ({type(value).__name__})"
    if not math.isfinite(value):
        return f"returned a non-finite score {value!r}"
    return None


def _unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return unique
