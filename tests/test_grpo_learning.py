"""GRPO learns the task: from the cold-start SFT model, a short CPU run raises held-out accuracy.

The SFT model is `tests/assets/tiny_sft` (what `configs/sft.yaml` produces; see the README
there); GRPO runs the `configs/grpo.yaml` hyper-parameters for fewer steps. Held-out accuracy
is pass@1 averaged over 4 samples at temperature 1 on prompts that never appear in training,
evaluated with the same seeds before and after.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from r1_lightning import GRPO, PromptDataModule

torch.set_num_threads(1)


def _trainer(root, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(root), **kwargs,
    )


SFT_MODEL = Path(__file__).parent / "assets" / "tiny_sft"


@pytest.mark.slow
def test_grpo_raises_held_out_accuracy_over_the_sft_model(tmp_path) -> None:
    L.seed_everything(0)
    module = GRPO(
        str(SFT_MODEL), num_generations=8, max_new_tokens=96, beta=0.04, learning_rate=1e-4, warmup_steps=5,
        reward_weights=[1.0, 0.2], eval_num_samples=4, eval_temperature=1.0, export_hf=False,
    )
    data = PromptDataModule(batch_size=8, max_prompt_length=64, num_samples=1024, num_val_samples=128, val_batch_size=64)
    trainer = _trainer(tmp_path, max_steps=60, limit_val_batches=1.0, check_val_every_n_epoch=None, val_check_interval=10_000)
    before = trainer.validate(module, data, verbose=False)[0]["val/accuracy"]
    trainer.fit(module, data)
    after = trainer.validate(module, data, verbose=False)[0]["val/accuracy"]
    print(f"held-out accuracy: SFT {before:.3f} -> GRPO {after:.3f}")
    assert 0.2 < before < 0.95, "the SFT model should be part-way: RL needs room above it"
    assert after > before + 0.04
