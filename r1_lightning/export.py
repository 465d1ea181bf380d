"""Write the trained policy as a Hugging Face directory that the next stage loads by path."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch

from r1_lightning.policy import unwrap_model


def log_dir(trainer: L.Trainer) -> Path:
    """The trainer's log directory: the logger's version dir, or ``default_root_dir`` without a logger."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def export_hf_model(trainer: L.Trainer, model: torch.nn.Module, tokenizer, subdir: str = "hf_model") -> Path:
    """Gather a full state dict (sharded or not), merge any LoRA adapter, and save once on rank 0.

    Every rank must call this (the gather is a collective). A LoRA model is exported merged, and
    keeps its adapter. Returns the directory.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    target = log_dir(trainer) / subdir
    if hasattr(model, "merge_adapter"):
        state_dict = merged_lora_state_dict(model)
    else:
        state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if trainer.is_global_zero:
        hf = unwrap_model(model)
        os.makedirs(target, exist_ok=True)
        state_dict = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        hf.save_pretrained(target, state_dict=state_dict)
        tokenizer.save_pretrained(target)
    trainer.strategy.barrier("export_hf_model")
    return target


def merged_lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The plain model's weights with the LoRA update folded in; the live model keeps its adapter."""
    model.merge_adapter()
    try:
        base = model.get_base_model().state_dict()
        return {k.replace(".base_layer.", "."): v.detach().clone() for k, v in base.items() if "lora_" not in k}
    finally:
        model.unmerge_adapter()
