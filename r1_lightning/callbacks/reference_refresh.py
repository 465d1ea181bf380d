"""Reset the GRPO reference model to the current policy (R1 does it between RL stages)."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from r1_lightning.errors import ConfigError


class ReferenceModelRefresh(Callback):
    """Set the reference to the policy every ``every_n_steps`` optimizer steps and/or when fit starts.

    A hard copy (``alpha = 1``) or a mix-up ``ref ← α·policy + (1-α)·ref``, parameter by parameter:
    under FSDP2 both models are sharded alike, so each rank updates only its own shards and
    no full weight is ever gathered. Under FSDP1 (``FSDPStrategy``) the root unit holds both
    models' embeddings and heads in one flat parameter, sharded at different offsets, so the
    refresh gathers the full weights (``summon_full_params``) and writes the shards back. With LoRA (where the reference is the policy with its
    adapter disabled) a refresh merges the adapter into the base weights and restarts it from
    zero, which makes the reference equal the current policy; only ``alpha = 1`` is possible then.
    The number of refreshes and the last refresh step are saved in checkpoints, and the
    reference weights are part of the module's state, so a resumed run keeps the refreshed one.

    Args:
        every_n_steps: Refresh after every this many optimizer steps (``None``: never during fit).
        at_fit_start: Refresh when a new fit starts (not when it resumes from a checkpoint): a
            new RL stage anchored at its own starting policy.
        alpha: Weight of the policy in the mix-up (1.0 = hard copy).

    Example:
        >>> trainer = L.Trainer(callbacks=[ReferenceModelRefresh(every_n_steps=100, alpha=0.6)])
    """

    def __init__(self, every_n_steps: int | None = None, at_fit_start: bool = False, alpha: float = 1.0) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ConfigError(f"ReferenceModelRefresh: every_n_steps={every_n_steps} must be >= 1 or null")
        if not 0.0 < alpha <= 1.0:
            raise ConfigError(f"ReferenceModelRefresh: alpha={alpha} must be in (0, 1]")
        self.every_n_steps, self.at_fit_start, self.alpha = every_n_steps, at_fit_start, alpha
        self.refreshes, self.last_refresh_step = 0, 0
        self._resumed = False

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_fit_start and not self._resumed:
            self.refresh(pl_module, trainer.global_step)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        # A batch may take several optimizer steps (GRPO mini-batches, μ > 1): refresh on crossing a multiple.
        if self.every_n_steps and trainer.global_step // self.every_n_steps > self.last_refresh_step // self.every_n_steps:
            self.refresh(pl_module, trainer.global_step)

    @torch.no_grad()
    def refresh(self, pl_module: L.LightningModule, step: int) -> None:
        if getattr(pl_module.hparams, "lora", None) is not None:
            if self.alpha != 1.0:
                raise ConfigError("ReferenceModelRefresh: with LoRA only a hard copy (alpha: 1.0) is possible")
            merge_and_restart_adapter(pl_module.model)
        else:
            reference = getattr(pl_module, "ref_model", None)
            if reference is None:
                raise ConfigError("ReferenceModelRefresh needs a reference model (GRPO with beta > 0)")
            with _full_params_under_fsdp1(pl_module):
                mix_into(reference, pl_module.model, self.alpha)
        self.refreshes += 1
        self.last_refresh_step = step

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"refreshes": self.refreshes, "last_refresh_step": self.last_refresh_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.refreshes, self.last_refresh_step = state_dict["refreshes"], state_dict["last_refresh_step"]
        self._resumed = True


@torch.no_grad()
def mix_into(reference: torch.nn.Module, policy: torch.nn.Module, alpha: float) -> None:
    """``ref ← α·policy + (1-α)·ref`` parameter by parameter (and shard by shard for DTensors)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    for module in (*reference.modules(), *policy.modules()):
        if isinstance(module, FSDPModule):
            module.reshard()  # a root unit may still hold its gathered weights from a forward: use the shards
    ref_params, policy_params = dict(reference.named_parameters()), dict(policy.named_parameters())
    if ref_params.keys() != policy_params.keys():
        raise ConfigError("ReferenceModelRefresh: the reference and the policy have different parameters")
    for name, ref in ref_params.items():
        source = policy_params[name].detach()
        if isinstance(ref, DTensor) or isinstance(source, DTensor):
            if not (isinstance(ref, DTensor) and isinstance(source, DTensor)) or (ref.device_mesh, ref.placements) != (
                source.device_mesh, source.placements
            ):
                raise ConfigError(f"ReferenceModelRefresh: {name} is sharded differently in the reference and the policy")
            ref, source = ref.to_local(), source.to_local()  # this rank's shard of each: same slice of the weight
        if ref.shape != source.shape:
            raise ConfigError(f"ReferenceModelRefresh: {name} has shape {tuple(ref.shape)} in the reference, {tuple(source.shape)} in the policy")
        source = source.to(ref.dtype)
        if alpha == 1.0:
            ref.copy_(source)
        else:
            ref.lerp_(source, alpha)


def _full_params_under_fsdp1(pl_module: L.LightningModule):
    """FSDP1's ``summon_full_params`` (with write-back) on the wrapped root; a no-op under other strategies."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    root = getattr(getattr(pl_module, "_trainer", None) and pl_module.trainer.strategy, "model", None)
    if not isinstance(root, FullyShardedDataParallel):
        return nullcontext()
    return FullyShardedDataParallel.summon_full_params(root, writeback=True)


@torch.no_grad()
def merge_and_restart_adapter(model: torch.nn.Module) -> None:
    """Fold the LoRA update into the base weights and zero ``lora_B``: policy unchanged, reference = policy."""
    for module in model.modules():
        if hasattr(module, "merge") and hasattr(module, "lora_B"):
            module.merge()
            module.merged_adapters = []  # keep the merged weights as the new base
            for adapter in module.lora_B.values():
                adapter.weight.zero_()
