"""Write the trained policy as a Hugging Face directory that the next stage loads by path."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from r1_lightning.atomic import directory_writer
from r1_lightning.policy import unwrap_model


def log_dir(trainer: L.Trainer) -> Path:
    """The trainer's log directory: the logger's version dir, or ``default_root_dir`` without a logger."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def export_hf_model(trainer: L.Trainer, model: torch.nn.Module, tokenizer, subdir: str = "hf_model") -> Path:
    """Gather a full state dict (sharded or not), merge any LoRA adapter, and save once on rank 0.

    Every rank must call this (the gather is a collective). A LoRA model is exported merged, and
    keeps its adapter. The directory is replaced whole (``save_hf_directory``). Returns the directory.
    """
    target = log_dir(trainer) / subdir
    if hasattr(model, "merge_adapter"):
        state_dict = merged_lora_state_dict(model)
    else:
        state_dict = full_state_dict(trainer, model)
    if trainer.is_global_zero:
        state_dict = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        save_hf_directory(target, unwrap_model(model), tokenizer, state_dict)
    trainer.strategy.barrier("export_hf_model")
    return target


def save_hf_directory(target: Path, model: torch.nn.Module, tokenizer, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """``save_pretrained`` of the model and tokenizer into ``target``, atomically.

    Everything is written into a temporary sibling, fsynced and renamed over ``target``: a failed
    or killed write (disk full, a file-size limit) leaves the previous export whole, never new
    ``config.json`` beside old weights. A killed write's leftovers go at the next export.
    """
    with directory_writer(target) as temporary:
        model.save_pretrained(temporary, state_dict=state_dict)
        tokenizer.save_pretrained(temporary)


def full_state_dict(trainer: L.Trainer, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s full (unsharded) weights on rank 0, on CPU; other ranks may get an empty dict.

    FSDP2 (DTensor parameters) and plain/DDP models are gathered from ``model`` itself. Under FSDP1
    (``FSDPStrategy``) the flat parameters belong to units wrapped around the whole LightningModule,
    so the gather starts at the strategy's wrapped root and keeps ``model``'s keys.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    root = getattr(trainer.strategy, "model", None)
    if root is None or not _is_fsdp1(root) or root is model:
        state_dict = get_model_state_dict(model, options=options)
    else:
        prefix = next(name for name, module in trainer.lightning_module.named_modules() if module is model) + "."
        state_dict = get_model_state_dict(root, options=options)
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return _without_tied_copies(model, state_dict)


def _without_tied_copies(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep one name of each tied parameter (e.g. the embedding, not the LM head tied to it).

    A gathered full state dict holds separate copies of tied weights, which ``save_pretrained``
    would then write twice; the unsharded model's own export writes the first name only.
    """
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    tied = {name for group in names.values() for name in group[1:]}
    return {k: v for k, v in state_dict.items() if k not in tied}


def _is_fsdp1(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) for m in module.modules())


def merged_lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The plain model's weights with the LoRA update folded in; the live model keeps its adapter."""
    model.merge_adapter()
    try:
        base = model.get_base_model().state_dict()
        return {k.replace(".base_layer.", "."): v.detach().clone() for k, v in base.items() if "lora_" not in k}
    finally:
        model.unmerge_adapter()
