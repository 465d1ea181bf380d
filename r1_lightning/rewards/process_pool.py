"""Worker processes that run a function with a hard time limit per call.

Why processes: a verifier such as sympy can hang or hold the GIL for minutes on a
pathological expression, and a thread cannot be stopped; signal-based timeouts
(`signal.alarm`) only work in the main thread and do not interrupt long C calls. A worker
process can always be killed, from any thread.

No worker outlives its parent: workers are killed at a timeout (and reaped), when the pool
is closed or garbage collected, and at interpreter exit (daemon processes); an idle worker
whose parent died exits within a second. A worker also asks Linux to SIGKILL it when its parent
dies (`PR_SET_PDEATHSIG`), even while stuck in a long C call that could not check on its parent.
The death signal follows the *thread* that forked the worker, so workers are forked by the main
thread, or, when a pool is used from another (possibly short-lived) thread, by a forkserver
process (which exits with us). Forking from a non-main thread is avoided for a second reason: in
a process busy with torch such a child crashed while starting (SIGSEGV, reproducibly after ~450
tests of the suite; root cause not found). The same crash hit children forked by the main thread
after `torch.compile` had run in the process (GRPO's `compile=True`): they come from the forkserver too.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any, Literal, NamedTuple

_READY = "ready"
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class Outcome(NamedTuple):
    """Result of one call: `status` is "ok" (then `value` is the return value), "error"
    (`value` is the exception text), "timeout" or "died" (the worker crashed)."""

    status: Literal["ok", "error", "timeout", "died"]
    value: Any = None


def _load_prctl() -> Callable[..., int] | None:
    """libc's ``prctl``, looked up here in the parent: a ``dlopen`` in a child forked from a
    multi-threaded parent is not safe."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # no libc symbol: the idle poll in `_serve` still applies
        return None


_PRCTL = _load_prctl()


def _die_with_parent(parent_pid: int, death_signal: bool) -> None:
    """In a worker: have Linux SIGKILL it when the parent's main thread (so the parent) dies."""
    if death_signal and _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(0)


def _parent_of_worker(ctx: Any) -> int:
    # A forkserver's workers are its children, not ours; it exits itself when we die.
    return os.getpid() if ctx.get_start_method() != "forkserver" else -1


def _serve(
    conn: Connection, fn: Callable[..., Any], initializer: Callable[[], None] | None, parent_pid: int, death_signal: bool
) -> None:
    if parent_pid < 0:
        parent_pid = os.getppid()
    _die_with_parent(parent_pid, death_signal)
    if initializer is not None:
        initializer()
    conn.send(_READY)
    while True:
        if not conn.poll(1.0):
            # Orphaned (the parent was killed): exit instead of lingering.
            if os.getppid() != parent_pid:
                return
            continue
        try:
            args = conn.recv()
        except EOFError:
            return
        try:
            outcome = Outcome("ok", fn(*args))
        except Exception as exc:  # noqa: BLE001  the caller decides what an error means
            outcome = Outcome("error", f"{type(exc).__name__}: {exc}")
        conn.send(outcome)


def _compiled_here() -> bool:
    """Whether this process has compiled with inductor (and so runs its compile worker pools)."""
    return "torch._inductor.async_compile" in sys.modules


class _StartCrash(RuntimeError):
    """A worker died before it was ready (e.g. a crash in a child forked from a busy multi-threaded parent)."""


_START_ATTEMPTS = 3  # a worker that crashes while starting is started again, this many times in all


class _Worker:
    def __init__(self, ctx: Any, fn: Callable[..., Any], initializer: Callable[[], None] | None) -> None:
        self.conn, child_conn = ctx.Pipe()
        if ctx.get_start_method() == "fork" and (threading.current_thread() is not threading.main_thread() or _compiled_here()):
            # Children forked by a non-main thread of a process busy with torch (reproducibly after ~450
            # tests), or by the main thread once torch.compile has run (its compile thread and process
            # pools are up), crashed while starting (SIGSEGV): then workers come from a forkserver.
            ctx = mp.get_context("forkserver")
        # Ask Linux to kill the worker with its parent, unless the parent is a short-lived thread of ours
        # (the signal follows the forking thread): our main thread, or the forkserver's.
        death_signal = threading.current_thread() is threading.main_thread() or ctx.get_start_method() == "forkserver"
        self.process = ctx.Process(
            target=_serve, args=(child_conn, fn, initializer, _parent_of_worker(ctx), death_signal),
            daemon=True, name="r1-lightning-worker",
        )
        self.process.start()
        child_conn.close()

    def wait_ready(self, timeout: float) -> None:
        try:
            if self.conn.poll(timeout) and self.conn.recv() == _READY:
                return
        except EOFError:
            pass
        self.kill()
        if self.process.exitcode not in (None, -signal.SIGKILL):
            raise _StartCrash(f"worker process exited with code {self.process.exitcode} while starting (see its error above)")
        raise RuntimeError(f"worker process did not start within {timeout:g}s")

    def kill(self) -> None:
        self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()


def _kill_all(workers: list[_Worker], owner_pid: int | None = None) -> None:
    if owner_pid is not None and os.getpid() != owner_pid:
        return  # a forked copy of the owner exiting: the workers are the owner's children, not ours to kill
    for worker in workers:
        worker.kill()
    workers.clear()


class TimeoutPool:
    """A few worker processes running `fn`; a call past its time limit gets its worker killed.

    Workers start on the first `map` and are replaced after a kill or crash. `map` is
    thread-safe (one batch at a time). The pool itself cannot be pickled; owners drop
    it from their state and rebuild it lazily.

    Args:
        fn: The function to run, `fn(*args)`; it must be picklable unless `start_method`
            is "fork", and so must its arguments and results.
        num_workers: Number of worker processes.
        initializer: Run once in each worker before it takes work (e.g. imports), so
            that start-up cost does not count against the first call's time limit.
        start_method: multiprocessing start method. Default: "fork" where available
            (fast; the worker only runs `fn`, never CUDA or torch ops, which is what
            makes forking a process with threads acceptable here), else "spawn".
        startup_timeout: Seconds a new worker may take to become ready.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        num_workers: int = 1,
        initializer: Callable[[], None] | None = None,
        start_method: str | None = None,
        startup_timeout: float = 120.0,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if start_method is None:
            fork_ok = "fork" in mp.get_all_start_methods() and sys.platform != "darwin"
            start_method = "fork" if fork_ok else "spawn"
        self._ctx = mp.get_context(start_method)
        self._fn = fn
        self._initializer = initializer
        self._num_workers = num_workers
        self._startup_timeout = startup_timeout
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self.finalizer = weakref.finalize(self, _kill_all, self._workers, os.getpid())  # also runs at exit

    def map(self, args: Sequence[tuple], timeout: float) -> list[Outcome]:
        """Run `fn(*a)` for each `a` in `args`, each call limited to `timeout` seconds.

        Returns:
            One `Outcome` per call, in order.
        """
        with self._lock:
            self._start_workers()
            outcomes: list[Outcome] = [Outcome("died")] * len(args)
            todo = deque(range(len(args)))
            idle = list(self._workers)
            busy: dict[Connection, tuple[int, _Worker, float]] = {}
            try:
                while todo or busy:
                    while todo and idle:
                        worker, i = idle.pop(), todo.popleft()
                        worker = self._send(worker, args[i])
                        busy[worker.conn] = (i, worker, time.monotonic() + timeout)
                    first_deadline = min(deadline for _, _, deadline in busy.values())
                    for conn in wait(list(busy), timeout=max(0.0, first_deadline - time.monotonic())):
                        i, worker, _ = busy.pop(conn)
                        try:
                            outcomes[i] = conn.recv()
                        except (EOFError, OSError):
                            worker = self._replace(worker)
                        idle.append(worker)
                    now = time.monotonic()
                    for conn, (i, worker, deadline) in list(busy.items()):
                        if deadline <= now:
                            del busy[conn]
                            outcomes[i] = Outcome("timeout")
                            idle.append(self._replace(worker))
            finally:
                # Interrupted mid-batch: a busy worker would answer into the next batch.
                for _, worker, _ in busy.values():
                    worker.kill()
                    if worker in self._workers:
                        self._workers.remove(worker)
            return outcomes

    def close(self) -> None:
        """Kill the workers; the next `map` starts new ones."""
        with self._lock:
            _kill_all(self._workers)

    def _start_workers(self) -> None:
        for attempt in range(1, _START_ATTEMPTS + 1):
            # Start them all before waiting, so that their start-up overlaps.
            new = [self._new_worker() for _ in range(self._num_workers - len(self._workers))]
            try:
                for worker in new:
                    worker.wait_ready(self._startup_timeout)
                    self._workers.append(worker)
                return
            except RuntimeError as error:
                for worker in new:
                    worker.kill()
                self._workers[:] = [w for w in self._workers if w not in new]
                if not isinstance(error, _StartCrash) or attempt == _START_ATTEMPTS:
                    raise
                warnings.warn(f"{error}; starting it again (attempt {attempt + 1} of {_START_ATTEMPTS})", RuntimeWarning, stacklevel=2)

    def _new_worker(self) -> _Worker:
        return _Worker(self._ctx, self._fn, self._initializer)

    def _replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        if worker in self._workers:
            self._workers.remove(worker)
        fresh = self._new_worker()
        fresh.wait_ready(self._startup_timeout)
        self._workers.append(fresh)
        return fresh

    def _send(self, worker: _Worker, args: tuple) -> _Worker:
        try:
            worker.conn.send(args)
        except (BrokenPipeError, OSError):  # died while idle, e.g. killed by the OOM killer
            worker = self._replace(worker)
            worker.conn.send(args)
        return worker
