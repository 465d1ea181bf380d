"""Measurement parts of ``grpo_vs_trl.py`` shared by both systems' runs: peak memory (with a cap), phase timers, step summaries."""

from __future__ import annotations

import json
import os
import resource
import statistics
import threading
import time
from collections import defaultdict
from typing import Callable

RESULT_PREFIX = "BENCH_RESULT "
OUT_OF_MEMORY_EXIT = 86
# Where a step's time goes. "other" is the step minus the named phases (logging, advantages, losses, clipping, data).
PHASES = ("generation", "rewards", "reference", "old_logprobs", "policy_forward", "backward", "optimizer", "weight_sync", "other")


def emit(result: dict) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


class PeakMemory:
    """Peak RSS of this process (the kernel's high-water mark, cross-checked by a psutil sampler), with a cap.

    Past ``cap_gib`` of resident memory the sampler prints an out-of-memory result and ends the process with
    ``OUT_OF_MEMORY_EXIT``, long before the machine's OOM killer would pick a victim (a 10 ms sampler: an
    allocation has to be written to count, and writing gigabytes takes far longer than that).
    """

    def __init__(self, system: str, cap_gib: float | None = None, interval: float = 0.01) -> None:
        import psutil

        self._process, self._interval, self._stop = psutil.Process(), interval, threading.Event()
        self._system, self._cap = system, None if cap_gib is None else cap_gib * 2**30
        self.sampled = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            rss = self._process.memory_info().rss
            self.sampled = max(self.sampled, rss)
            if self._cap is not None and rss > self._cap:
                emit({"system": self._system, "out_of_memory": True, "cap_gib": self._cap / 2**30, "peak_rss_mib": rss / 2**20})
                os._exit(OUT_OF_MEMORY_EXIT)

    def mark_start(self) -> None:
        """RSS when the first step starts: imports, model, optimizer and data are in; nothing has run."""
        self.at_start = self._process.memory_info().rss

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        hwm = _high_water_mib() * 2**20
        return {
            "peak_rss_mib": max(hwm, self.sampled) / 2**20,
            "peak_rss_sampled_mib": self.sampled / 2**20,
            "rss_at_first_step_mib": getattr(self, "at_start", 0) / 2**20,
        }


def _high_water_mib() -> float:
    """This process's resident high-water mark: Linux's ``VmHWM``, its own memory's peak. ``ru_maxrss`` (the fallback
    elsewhere) also holds the peak of the process it was forked from, kept across ``exec``, so a run started from a
    larger process (a test worker) would report that one's."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class PhaseClock:
    """Wall-clock seconds per phase and step, from timed wrappers around each system's own methods.

    Phases nest: a phase's time excludes the phases timed inside it (our rewards phase wraps the whole
    sampling call, generation inside it), so the phases of a step add up to at most the step.
    """

    def __init__(self, device: str) -> None:
        self.device, self.steps, self.cpu_steps = device, [], []
        self._current: dict[str, float] = defaultdict(float)
        self._cpu: dict[str, float] = defaultdict(float)
        # [start, CPU start, seconds and CPU seconds of the phases inside, high-water mark at start, MiB it rose inside]
        self._stack: list[list[float]] = []
        # MiB by which each phase pushed the process's resident high-water mark up (over the whole run, nested
        # phases excluded from their parent as for time): the phases holding a non-zero figure set peak memory.
        self.peak_rise_mib: dict[str, float] = defaultdict(float)

    def wrap(self, owner, name: str, phase: str | Callable[..., str]) -> None:
        """Time every call of ``owner.name`` (a method, replaced on the instance) as ``phase`` (or ``phase(*args)``)."""
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            label = phase(*args, **kwargs) if callable(phase) else phase
            self._stack.append([time.perf_counter(), time.process_time(), 0.0, 0.0, _high_water_mib(), 0.0])
            try:
                return original(*args, **kwargs)
            finally:
                sync(self.device)
                start, cpu_start, inner, cpu_inner, high_water, inner_rise = self._stack.pop()
                elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
                rise = _high_water_mib() - high_water
                self._current[label] += elapsed - inner
                self._cpu[label] += cpu - cpu_inner
                self.peak_rise_mib[label] += rise - inner_rise
                if self._stack:
                    self._stack[-1][2] += elapsed
                    self._stack[-1][3] += cpu
                    self._stack[-1][5] += rise

        setattr(owner, name, timed)

    def end_step(self, step_seconds: float, step_cpu_seconds: float) -> None:
        for record, current, total in ((self.steps, self._current, step_seconds), (self.cpu_steps, self._cpu, step_cpu_seconds)):
            phases = {name: current.get(name, 0.0) for name in PHASES if name != "other"}
            phases["other"] = total - sum(phases.values())
            record.append({k: round(v, 4) for k, v in phases.items()})
            current.clear()


def step_summary(
    times: list[float], tokens: list[int], completion_tokens: list[int], warmup: int, cpu_times: list[float], clock: PhaseClock
) -> dict:
    """Wall-clock step times are what a user waits; process CPU seconds per step are the same work with the
    time other jobs held the CPU left out (one thread: equal to wall-clock on an idle machine)."""
    t, n, c, cpu = times[warmup:], tokens[warmup:], completion_tokens[warmup:], cpu_times[warmup:]
    phases, measured, cpu_measured = clock.steps, clock.steps[warmup:], clock.cpu_steps[warmup:]
    return {
        "s_per_step": statistics.median(t),
        "tokens_per_s": sum(n) / sum(t),
        "completion_tokens_per_s": sum(c) / sum(t),
        "tokens_per_step": sum(n) / len(n),
        "completion_tokens_per_step": sum(c) / len(c),
        "first_step_s": times[0],
        "cpu_s_per_step": statistics.median(cpu),
        "tokens_per_cpu_s": sum(n) / sum(cpu),
        "phases_s": {name: statistics.median(p[name] for p in measured) for name in PHASES} if measured else {},
        "phases_cpu_s": {name: statistics.median(p[name] for p in cpu_measured) for name in PHASES} if measured else {},
        "step_times": [round(x, 4) for x in times],
        "step_cpu_times": [round(x, 4) for x in cpu_times],
        "step_tokens": tokens,
        "step_completion_tokens": completion_tokens,
        "step_phases": phases,
        "step_phases_cpu": clock.cpu_steps,
        "peak_rise_mib": {name: round(mib, 1) for name, mib in clock.peak_rise_mib.items()},
    }
