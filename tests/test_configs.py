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
def test_recipe_and_its_stage_configs_parse(path, capsys, monkeypatch, tmp_path):
    from r1_lightning.recipe import load_recipe

    monkeypatch.chdir(tmp_path)  # a recipe's configs are found relative to the recipe file, from any working directory
    recipe = load_recipe(str(path))
    for stage in recipe["stages"]:
        if stage["command"] == "drop_layers":  # no config: a layer-dropped copy of a model (tests/test_layer_drop.py)
            continue
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


# --- GPU examples: instantiate through the CLI, and shard the real model's shape on the meta device ------------

FSDP2_EXAMPLES = sorted((REPO_ROOT / "configs" / "examples").glob("*fsdp2*.yaml"))
# Qwen2.5-1.5B-Instruct's published config.json (the hub is offline here): the shapes the examples' memory comments use.
QWEN2_5_1_5B = dict(
    vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
    num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True, rope_theta=1000000.0,
)


@pytest.fixture(scope="module")
def qwen_shaped_dir(tmp_path_factory, builtin_tokenizer) -> Path:
    """A model directory with Qwen2.5-1.5B's config.json and the built-in tokenizer, no weights."""
    from transformers import Qwen2Config

    path = tmp_path_factory.mktemp("qwen2.5-1.5b-shape")
    Qwen2Config(**QWEN2_5_1_5B).save_pretrained(path)
    builtin_tokenizer.save_pretrained(path)
    return path


def test_the_fsdp2_examples_exist():
    assert {p.name for p in FSDP2_EXAMPLES} == {"qwen2.5_1.5b_grpo_fsdp2_8gpu.yaml", "qwen2.5_1.5b_grpo_fsdp2_2nodes.yaml"}


@pytest.mark.parametrize("path", FSDP2_EXAMPLES, ids=_id)
def test_fsdp2_example_instantiates_and_shards_on_the_meta_device(path, qwen_shaped_dir, tmp_path):
    """The CLI builds trainer, strategy, module and data from the file (accelerator switched to cpu: no GPU
    here; the model path pointed at a weightless Qwen2.5-1.5B-shaped directory), then the module's own
    sharding function shards a Qwen2.5-1.5B built on the meta device (1-rank gloo mesh: no weights, no memory)."""
    import torch
    import torch.distributed as dist
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    from transformers import AutoConfig, AutoModelForCausalLM

    from r1_lightning import GRPO
    from r1_lightning.cli import R1CLI
    from r1_lightning.parallel import shard_for_strategy

    written = yaml.safe_load(path.read_text())
    with mock.patch.object(sys, "argv", ["r1-lightning"]):
        cli = R1CLI(
            args=["--config", str(path), "--model.init_args.model_name_or_path", str(qwen_shaped_dir), "--trainer.accelerator", "cpu"],
            run=False,
        )
    trainer, module = cli.trainer, cli.model
    assert isinstance(module, GRPO) and isinstance(trainer.strategy, ModelParallelStrategy)
    assert trainer.num_nodes == written["trainer"]["num_nodes"] and trainer.num_devices == 8
    # FSDP2 over every rank: the data-parallel size must be devices x nodes, with no tensor parallelism.
    assert trainer.strategy._data_parallel_size == 8 * trainer.num_nodes and trainer.strategy._tensor_parallel_size == 1
    assert module.hparams.fsdp_param_dtype == "bfloat16" and module.hparams.dtype == "float32"
    assert cli.datamodule.hparams.batch_size * 8 * trainer.num_nodes == 32  # the same global batch in both examples

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        module._device_mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(qwen_shaped_dir), dtype=torch.float32)
        # 1.54e9 parameters, 0.23e9 of them the tied embedding: the numbers the memory comment starts from.
        assert sum(p.numel() for p in model.parameters()) == pytest.approx(1.54e9, rel=0.01)
        model = shard_for_strategy(module, model, module.hparams.fsdp_param_dtype)
        layers = model.model.layers
        assert isinstance(model, FSDPModule) and all(isinstance(layer, FSDPModule) for layer in layers) and len(layers) == 28
        assert all(isinstance(p, DTensor) and p.is_meta for p in model.parameters())
        assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied, in the root unit
        assert layers[0]._get_fsdp_state()._mp_policy.param_dtype == torch.bfloat16
    finally:
        dist.destroy_process_group()


def test_fsdp1_example_builds_its_strategy(qwen_shaped_dir):
    """Lightning refuses FSDPStrategy on CPU, so the FSDP1 example is checked up to the Trainer: the strategy
    object the CLI builds wraps each Qwen2 decoder layer (the class ``r1_lightning.parallel`` shards by) and keeps
    the original parameters (frozen and trained parameters in one unit). Its training itself is untested here."""
    from lightning.pytorch.strategies import FSDPStrategy
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from r1_lightning import PolicySFT
    from r1_lightning.cli import R1CLI
    from r1_lightning.parallel import decoder_layer_classes

    captured = {}

    class TrainerProbe(R1CLI):
        def instantiate_trainer(self, **kwargs):
            captured.update(self._get(self.config_init, "trainer"))

    path = REPO_ROOT / "configs" / "examples" / "qwen2.5_1.5b_sft_fsdp1_8gpu.yaml"
    with mock.patch.object(sys, "argv", ["r1-lightning"]):
        cli = TrainerProbe(args=["--config", str(path), "--model.init_args.model_name_or_path", str(qwen_shaped_dir)], run=False)
    strategy = captured["strategy"]
    assert isinstance(cli.model, PolicySFT) and isinstance(strategy, FSDPStrategy)
    tiny = Qwen2ForCausalLM(Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == decoder_layer_classes(tiny)
    assert strategy.kwargs["use_orig_params"] and captured.get("gradient_clip_val") is None


def test_distill_example_instantiates_up_to_model_loading(qwen_shaped_dir):
    """The real-model distillation example builds its trainer, student module (teacher and student tokenizers
    checked against each other) and data module through the CLI, with both model paths pointed at a weightless
    Qwen2.5-shaped directory (the hub is offline here); only the weights, loaded in configure_model, are missing."""
    from r1_lightning import ColdStartDataModule, Distillation
    from r1_lightning.cli import R1CLI

    path = REPO_ROOT / "configs" / "examples" / "distill_7b_to_qwen2.5_1.5b.yaml"
    written = yaml.safe_load(path.read_text())["model"]["init_args"]
    models = ["--model.init_args.model_name_or_path", str(qwen_shaped_dir), "--model.init_args.teacher_name_or_path", str(qwen_shaped_dir)]
    with mock.patch.object(sys, "argv", ["r1-lightning"]):
        cli = R1CLI(args=["--config", str(path), *models, "--trainer.accelerator", "cpu", "--trainer.precision", "32-true"], run=False)
    assert isinstance(cli.model, Distillation) and isinstance(cli.datamodule, ColdStartDataModule)
    for key in ("loss", "jsd_beta", "on_policy_fraction", "max_new_tokens", "learning_rate", "dtype", "logprob_chunk_size"):
        assert cli.model.hparams[key] == written[key], key
    assert cli.model.model is None  # weights come in configure_model, under the strategy
    assert cli.trainer.max_steps == 2000 and cli.trainer.accumulate_grad_batches == 8
