"""Exact resume after a kill, atomic checkpoints, and checkpoints that load without running code.

An interrupted run resumed from its checkpoint must reproduce the uninterrupted run: the same
batches in the same order (every sample once per epoch), the same random draws, the same
losses and the same final weights (CPU, float32).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import SingleDeviceStrategy
from safetensors.torch import load_file

from conftest import cli_env, run_cli
from r1_lightning import ColdStartDataModule, Distillation, PolicySFT, PromptDataModule
from r1_lightning.checkpoint import AtomicCheckpointIO, atomic_save, load_checkpoint_file, resolve_checkpoint
from r1_lightning.cli import main
from r1_lightning.data.resumable import ResumableSampler
from r1_lightning.errors import ConfigError
from r1_lightning.policy import LoraSettings, load_tokenizer
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


@pytest.mark.parametrize(
    ("stops", "late_restore", "max_steps"),
    [
        pytest.param([5, 6], False, -1, id="twice-in-one-epoch"),
        pytest.param([4, 8], False, -1, id="at-epoch-boundaries"),
        pytest.param([4, 5, 6, 8], False, 12, id="max_steps"),
        pytest.param([1, 4, 5, 11], False, -1, id="everywhere"),
        # The training loader is built (and prefetched from) before the checkpoint is restored.
        pytest.param([1, 4, 5, 11], True, -1, id="everywhere-restored-after-setup"),
    ],
)
def test_prompt_loader_resumes_without_skipping_or_repeating(tmp_path, stops, late_restore, max_steps) -> None:
    # 10 prompts in batches of 3: 4 batches per epoch (the last has 1), 3 epochs = 12 steps.
    epochs = 3 if max_steps == -1 else None
    uninterrupted, _ = _fit_with_interruptions(_prompt_run, tmp_path / "a", max_steps, [], max_epochs=epochs)
    resumed, _ = _fit_with_interruptions(_prompt_run, tmp_path / "b", max_steps, stops, late_restore, max_epochs=epochs)
    _assert_same_run(resumed, uninterrupted)
    assert len(resumed) == 12  # reached max_steps
    for epoch in range(3):
        seen = [i for s in resumed if s["epoch"] == epoch for i in s["samples"]]
        assert sorted(seen) == list(range(10)), (epoch, seen)  # each sample exactly once per epoch
    orders = [[i for s in resumed if s["epoch"] == e for i in s["samples"]] for e in range(3)]
    assert orders[0] != orders[1] != orders[2]  # a new shuffle every epoch


def test_sampler_splits_and_resumes_like_distributed_sampler() -> None:
    # 2 ranks, 11 samples: each rank takes every 2nd index of the epoch's permutation (padded to 12).
    ranks = [ResumableSampler(range(11), batch_size=2, shuffle=True, seed=3, num_replicas=2, rank=r) for r in (0, 1)]
    for sampler in ranks:
        sampler.set_epoch(1)
    full = [list(s) for s in ranks]
    assert len(full[0]) == len(full[1]) == 6 and set(full[0]) | set(full[1]) == set(range(11))
    for sampler in ranks:  # both trained on 2 batches, then the job was killed
        sampler.load_state_dict({"epoch": 1, "consumed": 2})
    assert [list(s) for s in ranks] == [f[4:] for f in full]
    ranks[0].load_state_dict({"epoch": 1, "consumed": 3})  # saved after the epoch's last batch
    fresh = ResumableSampler(range(11), batch_size=2, shuffle=True, seed=3, num_replicas=2, rank=0)
    fresh.set_epoch(2)
    assert list(ranks[0]) == list(fresh) != full[0]  # the next epoch, from its start
    assert ranks[0].epoch == 2


# ------------------------------------------------------------------ SFT and distillation, in process
def _sft_run():
    module = PolicySFT("builtin:tiny", learning_rate=1e-2, warmup_steps=2, export_hf=False)
    return module, ColdStartDataModule(num_samples=10, num_val_samples=2, batch_size=4, max_length=160)


def _distillation_run():
    # Half of every batch is sampled from the student (seeded generators), the other half is teacher-written.
    module = Distillation(
        "builtin:tiny-small", teacher_name_or_path="builtin:tiny", on_policy_fraction=0.5, max_new_tokens=6,
        learning_rate=1e-2, warmup_steps=2, export_hf=False,
    )
    return module, ColdStartDataModule(num_samples=10, num_val_samples=2, batch_size=4, max_length=160)


@pytest.mark.parametrize("make", [_sft_run, _distillation_run], ids=["sft", "distillation"])
def test_resumed_fit_matches_the_uninterrupted_one(tmp_path, make) -> None:
    # 3 batches per epoch (4, 4, 2 samples), 3 epochs: stopped at an epoch's end, in the middle of the
    # next one, at its end (a second boundary after a resume), then run to the end.
    uninterrupted, a = _fit_with_interruptions(make, tmp_path / "a", -1, [], max_epochs=3)
    resumed, b = _fit_with_interruptions(make, tmp_path / "b", -1, [3, 5, 6], max_epochs=3)
    assert len(resumed) == 9
    _assert_same_run(resumed, uninterrupted)
    trained, expected = b.model.state_dict(), a.model.state_dict()
    assert trained.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(trained[name], value, rtol=0, atol=1e-6, msg=name)
    initial = make()[0]
    initial.configure_model()
    assert not torch.equal(initial.model.state_dict()[name], value)  # training moved the weights


class StepLog(Callback):
    """Appends a JSON line per training step to ``path``: step, epoch, the batch's prompts and the loss.
    (A callback a config can name, so that CLI runs can be compared step by step.)"""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        samples = [[int(t) for t in ids] for ids in batch["prompt_ids"]]
        step = {"step": trainer.global_step, "epoch": trainer.current_epoch, "samples": samples, "loss": float(loss)}
        with self.path.open("a") as handle:
            handle.write(json.dumps(step) + "\n")


EPOCH_END_CONFIG = """\
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 4
  limit_val_batches: {limit_val_batches}
  num_sanity_val_steps: 0
  enable_progress_bar: false
  enable_model_summary: false
  logger: false
  default_root_dir: {root}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {root}/checkpoints, save_top_k: -1}}  # saves at every epoch's end (Lightning's default)
    - class_path: test_resume.StepLog
      init_args: {{path: {root}/steps.jsonl}}
model:
  class_path: r1_lightning.PolicySFT
  init_args: {{learning_rate: 1.0e-2, warmup_steps: 1, eval_max_new_tokens: 4, export_hf: false}}
data:
  class_path: r1_lightning.ColdStartDataModule
  init_args: {{batch_size: 4, num_samples: 8, num_val_samples: 2, max_length: 160}}
"""


@pytest.mark.parametrize("limit_val_batches", [1.0, 0], ids=["with-validation", "without-validation"])
def test_cli_resume_from_an_epoch_end_checkpoint_equals_the_uninterrupted_run(tmp_path, monkeypatch, limit_val_batches) -> None:
    # 8 samples in batches of 4: 2 steps per epoch, max_steps 4. Resumed (--ckpt_path) from the checkpoint saved at
    # epoch 0's end, steps 3 and 4 must train on epoch 1's order, as the uninterrupted run does: Lightning alone
    # closes epoch 0 a second time there and moves the sampler to epoch 2.
    monkeypatch.setattr(sys, "argv", ["r1-lightning"])  # LightningCLI warns when args and pytest's argv differ

    def fit(name: str, *extra: str) -> list[dict]:
        root = tmp_path / name
        config = tmp_path / f"{name}.yaml"
        config.write_text(EPOCH_END_CONFIG.format(root=root, limit_val_batches=limit_val_batches))
        main(["fit", "--config", str(config), *extra])
        return [json.loads(line) for line in (root / "steps.jsonl").read_text().splitlines()]

    uninterrupted = fit("uninterrupted")
    checkpoint = tmp_path / "uninterrupted" / "checkpoints" / "epoch=0-step=2.ckpt"
    resumed = fit("resumed", "--ckpt_path", str(checkpoint))
    assert [s["step"] for s in uninterrupted] == [1, 2, 3, 4] and [s["epoch"] for s in uninterrupted] == [0, 0, 1, 1]
    after = uninterrupted[2:]
    assert [(s["step"], s["epoch"], s["samples"]) for s in resumed] == [(s["step"], s["epoch"], s["samples"]) for s in after]
    torch.testing.assert_close([s["loss"] for s in resumed], [s["loss"] for s in after], rtol=0, atol=1e-6)
    epochs = [sorted(p for s in run for p in s["samples"]) for run in (uninterrupted[:2], after)]
    assert epochs[0] == epochs[1] and len(epochs[0]) == 8  # each epoch: every sample once
    assert uninterrupted[0]["samples"] != after[0]["samples"]  # reshuffled: the order tells the epochs apart
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == ["epoch=1-step=4.ckpt"]


# ------------------------------------------------------------------------- GRPO, real SIGKILL
GRPO_CONFIG = """\
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 6
  log_every_n_steps: 1
  num_sanity_val_steps: 0
  limit_val_batches: 0
  enable_progress_bar: false
  enable_model_summary: false
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {root}, name: logs, version: {version}}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {ckpt_dir}, every_n_train_steps: 1, save_top_k: -1, save_last: true}}
    - class_path: r1_lightning.callbacks.ReferenceModelRefresh
      init_args: {{every_n_steps: 2}}
model:
  class_path: r1_lightning.GRPO
  init_args:
    model_name_or_path: builtin:tiny
    num_generations: 4
    max_new_tokens: 12
    beta: 0.1
    learning_rate: 1.0e-2
    warmup_steps: 1
    dtype: float32
data:
  class_path: r1_lightning.PromptDataModule
  init_args: {{batch_size: 2, num_samples: 6, num_val_samples: 2, max_prompt_length: 64}}
"""


def _grpo_config(tmp_path: Path, version: str, ckpt_dir: Path) -> Path:
    path = tmp_path / f"{version}.yaml"
    path.write_text(GRPO_CONFIG.format(root=tmp_path, version=version, ckpt_dir=ckpt_dir))
    return path


def _logged_steps(path: Path) -> dict[int, dict[str, float]]:
    rows: dict[int, dict[str, float]] = {}
    with path.open() as handle:
        for row in csv.DictReader(handle):
            rows.setdefault(int(row["step"]), {}).update({k: float(v) for k, v in row.items() if v != "" and k != "step"})
    return rows


@pytest.mark.slow
def test_grpo_killed_after_a_checkpoint_resumes_exactly(tmp_path) -> None:
    # 6 prompts in batches of 2: 3 steps per epoch, 6 steps; the reference is refreshed every 2 steps.
    full = run_cli(["fit", "--config", _grpo_config(tmp_path, "uninterrupted", tmp_path / "ckpt_a")], cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]

    ckpt_dir, killed_after = tmp_path / "ckpt_b", 2
    command = [sys.executable, "-m", "r1_lightning", "fit", "--config", str(_grpo_config(tmp_path, "killed", ckpt_dir))]
    child = subprocess.Popen(command, cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (ckpt_dir / f"epoch=0-step={killed_after}.ckpt").exists():  # complete once it has its name
        assert child.poll() is None and time.monotonic() < deadline, child.stderr.read().decode()[-3000:]
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL and not (tmp_path / "logs" / "killed" / "hf_model").exists()

    resumed = run_cli(["fit", "--config", _grpo_config(tmp_path, "resumed", ckpt_dir), "--ckpt_path", "last"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    newest = max(ckpt_dir.glob("epoch=*.ckpt"), key=lambda p: p.stat().st_mtime)
    assert "Resuming from" in resumed.stderr and "(global step" in resumed.stderr

    expected = _logged_steps(tmp_path / "logs" / "uninterrupted" / "metrics.csv")
    before, after = (_logged_steps(tmp_path / "logs" / v / "metrics.csv") for v in ("killed", "resumed"))
    k = min(after)  # the resumed run's first step: right after the newest complete checkpoint
    assert k >= killed_after and set(after) == {s for s in expected if s >= k}, (sorted(after), newest)
    for step, logged in after.items():
        assert logged.keys() == expected[step].keys()
        for name, value in logged.items():  # loss, reward, completion length, KL, entropy, lr, ...
            assert value == pytest.approx(expected[step][name], abs=1e-6), (step, name)
    for step in (s for s in before if s < k):
        assert before[step] == pytest.approx(expected[step], abs=1e-6)
    final = load_file(tmp_path / "logs" / "resumed" / "hf_model" / "model.safetensors")
    reference = load_file(tmp_path / "logs" / "uninterrupted" / "hf_model" / "model.safetensors")
    assert final.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(final[name], reference[name], rtol=0, atol=1e-6, msg=name)


SFT_DDP_CONFIG = """\
seed_everything: 0
trainer:
  accelerator: cpu
  strategy: ddp
  devices: 2
  max_epochs: 2
  log_every_n_steps: 1
  num_sanity_val_steps: 0
  limit_val_batches: 0
  enable_progress_bar: false
  enable_model_summary: false
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {root}, name: logs, version: {version}}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {ckpt_dir}, every_n_train_steps: 1, save_top_k: -1, save_last: true}}
model:
  class_path: r1_lightning.PolicySFT
  init_args: {{learning_rate: 1.0e-2, warmup_steps: 1}}
data:
  class_path: r1_lightning.ColdStartDataModule
  init_args: {{batch_size: 2, num_samples: 12, num_val_samples: 2, max_length: 160}}
"""


@pytest.mark.slow
def test_ddp_job_killed_on_every_rank_resumes_exactly(tmp_path) -> None:
    # 2 ranks × 6 samples in batches of 2: 3 steps per epoch, 2 epochs. The whole job (both ranks) is killed.
    def config(version: str, ckpt_dir: Path) -> Path:
        path = tmp_path / f"{version}.yaml"
        path.write_text(SFT_DDP_CONFIG.format(root=tmp_path, version=version, ckpt_dir=ckpt_dir))
        return path

    full = run_cli(["fit", "--config", config("uninterrupted", tmp_path / "ckpt_a")], cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    ckpt_dir = tmp_path / "ckpt_b"
    command = [sys.executable, "-m", "r1_lightning", "fit", "--config", str(config("killed", ckpt_dir))]
    job = subprocess.Popen(
        command, cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 240
    while not (ckpt_dir / "epoch=0-step=2.ckpt").exists():
        assert job.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(job.pid, signal.SIGKILL)  # rank 0 and the rank 1 it launched
    job.wait()
    checkpoint = load_checkpoint_file(ckpt_dir / "epoch=0-step=2.ckpt")
    assert len(checkpoint["r1_rng_states"]) == 2 and checkpoint["ColdStartDataModule"]["world_size"] == 2

    resumed = run_cli(["fit", "--config", config("resumed", ckpt_dir), "--ckpt_path", "last"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, after = (_logged_steps(tmp_path / "logs" / v / "metrics.csv") for v in ("uninterrupted", "resumed"))
    assert after and set(after) == {s for s in expected if s >= min(after)}
    for step, logged in after.items():
        assert logged == pytest.approx(expected[step], abs=1e-6), step
    final, reference = (load_file(tmp_path / "logs" / v / "hf_model" / "model.safetensors") for v in ("resumed", "uninterrupted"))
    for name in reference:
        torch.testing.assert_close(final[name], reference[name], rtol=0, atol=1e-6, msg=name)


# ------------------------------------------------------------------------- atomic checkpoints
def test_a_kill_during_a_save_leaves_the_previous_checkpoint(tmp_path) -> None:
    path = tmp_path / "checkpoints" / "last.ckpt"
    atomic_save({"global_step": 1, "state_dict": {"w": torch.zeros(3)}}, path)
    script = textwrap.dedent(f"""
        import os, time, torch
        from pathlib import Path
        from r1_lightning.checkpoint import atomic_save

        def stall(fd):  # the new bytes are written, not yet renamed into place: the kill comes now
            print("writing", flush=True)
            time.sleep(600)

        os.fsync = stall
        atomic_save({{"global_step": 2, "state_dict": {{"w": torch.ones(1_000_000)}}}}, Path({str(path)!r}))
    """)
    child = subprocess.Popen([sys.executable, "-c", script], env=cli_env(), stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "writing"
    child.send_signal(signal.SIGKILL)
    child.wait()
    (partial,) = path.parent.glob(".last.ckpt.tmp-*")
    assert partial.stat().st_size > 4_000_000  # the new checkpoint was being written beside the old one
    trainer = L.Trainer(callbacks=[ModelCheckpoint(dirpath=path.parent)], **QUIET)
    assert resolve_checkpoint(trainer, "last") == str(path)
    assert load_checkpoint_file(path)["global_step"] == 1  # the old checkpoint, whole


def test_last_skips_a_truncated_checkpoint_and_names_the_one_it_resumes(tmp_path, caplog) -> None:
    _fit_with_interruptions(_prompt_run, tmp_path, 3, [])
    ckpt_dir = tmp_path / "checkpoints"
    for offset, name in enumerate(["epoch=0-step=3.ckpt", "last.ckpt"]):  # the two newest, cut short (a writer killed mid-copy)
        data = (ckpt_dir / name).read_bytes()
        (ckpt_dir / name).write_bytes(data[: len(data) // 2])
        os.utime(ckpt_dir / name, (time.time() + 10 + offset,) * 2)
    L.seed_everything(0)
    module, data = _prompt_run()
    recorder = _Record()
    trainer = _trainer(ckpt_dir, 6, recorder)
    skipped = "skipping a checkpoint that does not load.*not a complete"
    with caplog.at_level(logging.INFO), pytest.warns(UserWarning, match=skipped):
        path = resolve_checkpoint(trainer, "last")
    assert Path(path).name == "epoch=0-step=2.ckpt"
    assert f"Resuming from {path} (global step 2, epoch 0)" in caplog.text
    trainer.fit(module, datamodule=data, ckpt_path=path)
    assert trainer.global_step == 6 and len(recorder.steps) == 4


def test_last_takes_a_complete_sharded_directory_and_skips_an_incomplete_one(tmp_path) -> None:
    # FSDP / ModelParallel write a directory: shards, their index `.metadata` (written last) and meta.pt.
    ckpt_dir = tmp_path / "checkpoints"
    complete, partial = ckpt_dir / "epoch=0-step=4.ckpt", ckpt_dir / "last.ckpt"
    for offset, directory in enumerate((complete, partial)):
        directory.mkdir(parents=True)
        torch.save({"global_step": 4 + offset, "epoch": 0}, directory / "meta.pt")
        os.utime(directory, (time.time() + offset,) * 2)
    (complete / ".metadata").write_bytes(b"index")
    trainer = L.Trainer(callbacks=[ModelCheckpoint(dirpath=ckpt_dir)], **QUIET)
    with pytest.warns(UserWarning, match="last.ckpt'?: a directory but not a complete sharded checkpoint"):
        assert resolve_checkpoint(trainer, "last") == str(complete)


# -------------------------------------------------------------------------------- safe loading
class _RunsCode:
    """Unpickling this runs code: it writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def test_a_checkpoint_whose_pickle_runs_code_is_refused_before_it_runs(tmp_path) -> None:
    marker, path = tmp_path / "marker", tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "global_step": 3, "payload": _RunsCode(marker)}, path)
    torch.load(path, weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.read_text() == "ran"
    marker.unlink()
    with pytest.raises(ConfigError, match=r"evil\.ckpt'?: refused to load.*Unsupported global: GLOBAL exec\)"):
        load_checkpoint_file(path)
    with pytest.raises(ConfigError, match="refused to load"):
        AtomicCheckpointIO().load_checkpoint(path, weights_only=False)  # our IO loads weights_only whatever it is asked
    assert not marker.exists()


def _sft_config(tmp_path: Path) -> Path:
    path = tmp_path / "sft.yaml"
    path.write_text(textwrap.dedent(f"""\
        trainer:
          accelerator: cpu
          devices: 1
          max_steps: 2
          logger: false
          default_root_dir: {tmp_path / 'run'}
          enable_progress_bar: false
          callbacks:
            - class_path: lightning.pytorch.callbacks.ModelCheckpoint
              init_args: {{save_last: true}}
        model:
          class_path: r1_lightning.PolicySFT
        data:
          class_path: r1_lightning.ColdStartDataModule
          init_args: {{num_samples: 4, num_val_samples: 2, batch_size: 2}}
    """))
    return path


def test_cli_refuses_bad_checkpoints_in_one_line_and_leaves_earlier_outputs(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["r1-lightning"])  # LightningCLI warns when args and pytest's argv differ
    config, run = _sft_config(tmp_path), tmp_path / "run"
    (run / "hf_model").mkdir(parents=True)
    (run / "hf_model" / "config.json").write_text("{}")  # an earlier run's output
    truncated, evil, marker = tmp_path / "truncated.ckpt", tmp_path / "evil.ckpt", tmp_path / "marker"
    torch.save({"state_dict": {"w": torch.ones(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    torch.save({"payload": _RunsCode(marker)}, evil)
    cases = {
        str(tmp_path / "missing.ckpt"): "missing.ckpt'?: no such file",
        str(truncated): "truncated.ckpt'?: not a complete PyTorch checkpoint",
        str(tmp_path): "a directory but not a complete sharded checkpoint",
        str(evil): "evil.ckpt'?: refused to load",
        "last": r"ckpt_path='last': no complete checkpoint in .*run.checkpoints",
    }
    for ckpt_path, message in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", str(config), "--ckpt_path", ckpt_path])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 1 and len(err.splitlines()) == 1, err
        assert err.startswith("r1-lightning: error: ckpt_path=") and re.search(message, err), err
    assert not marker.exists()
    assert sorted(p.name for p in run.iterdir()) == ["hf_model"] and (run / "hf_model" / "config.json").read_text() == "{}"


def test_resume_with_another_world_size_is_refused(tmp_path) -> None:
    _fit_with_interruptions(_sft_run, tmp_path, 2, [])
    path = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint = load_checkpoint_file(path)
    checkpoint["r1_rng_states"] = checkpoint["r1_rng_states"] * 2  # as if 2 processes had saved it
    checkpoint["ColdStartDataModule"]["world_size"] = 2
    atomic_save(checkpoint, path)
    with pytest.raises(ConfigError, match=r"last\.ckpt'?: saved by 2 processes, and this run has 1"):
        _trainer(tmp_path / "checkpoints", 4).fit(*_sft_run(), ckpt_path=str(path))
    del checkpoint["r1_rng_states"]  # the data position alone cannot move to another world size either
    atomic_save(checkpoint, path)
    with pytest.raises(ConfigError, match="path=None: the checkpoint was saved by 2 processes and this run has 1: the data"):
        _trainer(tmp_path / "checkpoints", 4).fit(*_sft_run(), ckpt_path=str(path))


def test_checkpoints_with_lora_settings_load_weights_only(tmp_path) -> None:
    pytest.importorskip("peft")
    module = PolicySFT("builtin:tiny", lora=LoraSettings(r=2, alpha=4), export_hf=False)
    data = ColdStartDataModule(num_samples=2, num_val_samples=2, batch_size=2, max_length=160)
    _trainer(tmp_path / "checkpoints", 1).fit(module, datamodule=data)
    checkpoint = load_checkpoint_file(tmp_path / "checkpoints" / "last.ckpt")  # weights_only=True
    assert checkpoint["hyper_parameters"]["lora"] == LoraSettings(r=2, alpha=4)
    assert len(checkpoint["r1_rng_states"]) == 1 and "ColdStartDataModule" in checkpoint


def test_remote_code_is_off_by_default() -> None:
    import inspect

    from r1_lightning import GRPO
    from r1_lightning.policy import load_model

    for target in (PolicySFT, GRPO, Distillation, load_model, load_tokenizer):
        assert inspect.signature(target).parameters["trust_remote_code"].default is False, target
