"""Preemption: on SIGTERM (or a first Ctrl-C) finish the step, save it, and exit non-zero on every rank."""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from r1_lightning.checkpoint import checkpoint_directories

PREEMPTION_FILENAME = "last.ckpt"  # where `--ckpt_path last` looks first: the newest *.ckpt of the checkpoint directory


class Preempted(SystemExit):
    """Raised on every rank after the preemption checkpoint is written; exits with 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


class PreemptionCheckpoint(Callback):
    """Stop at the next optimizer-step boundary on SIGTERM or SIGINT, save that step, exit with 128 + signal.

    Schedulers (SLURM, Kubernetes, cloud spot instances) send SIGTERM and kill the job a grace period
    later. The signal handler only records the signal; at the end of the next training batch that
    completes an optimizer step (``on_train_batch_end``), the ranks agree (an all-reduce, so a signal
    that reached rank 0 alone stops them all at the same step), every rank takes part in
    ``trainer.save_checkpoint`` (the project's ``AtomicCheckpointIO`` writes it atomically) and raises
    ``Preempted``: the process exits 143 for SIGTERM, 130 for SIGINT. ``--ckpt_path last`` resumes from
    exactly that step. A second Ctrl-C stops at once, without saving (Lightning's KeyboardInterrupt path).

    The checkpoint is ``last.ckpt`` in the first ``ModelCheckpoint``'s directory (or
    ``<default_root_dir>/checkpoints``). Lightning's own SIGTERM handler (which only stops, saves nothing,
    exits 0, and broadcasts from inside the handler) is replaced while training runs; the previous
    handlers come back at the end. ``r1-lightning fit`` adds this callback.

    Args:
        signals: Names of the signals that request a stop.

    Example:
        >>> trainer = L.Trainer(callbacks=[PreemptionCheckpoint()], plugins=[AtomicCheckpointIO()])
    """

    def __init__(self, signals: tuple[str, ...] = ("SIGTERM", "SIGINT")) -> None:
        self.signals = [signal.Signals[name] for name in signals]
        self.requested: int | None = None  # the first signal received
        self._previous: dict[int, Any] = {}
        self._step_at_batch_start = 0
        self._saved_signal = 0  # set once the preemption checkpoint is written

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Installed here, after Lightning registers its own handlers (in `_run`, after on_fit_start).
        if threading.current_thread() is not threading.main_thread():
            return
        self.requested, self._saved_signal = None, 0
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        if self.requested is None:
            self.requested = signum
            # os.write: print() is not safe inside a signal handler.
            os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step and saving it\n".encode())

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if pl_module.automatic_optimization and trainer.global_step == self._step_at_batch_start:
            return  # inside a gradient accumulation: not a step boundary
        signum = agreed_signal(self.requested, trainer.strategy.root_device)
        if not signum:
            return
        path = preemption_path(trainer)
        trainer.save_checkpoint(path)  # here, where ModelCheckpoint saves too; all ranks (a collective when sharded)
        rank_zero_info(
            f"{signal.Signals(signum).name}: saved step {trainer.global_step} to {path}; "
            f"resume with --ckpt_path {'last' if checkpoint_directories(trainer) else path}"
        )
        self._saved_signal = signum  # stop once Lightning has logged the step (right after this hook)

    # The first hook after the step's metrics are logged: the next batch, the epoch's end, or the end of training.
    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._stop_if_saved()
        self._step_at_batch_start = trainer.global_step

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_if_saved()

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_if_saved()

    def _stop_if_saved(self) -> None:
        if self._saved_signal:
            raise Preempted(self._saved_signal)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


def agreed_signal(requested: int | None, device: torch.device) -> int:
    """The signal any rank received (the largest number if several), 0 if none; the same on every rank."""
    value = torch.tensor([requested or 0], device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())


def preemption_path(trainer: L.Trainer) -> str:
    """``last.ckpt`` in the first checkpoint directory, else ``<default_root_dir>/checkpoints/last.ckpt``."""
    directories = checkpoint_directories(trainer)
    directory = directories[0] if directories else os.path.join(trainer.default_root_dir, "checkpoints")
    return os.path.join(directory, PREEMPTION_FILENAME)
