"""The bad-input matrix: every case through the real ``r1-lightning`` command gives one clear message.

Each case asserts ONE ``r1-lightning: error:`` line naming the file:line, column or option, a non-zero
exit (1: input found bad while running; 2: command line / YAML not accepted), no traceback, and that
an earlier run's outputs in the same log directory (``hf_model/``, checkpoints, its config) are left
byte for byte intact. Most cases fail before training, so they run ``r1_lightning.cli.main`` in-process
(the same function the console script calls); a few run the real command in a subprocess for the exit
code a shell sees. Resume cases (unreadable checkpoint, world size) are in test_resume.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import pytest
from transformers import AutoTokenizer

from r1_lightning.cli import main

# Like the shipped configs: TensorBoard under a fixed version, so a rerun shares the earlier run's directory.
BASE_YAML = """
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 1
  limit_val_batches: 0
  enable_progress_bar: false
  enable_model_summary: false
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {{save_dir: {runs}, name: stage, version: latest}}
"""
SFT = ["--model", "r1_lightning.PolicySFT", "--model.export_hf", "false",
       "--data", "r1_lightning.ColdStartDataModule", "--data.num_samples", "4", "--data.batch_size", "2"]  # fmt: skip
GRPO = ["--model", "r1_lightning.GRPO", "--model.export_hf", "false", "--model.num_generations", "2", "--model.max_new_tokens", "4",
        "--data", "r1_lightning.PromptDataModule", "--data.num_samples", "2", "--data.batch_size", "1"]  # fmt: skip
DISTILL = ["--model", "r1_lightning.Distillation", "--model.export_hf", "false",
           "--data", "r1_lightning.ColdStartDataModule", "--data.num_samples", "4", "--data.batch_size", "2"]  # fmt: skip

# A reward module a user might write, with a name that is not a function.
USER_MODULE = "bad_input_rewards"


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """Data files, model directories, configs and an earlier run's outputs, made once."""
    root = tmp_path_factory.mktemp("bad_input")
    files = {
        "malformed.jsonl": '{"prompt": "a", "completion": "b"}\n\n{"prompt": "a", "completion": }\n',
        "not_an_object.jsonl": '{"prompt": "a", "completion": "b"}\n["a", "b"]\n',
        "question.jsonl": '{"question": "a", "completion": "b", "answer": "1"}\n',
        "empty.jsonl": "",
        "blank_lines.jsonl": "\n\n",
        "one_long.jsonl": '{"prompt": "a", "completion": "b"}\n\n' + json.dumps({"prompt": "x" * 400, "completion": "y"}) + "\n",
        "all_long.jsonl": "".join(json.dumps({"prompt": "x" * 400, "completion": "y"}) + "\n" for _ in range(3)),
        "number_prompt.jsonl": '{"prompt": "a", "completion": "b"}\n{"prompt": 5, "completion": "b"}\n',
        "notes.txt": "prompt,completion\n",
        "unknown_key.yaml": "model:\n  class_path: r1_lightning.PolicySFT\n  init_args:\n    learning_rat: 0.1\n",
        "wrong_type.yaml": "model:\n  class_path: r1_lightning.PolicySFT\n  init_args:\n    learning_rate: fast\n",
        "syntax.yaml": "model: [unclosed\n",
        f"{USER_MODULE}.py": "THRESHOLD = 3\n\n\ndef share(completions, *, prompts, **columns):\n    return [0.0] * len(completions)\n",
    }
    for name, text in files.items():
        (root / name).write_text(text)
    (root / "latin1.jsonl").write_bytes('{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n'.encode("latin-1"))
    (root / "not_a_dataset").mkdir()
    (root / "no_config").mkdir()
    models = {name: root / name for name in ("no_chat_template", "no_pad", "no_pad_no_eos", "small_vocab")}
    for path in models.values():
        shutil.copytree(tiny_model_dir, path)
    for name, unset in (("no_chat_template", ["chat_template"]), ("no_pad", ["pad_token"]), ("no_pad_no_eos", ["pad_token", "eos_token"])):
        config_file = models[name] / "tokenizer_config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **dict.fromkeys(unset)}))
        for template in models[name].glob("chat_template*") if "chat_template" in unset else []:
            template.unlink()
        tokenizer = AutoTokenizer.from_pretrained(models[name])
        assert all(getattr(tokenizer, attribute) is None for attribute in unset)  # really without them
    config_file = models["small_vocab"] / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "vocab_size": 200}))
    # One token more than the built-in tokenizer (and room for it in the config): a different tokenizer.
    models["other_tokenizer"] = root / "other_tokenizer"
    shutil.copytree(tiny_model_dir, models["other_tokenizer"])
    tokenizer = AutoTokenizer.from_pretrained(models["other_tokenizer"])
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(models["other_tokenizer"])
    config_file = models["other_tokenizer"] / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "vocab_size": 512}))
    # An earlier run in the log directory every case shares: it must survive each failed rerun.
    earlier = root / "runs" / "stage" / "latest"
    for relative, content in {
        "hf_model/config.json": b'{"model_type": "qwen2"}',
        "hf_model/model.safetensors": bytes(range(256)),
        "checkpoints/last.ckpt": b"earlier checkpoint",
        "config.yaml": b"earlier: config\n",
        "hparams.yaml": b"earlier: hparams\n",
    }.items():
        (earlier / relative).parent.mkdir(parents=True, exist_ok=True)
        (earlier / relative).write_bytes(content)
    (root / "base.yaml").write_text(BASE_YAML.format(runs=root / "runs"))
    return {"root": root, "earlier": earlier, "model": tiny_model_dir, **models}


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def run_in_process(args: list[str], cwd: Path) -> tuple[int, str]:
    """``r1-lightning ARGS`` in this process: (exit code, stderr)."""
    err = io.StringIO()
    code = 0
    sys.path.insert(0, str(cwd))  # the user's reward module, as the console script would find it from cwd
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), mock.patch.object(sys, "argv", ["r1-lightning"]):
            main([str(a) for a in args])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.path.remove(str(cwd))
    return code, err.getvalue()


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("r1-lightning: error:")]


# id -> (arguments after `fit --config base.yaml`, with {root}/{model}/... placeholders, exit code, texts the message holds)
CASES: dict[str, tuple[list[str], int, list[str]]] = {
    # Malformed JSONL: the file, its 1-based line and the column (blank line 2 is skipped, line 3 is bad).
    "malformed_jsonl": ([*SFT, "--data.path", "{root}/malformed.jsonl"], 1, ["{root}/malformed.jsonl:3:31:", "malformed JSON line"]),
    # A JSONL line that is valid JSON but not an object.
    "jsonl_line_not_an_object": ([*SFT, "--data.path", "{root}/not_an_object.jsonl"], 1, ["{root}/not_an_object.jsonl:2:", "got list"]),
    # Bytes that are not UTF-8: the file and line.
    "not_utf8": ([*SFT, "--data.path", "{root}/latin1.jsonl"], 1, ["{root}/latin1.jsonl:2:", "not UTF-8"]),
    # A missing column lists the columns that do exist.
    "missing_column": ([*GRPO, "--data.path", "{root}/question.jsonl"], 1, ["'prompt'", "the columns are: question, completion, answer"]),
    # An empty file.
    "empty_file": ([*SFT, "--data.path", "{root}/empty.jsonl"], 1, ["empty.jsonl", "the file is empty"]),
    # A file of blank lines: no rows at all.
    "no_rows": ([*GRPO, "--data.path", "{root}/blank_lines.jsonl"], 1, ["blank_lines.jsonl", "the dataset is empty"]),
    # Every sample filtered out as overlong with overlong: drop (SFT) ...
    "all_filtered_sft": ([*SFT, "--data.path", "{root}/all_long.jsonl", "--data.max_length", "64", "--data.overlong", "drop"], 1,
                         ["all_long.jsonl", "every sample was dropped", "max_length=64"]),
    # ... and every prompt (GRPO).
    "all_filtered_prompts": ([*GRPO, "--data.path", "{root}/all_long.jsonl", "--data.max_prompt_length", "64", "--data.overlong", "drop"],
                             1, ["all_long.jsonl", "no prompts left", "max_prompt_length=64"]),
    # One prompt over the limit: its file:line (line 3, after a blank line), its length and the limit.
    "prompt_too_long": ([*GRPO, "--data.path", "{root}/one_long.jsonl", "--data.max_prompt_length", "64"], 1,
                        ["{root}/one_long.jsonl:3:", "max_prompt_length=64", "overlong: drop"]),
    # One SFT sample over max_length.
    "sample_too_long": ([*SFT, "--data.path", "{root}/one_long.jsonl", "--data.max_length", "64"], 1,
                        ["{root}/one_long.jsonl:3:", "max_length=64"]),
    # A prompt that is a number, not text.
    "prompt_not_text": ([*SFT, "--data.path", "{root}/number_prompt.jsonl"], 1, ["{root}/number_prompt.jsonl:2:", "'prompt' must be a string"]),
    # An unknown data file type.
    "unknown_file_type": ([*SFT, "--data.path", "{root}/notes.txt"], 1, ["notes.txt", "unknown file type '.txt'"]),
    # A directory that is not a saved dataset.
    "not_a_dataset_directory": ([*SFT, "--data.path", "{root}/not_a_dataset"], 1, ["not_a_dataset", "not a saved datasets directory"]),
    # A data file that does not exist.
    "missing_data_file": ([*SFT, "--data.path", "{root}/nope.jsonl"], 1, ["path=", "nope.jsonl", "no such file"]),
    # A model directory that does not exist.
    "missing_model_directory": ([*SFT, "--model.model_name_or_path", "{root}/no_model"], 1, ["model_name_or_path=", "no such directory"]),
    # A directory without config.json.
    "no_config_json": ([*SFT, "--model.model_name_or_path", "{root}/no_config"], 1, ["no_config", "no config.json"]),
    # An unknown built-in model.
    "unknown_builtin_model": ([*SFT, "--model.model_name_or_path", "builtin:huge"], 1, ["builtin:huge", "builtin:tiny"]),
    # The tokenizer has more tokens than the model's embedding rows.
    "vocabulary_mismatch": ([*SFT, "--model.model_name_or_path", "{small_vocab}"], 1, ["small_vocab", "vocab_size", "is 200"]),
    # The teacher's own tokenizer and model do not match: named by the teacher's option.
    "teacher_vocabulary_mismatch": ([*DISTILL, "--model.teacher_name_or_path", "{small_vocab}"], 1, ["teacher_name_or_path=", "is 200"]),
    # Student and teacher with different tokenizers cannot distil logits.
    "student_teacher_tokenizers_differ": ([*DISTILL, "--model.teacher_name_or_path", "{other_tokenizer}"], 1,
                                          ["teacher_name_or_path=", "different tokenizers", "<extra>"]),
    # A tokenizer with neither a pad nor an EOS token (no fallback exists).
    "no_pad_no_eos": ([*SFT, "--model.model_name_or_path", "{no_pad_no_eos}"], 1, ["no_pad_no_eos", "neither a pad nor an EOS token"]),
    # An unknown class_path.
    "unknown_class_path": ([*SFT, "--model", "r1_lightning.NoSuchModule"], 2, ["model:", "NoSuchModule"]),
    # A class_path in a package that does not exist.
    "unknown_package": ([*SFT, "--data", "my_pkg.Data"], 2, ["data:", "No module named 'my_pkg'"]),
    # A YAML value of the wrong type: the full key.
    "wrong_type_in_yaml": ([*SFT, "--config", "{root}/wrong_type.yaml"], 2, ["model.learning_rate:", "Expected a float", "fast"]),
    # A wrong type on the command line.
    "wrong_type_on_command_line": ([*GRPO, "--trainer.max_steps", "many"], 2, ["trainer.max_steps:", "many"]),
    # An unknown YAML key (a typo) is refused, not ignored.
    "unknown_yaml_key": ([*SFT, "--config", "{root}/unknown_key.yaml"], 2, ["model:", "'learning_rat' is not accepted"]),
    # A YAML syntax error names the file.
    "yaml_syntax": ([*SFT, "--config", "{root}/syntax.yaml"], 2, ["Problems parsing config", "syntax.yaml"]),
    # A value outside a closed set.
    "bad_choice": ([*SFT, "--data.overlong", "nope"], 2, ["data.overlong:", "nope"]),
    # Negative beta.
    "negative_beta": ([*GRPO, "--model.beta", "-0.1"], 1, ["beta=-0.1", ">= 0"]),
    # Negative temperature (checked before the run, not at the first rollout).
    "negative_temperature": ([*GRPO, "--model.temperature", "-1"], 1, ["temperature=-1.0", ">= 0"]),
    # A zero token budget.
    "zero_max_new_tokens": ([*GRPO, "--model.max_new_tokens", "0"], 1, ["max_new_tokens=0", ">= 1"]),
    # A negative learning rate.
    "negative_learning_rate": ([*SFT, "--model.learning_rate", "-1"], 1, ["learning_rate=-1.0", ">= 0"]),
    # An unknown KL estimator name.
    "unknown_kl_estimator": ([*GRPO, "--model.kl_estimator", "k9"], 1, ["kl_estimator='k9'", "k3"]),
    # An unknown nonfinite policy.
    "bad_nonfinite_policy": ([*SFT, "--model.nonfinite", "ignore"], 2, ["model.nonfinite:", "ignore"]),
    # A reward dotted path whose function does not exist.
    "reward_function_missing": ([*GRPO, "--model.rewards", f'["{USER_MODULE}.nope"]'], 2, ["model.rewards:", f"{USER_MODULE}.nope"]),
    # A reward in a module that does not exist.
    "reward_module_missing": ([*GRPO, "--model.rewards", '["no_such_module.score"]'], 2, ["model.rewards:", "No module named 'no_such_module'"]),
    # A reward dotted path to something that is not callable.
    "reward_not_callable": ([*GRPO, "--model.rewards", f'["{USER_MODULE}.THRESHOLD"]'], 2, ["model.rewards:", "callable", "THRESHOLD"]),
    # More reward weights than rewards.
    "reward_weights_count": ([*GRPO, "--model.rewards", f'["{USER_MODULE}.share"]', "--model.reward_weights", "[1.0, 2.0]"], 1,
                             ["reward_weights=[1.0, 2.0]", "2 reward weights for 1 rewards"]),
    # An empty reward list is refused rather than silently replaced by the defaults.
    "no_rewards": ([*GRPO, "--model.rewards", "[]"], 1, ["rewards:", "empty"]),
}


def _fill(values: list[str], world: dict[str, Path]) -> list[str]:
    return [str(v).format(**{k: str(p) for k, p in world.items()}) for v in values]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_clear_message_and_leaves_earlier_outputs_intact(world, case):
    args, expected_code, expected = CASES[case]
    before = snapshot(world["earlier"])
    code, stderr = run_in_process(["fit", "--config", world["root"] / "base.yaml", *_fill(args, world)], world["root"])
    lines = error_lines(stderr)
    assert code == expected_code and len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    for text in _fill(expected, world):
        assert text in lines[0], (text, lines[0])
    after = snapshot(world["earlier"])
    assert {k: after.get(k) for k in before} == before  # nothing of the earlier run changed or went missing


@pytest.mark.parametrize(
    "model",
    [
        # No chat template: plain prompts are used as they are (README "Fallbacks").
        "no_chat_template",
        # No pad token: padding uses the EOS token, which is always masked.
        "no_pad",
    ],
)
def test_documented_tokenizer_fallbacks_train(world, model, tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(BASE_YAML.format(runs=tmp_path / "runs"))
    code, stderr = run_in_process(["fit", "--config", base, *SFT, "--model.model_name_or_path", world[model]], tmp_path)
    assert code == 0 and not error_lines(stderr), stderr[-3000:]


# The real console script for the exit code a shell sees: one case per exit code, both at once.
SUBPROCESS_CASES = ["malformed_jsonl", "wrong_type_in_yaml"]


@pytest.mark.slow  # two subprocesses importing torch: ~10 s idle, much more on a loaded machine
def test_the_real_command_exits_non_zero_with_the_same_one_line_message(world, cli):
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = {
            case: pool.submit(cli, ["fit", "--config", world["root"] / "base.yaml", *_fill(CASES[case][0], world)], world["root"])
            for case in SUBPROCESS_CASES
        }
        results = {case: future.result() for case, future in results.items()}
    for case, result in results.items():
        _, expected_code, expected = CASES[case]
        lines = error_lines(result.stderr)
        assert result.returncode == expected_code and len(lines) == 1 and "Traceback" not in result.stderr, (case, result.stderr[-3000:])
        assert all(text in lines[0] for text in _fill(expected, world)), (case, lines[0])
