"""The real ``r1-lightning`` command in subprocesses: two chained SFT stages, validate, and bad input.

``--print_config`` of every config is tested in-process, in test_configs.py.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from r1_lightning.policy import load_model, load_tokenizer

# One fixture starts eleven subprocesses (~5 s of imports each), two at a time: ~40-60 s on two cores.
pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
SFT_CONFIG = str(REPO_ROOT / "configs" / "sft.yaml")
TINY_RUN = [
    "--trainer.max_steps", "5", "--trainer.log_every_n_steps", "1",
    "--data.num_samples", "32", "--data.num_val_samples", "8", "--data.batch_size", "8",
    "--model.eval_max_new_tokens", "16",
]  # fmt: skip


def explain(result) -> str:
    return f"exit {result.returncode}\n--- stdout (tail)\n{result.stdout[-3000:]}\n--- stderr (tail)\n{result.stderr[-3000:]}"


def hf_model_under(root: Path) -> Path:
    found = sorted(p.parent for p in root.rglob("hf_model/config.json"))
    assert len(found) == 1, f"expected one hf_model/ under {root}, found {found}"
    return found[0]


# --- all runs, two at a time -----------------------------------------------------------------------


def _bad_inputs(data: Path) -> dict[str, tuple[list, list[str]]]:
    """name -> (extra fit arguments, strings the one-line error must contain)."""
    (data / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": }\n')
    (data / "columns.jsonl").write_text('{"question": "a", "completion": "b"}\n')
    (data / "empty.jsonl").write_text("")
    return {
        "missing_data_file": (["--data.path", data / "missing.jsonl"], ["path=", "missing.jsonl", "no such file"]),
        "malformed_jsonl": (["--data.path", data / "bad.jsonl"], [f"{data / 'bad.jsonl'}:2:31:", "malformed JSON"]),
        "missing_column": (["--data.path", data / "columns.jsonl"], ["'prompt'", "the columns are: question, completion"]),
        "empty_dataset": (["--data.path", data / "empty.jsonl"], ["empty.jsonl", "empty"]),
        "bad_dtype": (["--model.dtype", "int3"], ["dtype='int3'", "float32"]),
        "missing_model_dir": (
            ["--model.model_name_or_path", data / "no_model"], ["model_name_or_path=", "no_model", "no such directory"]
        ),
    }


# jsonargparse rejects this while parsing, in its own format: non-zero exit and the option named.
PARSE_ERROR = (["--data.overlong", "nope"], "overlong")


@pytest.fixture(scope="module")
def runs(cli, tmp_path_factory) -> dict:
    """Every CLI run of this file, two at a time (each subprocess spends ~5 s importing).

    Stage 1 fits from builtin:tiny; stage 2 fits from stage 1's hf_model/ and ``validate`` scores
    it. Each run's cwd is its own tmp dir: configs may log to relative paths (``runs/...``).
    """
    root = tmp_path_factory.mktemp("cli")
    for name in ("stage1", "stage2", "validate", "bad"):
        (root / name).mkdir()
    fit = ["fit", "--config", SFT_CONFIG, *TINY_RUN]
    results: dict = {"root": root}
    with ThreadPoolExecutor(max_workers=2) as pool:
        stage1 = pool.submit(cli, [*fit, "--trainer.default_root_dir", root / "stage1"], root / "stage1")
        pending = {"help": pool.submit(cli, ["--help"], root, module=True)}  # `python -m r1_lightning`
        results["expected"] = {}
        for name, (args, expected) in _bad_inputs(root / "bad").items():
            pending[name] = pool.submit(cli, [*fit, *args, "--trainer.default_root_dir", root / "bad"], root / "bad")
            results["expected"][name] = expected
        pending["parse_error"] = pool.submit(cli, [*fit, *PARSE_ERROR[0]], root / "bad")
        results["stage1"] = stage1.result()
        if results["stage1"].returncode == 0:
            model = hf_model_under(root / "stage1")
            pending["stage2"] = pool.submit(
                cli, [*fit, "--model.model_name_or_path", model, "--trainer.default_root_dir", root / "stage2"], root / "stage2"
            )
            pending["validate"] = pool.submit(cli, [
                "validate", "--config", SFT_CONFIG, "--model.model_name_or_path", model, "--data.num_val_samples", "8",
                "--data.batch_size", "8", "--model.eval_max_new_tokens", "16", "--trainer.default_root_dir", root / "validate",
            ], root / "validate")  # fmt: skip
        results |= {name: future.result() for name, future in pending.items()}
    return results


def _ok(runs: dict, name: str):
    assert name in runs, "not run: stage 1 failed"
    assert runs[name].returncode == 0, explain(runs[name])
    return runs[name]


# --- two chained stages, validate ------------------------------------------------------------------


def test_fit_exports_a_trained_hf_model(runs, builtin_tokenizer, tokenizer_texts):
    _ok(runs, "stage1")
    target = hf_model_under(runs["root"] / "stage1")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (target / name).is_file(), name
    assert json.loads((target / "config.json").read_text())["model_type"] == "qwen2"

    trained = load_file(target / "model.safetensors")
    initial = load_model("builtin:tiny").state_dict()  # the config's starting point (seed 0)
    assert trained.keys() <= initial.keys()
    changed = [k for k in trained if not torch.equal(trained[k], initial[k])]
    assert len(changed) == len(trained), f"unchanged: {sorted(set(trained) - set(changed))}"

    exported = load_tokenizer(str(target))
    assert len(exported) == len(builtin_tokenizer)
    assert all(exported(t)["input_ids"] == builtin_tokenizer(t)["input_ids"] for t in tokenizer_texts)


def test_second_stage_starts_from_the_first_stage_model(runs):
    _ok(runs, "stage2")
    first = load_file(hf_model_under(runs["root"] / "stage1") / "model.safetensors")
    second = load_file(hf_model_under(runs["root"] / "stage2") / "model.safetensors")
    initial = load_model("builtin:tiny").state_dict()
    assert first.keys() == second.keys()
    assert any(not torch.equal(first[k], second[k]) for k in first)  # stage 2 trained too

    # Stage 2 continued from stage 1, not from the built-in initial weights: 5 more steps away
    # from stage 1 is closer than 10 steps away from the start.
    def distance(a, b):
        return sum((a[k].float() - b[k].float()).square().sum() for k in second).sqrt()

    assert distance(second, first) < distance(second, initial)


def test_validate_subcommand(runs):
    result = _ok(runs, "validate")
    for metric in ("val/loss", "val/accuracy", "val/format"):
        assert metric in result.stdout, metric


# --- help, bad input -------------------------------------------------------------------------------


def test_python_m_r1_lightning_help(runs):
    result = _ok(runs, "help")
    for subcommand in ("fit", "validate", "test", "predict"):
        assert subcommand in result.stdout


BAD_INPUT_CASES = ["missing_data_file", "malformed_jsonl", "missing_column", "empty_dataset", "bad_dtype", "missing_model_dir"]


@pytest.mark.parametrize("case", BAD_INPUT_CASES)
def test_bad_input_gets_one_clear_message(runs, case):
    result, expected = runs[case], runs["expected"][case]
    assert result.returncode == 1, explain(result)
    assert "Traceback" not in result.stderr, explain(result)
    errors = [line for line in result.stderr.splitlines() if line.startswith("r1-lightning: error:")]
    assert len(errors) == 1, explain(result)
    for text in expected:
        assert text in errors[0], (text, errors[0])


def test_parse_error_names_the_option(runs):
    result = runs["parse_error"]
    assert result.returncode != 0, explain(result)
    assert PARSE_ERROR[1] in result.stderr and "Traceback" not in result.stderr, explain(result)
