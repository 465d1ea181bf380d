"""The in-process resume harness shared by tests/test_resume.py and tests/test_checkpoint.py:
fit with interruptions (a stand-in for a kill between two steps), record every step, compare runs."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import SingleDeviceStrategy

from conftest import cli_env
from r1_lightning import ColdStartDataModule, PolicySFT, PromptDataModule
from r1_lightning.checkpoint import AtomicCheckpointIO, resolve_checkpoint
from r1_lightning.policy import load_tokenizer
from r1_lightning.resume import load_resume_state, save_rng_states

QUIET = dict(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False, logger=False)


class _Interrupted(Exception):
    """Stands in for a kill between two steps (the subprocess test uses a real SIGKILL)."""


class _StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise _Interrupted


class _Record(Callback):
    """Per step: the loss, the batch's samples, and draws from every global RNG (as dropout or a user reward would make)."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        samples = batch["indices"] if "indices" in batch else [tuple(ids) for ids in batch["prompt_ids"]]
        draws = (torch.rand(1).item(), random.random(), float(np.random.rand()))
        self.steps.append({"epoch": trainer.current_epoch, "samples": list(samples), "draws": draws})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.steps[-1]["loss"] = float(loss) if loss is not None else None


class _LateRestore(SingleDeviceStrategy):
    """Restores the checkpoint after setting up, as FSDP, ModelParallel and DeepSpeed do."""

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True


def _trainer(
    ckpt_dir: Path, max_steps: int, *callbacks: Callback, late_restore: bool = False, max_epochs: int | None = None
) -> L.Trainer:
    """Checkpoints after every step. With ``max_epochs`` (and ``max_steps=-1``) ``configure_optimizers``
    asking for ``estimated_stepping_batches`` builds the training loader before a checkpoint is restored."""
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_top_k=-1, save_last=True)
    strategy = _LateRestore(torch.device("cpu")) if late_restore else "auto"
    return L.Trainer(
        max_steps=max_steps, max_epochs=max_epochs, limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=ckpt_dir.parent,
        callbacks=[*callbacks, checkpoint], plugins=[AtomicCheckpointIO()], strategy=strategy, **QUIET,
    )


def _fit_with_interruptions(
    make, tmp_path: Path, max_steps: int, stops: list[int], late_restore: bool = False, max_epochs: int | None = None
) -> tuple[list[dict], L.LightningModule]:
    """Fit to ``max_steps``, interrupted after each step in ``stops`` and resumed with ckpt_path='last'."""
    recorder, ckpt_dir = _Record(), tmp_path / "checkpoints"
    module = None
    for i, stop in enumerate([*stops, None]):
        L.seed_everything(0)  # a fresh process: only the checkpoint carries the state on
        module, data = make()
        callbacks = [recorder] if stop is None else [_StopAt(stop), recorder]
        trainer = _trainer(ckpt_dir, max_steps, *callbacks, late_restore=late_restore, max_epochs=max_epochs)
        ckpt_path = resolve_checkpoint(trainer, "last") if i else None
        if stop is None:
            trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        else:
            with pytest.raises(_Interrupted):
                trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return recorder.steps, module


def _assert_same_run(resumed: list[dict], uninterrupted: list[dict]) -> None:
    assert [s["samples"] for s in resumed] == [s["samples"] for s in uninterrupted]
    assert [s["epoch"] for s in resumed] == [s["epoch"] for s in uninterrupted]
    assert [s["draws"] for s in resumed] == [s["draws"] for s in uninterrupted]
    torch.testing.assert_close([s["loss"] for s in resumed], [s["loss"] for s in uninterrupted], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- data position
class _PromptReader(L.LightningModule):
    """The smallest module a PromptDataModule feeds; like the real ones it asks for the step count early."""

    def __init__(self) -> None:
        super().__init__()
        self.tokenizer = load_tokenizer("builtin:tiny")
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.weight - len(batch["indices"])).pow(2).sum()

    def configure_optimizers(self):
        assert self.trainer.estimated_stepping_batches > 0  # as the real modules do
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_save_checkpoint(self, checkpoint):  # what any module can do to resume its RNG
        save_rng_states(self, checkpoint)

    def on_load_checkpoint(self, checkpoint):
        load_resume_state(self, checkpoint)


def _prompt_run():
    return _PromptReader(), PromptDataModule(num_samples=10, batch_size=3, max_prompt_length=64, shuffle_seed=5)



def _sft_run():
    module = PolicySFT("builtin:tiny", learning_rate=1e-2, warmup_steps=2, export_hf=False)
    return module, ColdStartDataModule(num_samples=10, num_val_samples=2, batch_size=4, max_length=160)



# ----------------------------------------------------------------------------- real processes, real signals
def _logged_steps(path: Path) -> dict[int, dict[str, float]]:
    """A CSVLogger's metrics.csv as {step: {name: value}}."""
    rows: dict[int, dict[str, float]] = {}
    with path.open() as handle:
        for row in csv.DictReader(handle):
            rows.setdefault(int(row["step"]), {}).update({k: float(v) for k, v in row.items() if v != "" and k != "step"})
    return rows


def fit_signalled_at(
    config: Path, checkpoint: Path, cwd: Path, signum: int, whole_group: bool, timeout: float = 240, env: dict | None = None
) -> subprocess.Popen:
    """Run ``r1-lightning fit --config CONFIG``, send ``signum`` once ``checkpoint`` exists (it is complete once it
    has its name), and wait for the process to end. ``whole_group``: to every rank (a scheduler killing the job),
    else to the first process only (rank 0, which launched the others). stderr is in ``cwd/<checkpoint dir>.stderr``."""
    command = [sys.executable, "-m", "r1_lightning", "fit", "--config", str(config)]
    log = cwd / f"{checkpoint.parent.name}.stderr"  # a file, not a pipe: a full pipe would stall the run
    with log.open("w") as stderr:
        job = subprocess.Popen(
            command, cwd=cwd, env=env or cli_env(), stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True
        )
    deadline = time.monotonic() + timeout
    while not checkpoint.exists():
        assert job.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.02)
    os.killpg(job.pid, signum) if whole_group else job.send_signal(signum)
    try:
        job.wait(timeout=timeout)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    return job
