"""Numerical guards around the optimizer step: no update without signal, no training on NaN.

Two things go wrong silently in RL fine-tuning unless something checks:

- **No signal.** A mini-batch whose groups all have equal rewards, whose completions are all
  masked (every one truncated with ``mask_truncated``, every group dropped by dynamic sampling)
  or empty has an exactly zero gradient. AdamW still moves the weights on such a step: its
  moment estimates from earlier steps are non-zero, and decoupled weight decay shrinks every
  weight regardless of the gradient. So a step whose gradient is exactly zero on every rank is
  *skipped*: the gradients are dropped (set to ``None``), and ``torch.optim`` leaves a parameter
  without a gradient untouched (no moment update, no weight decay, no step count). The step
  still counts (``global_step``, ``max_steps`` and the LR schedule advance) and is logged as
  ``train/skipped_steps/no_signal``.
- **NaN / inf.** A non-finite loss or gradient on any rank stops the run with one
  ``NonFiniteError`` naming the global step and the rank (``nonfinite="raise"``, the default),
  or skips that optimizer step like a no-signal one, logged as ``train/skipped_steps/nonfinite``
  (``nonfinite="skip"``). Weights that are already non-finite cannot be rescued by skipping:
  then the run stops in either mode, so training never continues on NaN weights.

Under mixed precision with a gradient scaler (``16-mixed``) inf gradients are the scaler's
normal signal to lower its scale, and it skips those steps itself; only the loss is checked then.

The decision is reduced over ranks (one all-reduce of three flags), so every rank skips or
steps together, also when gradients are sharded (FSDP).

The modules use it through ``StepGuard``: ``record_loss`` in the training step and
``before_optimizer_step`` in ``on_before_optimizer_step``, which Lightning calls after the
backward and before the step, in automatic and manual optimization alike.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor

from r1_lightning.errors import ConfigError, UserError

log = logging.getLogger(__name__)

NonFinite = Literal["raise", "skip"]
Outcome = Literal["step", "no_signal", "nonfinite"]


class NonFiniteError(UserError, FloatingPointError):
    """The loss, a gradient or a weight became NaN or infinite; the message names the step and rank."""


def check_nonfinite_option(value: str) -> None:
    """Raise a ``ConfigError`` unless ``value`` is ``raise`` or ``skip``."""
    if value not in ("raise", "skip"):
        raise ConfigError(f"nonfinite={value!r}: choose raise (stop the run) or skip (skip the optimizer step)")


def gradient_flags(parameters: Iterable[Tensor]) -> tuple[Tensor, Tensor]:
    """Whether any gradient is non-finite, and whether any is non-zero, as 0-dim bool tensors.

    One max-abs reduction over all gradients (NaN propagates through max, and max cannot
    overflow); the result stays on the device, so nothing waits for the GPU here.
    Parameters without a gradient count as zero.
    """
    grads = [_local(p.grad) for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(False), torch.tensor(False)
    max_abs = torch.nn.utils.get_total_norm(grads, norm_type=float("inf"))  # []
    return ~torch.isfinite(max_abs), max_abs > 0


def decide(loss_finite: bool, grads_finite: bool, grads_nonzero: bool, scaler: bool = False) -> Outcome:
    """What to do with an optimizer step.

    Args:
        loss_finite: Every loss since the last step was finite (on every rank).
        grads_finite: Every gradient is finite (on every rank).
        grads_nonzero: Some gradient is non-zero (on some rank).
        scaler: A gradient scaler handles inf gradients itself (fp16 mixed precision).

    Returns:
        ``"nonfinite"``, ``"no_signal"`` (the gradient is exactly zero) or ``"step"``.
    """
    if not loss_finite or not (grads_finite or scaler):
        return "nonfinite"
    if not grads_nonzero:
        return "no_signal"
    return "step"


def drop_gradients(optimizer: Any) -> None:
    """Set every gradient the optimizer would use to ``None``: its ``step()`` then leaves the weights alone."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None


def nonfinite_names(named_tensors: Iterable[tuple[str, Tensor | None]]) -> list[str]:
    """The names of the tensors holding a NaN or inf (this rank's shard of each), for error messages."""
    return [name for name, tensor in named_tensors if tensor is not None and not bool(torch.isfinite(_local(tensor)).all())]


def _local(tensor: Tensor) -> Tensor:
    """The tensor, or this rank's shard of a DTensor (FSDP2), detached."""
    tensor = tensor.detach()
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class StepGuard:
    """The per-module state of the guards: losses seen since the last step and the skip counts.

    Args:
        nonfinite: ``raise`` (stop the run with ``NonFiniteError``) or ``skip`` (skip the
            optimizer step) on a non-finite loss or gradient.

    Example:
        In a LightningModule::

            self.guard = StepGuard(nonfinite)                      # __init__
            self.guard.record_loss(loss)                           # training_step, every (micro-)loss
            def on_before_optimizer_step(self, optimizer):
                self.guard.before_optimizer_step(self, optimizer)
    """

    def __init__(self, nonfinite: NonFinite = "raise") -> None:
        check_nonfinite_option(nonfinite)
        self.nonfinite = nonfinite
        self._bad_loss: Tensor | None = None  # [] bool: a loss since the last step was not finite
        self.skipped = {"no_signal": 0, "nonfinite": 0}  # since the last `pop_skipped`

    def record_loss(self, loss: Tensor) -> None:
        """Note a loss that will reach the next optimizer step (no host sync)."""
        bad = ~torch.isfinite(loss.detach()).all()
        self._bad_loss = bad if self._bad_loss is None else self._bad_loss | bad.to(self._bad_loss.device)

    def before_optimizer_step(self, module: Any, optimizer: Any) -> Outcome:
        """Decide (the same on every rank), then drop the gradients or raise as configured.

        Args:
            module: The LightningModule (its trainer, rank and named parameters are used).
            optimizer: The optimizer about to step.

        Raises:
            NonFiniteError: a non-finite loss or gradient with ``nonfinite="raise"``, or
                non-finite weights in either mode.
        """
        trainer = module.trainer
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grad_bad, grad_nonzero = gradient_flags(params)
        loss_bad = self._bad_loss if self._bad_loss is not None else torch.tensor(False)
        self._bad_loss = None
        local = torch.stack([loss_bad.cpu(), grad_bad.cpu(), grad_nonzero.cpu()]).float()  # [3]
        device = trainer.strategy.root_device
        total = trainer.strategy.reduce(local.to(device), reduce_op="sum").cpu() if trainer.world_size > 1 else local
        scaler = getattr(trainer.strategy.precision_plugin, "scaler", None) is not None
        loss_nonfinite, grads_nonfinite, grads_nonzero = (bool(v > 0) for v in total)
        outcome = decide(not loss_nonfinite, not grads_nonfinite, grads_nonzero, scaler)
        if outcome == "step":
            return outcome
        if outcome == "nonfinite":
            self._on_nonfinite(module, bool(local[0]), bool(local[1]) and not scaler)
        drop_gradients(optimizer)
        self.skipped[outcome] += 1
        return outcome

    def pop_skipped(self) -> dict[str, float]:
        """``train/skipped_steps/<reason>`` → steps skipped since the last call, for logging."""
        counts, self.skipped = self.skipped, {"no_signal": 0, "nonfinite": 0}
        return {f"train/skipped_steps/{reason}": float(n) for reason, n in counts.items()}

    def _on_nonfinite(self, module: Any, loss_bad: bool, grad_bad: bool) -> None:
        step, rank = module.trainer.global_step, module.global_rank
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]  # the weights being trained
        if loss_bad or grad_bad:
            what = "loss" if loss_bad else "gradient"
            where = f"non-finite {what} at global_step={step} on rank {rank}"
            bad = nonfinite_names((n, p.grad) for n, p in named)
            if bad:  # parameter order is not backward order: the first is not necessarily the origin
                where += f" ({len(bad)} of {len(named)} gradient tensors, the first {bad[0]})"
        else:
            where = f"non-finite loss or gradient on another rank at global_step={step} (this is rank {rank})"
        broken = nonfinite_names(named)
        if broken:
            raise NonFiniteError(
                f"{where}, and the weights are already non-finite ({len(broken)} tensors, the first {broken[0]}): "
                "stopping, since skipping cannot recover them; resume from an earlier checkpoint with a lower learning_rate"
            )
        if self.nonfinite == "raise":
            raise NonFiniteError(
                f"{where}: stopping before the optimizer step (the weights are still finite). Lower learning_rate, check "
                "the data and rewards, or set nonfinite: skip to skip such steps"
            )
        log.warning("%s: skipped the optimizer step (nonfinite='skip')", where)
