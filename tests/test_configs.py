"""Every YAML under configs/ and callbacks/ parses with the real CLI (``--print_config``).

The CLI's ``main`` runs in-process (one parse each instead of a ~5 s subprocess start); a new
file is picked up by the glob. ``--print_config`` parses and validates without instantiating,
so configs for real models (configs/examples/) and paths to models that do not exist yet
(runs/...) parse here too.
"""

from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml

from r1_lightning.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]
FILES = sorted((REPO_ROOT / "configs").rglob("*.yaml")) + sorted((REPO_ROOT / "callbacks").rglob("*.yaml"))
RECIPES = REPO_ROOT / "configs" / "recipes"
FRAGMENTS = REPO_ROOT / "callbacks"


def _id(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


def print_config(args: list[str], capsys) -> tuple[dict, str]:
    """``r1-lightning ARGS --print_config``: the printed YAML, parsed, and as text."""
    capsys.readouterr()
    # LightningCLI warns when it gets args while sys.argv holds others (pytest's here).
    with pytest.raises(SystemExit) as exit_, mock.patch.object(sys, "argv", ["r1-lightning"]):
        main([*map(str, args), "--print_config"])
    out, err = capsys.readouterr()
    assert exit_.value.code in (0, None), err
    return yaml.safe_load(out), out


def _class_paths(entries) -> list[str]:
    return [e["class_path"] for e in entries or [] if isinstance(e, dict)]


def _check_init_args(written: dict, printed: dict, section: str) -> None:
    """What the file sets for ``section`` is what the parser kept (scalars; nested values are expanded)."""
    if not isinstance(written.get(section), dict) or "class_path" not in written[section]:
        return
    assert printed[section]["class_path"] == written[section]["class_path"]
    for key, value in (written[section].get("init_args") or {}).items():
        if not isinstance(value, (dict, list)):
            assert printed[section]["init_args"][key] == value, f"{section}.init_args.{key}"


def test_the_glob_finds_the_stage_configs():
    names = {_id(p) for p in FILES}
    assert {"configs/sft.yaml", "configs/examples/qwen2.5_1.5b_sft.yaml"} <= names


@pytest.mark.parametrize("path", [p for p in FILES if RECIPES not in p.parents and FRAGMENTS not in p.parents], ids=_id)
def test_stage_config_parses(path, capsys):
    written = yaml.safe_load(path.read_text())
    printed, text = print_config(["fit", "--config", path], capsys)
    for section in ("model", "data"):
        _check_init_args(written, printed, section)
    if path.name == "sft.yaml":
        assert "class_path: r1_lightning.PolicySFT" in text
        assert printed["data"]["class_path"] == "r1_lightning.ColdStartDataModule"


@pytest.mark.parametrize("path", [p for p in FILES if FRAGMENTS in p.parents], ids=_id)
def test_callback_fragment_merges_into_a_stage_config(path, capsys):
    # Fragments are merged into a stage config (`--config configs/grpo.yaml --config callbacks/X.yaml`).
    base = REPO_ROOT / "configs" / ("grpo.yaml" if (REPO_ROOT / "configs" / "grpo.yaml").is_file() else "sft.yaml")
    written = yaml.safe_load(path.read_text())
    printed, _ = print_config(["fit", "--config", base, "--config", path], capsys)
    wanted = _class_paths(written["trainer"].get("callbacks+") or written["trainer"].get("callbacks"))
    assert wanted and set(wanted) <= set(_class_paths(printed["trainer"]["callbacks"]))


@pytest.mark.parametrize("path", [p for p in FILES if RECIPES in p.parents], ids=_id)
def test_recipe_and_its_stage_configs_parse(path, capsys, monkeypatch):
    from r1_lightning.recipe import load_recipe

    monkeypatch.chdir(REPO_ROOT)  # a recipe names its configs relative to the repository
    recipe = load_recipe(str(path))
    for stage in recipe["stages"]:
        args = ["fit"] + [a for c in _as_list(stage["config"]) for a in ("--config", c)]
        if stage.get("model_from"):
            args += ["--model.init_args.model_name_or_path", f"runs/{stage['model_from']}/hf_model"]
        print_config([*args, *map(str, stage.get("args", []))], capsys)
    if recipe.get("evaluation"):
        evaluation = recipe["evaluation"]
        args = ["validate"] + [a for c in _as_list(evaluation["config"]) for a in ("--config", c)]
        print_config([*args, *map(str, evaluation.get("args", []))], capsys)


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]
