"""AdamW with linear warm-up and cosine decay, shared by every module."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from r1_lightning.errors import ConfigError


def check_optimizer_options(learning_rate: float, weight_decay: float, warmup_steps: int, min_lr_ratio: float) -> None:
    """Raise a ``ConfigError`` naming the first bad option (checked in ``__init__``, before any run starts)."""
    if not learning_rate >= 0:  # also catches NaN
        raise ConfigError(f"learning_rate={learning_rate}: must be >= 0")
    if not weight_decay >= 0:
        raise ConfigError(f"weight_decay={weight_decay}: must be >= 0")
    if warmup_steps < 0:
        raise ConfigError(f"warmup_steps={warmup_steps}: must be >= 0")
    if not 0 <= min_lr_ratio <= 1:
        raise ConfigError(f"min_lr_ratio={min_lr_ratio}: must be in [0, 1]")


def adamw_warmup_cosine(
    parameters: Iterable[torch.nn.Parameter],
    learning_rate: float,
    weight_decay: float,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = 0.1,
) -> dict:
    """An optimizer + per-step scheduler config for ``configure_optimizers``.

    The learning rate rises linearly over ``warmup_steps`` and then follows a half cosine from
    ``learning_rate`` down to ``min_lr_ratio * learning_rate`` at ``total_steps``.
    """
    trainable = [p for p in parameters if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=weight_decay, betas=(0.9, 0.95))
    total_steps = max(total_steps, 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def total_training_steps(trainer) -> int:
    """Optimizer steps the trainer will take (``max_steps`` or epochs × batches)."""
    steps = trainer.estimated_stepping_batches
    return int(steps) if math.isfinite(steps) else 1
