"""The plumbing the three modules share (r1_lightning.modules.plumbing): one EOS rule, one seed formula,
one engine lifecycle, and the "G rows of a prompt" helpers."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch

from r1_lightning import GRPO, ColdStartDataModule, Distillation, PolicySFT
from r1_lightning.engines import HFGenerateEngine
from r1_lightning.modules.plumbing import EngineLifecycle, SamplingSeeds, eos_token_ids
from r1_lightning.policy import load_tokenizer
from r1_lightning.rl.groups import group_indices, split_groups


class RecordingEngine(HFGenerateEngine):
    """The HF engine, keeping each call's sampling params and generators and the lifecycle calls in order."""

    def __init__(self) -> None:
        self.calls: list = []
        self.events: list[str] = []

    def generate(self, model, prompt_ids, num_generations, params, generator=None):
        self.calls.append((params, generator))
        return super().generate(model, prompt_ids, num_generations, params, generator)

    def check_lengths(self, longest_prompt: int, max_new_tokens: int) -> None:
        self.events.append(f"check {longest_prompt} {max_new_tokens}")

    def setup(self, model) -> None:
        self.events.append("setup")

    def mark_stale(self) -> None:
        self.events.append("stale")

    def teardown(self) -> None:
        self.events.append("teardown")


def seeds_of(generators) -> list[int]:
    return [g.initial_seed() for g in (generators if isinstance(generators, list) else [generators])]


def test_eos_ids_are_the_tokenizers_and_the_generation_configs():
    tokenizer = load_tokenizer("builtin:tiny", False)
    eos = tokenizer.eos_token_id
    config = lambda ids: SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=ids))  # noqa: E731
    assert eos_token_ids(tokenizer, None) == [eos]  # no model yet: the tokenizer's
    assert eos_token_ids(tokenizer, config(7)) == sorted({eos, 7})  # one id, as many HF configs write it
    assert eos_token_ids(tokenizer, config([eos, 7, None])) == sorted({eos, 7})  # a list; duplicates and None dropped


def test_one_seed_formula():
    # (seed · 1_000_003 + offset) mod 2^63, with seed 2:
    seeds = SamplingSeeds(2)
    base = 2 * 1_000_003
    # Per prompt: (index + 1) · 1_000_033 + stream.
    assert seeds_of(seeds.per_prompt([5, 0], 3)) == [base + 6 * 1_000_033 + 3, base + 1 * 1_000_033 + 3]
    assert seeds_of(seeds.for_batch({}, 4, rank=1)) == [base + 7919 + 4]  # no indices: rank · 7919 + stream
    assert seeds_of(seeds.evaluation({}, 3, rank=1)) == [base + 7919 + 10_000_003]  # evaluation: stream 10_000_000 + batch_idx
    assert seeds_of(seeds.evaluation({"indices": [0]}, 9, rank=0)) == [base + 1_000_033 - 1]  # per prompt: stream -1
    assert seeds_of(SamplingSeeds(-1).generator(0)) == [(-1_000_003) % 2**63]


def test_groups_helpers():
    assert list(group_indices(2, 3)) == [6, 7, 8]  # prompt 2 of G = 3 owns rows 6..8
    assert split_groups(["a1", "a2", "b1", "b2"], 2) == [["a1", "a2"], ["b1", "b2"]]
    with pytest.raises(ValueError, match="groups of num_generations=2"):
        split_groups([1, 2, 3], 2)


@pytest.fixture(scope="module")
def val_batch():
    tokenizer = load_tokenizer("builtin:tiny", False)
    data = ColdStartDataModule(num_samples=4, num_val_samples=2, max_length=256, batch_size=2, tokenizer=tokenizer)
    data.setup("fit")
    return next(iter(data.val_dataloader()))


def test_every_module_validates_with_the_same_eos_ids_and_seeds(val_batch):
    """The drift the three copies had: PolicySFT stopped only at the tokenizer's EOS and seeded validation by
    seed + batch_idx. Now the three sample validation answers alike: every EOS id, one seed formula."""
    expected_seeds = seeds_of(SamplingSeeds(0).evaluation(val_batch, 1, rank=0))
    assert len(expected_seeds) == 2  # one generator per prompt (ColdStartDataModule sends dataset indices)
    for module in (
        PolicySFT("builtin:tiny", rollout_engine=RecordingEngine(), eval_max_new_tokens=4),
        Distillation("builtin:tiny", "builtin:tiny", rollout_engine=RecordingEngine(), eval_max_new_tokens=4),
    ):
        module.configure_model()
        eos = module.tokenizer.eos_token_id
        module.model.generation_config.eos_token_id = [eos, 7]  # e.g. an instruct model's end-of-turn token
        module.validation_step(val_batch, 1)
        params, generators = module.engine.calls[-1]
        assert params.eos_token_ids == sorted({eos, 7}), type(module).__name__
        assert seeds_of(generators) == expected_seeds, type(module).__name__
    grpo = GRPO("builtin:tiny", beta=0.0)
    grpo.configure_model()
    grpo.model.generation_config.eos_token_id = [eos, 7]
    assert grpo.sampling_params(evaluation=True).eos_token_ids == sorted({eos, 7})
    assert seeds_of(grpo.seeds.evaluation(val_batch, 1, grpo.global_rank)) == expected_seeds


def test_the_engine_lifecycle_runs_once_per_stage_through_a_fit(tmp_path):
    engine = RecordingEngine()
    module = PolicySFT("builtin:tiny", rollout_engine=engine, eval_max_new_tokens=4)
    assert [type(c) for c in module.configure_callbacks()] == [EngineLifecycle]
    data = ColdStartDataModule(num_samples=4, num_val_samples=2, max_length=128, batch_size=2)
    trainer = L.Trainer(
        max_steps=2, limit_val_batches=1, num_sanity_val_steps=0, val_check_interval=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    module.hparams.export_hf = False
    trainer.fit(module, data)
    # Lengths checked before the model loads, the engine started at fit and again for validation,
    # stale after each of the 2 training batches, torn down with the stage.
    assert engine.events == ["check 128 4", "setup", "stale", "stale", "setup", "teardown"]
    assert isinstance(module.model, torch.nn.Module)
