"""Exact resume after a kill, atomic checkpoints, and checkpoints that load without running code.

An interrupted run resumed from its checkpoint must reproduce the uninterrupted run: the same
batches in the same order (every sample once per epoch), the same random draws, the same
losses and the same final weights (CPU, float32).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

from conftest import run_cli
from r1_lightning import ColdStartDataModule, Distillation
from r1_lightning.checkpoint import load_checkpoint_file
from r1_lightning.cli import main
from r1_lightning.data.resumable import ResumableSampler

from resume_helpers import _assert_same_run, _fit_with_interruptions, _logged_steps, _prompt_run, _sft_run, fit_signalled_at



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


def _fit_killed_at(config: Path, checkpoint: Path, cwd: Path) -> subprocess.Popen:
    """SIGKILL the whole job (every rank) once ``checkpoint`` exists."""
    return fit_signalled_at(config, checkpoint, cwd, signal.SIGKILL, whole_group=True)


@pytest.mark.slow
def test_grpo_killed_after_a_checkpoint_resumes_exactly(tmp_path) -> None:
    # 6 prompts in batches of 2: 3 steps per epoch, 6 steps; the reference is refreshed every 2 steps.
    full = run_cli(["fit", "--config", _grpo_config(tmp_path, "uninterrupted", tmp_path / "ckpt_a")], cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]

    ckpt_dir, killed_after = tmp_path / "ckpt_b", 2
    child = _fit_killed_at(_grpo_config(tmp_path, "killed", ckpt_dir), ckpt_dir / f"epoch=0-step={killed_after}.ckpt", tmp_path)
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
    _fit_killed_at(config("killed", ckpt_dir), ckpt_dir / "epoch=0-step=2.ckpt", tmp_path)  # rank 0 and the rank 1 it launched
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
