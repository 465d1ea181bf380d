"""Shared pieces of the GRPO and PromptDataModule tests: tiny runs, recording rewards and callbacks, log readers.

Every run is a real `lightning.Trainer` fit of `r1_lightning.GRPO` on `builtin:tiny` with a handful of
short completions, so a test takes a second or two on one CPU core.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import zlib
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from r1_lightning import GRPO, PromptDataModule
from r1_lightning.rewards import Reward
from r1_lightning.engines import HFGenerateEngine

# The tiny model gains nothing from intra-op threads; on a shared 2-core machine they make a step
# many times slower (tests/conftest.py does the same for the whole session).
torch.set_num_threads(1)

# Small enough for a fast step, large enough for groups with a spread of rewards.
FAST = dict(model_name_or_path="builtin:tiny", num_generations=4, max_new_tokens=8, learning_rate=1e-3, export_hf=False)


class TextHash(Reward):
    """A pseudo-random score in [0, 1) that is a deterministic function of the text.

    Distinct completions get distinct scores, so every group has non-zero advantages (unlike
    `Accuracy` on an untrained model, where all rewards are 0 and nothing would be learned).
    """

    def __call__(self, completions: list[str], *, prompts: list, **columns: Any) -> list[float | None]:
        return [zlib.crc32(c.encode()) / 2**32 for c in completions]


class VariedLengthEngine(HFGenerateEngine):
    """`HFGenerateEngine` that also ends a completion at every 8th token id.

    An untrained model almost never samples EOS, so all its completions would be `max_new_tokens`
    long; with ~1 stop token in 8 the lengths vary, which is what tells the loss aggregations
    (and per-micro-batch normalisers) apart.
    """

    def generate(self, model, prompt_ids, num_generations, params, generator=None):
        stops = sorted({*params.eos_token_ids, *range(0, model.config.vocab_size, 8)})
        return super().generate(model, prompt_ids, num_generations, dataclasses.replace(params, eos_token_ids=stops), generator)


class NoEOSEngine(HFGenerateEngine):
    """`HFGenerateEngine` that never stops early: every completion hits `max_new_tokens` (is truncated)."""

    def generate(self, model, prompt_ids, num_generations, params, generator=None):
        return super().generate(model, prompt_ids, num_generations, dataclasses.replace(params, eos_token_ids=[]), generator)


class RecordingReward(Reward):
    """Scores 0 and records what each call received: completions, prompts and every column."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, completions: list[str], *, prompts: list, **columns: Any) -> list[float | None]:
        self.calls.append({"completions": list(completions), "prompts": list(prompts), "columns": dict(columns)})
        return [0.0] * len(completions)


class Snapshot(Callback):
    """Copies of the policy's and the reference's parameters when training starts."""

    def __init__(self) -> None:
        self.policy: dict[str, torch.Tensor] = {}
        self.reference: dict[str, torch.Tensor] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: GRPO) -> None:
        self.policy = parameters(pl_module.model)
        self.reference = None if pl_module.ref_model is None else parameters(pl_module.ref_model)


class RolloutRecorder(Callback):
    """The `RolloutBatch` each training step returns (`outputs["rollout"]`)."""

    def __init__(self) -> None:
        self.batches: list[Any] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches.append(outputs["rollout"])


class GradRecorder(Callback):
    """Copies of the gradients right before each optimizer step (after clipping)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.steps.append(
            {n: p.grad.detach().clone() for n, p in pl_module.model.named_parameters() if p.grad is not None}
        )


def tiny_grpo(**overrides: Any) -> GRPO:
    """`GRPO` on `builtin:tiny` with short completions, β = 0 and the `TextHash` reward unless overridden."""
    return GRPO(**{**FAST, "rewards": [TextHash()], "beta": 0.0, **overrides})


def prompt_data(**overrides: Any) -> PromptDataModule:
    """The built-in task, 2 prompts a batch, in a fixed order (so two runs see the same prompts)."""
    return PromptDataModule(**{"batch_size": 2, "num_samples": 8, "num_val_samples": 4, "max_prompt_length": 64, "shuffle": False, **overrides})


def fit(
    module: L.LightningModule,
    data: L.LightningDataModule,
    root: Path,
    max_steps: int = 1,
    callbacks: list[Callback] | None = None,
    validate: bool = False,
    **trainer_kwargs: Any,
) -> L.Trainer:
    """`trainer.fit` on CPU with a CSV logger under `root`; validation only when asked (at the last step)."""
    L.seed_everything(0, verbose=False)
    kwargs: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=CSVLogger(root, name="logs"),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks or [],
    )
    if validate:
        kwargs.update(val_check_interval=max_steps, check_val_every_n_epoch=None)
    else:
        kwargs.update(limit_val_batches=0)
    trainer = L.Trainer(**{**kwargs, **trainer_kwargs})
    trainer.fit(module, data)
    return trainer


def logged_metrics(trainer: L.Trainer) -> dict[str, list[float]]:
    """Every value the CSV logger wrote, per metric name, in logging order (empty cells skipped)."""
    path = Path(trainer.logger.log_dir) / "metrics.csv"
    series: dict[str, list[float]] = {}
    with path.open() as handle:
        for row in csv.DictReader(handle):
            for name, value in row.items():
                if value not in ("", None) and name not in ("epoch", "step"):
                    series.setdefault(name, []).append(float(value))
    return series


def parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def max_change(before: dict[str, torch.Tensor], model: torch.nn.Module) -> float:
    """The largest absolute difference between `before` and the model's current parameters."""
    after = dict(model.named_parameters())
    assert before.keys() == after.keys()
    return max((after[n].detach() - p).abs().max().item() for n, p in before.items())


def all_finite(values: list[float]) -> bool:
    return bool(values) and all(math.isfinite(v) for v in values)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
