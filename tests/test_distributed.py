"""Two processes equal one: SFT, GRPO and distillation under DDP and FSDP2 through the real CLI, on CPU (gloo).

Each module runs three times with the same global batch: one process, two DDP processes, and two
FSDP2 processes (``ModelParallelStrategy``; every decoder layer and the root ``fully_shard``-ed).
Lightning's subprocess launcher re-runs the command for rank 1. The data modules split each global
batch by one ``DistributedSampler`` permutation, so the three runs train on the same prompts.
The per-step training loss and the exported ``hf_model/`` weights must agree. The GRPO runs also
mix the policy into the reference every 2 steps (``ReferenceModelRefresh``, α = 0.5). The GRPO and
distillation runs resume from their step-2 checkpoints (sharded for FSDP2), and the resumed FSDP2
run must match the uninterrupted single-process run's steps 3-4 and weights.

Each run takes 4 optimizer steps: 2 epochs of 2 batches.

Tolerances, and what the runs give (float32 sums in another order and over other padding):
- SFT and distillation losses agree to ~1e-7 relative; GRPO's to ~1e-4 after the first refresh.
  GRPO's loss is mostly β·KL between two nearby models (~1e-4), a difference of near-equal
  log-probs, and AdamW's first steps are ~lr·sign(gradient): a gradient element at rounding level
  moves by ±lr either way, a tiny change of the weights that shows up relatively large in the KL.
  GRPO's sampled completions (rewards, lengths) agree exactly: the sampling seeds are per prompt, as
  are distillation's on-policy samples (half of each batch's rows are the student's own samples).
- Weights: ||w_N - w_1|| / ||w_1 - w_init|| per tensor: ≤ 3e-6 for SFT and distillation, a median
  of 2e-6 and a maximum of ~1e-4 for GRPO's policy and reference (the same AdamW effect). The
  attention key biases are left out: their true gradient is 0 (softmax ignores a shift shared by
  all keys), so AdamW turns rounding noise into ±lr steps and they hold noise in every run.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

RUN_TIMEOUT_S = 900  # a 2-process run takes ~20 s on an idle 2-core machine; generous for a loaded one
STEPS = 4
RESUMED = ["grpo", "distill"]  # resumed from their step-2 checkpoints
LOSS_RTOL = {"sft": 1e-5, "grpo": 1e-3, "distill": 1e-5}
WEIGHT_RTOL = {"sft": 1e-4, "grpo": 1e-3, "distill": 1e-4}  # of the training update, per tensor
ZERO_GRADIENT = "self_attn.k_proj.bias"

COMMON = """
seed_everything: 0
trainer:
  accelerator: cpu
  max_steps: {steps}
  log_every_n_steps: 1
  num_sanity_val_steps: 0
  enable_progress_bar: false
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: logs, name: run, version: 0}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: checkpoints, every_n_epochs: 1, save_top_k: -1}}
{callbacks}"""

MODULES = {
    "sft": """
model:
  class_path: r1_lightning.PolicySFT
  init_args: {model_name_or_path: "builtin:tiny-small", learning_rate: 3.0e-3, warmup_steps: 1, eval_max_new_tokens: 6}
data:
  class_path: r1_lightning.ColdStartDataModule
  init_args: {batch_size: BATCH, max_length: 160, num_samples: 16, num_val_samples: 4}
""",
    "grpo": """
model:
  class_path: r1_lightning.GRPO
  init_args:
    model_name_or_path: "builtin:tiny-small"
    rewards:   # lengths of the untrained model's text vary: a reward with spread, so advantages are not 0
      - class_path: r1_lightning.rewards.SoftOverlong
        init_args: {max_length: 14, cache_length: 12}
    num_generations: 4
    max_new_tokens: 12
    beta: 0.1
    learning_rate: 1.0e-3
    eval_num_samples: 2
    eval_max_new_tokens: 6
data:
  class_path: r1_lightning.PromptDataModule
  init_args: {batch_size: BATCH, max_prompt_length: 64, num_samples: 16, num_val_samples: 4}
""",
    "distill": """
model:
  class_path: r1_lightning.Distillation
  init_args: {model_name_or_path: "builtin:tiny-small", teacher_name_or_path: "builtin:tiny", learning_rate: 3.0e-3,
              warmup_steps: 1, eval_max_new_tokens: 6, on_policy_fraction: 0.5, max_new_tokens: 8}   # half the rows: student samples
data:
  class_path: r1_lightning.ColdStartDataModule
  init_args: {batch_size: BATCH, max_length: 160, num_samples: 16, num_val_samples: 4}
""",
}

STRATEGIES = {
    "single": ("trainer:\n  devices: 1\n", 8),
    "ddp": ("trainer:\n  devices: 2\n  strategy: ddp\n", 4),
    "fsdp2": (
        "trainer:\n  devices: 2\n  strategy:\n    class_path: lightning.pytorch.strategies.ModelParallelStrategy\n"
        "    init_args: {data_parallel_size: 2, tensor_parallel_size: 1}\n",
        4,
    ),
}


def explain(result) -> str:
    return f"exit {result.returncode}\n--- stdout (tail)\n{result.stdout[-3000:]}\n--- stderr (tail)\n{result.stderr[-5000:]}"


# GRPO also mixes the policy into the reference every 2 steps.
EXTRA_CALLBACKS = {
    "grpo": "    - class_path: r1_lightning.callbacks.ReferenceModelRefresh\n      init_args: {every_n_steps: 2, alpha: 0.5}\n"
}


def _configs(root: Path, module: str, strategy: str) -> list[Path]:
    text, batch = STRATEGIES[strategy]
    base = root / f"{module}.yaml"
    common = COMMON.format(steps=STEPS, callbacks=EXTRA_CALLBACKS.get(module, ""))
    base.write_text(common + MODULES[module].replace("BATCH", str(batch)))
    fragment = root / f"{strategy}.yaml"
    fragment.write_text(text)
    return [base, fragment]


def _run(cli, root: Path, module: str, strategy: str, extra: tuple = ()) -> Path:
    root.mkdir(parents=True)
    args = ["fit"]
    for config in _configs(root, module, strategy):
        args += ["--config", config]
    result = cli([*args, *extra], root, timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, explain(result)
    return root


@pytest.fixture(scope="module")
def runs(cli, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """Every run of this file, one at a time (a 2-process run already uses both cores)."""
    root = tmp_path_factory.mktemp("distributed")
    done = {}
    for module in MODULES:
        for strategy in STRATEGIES:
            done[module, strategy] = _run(cli, root / f"{module}-{strategy}", module, strategy)
    # Resume the GRPO and distillation runs from their step-2 checkpoints (FSDP2's is a directory of shards).
    for module in RESUMED:
        for strategy in ("fsdp2",):
            checkpoint = done[module, strategy] / "checkpoints" / "epoch=0-step=2.ckpt"
            resumed = _run(cli, root / f"{module}-{strategy}-resumed", module, strategy, ("--ckpt_path", checkpoint))
            done[module, f"{strategy}-resumed"] = resumed
    return done


def logged(run: Path, name: str = "train/loss") -> list[float]:
    """A training metric at every step, in order (a resumed run numbers its steps from the checkpoint's)."""
    with open(run / "logs" / "run" / "version_0" / "metrics.csv") as file:
        rows = [row for row in csv.DictReader(file) if row.get(name)]
    return [float(row[name]) for row in sorted(rows, key=lambda row: int(row["step"]))]


def exported(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "logs" / "run" / "version_0" / "hf_model" / "model.safetensors")


def initial_weights(prefix: str = "") -> dict[str, torch.Tensor]:
    from r1_lightning.policy import load_model

    return {prefix + k: v for k, v in load_model("builtin:tiny-small").state_dict().items()}


def assert_weights_close(actual: dict, expected: dict, initial: dict, rtol: float) -> None:
    """Every tensor within ``rtol`` of how far training moved it (key biases aside, see the module docstring)."""
    assert actual.keys() == expected.keys()
    checked = [name for name in expected if ZERO_GRADIENT not in name]
    assert len(checked) > 20
    for name in checked:
        moved = (expected[name] - initial[name]).norm().item()
        assert moved > 0, f"{name} did not train"
        error = (actual[name] - expected[name]).norm().item() / moved
        assert error < rtol, f"{name}: differs by {error:.2e} of its update"


@pytest.mark.slow  # 2-process CLI runs
@pytest.mark.parametrize("module", list(MODULES))
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_equal_one(runs, module, strategy):
    single, multi = runs[module, "single"], runs[module, strategy]
    expected = logged(single)
    assert len(expected) == STEPS and len(set(expected)) == STEPS  # every step logged, and the loss moved
    assert logged(multi) == pytest.approx(expected, rel=LOSS_RTOL[module], abs=1e-8)  # GRPO's first loss is ~0 (A sums to 0)
    if module == "grpo":  # the same completions were sampled: per-prompt seeds, whatever rank holds the prompt
        for name in ("train/reward", "train/completion_length"):
            assert logged(multi, name) == pytest.approx(logged(single, name), rel=1e-6), name
    assert_weights_close(exported(multi), exported(single), initial_weights(), WEIGHT_RTOL[module])


@pytest.mark.slow  # 2-process CLI runs
@pytest.mark.parametrize("module", RESUMED)
def test_fsdp2_checkpoint_is_sharded_and_resumes_like_the_uninterrupted_run(runs, module):
    """Resuming the sharded checkpoint continues the uninterrupted single-process run: it restores the weights, AdamW
    state and, for GRPO, the refreshed reference, the refresh callback's and the rollout counter's state
    (distillation's sharded checkpoint also holds the teacher's shards, which its loader expects)."""
    checkpoint = runs[module, "fsdp2"] / "checkpoints" / "epoch=0-step=2.ckpt"
    assert sorted(p.name for p in checkpoint.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # one shard per rank
    single, sharded = runs[module, "single"], runs[module, "fsdp2-resumed"]
    assert len(logged(sharded)) == STEPS - 2  # only the steps after the checkpoint ran
    assert logged(sharded) == pytest.approx(logged(single)[2:], rel=LOSS_RTOL[module], abs=1e-8)
    if module == "grpo":
        assert logged(sharded, "train/reward") == pytest.approx(logged(single, "train/reward")[2:], rel=1e-6)
    assert_weights_close(exported(sharded), exported(single), initial_weights(), WEIGHT_RTOL[module])


@pytest.mark.slow  # 2-process CLI runs
def test_reference_refresh_under_fsdp2_equals_unsharded(runs):
    """ReferenceModelRefresh mixed the sharded reference shard by shard into what one process gets."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    single = torch.load(runs["grpo", "single"] / "checkpoints" / f"epoch=1-step={STEPS}.ckpt", weights_only=False)
    sharded_dir = runs["grpo", "fsdp2"] / "checkpoints" / f"epoch=1-step={STEPS}.ckpt"
    converted = sharded_dir.parent / "converted.pt"
    dcp_to_torch_save(sharded_dir, converted)
    sharded = torch.load(converted, weights_only=False)["state_dict"]
    assert single["callbacks"]["ReferenceModelRefresh"]["refreshes"] == 2
    reference = {k: v for k, v in single["state_dict"].items() if k.startswith("ref_model.")}
    policy = {k: single["state_dict"]["model." + k[len("ref_model."):]] for k in reference}
    assert any(not torch.equal(reference[k], policy[k]) for k in reference)  # α = 0.5: not a copy of the policy
    assert_weights_close({k: sharded[k] for k in reference}, reference, initial_weights("ref_model."), WEIGHT_RTOL["grpo"])


# --- the pieces, in one process ---------------------------------------------------------------------


def test_per_prompt_generators_make_a_prompts_samples_independent_of_its_batch():
    """With one generator per prompt, a prompt sampled alone or next to others (another padding, another
    batch position, as on another rank) gets the same completions: the seed follows the prompt."""
    from test_rollout import PROMPTS, params, seeded, tiny_model

    from r1_lightning.engines import HFGenerateEngine

    model, engine, G = tiny_model(), HFGenerateEngine(), 3
    together = engine.generate(model, PROMPTS, G, params(top_k=20), [seeded(10 + i) for i in range(len(PROMPTS))])
    for i, prompt in enumerate(PROMPTS):
        alone = engine.generate(model, [prompt], G, params(top_k=20), [seeded(10 + i)])
        rows = slice(i * G, (i + 1) * G)
        width = alone.completion_ids.shape[1]  # the batch runs until its longest row ends
        torch.testing.assert_close(together.completion_ids[rows, :width], alone.completion_ids)
        assert not together.completion_mask[rows, width:].any()
        torch.testing.assert_close(together.logprobs[rows, :width], alone.logprobs, atol=1e-5, rtol=1e-5)
    # The G rows of a prompt still differ from each other, and a single generator still works.
    assert len({tuple(r) for r in together.completion_ids[:G].tolist()}) > 1
    single = engine.generate(model, PROMPTS, G, params(), seeded(0))
    assert single.completion_ids.shape[0] == len(PROMPTS) * G


def test_a_generator_list_must_match_the_prompts():
    from test_rollout import PROMPTS, params, seeded, tiny_model

    from r1_lightning.engines import HFGenerateEngine

    with pytest.raises(ValueError, match="2 generators for 3 prompts"):
        HFGenerateEngine().generate(tiny_model(), PROMPTS, 2, params(), [seeded(0), seeded(1)])


def test_grpo_seeds_a_prompt_by_its_index_and_the_rollout_step():
    from grpo_helpers import tiny_grpo

    module = tiny_grpo()
    seeds = lambda indices, stream: [g.initial_seed() for g in module.seeds.per_prompt(indices, stream)]  # noqa: E731
    assert seeds([3, 5], 0)[1] == seeds([5], 0)[0]  # the batch around a prompt does not matter
    assert len(set(seeds([3, 5], 0) + seeds([3, 5], 1))) == 4  # prompts and steps differ
    assert isinstance(module.seeds.for_batch({}, 0, rank=0), torch.Generator)  # a batch without indices: the per-rank generator


def test_outside_a_process_group_nothing_is_sharded_or_reduced():
    from grpo_helpers import tiny_grpo

    from r1_lightning.parallel import global_normalizer, run_gathered, shard_for_strategy

    module = tiny_grpo()
    module.configure_model()
    assert shard_for_strategy(module, module.model) is module.model  # no device mesh: DDP / one device
    assert global_normalizer(torch.tensor(7.0)) == 7.0
    assert run_gathered(module.model, lambda a, b: a + b, 2, b=3) == 5


# --- rejection sampling, 2 real processes ------------------------------------------------------------
RS_CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  logger: false
  enable_progress_bar: false
  callbacks:
    - class_path: r1_lightning.callbacks.RejectionSamplingWriter
      init_args: {keep: all, require: [accuracy]}
model:
  class_path: r1_lightning.GRPO
  init_args:
    model_name_or_path: MODEL   # the cold-start SFT model: right about 70% of the time at temperature 1
    beta: 0.0
    num_generations: 3
    max_new_tokens: 96
data:
  class_path: r1_lightning.PromptDataModule
  init_args: {max_prompt_length: 64, num_samples: 5, val_batch_size: 2}
"""


@pytest.mark.slow  # 2-process CLI runs
def test_rejection_sampling_with_two_processes_writes_what_one_writes(cli, tmp_path):
    """5 prompts: the distributed sampler pads rank 1 with a repeated prompt, which the merge drops."""
    config = tmp_path / "rs.yaml"
    config.write_text(RS_CONFIG.replace("MODEL", str(Path(__file__).parent / "assets" / "tiny_sft")))
    files = {}
    for devices in (1, 2):
        root = tmp_path / f"devices{devices}"
        strategy = ["--trainer.strategy", "ddp"] if devices > 1 else []
        args = ["predict", "--config", config, "--trainer.devices", devices, *strategy, "--trainer.default_root_dir", root]
        result = cli([*args, "--return_predictions", "false"], tmp_path, timeout=RUN_TIMEOUT_S)
        assert result.returncode == 0, explain(result)
        files[devices] = (root / "accepted.jsonl").read_text()
        assert not [p.name for p in root.iterdir() if ".rank" in p.name or ".tmp-" in p.name]  # no share or temporary file left
    rows = [json.loads(line) for line in files[1].splitlines()]
    assert 0 < len(rows) < 5 * 3 and len({r["prompt"] for r in rows}) > 1  # some samples rejected, several prompts kept
    assert len({r["completion"] for r in rows}) == len(rows)
    assert files[2] == files[1]
