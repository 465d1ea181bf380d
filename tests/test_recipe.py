"""The multi-stage recipe: a shortened R1 chain runs end to end, writes its table, and resumes."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from r1_lightning.errors import ConfigError
from r1_lightning.recipe import load_recipe, main

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
