"""What the CLI does with hostile and mistaken input (issue 16): a checkpoint never changes the configuration,
unchecked options fail in one line before any model loads, stale log directories are named, offline hub names
fail fast, and the command's help and progress bar say what they mean."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from r1_lightning.cli import R1CLI, main
from r1_lightning.policy import build_builtin_tokenizer, load_model

SFT_CONFIG = """\
seed_everything: 0
trainer:
  accelerator: cpu
  max_steps: {steps}
  enable_progress_bar: false
  enable_model_summary: false
  limit_val_batches: 0
  num_sanity_val_steps: 0
  logger: false
  default_root_dir: {root}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {root}/checkpoints, save_last: true}}
model:
  class_path: r1_lightning.PolicySFT
  init_args: {{model_name_or_path: "builtin:tiny-small", learning_rate: 0.001, export_hf: false}}
data:
  class_path: r1_lightning.ColdStartDataModule
  init_args: {{batch_size: 2, num_samples: 4, num_val_samples: 2, max_length: 160}}
"""

GRPO_CONFIG = """\
seed_everything: 0
trainer:
  accelerator: cpu
  max_steps: 2
  enable_progress_bar: false
  enable_model_summary: false
  limit_val_batches: 0
  num_sanity_val_steps: 0
  logger: false
  default_root_dir: {root}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {root}/checkpoints, save_last: true}}
model:
  class_path: r1_lightning.GRPO
  init_args: {{model_name_or_path: "builtin:tiny-small", num_generations: 2, max_new_tokens: 4, export_hf: false}}
data:
  class_path: r1_lightning.PromptDataModule
  init_args: {{batch_size: 2, num_samples: 4, num_val_samples: 2}}
"""


def run(args: list, capsys) -> tuple[int, str]:
    """``r1-lightning ARGS`` in this process: the exit status and what it wrote to stderr."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 0
    return code, capsys.readouterr().err


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["r1-lightning"])  # LightningCLI warns when args and pytest's argv differ


@pytest.fixture(scope="module")
def sft_checkpoint(tmp_path_factory) -> Path:
    """A PolicySFT checkpoint (1 step, learning_rate 0.001) saved by the CLI."""
    root = tmp_path_factory.mktemp("sft1")
    config = write(root / "sft1.yaml", SFT_CONFIG.format(root=root / "run", steps=1))
    sys.argv = ["r1-lightning"]
    main(["fit", "--config", str(config)])
    return root / "run" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def remote_code_model(tmp_path_factory) -> tuple[Path, Path]:
    """A model directory whose tokenizer is a custom module: loading it with trust_remote_code runs that module,
    which writes a marker file. Returns (directory, marker)."""
    root = tmp_path_factory.mktemp("remote_code")
    directory, marker = root / "model", root / "CODE_RAN"
    tokenizer = build_builtin_tokenizer()
    load_model("builtin:tiny-small", vocab_size=len(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    settings = json.loads((directory / "tokenizer_config.json").read_text())
    settings.update(auto_map={"AutoTokenizer": [None, "tokenization_marker.MarkerTokenizer"]}, tokenizer_class="MarkerTokenizer")
    (directory / "tokenizer_config.json").write_text(json.dumps(settings))
    (directory / "tokenization_marker.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n\nclass MarkerTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    return directory, marker


# ------------------------------------------------------------------ 1. a checkpoint never changes the config
def test_a_crafted_checkpoint_of_strings_and_a_bool_is_refused_and_runs_no_code(tmp_path, capsys, remote_code_model):
    # The attack of issue 16: only strings and a bool (so it passes weights_only=True), naming another module class,
    # turning on remote code and pointing the model at a directory whose tokenizer module runs code when loaded.
    directory, marker = remote_code_model
    crafted = tmp_path / "crafted.ckpt"
    torch.save({"hyper_parameters": {"_class_path": "r1_lightning.PolicySFT", "trust_remote_code": True,
                                     "model_name_or_path": str(directory)}}, crafted)
    config = write(tmp_path / "grpo.yaml", GRPO_CONFIG.format(root=tmp_path / "run"))
    code, err = run(["fit", "--config", config, "--ckpt_path", crafted], capsys)
    assert code == 1 and not marker.exists()
    (line,) = [l for l in err.splitlines() if "error" in l]
    assert line == f"r1-lightning: error: ckpt_path='{crafted}': not a Lightning checkpoint (it holds hyper_parameters; no state_dict and version)"


def test_a_real_checkpoint_with_hostile_hyperparameters_resumes_with_the_config(tmp_path, caplog, sft_checkpoint, remote_code_model):
    # The same hyper-parameters planted in a real checkpoint of the config's class: the run resumes its weights and
    # steps, and every value (class, path, remote code, learning rate) comes from the config.
    directory, marker = remote_code_model
    checkpoint = torch.load(sft_checkpoint, weights_only=True)
    checkpoint["hyper_parameters"].update(model_name_or_path=str(directory), trust_remote_code=True, learning_rate=0.25)
    torch.save(checkpoint, tmp_path / "planted.ckpt")
    config = write(tmp_path / "sft.yaml", SFT_CONFIG.format(root=tmp_path / "run", steps=2))
    cli = R1CLI(args=["fit", "--config", str(config), "--ckpt_path", str(tmp_path / "planted.ckpt")])
    assert not marker.exists()
    assert cli.model.hparams.model_name_or_path == "builtin:tiny-small" and cli.model.hparams.trust_remote_code is False
    assert cli.trainer.global_step == 2  # resumed at step 1, trained one more
    assert cli.trainer.optimizers[0].param_groups[0]["initial_lr"] == 0.001
    assert "the config's values are used, not the checkpoint's: model_name_or_path: checkpoint" in caplog.text


def test_a_grpo_run_given_an_sft_checkpoint_is_refused_in_one_line(tmp_path, capsys, sft_checkpoint):
    config = write(tmp_path / "grpo.yaml", GRPO_CONFIG.format(root=tmp_path / "run"))
    code, err = run(["fit", "--config", config, "--ckpt_path", sft_checkpoint], capsys)
    assert code == 1
    assert err.splitlines()[-1] == (
        f"r1-lightning: error: ckpt_path='{sft_checkpoint}' holds a r1_lightning.PolicySFT checkpoint, but the config asks "
        "for r1_lightning.modules.grpo.GRPO: resume a run with the module class that saved it"
    )
    # --ckpt_path last behaves the same: the SFT checkpoint copied into the GRPO run's checkpoint directory.
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(sft_checkpoint.read_bytes())
    code, err = run(["fit", "--config", config, "--ckpt_path", "last"], capsys)
    assert code == 1 and "holds a r1_lightning.PolicySFT checkpoint, but the config asks for r1_lightning.modules.grpo.GRPO" in err


def test_the_command_line_beats_the_checkpoint_and_a_model_of_another_shape_is_refused(tmp_path, capsys, sft_checkpoint):
    # Issue 16: `--model.learning_rate 0.5 --ckpt_path sft1.ckpt` trained with the checkpoint's 0.001.
    config = write(tmp_path / "sft.yaml", SFT_CONFIG.format(root=tmp_path / "run", steps=2))
    for ckpt_path in (sft_checkpoint, "last"):
        if ckpt_path == "last":
            (tmp_path / "run" / "checkpoints").mkdir(parents=True, exist_ok=True)
            (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(sft_checkpoint.read_bytes())
        cli = R1CLI(args=["fit", "--config", str(config), "--model.learning_rate", "0.5", "--ckpt_path", str(ckpt_path)])
        assert cli.trainer.optimizers[0].param_groups[0]["initial_lr"] == 0.5 and cli.trainer.global_step == 2
    # builtin:tiny is wider than the tiny-small model the checkpoint holds.
    code, err = run(["fit", "--config", config, "--model.model_name_or_path", "builtin:tiny", "--ckpt_path", sft_checkpoint], capsys)
    assert code == 1 and err.splitlines()[-1] == (
        f"r1-lightning: error: ckpt_path='{sft_checkpoint}': it holds model.model.embed_tokens.weight of shape [263, 64], "
        "the config's model has [263, 128]; a checkpoint of another model?"
    )
