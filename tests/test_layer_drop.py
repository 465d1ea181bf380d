"""A smaller student with the same tokenizer: a layer-dropped copy (r1_lightning.layer_drop), alone and as a recipe stage."""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from r1_lightning.errors import ConfigError
from r1_lightning.layer_drop import check_keep_layers, write_layer_dropped_copy
from r1_lightning.policy import load_model
from r1_lightning.recipe import load_recipe, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def student_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return write_layer_dropped_copy(str(tiny_model_dir), [0, 3], tmp_path_factory.mktemp("student") / "hf_model")


def test_kept_layers_are_copied_exactly_and_renumbered(tiny_model_dir, student_dir):
    parent = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    assert student.config.num_hidden_layers == 2 and len(student.config.layer_types) == 2
    parent_state, student_state = parent.state_dict(), student.state_dict()
    for name, tensor in student_state.items():
        if name.startswith("model.layers.1."):  # student layer 1 is parent layer 3
            source = name.replace("model.layers.1.", "model.layers.3.")
        else:  # layer 0, embeddings, final norm, head: the same names
            source = name
        assert torch.equal(tensor, parent_state[source]), name
    # The copy computes what the parent computes with only those two layers, in that order.
    reference = copy.deepcopy(parent)
    reference.model.layers = torch.nn.ModuleList([parent.model.layers[0], parent.model.layers[3]])
    ids = torch.tensor([[5, 17, 99, 3, 42, 8]])
    with torch.no_grad():
        expected = reference(input_ids=ids, use_cache=False).logits
        actual = student(input_ids=ids, use_cache=False).logits
    assert torch.allclose(actual, expected, atol=1e-6)
    assert not torch.allclose(actual, parent(input_ids=ids, use_cache=False).logits, atol=1e-3)  # the dropped layers mattered
    # and it generates (the KV cache indexes the renumbered layers 0..1)
    assert student.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 10)


def test_student_keeps_the_parent_tokenizer_and_generation_config(tiny_model_dir, student_dir, tokenizer_texts):
    parent, student = AutoTokenizer.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(student_dir)
    assert [parent(t)["input_ids"] for t in tokenizer_texts] == [student(t)["input_ids"] for t in tokenizer_texts]
    assert student.chat_template == parent.chat_template and student.eos_token == parent.eos_token
    parent_generation = AutoModelForCausalLM.from_pretrained(tiny_model_dir).generation_config
    assert AutoModelForCausalLM.from_pretrained(student_dir).generation_config.eos_token_id == parent_generation.eos_token_id


@pytest.mark.parametrize(
    ("keep", "message"),
    [
        ([], "non-empty list"),
        ("0,3", "non-empty list"),  # a string, not a list
        ([0, -1], "integers >= 0"),
        ([0, 1.5], "integers >= 0"),
        ([3, 1], "increasing order"),
        ([0, 0, 2], "increasing order"),  # a layer twice
        ([0, 4], r"layer 4 does not exist: builtin:tiny has 4 decoder layers \(0-3\)"),
        ([0, 1, 2, 3], "keeps all 4 layers"),
    ],
)
def test_bad_layer_choices_are_one_error_naming_the_option(keep, message, tmp_path):
    with pytest.raises(ConfigError, match=r"^keep_layers=.*" + message):
        write_layer_dropped_copy("builtin:tiny", keep, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_check_keep_layers_without_a_model_checks_only_the_list():
    assert check_keep_layers([0, 7, 40]) == [0, 7, 40]  # the range needs the model
    with pytest.raises(ConfigError, match=r"^stage 's': keep_layers=\[2, 2\]"):
        check_keep_layers([2, 2], option="stage 's': keep_layers")


# ---------------------------------------------------------------------------- as a recipe stage
def _recipe(tmp_path: Path, stage: dict, evaluation: bool = False) -> Path:
    recipe = {"output_dir": str(tmp_path / "out"), "stages": [stage]}
    if evaluation:
        recipe["evaluation"] = {
            "config": str(ROOT / "configs/eval.yaml"),
            "args": ["--data.init_args.num_val_samples", "2", "--model.init_args.eval_max_new_tokens", "4",
                     "--model.init_args.eval_num_samples", "1", "--trainer.default_root_dir", str(tmp_path / "eval")],
        }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_drop_layers_stage_writes_and_scores_the_student(tmp_path, capsys):
    stage = {"name": "student", "command": "drop_layers", "model": "builtin:tiny", "keep_layers": [0, 2]}
    main([str(_recipe(tmp_path, stage, evaluation=True))])
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "out/student/hf_model")
    assert student.config.num_hidden_layers == 2
    with (tmp_path / "out/results.csv").open() as handle:
        [row] = list(csv.DictReader(handle))
    # The table's params column: the parent's count less two of its (equal-sized) layers.
    parent = load_model("builtin:tiny")
    layer = sum(p.numel() for p in parent.model.layers[1].parameters())
    assert int(row["params"]) == sum(p.numel() for p in parent.parameters()) - 2 * layer == sum(p.numel() for p in student.parameters())
    assert 0.0 <= float(row["accuracy"]) <= 1.0
    main([str(_recipe(tmp_path, stage, evaluation=True))])  # done: skipped, not rewritten
    assert "student: done before, skipped" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        ({"keep_layers": [0]}, "needs exactly one parent"),
        ({"model": "builtin:tiny", "model_from": "x", "keep_layers": [0]}, "needs exactly one parent"),
        ({"model_from": "later", "keep_layers": [0]}, "model_from='later' is not an earlier stage"),
        ({"model": "builtin:tiny", "keep_layers": [1, 0]}, r"keep_layers=\[1, 0\]: list each layer once"),
        ({"model": "builtin:tiny", "keep_layers": [0], "config": ["x.yaml"]}, "not config"),
    ],
)
def test_drop_layers_stage_errors_name_the_stage_and_option(stage, message, tmp_path):
    with pytest.raises(ConfigError, match=r"stage 'student': .*" + message):
        load_recipe(str(_recipe(tmp_path, {"name": "student", "command": "drop_layers", **stage})))


def test_a_layer_the_parent_lacks_is_named_when_the_stage_runs(tmp_path):
    stage = {"name": "student", "command": "drop_layers", "model": "builtin:tiny", "keep_layers": [0, 9]}
    with pytest.raises(ConfigError, match=r"stage 'student': keep_layers=\[0, 9\]: layer 9 does not exist: builtin:tiny has 4"):
        main([str(_recipe(tmp_path, stage))])
