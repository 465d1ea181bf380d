"""Run a multi-stage R1 recipe: each stage an ordinary LightningCLI run whose ``hf_model/`` feeds the next.

    r1-lightning recipe configs/recipes/r1_tiny.yaml [--output_dir DIR] [--fresh]

A recipe is a plain YAML file::

    output_dir: runs/r1_tiny
    threads: 1                       # torch intra-op threads for every stage (default: torch's own)
    evaluation:                      # how every stage's model is scored for the final table
      config: configs/eval.yaml      # a GRPO + PromptDataModule config; only `validate` is run
      args: ["--model.init_args.eval_num_samples", "4"]
    stages:
      - name: sft                    # the stage's directory: <output_dir>/<name>/
        config: [configs/sft.yaml]   # one or more --config files
        args: ["--trainer.max_epochs", "6"]
      - name: grpo
        config: [configs/grpo.yaml]
        model_from: sft              # model_name_or_path = <output_dir>/sft/hf_model
      - name: distill
        config: [configs/distill.yaml]
        teacher_from: grpo           # teacher_name_or_path = <output_dir>/grpo/hf_model (Distillation)

A stage that already has ``hf_model/`` and ``stage.json`` is skipped (re-running resumes the
chain); ``--fresh`` deletes the output directory first. At the end the recipe prints a table
(stage, model parameters, held-out accuracy, maj@k, format rate, mean reasoning length, wall time) and writes it
as ``results.csv`` and ``results.png`` in the output directory.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from r1_lightning.errors import ConfigError

COLUMNS = ["stage", "params", "accuracy", "maj@k", "format", "reasoning_length", "accepted_rows", "wall_time_s"]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="r1-lightning recipe", description="Run a multi-stage R1 recipe.")
    parser.add_argument("recipe", help="the recipe YAML")
    parser.add_argument("--output_dir", help="overrides the recipe's output_dir")
    parser.add_argument("--fresh", action="store_true", help="delete the output directory and run every stage")
    options = parser.parse_args(argv)
    recipe = load_recipe(options.recipe)
    output_dir = Path(options.output_dir or recipe.get("output_dir", "runs/recipe"))
    if options.fresh and output_dir.exists():
        shutil.rmtree(output_dir)
    rows = run_recipe(recipe, output_dir)
    print(format_table(rows))
    print(f"results: {output_dir / 'results.csv'} and {output_dir / 'results.png'}; logs: tensorboard --logdir {output_dir}")


def load_recipe(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"recipe {path!r}: no such file")
    try:
        recipe = yaml.safe_load(file.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"recipe {path}: not valid YAML: {error}") from None
    if not isinstance(recipe, dict) or not isinstance(recipe.get("stages"), list) or not recipe["stages"]:
        raise ConfigError(f"recipe {path}: needs a non-empty 'stages' list")
    threads = recipe.get("threads")
    if threads is not None and not (isinstance(threads, int) and threads >= 1):
        raise ConfigError(f"recipe {path}: threads={threads!r} must be a positive integer")
    names = set()
    for index, stage in enumerate(recipe["stages"]):
        if not isinstance(stage, dict) or "name" not in stage or "config" not in stage:
            raise ConfigError(f"recipe {path}: stage {index} needs 'name' and 'config'")
        for key in ("model_from", "data_from", "teacher_from"):
            if stage.get(key) and stage[key] not in names:
                raise ConfigError(f"recipe {path}: stage {stage['name']!r} takes {key}={stage[key]!r}, which is not an earlier stage")
        names.add(stage["name"])
        for config in _as_list(stage["config"]):
            if not Path(config).is_file():
                raise ConfigError(f"recipe {path}: stage {stage['name']!r}: config {config!r} not found")
    return recipe


def run_recipe(recipe: dict[str, Any], output_dir: Path) -> list[dict[str, Any]]:
    output_dir.mkdir(parents=True, exist_ok=True)
    if recipe.get("threads"):
        # Float reductions split differently over threads: a fixed count makes the table the same on any machine.
        import torch

        torch.set_num_threads(int(recipe["threads"]))
    rows = []
    for stage in recipe["stages"]:
        stage_dir = output_dir / stage["name"]
        done = stage_dir / "stage.json"
        if done.is_file() and _stage_output(stage, stage_dir).exists():
            print(f"[recipe] {stage['name']}: done before, skipped")
            rows.append(json.loads(done.read_text()))
            continue
        print(f"[recipe] {stage['name']}: running")
        started = time.perf_counter()
        run_stage(stage, stage_dir, output_dir)
        wall = time.perf_counter() - started
        if stage.get("command", "fit") == "fit":
            row = {"stage": stage["name"], **evaluate(recipe.get("evaluation"), stage_dir / "hf_model")}
        else:
            accepted = sum(1 for _ in _stage_output(stage, stage_dir).open())
            row = {"stage": stage["name"], "accepted_rows": accepted}
        row["wall_time_s"] = round(wall, 1)
        done.write_text(json.dumps(row))
        rows.append(row)
    write_results(rows, output_dir)
    return rows


def _stage_output(stage: dict[str, Any], stage_dir: Path) -> Path:
    return stage_dir / ("hf_model/config.json" if stage.get("command", "fit") == "fit" else "accepted.jsonl")


def run_stage(stage: dict[str, Any], stage_dir: Path, output_dir: Path) -> None:
    """One LightningCLI run (``fit``, or ``predict`` for rejection sampling) writing into ``stage_dir``."""
    command = stage.get("command", "fit")
    if command not in ("fit", "predict"):
        raise ConfigError(f"recipe stage {stage['name']!r}: command={command!r}; use fit or predict")
    args = [command] + [a for c in _as_list(stage["config"]) for a in ("--config", str(c))]
    if command == "fit":
        args += [
            "--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger",
            "--trainer.logger.save_dir", str(output_dir), "--trainer.logger.name", stage["name"], "--trainer.logger.version", "",
        ]
    else:
        args += ["--trainer.default_root_dir", str(stage_dir), "--return_predictions", "false"]
    if stage.get("model_from"):
        args += ["--model.init_args.model_name_or_path", str(output_dir / stage["model_from"] / "hf_model")]
    if stage.get("data_from"):
        args += ["--data.init_args.path", str(output_dir / stage["data_from"] / "accepted.jsonl")]
    if stage.get("teacher_from"):
        args += ["--model.init_args.teacher_name_or_path", str(output_dir / stage["teacher_from"] / "hf_model")]
    args += [str(a) for a in stage.get("args", [])]
    stage_dir.mkdir(parents=True, exist_ok=True)
    _cli(args)


def evaluate(evaluation: dict[str, Any] | None, model_dir: Path) -> dict[str, Any]:
    """Held-out metrics of ``model_dir`` with the recipe's evaluation config (``validate`` only)."""
    if not evaluation:
        return {}
    args = [a for c in _as_list(evaluation["config"]) for a in ("--config", str(c))]
    args += ["--model.init_args.model_name_or_path", str(model_dir), "--trainer.logger", "false"]
    args += [str(a) for a in evaluation.get("args", [])]
    cli = _cli(args, run=False)
    metrics = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    k = cli.model.hparams.eval_num_samples
    return {
        "params": sum(p.numel() for p in cli.model.model.parameters()),
        "accuracy": round(float(metrics["val/accuracy"]), 4),
        "maj@k": round(float(metrics[f"val/maj@{k}"]), 4),
        "format": round(float(metrics["val/format"]), 4),
        "reasoning_length": round(float(metrics.get("val/reasoning_length", float("nan"))), 1),
    }


def write_results(rows: list[dict[str, Any]], output_dir: Path) -> None:
    with (output_dir / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    plot_results(rows, output_dir / "results.png")


def plot_results(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [r for r in rows if "accuracy" in r]  # predict stages (rejection sampling) have no model to score
    stages = [r["stage"] for r in trained]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("accuracy", "maj@k", "format"):
        axes[0].plot(stages, [r.get(key, float("nan")) for r in trained], marker="o", label=key)
    axes[0].set_ylim(0, 1.05)
    axes[0].set_title("held-out evaluation")
    axes[0].legend()
    axes[1].bar(stages, [r.get("reasoning_length", float("nan")) for r in trained])
    axes[1].set_title("mean reasoning length (tokens)")
    for axis in axes:
        axis.tick_params(axis="x", labelrotation=20)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def format_table(rows: list[dict[str, Any]]) -> str:
    header = f"{'stage':<24}{'params':>9}{'accuracy':>10}{'maj@k':>8}{'format':>8}{'reason len':>12}{'wall s':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        if "accuracy" in r:
            scores = f"{r['accuracy']:>10.3f}{r['maj@k']:>8.3f}{r['format']:>8.3f}{r['reasoning_length']:>12.1f}"
        else:
            scores = f"{'accepted ' + str(r.get('accepted_rows', '-')) + ' rows':>38}"
        params = f"{r['params'] / 1e6:.2f}M" if r.get("params") else "-"
        lines.append(f"{r['stage']:<24}{params:>9}{scores}{r['wall_time_s']:>9.1f}")
    return "\n".join(lines)


def _cli(args: list[str], run: bool = True):
    """An in-process LightningCLI run (with ``sys.argv`` hidden, which LightningCLI would warn about)."""
    from unittest import mock

    from r1_lightning.cli import R1CLI

    with mock.patch.object(sys, "argv", sys.argv[:1]):
        return R1CLI(args=args, run=run)


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]
