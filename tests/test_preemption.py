"""Preemption with real signals: SIGTERM (and Ctrl-C) stop every rank at the next step boundary, the step is saved,
the process exits 128 + signal, and ``--ckpt_path last`` continues exactly as the uninterrupted run did."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

from conftest import cli_env
from r1_lightning.callbacks import PreemptionCheckpoint
from r1_lightning.callbacks.preemption import Preempted
from r1_lightning.checkpoint import load_checkpoint_file
from resume_helpers import _logged_steps, _prompt_run, _trainer, fit_signalled_at

TESTS = Path(__file__).parent


class CompletionLog(Callback):
    """Appends each GRPO step's sampled completions to a JSON-lines file (named by a config's class_path)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps({"step": trainer.global_step, "texts": outputs["rollout"].texts}) + "\n")


class PauseFrom(Callback):
    """Sleeps at the start of every step after ``step`` (in the run that gets the signal), so that the signal sent once
    step ``step``'s checkpoint exists surely arrives during step ``step + 1``, on a loaded machine too."""

    def __init__(self, step: int, seconds: float) -> None:
        self.step, self.seconds = step, seconds

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            time.sleep(self.seconds)


PAUSE = "    - class_path: test_preemption.PauseFrom\n      init_args: {step: 2, seconds: 2.0}\n"


def env() -> dict[str, str]:
    """The CLI's environment with tests/ importable (for ``test_preemption.CompletionLog``)."""
    return {**cli_env(), "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


def run(command: str, config: Path, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "r1_lightning", command, "--config", str(config), *extra]
    return subprocess.run(args, cwd=cwd, env=env(), capture_output=True, text=True, timeout=600, check=False)


def completions(path: Path) -> dict[int, list[str]]:
    return {row["step"]: row["texts"] for row in map(json.loads, path.read_text().splitlines())}


def assert_same_weights(run_dir: Path, reference_dir: Path) -> None:
    final, reference = (load_file(d / "hf_model" / "model.safetensors") for d in (run_dir, reference_dir))
    assert final.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(final[name], reference[name], rtol=0, atol=1e-6, msg=name)


GRPO_CONFIG = """\
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 5
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
      init_args: {{dirpath: {ckpt_dir}, every_n_train_steps: 2, save_top_k: -1}}
    - class_path: test_preemption.CompletionLog
      init_args: {{path: {root}/{version}.jsonl}}
{pause}model:
  class_path: r1_lightning.GRPO
  init_args:
    model_name_or_path: builtin:tiny-small
    num_generations: 4
    max_new_tokens: 10
    beta: 0.1
    learning_rate: 1.0e-2
    dtype: float32
data:
  class_path: r1_lightning.PromptDataModule
  init_args: {{batch_size: 2, num_samples: 6, num_val_samples: 2, max_prompt_length: 64}}
"""


@pytest.mark.slow  # three CLI runs
def test_sigterm_saves_the_step_exits_143_and_resumes_exactly(tmp_path) -> None:
    def config(version: str, ckpt_dir: Path) -> Path:
        path = tmp_path / f"{version}.yaml"
        pause = PAUSE if version == "killed" else ""
        path.write_text(GRPO_CONFIG.format(root=tmp_path, version=version, ckpt_dir=ckpt_dir, pause=pause))
        return path

    full = run("fit", config("uninterrupted", tmp_path / "ckpt_a"), tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    # SIGTERM once step 2's periodic checkpoint exists (step 3 then pauses): the run finishes step 3 and saves it.
    ckpt_dir = tmp_path / "ckpt_b"
    step_2 = ckpt_dir / "epoch=0-step=2.ckpt"
    job = fit_signalled_at(config("killed", ckpt_dir), step_2, tmp_path, signal.SIGTERM, whole_group=False, env=env())
    stderr = (tmp_path / "ckpt_b.stderr").read_text()
    assert job.returncode == 143, stderr[-3000:]
    saved = load_checkpoint_file(ckpt_dir / "last.ckpt")
    killed = _logged_steps(tmp_path / "logs" / "killed" / "metrics.csv")
    step = saved["global_step"]
    assert step == 3 and max(killed) + 1 == step  # the step it was in, and no later one (metrics count from 0)
    assert f"SIGTERM: saved step {step} to {ckpt_dir / 'last.ckpt'}; resume with --ckpt_path last" in stderr
    assert not (tmp_path / "logs" / "killed" / "hf_model").exists() and not list(ckpt_dir.glob(".*tmp*"))

    resumed = run("fit", config("resumed", ckpt_dir), tmp_path, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from {ckpt_dir / 'last.ckpt'} (global step {step}," in resumed.stderr
    expected, after = completions(tmp_path / "uninterrupted.jsonl"), completions(tmp_path / "resumed.jsonl")
    assert sorted(after) == [s for s in sorted(expected) if s > step]
    assert all(after[s] == expected[s] for s in after)  # the same sampled completions
    assert completions(tmp_path / "killed.jsonl") == {s: expected[s] for s in expected if s <= step}
    assert_same_weights(tmp_path / "logs" / "resumed", tmp_path / "logs" / "uninterrupted")


SFT_DDP_CONFIG = """\
seed_everything: 0
trainer:
  accelerator: cpu
  strategy: ddp
  devices: 2
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
      init_args: {{dirpath: {ckpt_dir}, every_n_train_steps: 2, save_top_k: -1}}
{pause}model:
  class_path: r1_lightning.PolicySFT
  init_args: {{model_name_or_path: "builtin:tiny-small", learning_rate: 1.0e-2, warmup_steps: 1}}
data:
  class_path: r1_lightning.ColdStartDataModule
  init_args: {{batch_size: 2, num_samples: 12, num_val_samples: 2, max_length: 160}}
"""


@pytest.mark.slow  # three 2-process CLI runs
def test_sigterm_to_rank_0_stops_both_ddp_ranks_at_one_step_and_resumes_exactly(tmp_path) -> None:
    def config(version: str, ckpt_dir: Path) -> Path:
        path = tmp_path / f"{version}.yaml"
        pause = PAUSE if version == "killed" else ""
        path.write_text(SFT_DDP_CONFIG.format(root=tmp_path, version=version, ckpt_dir=ckpt_dir, pause=pause))
        return path

    full = run("fit", config("uninterrupted", tmp_path / "ckpt_a"), tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    ckpt_dir = tmp_path / "ckpt_b"
    # To rank 0 only (the process the user started; it launched rank 1): the ranks agree at the step boundary.
    step_2 = ckpt_dir / "epoch=0-step=2.ckpt"
    job = fit_signalled_at(config("killed", ckpt_dir), step_2, tmp_path, signal.SIGTERM, whole_group=False, env=env())
    stderr = (tmp_path / "ckpt_b.stderr").read_text()
    assert job.returncode == 143, stderr[-3000:]
    deadline = time.monotonic() + 60
    while _group_alive(job.pid):  # rank 1 stops too (it exits on its own, at the same step)
        assert time.monotonic() < deadline, "rank 1 kept running"
        time.sleep(0.1)
    saved = load_checkpoint_file(ckpt_dir / "last.ckpt")
    assert len(saved["r1_rng_states"]) == 2 and saved["ColdStartDataModule"]["world_size"] == 2 and saved["global_step"] == 3

    resumed = run("fit", config("resumed", ckpt_dir), tmp_path, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, after = (_logged_steps(tmp_path / "logs" / v / "metrics.csv") for v in ("uninterrupted", "resumed"))
    assert sorted(after) == [s for s in sorted(expected) if s >= saved["global_step"]]
    for step, logged in after.items():
        assert logged == pytest.approx(expected[step], abs=1e-6), step
    assert_same_weights(tmp_path / "logs" / "resumed", tmp_path / "logs" / "uninterrupted")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


class _SignalSelf(Callback):
    """Sends this process a real signal during the training step ``at`` (as a user's Ctrl-C would)."""

    def __init__(self, at: int, signum: int) -> None:
        self.at, self.signum = at, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step + 1 == self.at:
            os.kill(os.getpid(), self.signum)


def test_ctrl_c_saves_the_step_and_exits_130_a_second_one_stops_at_once(tmp_path) -> None:
    module, data = _prompt_run()
    trainer = _trainer(tmp_path / "checkpoints", 6, _SignalSelf(2, signal.SIGINT), PreemptionCheckpoint())
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(Preempted) as stopped:
        trainer.fit(module, datamodule=data)
    assert stopped.value.code == 130 and trainer.global_step == 2
    assert load_checkpoint_file(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 2
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are put back
    # A second Ctrl-C while the first waits for the step's end: KeyboardInterrupt, no waiting.
    callback = PreemptionCheckpoint()
    callback._handle(signal.SIGINT, None)
    with pytest.raises(KeyboardInterrupt):
        callback._handle(signal.SIGINT, None)
    callback._handle(signal.SIGTERM, None)  # a SIGTERM after a Ctrl-C changes nothing: still a stop at the boundary
    assert callback.requested == signal.SIGINT
