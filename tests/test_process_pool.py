"""TimeoutPool, the killable worker processes behind time-limited rewards (math-verify in `Accuracy`)."""

import functools
import math
import os
import signal
import sys
import time

import pytest

from r1_lightning.rewards.process_pool import TimeoutPool


def test_timeout_pool_kills_only_the_late_call():
    pool = TimeoutPool(time.sleep, num_workers=2)
    try:
        pool.map([(0.0,), (0.0,)], timeout=30.0)  # workers up first (from a forkserver that can take seconds)
        start = time.monotonic()
        # A 2 s limit: a quick call on a loaded 2-core machine can take a good part of a second to come back.
        outcomes = pool.map([(0.0,), (60.0,), (0.0,), (0.0,)], timeout=2.0)
        # Well under the late call's 60 s: it was killed, not waited for.
        assert time.monotonic() - start < 30.0
        assert [o.status for o in outcomes] == ["ok", "timeout", "ok", "ok"]
        # The killed worker was replaced: the pool is whole again.
        assert [o.status for o in pool.map([(0.0,), (0.0,)], timeout=5.0)] == ["ok", "ok"]
    finally:
        pool.close()


def test_a_forked_copy_of_the_pool_owner_leaves_its_workers_alone():
    # A process forked from the owner (a data-loader worker, a forked reward worker) runs the pool's exit
    # finalizer when it exits; it must not kill the owner's workers (it did, then failed to join them).
    pool = TimeoutPool(time.sleep, num_workers=1)
    try:
        pool.map([(0.0,)], timeout=30.0)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                pool.finalizer()
                code = 0
            finally:
                os._exit(code)
        assert os.waitpid(pid, 0)[1] == 0
        assert [o.status for o in pool.map([(0.0,)], timeout=30.0)] == ["ok"]
    finally:
        pool.close()


def _crash_first_start(marker: str) -> None:
    # A worker's initializer that segfaults the first time only (the marker file remembers it).
    if not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGSEGV)


def test_timeout_pool_starts_a_worker_again_when_it_crashes_while_starting(tmp_path):
    pool = TimeoutPool(math.sqrt, num_workers=1, initializer=functools.partial(_crash_first_start, str(tmp_path / "crashed")))
    try:
        with pytest.warns(RuntimeWarning, match=r"exited with code -11 while starting .*; starting it again"):
            assert pool.map([(9.0,)], timeout=5.0) == [("ok", 3.0)]
    finally:
        pool.close()


def test_timeout_pool_gives_up_on_a_worker_that_always_crashes_while_starting():
    pool = TimeoutPool(math.sqrt, num_workers=1, initializer=_always_crash)
    try:
        with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="exited with code -11 while starting"):
            pool.map([(9.0,)], timeout=5.0)
    finally:
        pool.close()


def _always_crash() -> None:
    os.kill(os.getpid(), signal.SIGSEGV)


def test_timeout_pool_reports_errors():
    pool = TimeoutPool(math.sqrt)
    try:
        ok, error = pool.map([(4.0,), (-1.0,)], timeout=5.0)
        assert ok == ("ok", 2.0)
        assert error.status == "error" and "ValueError" in error.value
    finally:
        pool.close()


def _worker_process_kind(x: float) -> str:
    """Start a one-worker pool, check it computes sqrt(x), and name its worker's process class."""
    pool = TimeoutPool(math.sqrt, num_workers=1)
    try:
        assert pool.map([(x,)], timeout=30.0)[0] == ("ok", math.sqrt(x))
        return pool._workers[0].process.__class__.__name__
    finally:
        pool.close()


def test_after_torch_compile_workers_come_from_a_forkserver(monkeypatch):
    # Children forked by the main thread once torch.compile had run in the process crashed while
    # starting (SIGSEGV, in the full suite); then the pool starts its workers from a forkserver.
    monkeypatch.delitem(sys.modules, "torch._inductor.async_compile", raising=False)  # as if nothing compiled yet
    assert _worker_process_kind(4.0) == "ForkProcess"
    monkeypatch.setitem(sys.modules, "torch._inductor.async_compile", sys.modules["math"])  # "compiled here"
    assert _worker_process_kind(9.0) == "ForkServerProcess"
