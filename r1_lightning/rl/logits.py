"""Logits of a chunk of hidden states through an LM head, in the dtype the log-prob kernels compute in."""

from __future__ import annotations

import torch
from torch import Tensor

from r1_lightning.rl.cpu_matmul import mm_nt


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float32, or float64 when an input is float64 (exact gradchecks)."""
    dtype = torch.float32
    for t in tensors:
        dtype = dtype if t is None else torch.promote_types(dtype, t.dtype)
    return dtype


def chunk_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, temperature: float) -> Tensor:
    """`[C, V]` logits of `[C, H]` hidden states through an LM head already in the compute dtype, divided by `temperature`."""
    hidden = hidden.to(weight.dtype)  # [C, H], weight is already in the compute dtype
    logits = mm_nt(hidden, weight, bias)  # [C, V]
    return logits.div_(temperature) if temperature != 1.0 else logits
