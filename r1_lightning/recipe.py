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
      - name: student                # a smaller model with the same tokenizer (r1_lightning.layer_drop)
        command: drop_layers
        model: builtin:tiny          # or model_from: <stage>
        keep_layers: [0, 3]          # the parent's decoder layers to keep, copied exactly
      - name: distill
        config: [configs/distill.yaml]
        model_from: student
        teacher_from: grpo           # teacher_name_or_path = <output_dir>/grpo/hf_model (Distillation)

Paths in a recipe (stage configs, the evaluation config, and values of path options in ``args``
such as ``--data.init_args.path``) are read relative to the recipe file's directory, else the
working directory; ``output_dir`` is relative to the working directory.

The recipe records every stage directory it makes in ``<output_dir>/recipe_manifest.json``.
A stage that already has ``hf_model/`` and ``stage.json`` is skipped (re-running resumes the
chain); a ``fit`` stage that was killed mid-run continues from its last checkpoint
(``--ckpt_path last``); one that finished training but not its evaluation is only evaluated.
``--fresh`` deletes the recorded stage directories and the recipe's own files, nothing else, and
refuses a directory without the manifest. Outputs (``stage.json``, ``results.csv``,
``results.png``) are replaced atomically. At the end the recipe prints a table (stage, model
parameters, held-out accuracy, maj@k, format rate, mean reasoning length, wall time) and writes it
as ``results.csv`` and ``results.png`` in the output directory; the plot also draws, for every stage
that logged it (``ReasoningLengthLogger``), the mean ``<think>`` length over its training steps.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from r1_lightning.atomic import remove_stray_temporaries, write_bytes_atomic, write_text_atomic
from r1_lightning.errors import ConfigError
from r1_lightning.layer_drop import check_keep_layers, write_layer_dropped_copy
from r1_lightning.lightning_cli import R1CLI

COLUMNS = ["stage", "params", "accuracy", "maj@k", "format", "reasoning_length", "accepted_rows", "wall_time_s"]
MANIFEST = "recipe_manifest.json"  # in output_dir: the stage directories this recipe made (what --fresh may delete)
RESULTS = ("results.csv", "results.png")
COMMANDS = ("fit", "predict", "drop_layers")  # drop_layers: a layer-dropped copy of a model (r1_lightning.layer_drop)
REASONING_LENGTH_TAG = "reasoning/think_length_mean"  # logged by ReasoningLengthLogger
# Options in a stage's `args` whose value is a path read relative to the recipe's directory.
_PATH_OPTION = re.compile(r"(^|[._-])(path|config|[a-z_]*_path|[a-z_]*name_or_path)$")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="r1-lightning recipe", description="Run a multi-stage R1 recipe.")
    parser.add_argument("recipe", help="the recipe YAML")
    parser.add_argument("--output_dir", help="overrides the recipe's output_dir")
    parser.add_argument(
        "--fresh", action="store_true", help=f"delete the stage directories an earlier run recorded in {MANIFEST}, then run every stage"
    )
    options = parser.parse_args(argv)
    recipe = load_recipe(options.recipe)
    output_dir = output_directory(options.output_dir if options.output_dir is not None else recipe.get("output_dir", "runs/recipe"))
    if options.fresh:
        for path in clear_outputs(output_dir):
            print(f"[recipe] --fresh: removed {path}")
    rows = run_recipe(recipe, output_dir)
    print(format_table(rows))
    print(f"results: {output_dir / 'results.csv'} and {output_dir / 'results.png'}; logs: tensorboard --logdir {output_dir}")


def load_recipe(path: str) -> dict[str, Any]:
    """The recipe, checked, with its paths resolved (``resolve_path``) against the recipe's directory."""
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
    if "output_dir" in recipe:
        output_directory(recipe["output_dir"], f"recipe {path}: ")
    base = file.resolve().parent
    names: set[str] = set()
    for index, stage in enumerate(recipe["stages"]):
        if not isinstance(stage, dict) or "name" not in stage:
            raise ConfigError(f"recipe {path}: stage {index} needs 'name' and 'config'")
        check_stage_name(stage["name"], f"recipe {path}: stage {index}: ")
        command = stage.setdefault("command", "fit")
        if command not in COMMANDS:
            raise ConfigError(f"recipe {path}: stage {stage['name']!r}: command={command!r}; use one of {', '.join(COMMANDS)}")
        if command == "drop_layers":
            _check_drop_layers_stage(stage, names, base, f"recipe {path}: stage {stage['name']!r}: ")
            names.add(stage["name"])
            continue
        if "config" not in stage:
            raise ConfigError(f"recipe {path}: stage {index} needs 'name' and 'config'")
        if stage["name"] in names:
            raise ConfigError(f"recipe {path}: two stages are named {stage['name']!r} (each stage needs its own directory)")
        for key in ("model_from", "data_from", "teacher_from"):
            if stage.get(key) and stage[key] not in names:
                raise ConfigError(f"recipe {path}: stage {stage['name']!r} takes {key}={stage[key]!r}, which is not an earlier stage")
        names.add(stage["name"])
        stage["config"] = [_existing_config(c, base, f"recipe {path}: stage {stage['name']!r}: ") for c in _as_list(stage["config"])]
        stage["args"] = resolve_args(stage.get("args", []), base)
    evaluation = recipe.get("evaluation")
    if evaluation:
        if not isinstance(evaluation, dict) or "config" not in evaluation:
            raise ConfigError(f"recipe {path}: evaluation needs 'config'")
        evaluation["config"] = [_existing_config(c, base, f"recipe {path}: evaluation: ") for c in _as_list(evaluation["config"])]
        evaluation["args"] = resolve_args(evaluation.get("args", []), base)
    return recipe


def _check_drop_layers_stage(stage: dict[str, Any], earlier: set[str], base: Path, where: str) -> None:
    """A ``command: drop_layers`` stage: one parent (``model`` or ``model_from``) and a valid ``keep_layers``."""
    unknown = set(stage) - {"name", "command", "model", "model_from", "keep_layers"}
    if unknown:
        raise ConfigError(f"{where}command: drop_layers takes model or model_from, and keep_layers; not {', '.join(sorted(unknown))}")
    if ("model" in stage) == ("model_from" in stage):
        raise ConfigError(f"{where}command: drop_layers needs exactly one parent: model (a path or builtin: name) or model_from (a stage)")
    if stage.get("model_from") is not None and stage["model_from"] not in earlier:
        raise ConfigError(f"{where}model_from={stage['model_from']!r} is not an earlier stage")
    if "model" in stage:
        stage["model"] = resolve_path(str(stage["model"]), base)
    check_keep_layers(stage.get("keep_layers"), option=f"{where}keep_layers")


def resolve_path(value: str, base: Path) -> str:
    """``value`` under the recipe's directory ``base`` if it exists there, else ``value`` as given (the working directory)."""
    if not value or os.path.isabs(value) or ":" in value.split("/")[0]:  # absolute, or builtin:tiny / s3://
        return value
    candidate = base / value
    return str(candidate) if candidate.exists() else value


def resolve_args(args: list[Any], base: Path) -> list[str]:
    """A stage's CLI ``args`` with the values of path options (``--data.init_args.path X``, ``--x_path=X``) resolved."""
    args, resolved = [str(a) for a in args], []
    for i, arg in enumerate(args):
        option, equals, value = arg.partition("=")
        if arg.startswith("--") and equals and _PATH_OPTION.search(option[2:]):
            arg = f"{option}={resolve_path(value, base)}"
        elif i > 0 and args[i - 1].startswith("--") and "=" not in args[i - 1] and _PATH_OPTION.search(args[i - 1][2:]):
            arg = resolve_path(arg, base)
        resolved.append(arg)
    return resolved


def _existing_config(config: Any, base: Path, where: str) -> str:
    resolved = resolve_path(str(config), base)
    if not Path(resolved).is_file():
        raise ConfigError(f"{where}config {str(config)!r} not found (looked in {base} and in the working directory {Path.cwd()})")
    return resolved


def check_stage_name(name: Any, where: str = "") -> None:
    """A stage name is a directory name of its own: not empty, no path separator, not ``.`` or ``..``."""
    if not isinstance(name, str) or not name.strip() or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise ConfigError(f"{where}stage name {name!r}: must be a plain directory name (not empty, no '/' or '\\\\', not '.' or '..')")


def output_directory(value: Any, where: str = "") -> Path:
    """``output_dir`` as a path; an empty or non-string value is refused (``""`` used to mean the working directory)."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}output_dir={value!r}: name a directory of its own for the recipe's outputs (e.g. runs/my_recipe)")
    return Path(value)


def clear_outputs(output_dir: Path) -> list[Path]:
    """``--fresh``: delete the stage directories ``MANIFEST`` records, the results and the manifest; return them.

    Nothing else is touched. Refused (``ConfigError``, nothing deleted): a filesystem root, a home
    directory, the working directory or one of its parents, and a non-empty directory without the
    manifest (a recipe did not make it).
    """
    if not output_dir.exists():
        return []
    resolved = output_dir.resolve()
    home = Path.home().resolve()
    protected = {Path(resolved.anchor), home, *Path.cwd().resolve().parents, Path.cwd().resolve()}
    if resolved in protected or resolved == home.parent:
        raise ConfigError(
            f"--fresh: output_dir={str(output_dir)!r} is {resolved}: the recipe never clears a root, home or working directory"
        )
    manifest = read_manifest(output_dir)
    if manifest is None:
        if any(output_dir.iterdir()):
            raise ConfigError(
                f"--fresh: {output_dir} has no {MANIFEST}, so a recipe did not make it; nothing was deleted. "
                "Choose another output_dir, or empty it yourself"
            )
        return []
    removed = []
    for name in manifest["stages"]:
        check_stage_name(name, f"{output_dir / MANIFEST}: ")
        path = output_dir / name
        if path.is_symlink():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
        else:
            continue
        removed.append(path)
    for name in RESULTS:
        if (output_dir / name).is_file():
            (output_dir / name).unlink()
            removed.append(output_dir / name)
    (output_dir / MANIFEST).unlink()
    return removed


def read_manifest(output_dir: Path) -> dict[str, Any] | None:
    """The manifest in ``output_dir`` (``{"stages": {name: {...}}}``), or None without one."""
    path = output_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not the JSON a recipe writes ({error}); remove it if this directory is not a recipe's") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("stages"), dict):
        raise ConfigError(f"{path}: not a recipe manifest (no 'stages' mapping)")
    return manifest


def _write_manifest(output_dir: Path, manifest: dict[str, Any]) -> None:
    write_text_atomic(output_dir / MANIFEST, json.dumps(manifest, indent=1))


def run_recipe(recipe: dict[str, Any], output_dir: Path) -> list[dict[str, Any]]:
    output_dir.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(output_dir) or {"made_by": "r1-lightning recipe", "stages": {}}
    _write_manifest(output_dir, manifest)
    remove_stray_temporaries(output_dir)  # results.* of a killed write
    if recipe.get("threads"):
        # Float reductions split differently over threads: a fixed count makes the table the same on any machine.
        import torch

        torch.set_num_threads(int(recipe["threads"]))
    rows = [stage_row(stage, output_dir, manifest, recipe.get("evaluation")) for stage in recipe["stages"]]
    write_results(rows, output_dir)
    return rows


def stage_row(stage: dict[str, Any], output_dir: Path, manifest: dict[str, Any], evaluation: dict[str, Any] | None) -> dict[str, Any]:
    """Run (or resume, or skip) one stage and return its row of the table; ``stage.json`` records it."""
    name, stage_dir, command = stage["name"], output_dir / stage["name"], stage.get("command", "fit")
    makes_model = command != "predict"
    for directory in (stage_dir, stage_dir / "checkpoints"):
        remove_stray_temporaries(directory)  # hf_model/, stage.json or a checkpoint of a killed write
    done = stage_dir / "stage.json"
    if done.is_file() and _stage_output(stage, stage_dir).exists():
        print(f"[recipe] {name}: done before, skipped")
        row = json.loads(done.read_text())
        if name not in manifest["stages"]:  # made by a recipe (it has stage.json) before manifests existed
            manifest["stages"][name] = {"wall_time_s": row.get("wall_time_s")}
            _write_manifest(output_dir, manifest)
        return row
    record = _claim(stage_dir, output_dir, manifest)
    if makes_model and _stage_output(stage, stage_dir).exists() and "wall_time_s" in record:
        print(f"[recipe] {name}: trained before, evaluating")
    else:
        resume = command == "fit" and has_checkpoint(stage_dir)
        print(f"[recipe] {name}: {'resuming from its last checkpoint' if resume else 'running'}")
        started = time.perf_counter()
        run_stage(stage, stage_dir, output_dir, resume=resume)
        record["wall_time_s"] = round(time.perf_counter() - started, 1)  # of the last attempt
        _write_manifest(output_dir, manifest)
    if makes_model:
        row = {"stage": name, **evaluate(evaluation, stage_dir / "hf_model")}
    else:
        row = {"stage": name, "accepted_rows": sum(1 for _ in _stage_output(stage, stage_dir).open())}
    row["wall_time_s"] = record["wall_time_s"]
    write_text_atomic(done, json.dumps(row))
    return row


def _claim(stage_dir: Path, output_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest's record of ``stage_dir``, added (and saved) before anything is written there."""
    name = stage_dir.name
    if name in manifest["stages"]:
        return manifest["stages"][name]
    if stage_dir.exists() and any(stage_dir.iterdir()):
        raise ConfigError(
            f"{stage_dir} exists but the recipe did not make it (it is not in {output_dir / MANIFEST}): "
            "move it away or choose another output_dir"
        )
    manifest["stages"][name] = {}
    _write_manifest(output_dir, manifest)  # --fresh may delete what the manifest lists
    return manifest["stages"][name]


def has_checkpoint(stage_dir: Path) -> bool:
    """Whether an earlier attempt of this stage left a checkpoint (a ``*.ckpt`` file or sharded directory) under ``stage_dir``."""
    return stage_dir.is_dir() and any(stage_dir.rglob("*.ckpt"))


def _stage_output(stage: dict[str, Any], stage_dir: Path) -> Path:
    return stage_dir / ("accepted.jsonl" if stage.get("command", "fit") == "predict" else "hf_model/config.json")


def run_stage(stage: dict[str, Any], stage_dir: Path, output_dir: Path, resume: bool = False) -> None:
    """One LightningCLI run (``fit``, or ``predict`` for rejection sampling) writing into ``stage_dir``.

    With ``resume`` (a ``fit`` stage whose directory holds an earlier attempt's checkpoint) it
    continues from the newest complete checkpoint (``--ckpt_path last``).
    """
    command = stage.get("command", "fit")
    if command not in COMMANDS:
        raise ConfigError(f"recipe stage {stage['name']!r}: command={command!r}; use one of {', '.join(COMMANDS)}")
    if command == "drop_layers":
        parent = str(output_dir / stage["model_from"] / "hf_model") if stage.get("model_from") else stage["model"]
        stage_dir.mkdir(parents=True, exist_ok=True)
        write_layer_dropped_copy(parent, stage["keep_layers"], stage_dir / "hf_model", option=f"recipe stage {stage['name']!r}: keep_layers")
        return
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
    if resume:
        args += ["--ckpt_path", "last"]
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
    """``results.csv`` and ``results.png``, each replaced atomically."""
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(output_dir / "results.csv", table.getvalue())
    plot_results(rows, output_dir / "results.png", reasoning_curves(output_dir, [r["stage"] for r in rows]))


def reasoning_curves(output_dir: Path, stages: list[str], tag: str = REASONING_LENGTH_TAG) -> dict[str, list[tuple[int, float]]]:
    """Per stage that logged ``tag`` to TensorBoard in its directory: ``[(step, value), ...]`` in step order.

    A resumed stage writes a second event file; a step logged twice keeps its last value.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves = {}
    for stage in stages:
        stage_dir = output_dir / stage
        if not any(stage_dir.glob("events.out.tfevents.*")):
            continue
        events = EventAccumulator(str(stage_dir), size_guidance={"scalars": 0})  # 0: keep every point
        events.Reload()
        if tag in events.Tags()["scalars"]:
            points = {event.step: event.value for event in events.Scalars(tag)}
            curves[stage] = sorted(points.items())
    return curves


def plot_results(rows: list[dict[str, Any]], path: Path, curves: dict[str, list[tuple[int, float]]] | None = None) -> None:
    """The held-out scores and reasoning length per stage; with ``curves``, a third panel of them over training steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [r for r in rows if "accuracy" in r]  # predict stages (rejection sampling) have no model to score
    stages = [r["stage"] for r in trained]
    figure, axes = plt.subplots(1, 3 if curves else 2, figsize=(16 if curves else 11, 4))
    for key in ("accuracy", "maj@k", "format"):
        axes[0].plot(stages, [r.get(key, float("nan")) for r in trained], marker="o", label=key)
    axes[0].set_ylim(0, 1.05)
    axes[0].set_title("held-out evaluation")
    axes[0].legend()
    axes[1].bar(stages, [r.get("reasoning_length", float("nan")) for r in trained])
    axes[1].set_title("mean reasoning length (tokens)")
    for axis in axes[:2]:
        axis.tick_params(axis="x", labelrotation=20)
    if curves:
        for stage, points in curves.items():
            axes[2].plot([s for s, _ in points], [v for _, v in points], marker=".", label=stage)
        axes[2].set_xlabel("training step")
        axes[2].set_title("<think> length in training (tokens, mean per step)")
        axes[2].legend()
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=100)
    plt.close(figure)
    write_bytes_atomic(path, image.getvalue())


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


def _cli(args: list[str], run: bool = True) -> R1CLI:
    """An in-process LightningCLI run (with ``sys.argv`` hidden, which LightningCLI would warn about)."""
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        return R1CLI(args=args, run=run)
    finally:
        sys.argv = argv


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]
