"""The multi-stage recipe: a shortened R1 chain runs end to end, writes its table, and resumes."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import cli_env
from safetensors.torch import load_file

from r1_lightning.errors import ConfigError
from r1_lightning.recipe import MANIFEST, clear_outputs, load_recipe, main, run_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY_GRPO = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--model.init_args.max_new_tokens", "12",
             "--model.init_args.num_generations", "2", "--data.init_args.batch_size", "2", "--data.init_args.num_val_samples", "4",
             "--model.init_args.eval_num_samples", "2"]


def _write_recipe(tmp_path: Path) -> Path:
    # Rejection sampling of an untrained model accepts nothing under the default filters:
    # this config keeps every sample so the chain has data to continue with.
    rs_config = yaml.safe_load((ROOT / "configs/rejection_sampling.yaml").read_text())
    rs_config["trainer"]["callbacks"][0]["init_args"].update({"require": [], "drop_truncated": False, "max_tokens": None})
    (tmp_path / "rs.yaml").write_text(yaml.safe_dump(rs_config))
    recipe = {
        "output_dir": str(tmp_path / "out"),
        "evaluation": {"config": str(ROOT / "configs/eval.yaml"),
                       "args": ["--data.init_args.num_val_samples", "4", "--model.init_args.eval_max_new_tokens", "12",
                                "--model.init_args.eval_num_samples", "2", "--trainer.default_root_dir", str(tmp_path / "eval")]},
        "stages": [
            {"name": "sft", "config": [str(ROOT / "configs/sft.yaml")],
             "args": ["--trainer.max_epochs", "1", "--trainer.check_val_every_n_epoch", "1", "--data.init_args.num_samples", "16",
                      "--data.init_args.num_val_samples", "4", "--model.init_args.eval_max_new_tokens", "12"]},
            {"name": "grpo", "config": [str(ROOT / "configs/grpo.yaml")], "model_from": "sft", "args": TINY_GRPO},
            {"name": "rs", "command": "predict", "config": [str(tmp_path / "rs.yaml")], "model_from": "grpo",
             "args": ["--data.init_args.num_samples", "3", "--model.init_args.num_generations", "2", "--model.init_args.max_new_tokens", "12"]},
            {"name": "sft_2", "config": [str(ROOT / "configs/sft.yaml")], "model_from": "grpo", "data_from": "rs",
             "args": ["--trainer.max_epochs", "1", "--data.init_args.max_length", "160", "--data.init_args.overlong", "truncate"]},
            {"name": "distill", "config": [str(ROOT / "configs/distill.yaml")], "teacher_from": "sft_2",
             "args": ["--trainer.max_steps", "2", "--data.init_args.num_samples", "8", "--data.init_args.num_val_samples", "4",
                      "--model.init_args.model_name_or_path", "builtin:tiny-small"]},
        ],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.slow
def test_short_recipe_runs_end_to_end_and_resumes(tmp_path, capsys) -> None:
    recipe = _write_recipe(tmp_path)
    main([str(recipe)])
    out = tmp_path / "out"
    printed = capsys.readouterr().out
    assert "stage" in printed and "grpo" in printed  # the final table
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["stage"] for r in rows] == ["sft", "grpo", "rs", "sft_2", "distill"]
    for row in rows:
        if row["stage"] != "rs":
            assert 0.0 <= float(row["accuracy"]) <= 1.0 and 0.0 <= float(row["format"]) <= 1.0
    assert int(rows[2]["accepted_rows"]) == 3  # best-of-2 for each of 3 prompts (every sample passes the filters)
    assert (out / "results.png").stat().st_size > 0
    for stage in ("sft", "grpo", "sft_2", "distill"):
        assert (out / stage / "hf_model" / "config.json").is_file()
    assert len((out / "rs" / "accepted.jsonl").read_text().splitlines()) == 3
    # each stage started from the model (or data) of the stage it names
    grpo_config = yaml.safe_load((out / "grpo" / "config.yaml").read_text())
    assert grpo_config["model"]["init_args"]["model_name_or_path"] == str(out / "sft" / "hf_model")
    sft_2_config = yaml.safe_load((out / "sft_2" / "config.yaml").read_text())
    assert sft_2_config["data"]["init_args"]["path"] == str(out / "rs" / "accepted.jsonl")
    distill_config = yaml.safe_load((out / "distill" / "config.yaml").read_text())
    assert distill_config["model"]["init_args"]["teacher_name_or_path"] == str(out / "sft_2" / "hf_model")
    assert int(rows[-1]["params"]) < int(rows[0]["params"])  # the distilled student is the smaller model

    main([str(recipe)])  # everything is done: every stage is skipped, the table is the same
    assert capsys.readouterr().out.count("done before, skipped") == 5
    with (out / "results.csv").open() as handle:
        assert list(csv.DictReader(handle)) == rows


def test_recipe_errors_name_the_problem(tmp_path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("stages: []\n")
    with pytest.raises(ConfigError, match="non-empty 'stages'"):
        load_recipe(str(path))
    path.write_text(yaml.safe_dump({"stages": [{"name": "a", "config": [str(ROOT / "configs/sft.yaml")], "model_from": "b"}]}))
    with pytest.raises(ConfigError, match="model_from='b'"):
        load_recipe(str(path))
    path.write_text(yaml.safe_dump({"stages": [{"name": "a", "config": ["nope.yaml"]}]}))
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_recipe(str(path))
    path.write_text(yaml.safe_dump({"threads": 0, "stages": [{"name": "a", "config": [str(ROOT / "configs/sft.yaml")]}]}))
    with pytest.raises(ConfigError, match="threads=0"):
        load_recipe(str(path))
    with pytest.raises(ConfigError, match="no such file"):
        load_recipe(str(tmp_path / "missing.yaml"))


# ------------------------------------------------------------------ --fresh deletes only what a recipe wrote
def _tiny_recipe(path: Path, **extra) -> Path:
    path.write_text(yaml.safe_dump({**extra, "stages": [{"name": "sft", "config": [str(ROOT / "configs/sft.yaml")]}]}))
    return path


def test_fresh_with_an_empty_output_dir_is_refused_and_deletes_nothing(tmp_path, monkeypatch) -> None:
    # The reported bug: `output_dir: ""` made --fresh empty the working directory, user files included.
    work = tmp_path / "work"
    work.mkdir()
    (work / "mine.txt").write_text("precious")
    monkeypatch.chdir(work)
    recipe = _tiny_recipe(tmp_path / "recipe.yaml", output_dir="")
    with pytest.raises(ConfigError, match="output_dir=''"):
        main([str(recipe), "--fresh"])
    with pytest.raises(ConfigError, match="output_dir=''"):
        main([str(_tiny_recipe(tmp_path / "plain.yaml")), "--output_dir", "", "--fresh"])
    assert (work / "mine.txt").read_text() == "precious"


def test_fresh_removes_only_the_stage_directories_the_recipe_recorded(tmp_path, monkeypatch) -> None:
    out = tmp_path / "out"
    (out / "sft" / "checkpoints").mkdir(parents=True)
    (out / "sft" / "checkpoints" / "last.ckpt").write_text("x")
    (out / "mine").mkdir()
    (out / "notes.txt").write_text("keep")
    (out / "results.csv").write_text("stage\n")
    # Without the recipe's manifest nothing is deleted.
    with pytest.raises(ConfigError, match="has no recipe_manifest.json"):
        clear_outputs(out)
    assert (out / "sft" / "checkpoints" / "last.ckpt").is_file()
    (out / MANIFEST).write_text(json.dumps({"stages": {"sft": {}, "never_ran": {}}}))
    removed = clear_outputs(out)
    assert sorted(p.name for p in removed) == ["results.csv", "sft"]
    assert sorted(p.name for p in out.iterdir()) == ["mine", "notes.txt"]  # the user's files stay
    # A manifest naming a path outside output_dir (edited, or not ours) is refused before anything goes.
    (tmp_path / "victim").mkdir()
    (out / MANIFEST).write_text(json.dumps({"stages": {"../victim": {}}}))
    with pytest.raises(ConfigError, match="stage name '../victim'"):
        clear_outputs(out)
    assert (tmp_path / "victim").is_dir()
    # Never a root, a home or the working directory (or one of its parents), manifest or not.
    monkeypatch.chdir(out)
    for protected in (Path("/"), Path.home(), Path("."), tmp_path):
        with pytest.raises(ConfigError, match="never clears a root, home or working directory"):
            clear_outputs(protected)


def test_stage_names_are_plain_directory_names(tmp_path) -> None:
    for name in ["", "a/b", "..", ".", "a\\b", 3]:
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump({"stages": [{"name": name, "config": [str(ROOT / "configs/sft.yaml")]}]}))
        with pytest.raises(ConfigError, match="must be a plain directory name"):
            load_recipe(str(path))
    path.write_text(yaml.safe_dump({"stages": [{"name": "a", "config": [str(ROOT / "configs/sft.yaml")]}] * 2}))
    with pytest.raises(ConfigError, match="two stages are named 'a'"):
        load_recipe(str(path))


def test_a_stage_directory_the_recipe_did_not_make_is_not_written_into(tmp_path) -> None:
    out = tmp_path / "out"
    (out / "sft").mkdir(parents=True)
    (out / "sft" / "mine.txt").write_text("keep")
    with pytest.raises(ConfigError, match="exists but the recipe did not make it"):
        run_recipe(load_recipe(str(_tiny_recipe(tmp_path / "r.yaml"))), out)
    assert (out / "sft" / "mine.txt").read_text() == "keep"


# ------------------------------------------------------------------ paths relative to the recipe file
def test_recipe_paths_resolve_against_the_recipe_directory_then_the_working_directory(tmp_path, monkeypatch) -> None:
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    (project / "recipes").mkdir(parents=True)
    elsewhere.mkdir()
    (project / "stage.yaml").write_text("{}\n")
    (project / "recipes" / "train.jsonl").write_text("{}\n")
    (elsewhere / "local.yaml").write_text("{}\n")
    (elsewhere / "val.jsonl").write_text("{}\n")
    recipe = project / "recipes" / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "evaluation": {"config": "../stage.yaml"},
        "stages": [{"name": "a", "config": ["../stage.yaml", "local.yaml"],
                    "args": ["--data.init_args.path", "train.jsonl", "--data.init_args.val_path=val.jsonl",
                             "--model.init_args.model_name_or_path", "builtin:tiny", "--trainer.max_steps", "train.jsonl"]}],
    }))
    monkeypatch.chdir(elsewhere)
    loaded = load_recipe("../project/recipes/r.yaml")
    stage = loaded["stages"][0]
    assert stage["config"] == [str(project / "recipes" / "../stage.yaml"), "local.yaml"]  # recipe's directory, else the working one
    assert Path(stage["config"][0]).resolve() == project / "stage.yaml"
    assert stage["args"] == ["--data.init_args.path", str(project / "recipes" / "train.jsonl"), "--data.init_args.val_path=val.jsonl",
                             "--model.init_args.model_name_or_path", "builtin:tiny", "--trainer.max_steps", "train.jsonl"]
    assert Path(loaded["evaluation"]["config"][0]).resolve() == project / "stage.yaml"
    recipe.write_text(yaml.safe_dump({"stages": [{"name": "a", "config": ["missing.yaml"]}]}))
    with pytest.raises(ConfigError, match=r"config 'missing.yaml' not found \(looked in .*recipes and in the working directory"):
        load_recipe(str(recipe))


# ------------------------------------------------------------------ a stage killed mid-run resumes from its checkpoint
STAGE_CONFIG = """\
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
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {every_n_train_steps: 2, save_top_k: -1, save_last: true}
model:
  class_path: r1_lightning.PolicySFT
  init_args: {model_name_or_path: "builtin:tiny-small", learning_rate: 3.0e-3, warmup_steps: 1, eval_max_new_tokens: 8}
data:
  class_path: r1_lightning.ColdStartDataModule
  init_args: {batch_size: 4, max_length: 160, num_samples: 24, num_val_samples: 4}
"""


def _recipe_project(tmp_path: Path) -> Path:
    """A recipe whose paths are relative to its own directory (``../configs/...``), run from elsewhere."""
    (tmp_path / "project" / "recipes").mkdir(parents=True)
    (tmp_path / "project" / "configs").mkdir()
    (tmp_path / "project" / "configs" / "stage.yaml").write_text(STAGE_CONFIG)
    recipe = tmp_path / "project" / "recipes" / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({
        "threads": 1,
        "evaluation": {"config": str(ROOT / "configs/eval.yaml"),
                       "args": ["--data.init_args.num_val_samples", "4", "--model.init_args.eval_max_new_tokens", "8",
                                "--model.init_args.eval_num_samples", "2"]},
        "stages": [{"name": "sft", "config": ["../configs/stage.yaml"]}],
    }))
    return recipe


def _recipe_command(recipe: Path, output_dir: Path) -> list[str]:
    return [sys.executable, "-m", "r1_lightning", "recipe", str(recipe), "--output_dir", str(output_dir)]


def _table(output_dir: Path) -> list[dict[str, str]]:
    with (output_dir / "results.csv").open() as handle:
        return [{k: v for k, v in row.items() if k != "wall_time_s"} for row in csv.DictReader(handle)]


@pytest.mark.slow  # three recipe runs in subprocesses, one of them killed
def test_a_stage_killed_mid_run_resumes_from_its_checkpoint_and_gives_the_uninterrupted_table(tmp_path) -> None:
    recipe, cwd = _recipe_project(tmp_path), tmp_path / "elsewhere"
    cwd.mkdir()
    full = subprocess.run(_recipe_command(recipe, tmp_path / "full"), cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]

    out = tmp_path / "killed"
    checkpoint = out / "sft" / "checkpoints" / "epoch=0-step=2.ckpt"
    with (tmp_path / "killed.log").open("w") as log:  # a file, not a pipe: a full pipe would stall the run
        job = subprocess.Popen(_recipe_command(recipe, out), cwd=cwd, env=cli_env(), stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + 300
    while not checkpoint.exists():
        assert job.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()[-3000:]
        time.sleep(0.02)
    os.killpg(job.pid, signal.SIGKILL)
    assert job.wait() == -signal.SIGKILL
    assert not (out / "sft" / "hf_model").exists() and not (out / "sft" / "stage.json").exists()
    (out / ".results.csv.tmp-99999999").write_text("a killed write's leftover")  # pid 99999999 cannot exist

    resumed = subprocess.run(_recipe_command(recipe, out), cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[recipe] sft: resuming from its last checkpoint" in resumed.stdout
    assert "Resuming from" in resumed.stderr and "(global step" in resumed.stderr  # not from step 0
    assert not (out / ".results.csv.tmp-99999999").exists()
    assert _table(out) == _table(tmp_path / "full") and float(_table(out)[0]["accuracy"]) >= 0
    final, reference = (load_file(d / "sft" / "hf_model" / "model.safetensors") for d in (out, tmp_path / "full"))
    for name in reference:
        torch.testing.assert_close(final[name], reference[name], rtol=0, atol=1e-6, msg=name)
    assert json.loads((out / MANIFEST).read_text())["stages"].keys() == {"sft"}


def test_the_plot_draws_reasoning_length_over_training_steps(tmp_path) -> None:
    from matplotlib.image import imread
    from torch.utils.tensorboard import SummaryWriter

    from r1_lightning.recipe import REASONING_LENGTH_TAG, reasoning_curves, write_results

    def log(stage: str, tag: str, points: list[tuple[int, float]]) -> None:
        writer = SummaryWriter(str(tmp_path / stage))  # one event file per call, as a resumed stage writes a second one
        for step, value in points:
            writer.add_scalar(tag, value, step)
        writer.close()

    log("grpo", REASONING_LENGTH_TAG, [(0, 20.0), (1, 15.0), (2, 99.0)])
    log("grpo", REASONING_LENGTH_TAG, [(2, 12.0), (3, 10.0)])  # resumed at step 2: its value replaces the killed run's
    log("sft", "train/loss", [(0, 1.0)])  # a stage without ReasoningLengthLogger has no curve
    assert reasoning_curves(tmp_path, ["sft", "grpo", "rs"]) == {"grpo": [(0, 20.0), (1, 15.0), (2, 12.0), (3, 10.0)]}
    rows = [{"stage": "sft", "accuracy": 0.1, "maj@k": 0.1, "format": 0.5, "reasoning_length": 20.0, "wall_time_s": 1.0},
            {"stage": "grpo", "accuracy": 0.2, "maj@k": 0.2, "format": 0.9, "reasoning_length": 10.0, "wall_time_s": 1.0}]
    write_results(rows, tmp_path)
    assert imread(tmp_path / "results.png").shape[1] == 1600  # 16 in x 100 dpi: three panels, the third the curve
    (tmp_path / "no_curves").mkdir()
    write_results(rows, tmp_path / "no_curves")
    assert imread(tmp_path / "no_curves" / "results.png").shape[1] == 1100  # the two panels of before
