"""What the CLI does with hostile and mistaken input (issue 16): a checkpoint never changes the configuration,
unchecked options fail in one line before any model loads, stale log directories are named, offline hub names
fail fast, and the command's help and progress bar say what they mean."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import lightning as L
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


# ------------------------------------------------------------------ 7. unchecked options, before any model loads
@pytest.fixture(scope="module")
def bad_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad_data")
    (root / "reward_argument_column.jsonl").write_text('{"prompt": "1+1", "answer": "2", "completions": "x"}\n')
    (root / "list_of_strings.jsonl").write_text('{"prompt": "1+1", "answer": "2"}\n{"prompt": ["1+1", "2+2"], "answer": "2"}\n')
    return root


GRPO_ARGS = ["--model", "r1_lightning.GRPO", "--model.num_generations", "2", "--model.max_new_tokens", "4",
             "--data", "r1_lightning.PromptDataModule", "--data.num_samples", "2", "--data.batch_size", "1",
             "--trainer.max_steps", "1", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false"]  # fmt: skip

# id -> (subcommand, extra arguments ({data} = the bad_data directory), the one error line after "r1-lightning: error: ")
OPTION_CASES = {
    "negative_mini_batch": ("fit", ["--model.mini_batch_size", "-4"], "mini_batch_size=-4: must be >= 1 completions (or unset: the whole batch)"),
    "negative_micro_batch": ("fit", ["--model.micro_batch_size", "-1"], "micro_batch_size=-1: must be >= 1 completions (or unset: the whole batch)"),
    "negative_epsilon": ("fit", ["--model.epsilon", "-0.2"], "epsilon=-0.2: must be >= 0 (the clip range is [1 - epsilon, 1 + epsilon_high])"),
    "one_generation": ("fit", ["--model.num_generations", "1"],
                       "num_generations=1: GRPO training needs >= 2 completions per prompt (advantages are relative to the "
                       "group: with 1 they are all 0 and nothing is learnt)"),
    "reward_argument_column": ("fit", ["--data.path", "{data}/reward_argument_column.jsonl"],
                               "path='{data}/reward_argument_column.jsonl': column 'completions' has the name of a reward argument "
                               "(prompts, completions are given to every reward by the trainer); rename the column"),
    "list_of_strings_prompt": ("fit", ["--data.path", "{data}/list_of_strings.jsonl"],
                               "{data}/list_of_strings.jsonl:2: column 'prompt' is a list, so it must hold chat messages ({{'role': "
                               "..., 'content': ...}}), but it holds str '1+1'; write a string prompt as one string"),
    "zero_val_batch_size": ("predict", ["--data.val_batch_size", "0"], "val_batch_size=0: must be >= 1 (or unset: batch_size)"),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_unchecked_options_fail_in_one_line_before_any_model_loads(case, bad_data, tmp_path, capsys, monkeypatch):
    import r1_lightning.modules.plumbing

    subcommand, extra, expected = OPTION_CASES[case]
    monkeypatch.setattr(r1_lightning.modules.plumbing, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    args = GRPO_ARGS if subcommand == "fit" else GRPO_ARGS[: GRPO_ARGS.index("--trainer.max_steps")] + ["--trainer.logger", "false"]
    monkeypatch.chdir(tmp_path)
    code, err = run([subcommand, *args, *[a.format(data=bad_data) for a in extra]], capsys)
    assert code == 1 and "Traceback" not in err
    assert [l for l in err.splitlines() if "error" in l] == ["r1-lightning: error: " + expected.format(data=bad_data)]


def test_a_bad_cpu_matmul_setting_fails_in_one_line_before_any_model_loads(tmp_path, capsys, monkeypatch):
    import r1_lightning.modules.plumbing

    monkeypatch.setattr(r1_lightning.modules.plumbing, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setenv("R1_CPU_MATMUL", "mkl")
    monkeypatch.chdir(tmp_path)
    code, err = run(["fit", *GRPO_ARGS], capsys)
    assert code == 1 and "Traceback" not in err
    assert [l for l in err.splitlines() if "error" in l] == [
        "r1-lightning: error: R1_CPU_MATMUL='mkl': choose one of auto, onednn, default"
    ]


def test_a_corrupt_kept_cpu_matmul_decision_fails_in_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    import r1_lightning.modules.plumbing

    monkeypatch.setattr(r1_lightning.modules.plumbing, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setenv("R1_CPU_MATMUL", "auto")
    monkeypatch.setenv("R1_LIGHTNING_CACHE", str(tmp_path / "cache"))
    kept = tmp_path / "cache" / "cpu_matmul.json"
    kept.parent.mkdir()
    kept.write_text('{"cpu": {"onednn": true},\n "other": {"onednn": tru')
    monkeypatch.chdir(tmp_path)
    code, err = run(["fit", *GRPO_ARGS], capsys)
    assert code == 1 and "Traceback" not in err
    assert [l for l in err.splitlines() if "error" in l] == [
        f"r1-lightning: error: {kept}:2:22: not JSON (Expecting value); delete it to probe again"
    ]


# ------------------------------------------------------------------ 9. stale state in fixed log directories
def test_a_fresh_fit_into_an_earlier_runs_directory_says_so_and_validate_keeps_the_fit_config(tmp_path, capsys, sft_checkpoint):
    config = write(tmp_path / "sft.yaml", SFT_CONFIG.format(root=tmp_path / "run", steps=2))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(sft_checkpoint.read_bytes())
    (tmp_path / "run" / "config.yaml").write_text("the fit's config\n")
    code, err = run(["fit", "--config", config], capsys)
    assert code == 1 and err.splitlines()[-1] == (
        f"r1-lightning: error: {tmp_path / 'run' / 'checkpoints'} holds checkpoints of an earlier run (last.ckpt): resume it "
        "with --ckpt_path last, or start this run in another directory (another logger version or ModelCheckpoint dirpath) "
        "or clear that one"
    )
    assert (tmp_path / "run" / "config.yaml").read_text() == "the fit's config\n"  # refused before the config is saved
    code, err = run(["validate", "--config", config], capsys)
    assert code == 0, err
    assert (tmp_path / "run" / "config.yaml").read_text() == "the fit's config\n"
    assert "class_path: r1_lightning.PolicySFT" in (tmp_path / "run" / "validate_config.yaml").read_text()


# ------------------------------------------------------------------ 10. offline hub names fail fast
@pytest.mark.parametrize("environment", [{"HF_HUB_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}],
                         ids=["offline-mode", "no-connection"])
def test_a_hub_name_offline_fails_in_one_line_within_seconds(environment, tmp_path, capsys, monkeypatch):
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    started = time.monotonic()
    code, err = run(["fit", "--model", "r1_lightning.PolicySFT", "--model.model_name_or_path", "someorg/not-here",
                     "--data", "r1_lightning.ColdStartDataModule"], capsys)  # fmt: skip
    assert time.monotonic() - started < 10 and code == 1 and "Traceback" not in err
    reason = "HF_HUB_OFFLINE=1" if environment["HF_HUB_OFFLINE"] == "1" else "http://127.0.0.1:9: Connection refused"
    assert [l for l in err.splitlines() if "error" in l] == [
        f"r1-lightning: error: model_name_or_path='someorg/not-here': not a local directory and the hub is unreachable ({reason})"
    ]


# ------------------------------------------------------------------ polish: help, progress bar, warnings
def test_help_and_the_missing_subcommand_error_name_recipe(capsys):
    code, err = run([], capsys)
    assert code == 2 and err.strip() == (
        'r1-lightning: error: expected "subcommand" to be one of {fit,validate,test,predict,recipe}, but it was not provided.'
    )
    with pytest.raises(SystemExit):
        main(["--help"])
    printed = " ".join(capsys.readouterr().out.split())
    assert printed.startswith("usage: r1-lightning ") and "r1-lightning recipe FILE [--output_dir DIR] [--fresh]" in printed


def test_the_progress_bar_shows_readable_numbers_and_a_step_bounded_epoch():
    from lightning.pytorch.callbacks import RichProgressBar

    from r1_lightning.callbacks.progress import R1RichProgressBar, default_progress_bar, readable_metrics

    assert readable_metrics({"lr": 3e-4, "lr-AdamW": 1e-6, "v_num": "latest", "train/reward": 0.25}) == {
        "lr": "3.00e-04", "lr-AdamW": "1.00e-06", "train/reward": 0.25}  # fmt: skip
    assert readable_metrics({"v_num": 3}) == {"v_num": 3}  # a numbered version is kept
    bar = default_progress_bar()
    assert isinstance(bar, R1RichProgressBar)  # rich is installed here, as Lightning would pick
    for progress_bar, shown in ((bar, "Epoch 0"), (RichProgressBar(), "Epoch 0/-2")):  # ours, and what Lightning alone shows
        trainer = L.Trainer(max_steps=5, max_epochs=-1, callbacks=[progress_bar], logger=False, enable_checkpointing=False)
        progress_bar.setup(trainer, L.LightningModule(), "fit")
        assert progress_bar._get_train_description(0).strip() == shown


def test_known_harmless_warnings_are_silenced_and_others_are_not(tmp_path, recwarn):
    from r1_lightning.cli import QuietKnownWarnings

    class Frozen(L.LightningModule):
        def __init__(self, frozen: bool) -> None:
            super().__init__()
            self.policy, self.reference = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).eval()
            self.reference.requires_grad_(not frozen)

    for frozen in (True, False):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            QuietKnownWarnings().on_fit_start(None, Frozen(frozen))
            warnings.warn("Found 1 module(s) in eval mode at the start of training. This may lead to ...", UserWarning)
        assert len(caught) == (0 if frozen else 1)  # a trainable module left in eval mode still warns


class SigtermDuringValidation(L.Callback):
    """Sends this process a real SIGTERM during the first validation batch."""

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_during_validate_exits_143_not_0(tmp_path, capsys):
    # Lightning's own handler stops an evaluation at the next batch with an exit status of 0; the CLI reports 143.
    config = write(tmp_path / "sft.yaml", SFT_CONFIG.format(root=tmp_path / "run", steps=1))
    args = ["validate", "--config", config, "--trainer.limit_val_batches", "2", "--data.num_val_samples", "4",
            "--model.eval_max_new_tokens", "2", "--trainer.callbacks+=test_failure_behaviour.SigtermDuringValidation"]  # fmt: skip
    code, err = run(args, capsys)
    assert code == 143, err[-2000:]
