"""Atomic checkpoints, `--ckpt_path last` resolution, and checkpoints that load without running code."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import cli_env
from r1_lightning import ColdStartDataModule, Distillation, PolicySFT
from r1_lightning.checkpoint import AtomicCheckpointIO, atomic_save, load_checkpoint_file, resolve_checkpoint
from r1_lightning.cli import main
from r1_lightning.errors import ConfigError
from r1_lightning.policy import LoraSettings, load_tokenizer
from resume_helpers import QUIET, _fit_with_interruptions, _prompt_run, _Record, _sft_run, _trainer


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
    atomic_save({"global_step": 3, "state_dict": {"w": torch.zeros(3)}}, path)  # the resumed run's next save
    assert not partial.exists() and [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # the dead writer's copy is gone


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
