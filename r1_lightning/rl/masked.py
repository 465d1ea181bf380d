"""Masked reductions over completion tokens.

Positions outside the mask are selected away with `torch.where` rather than multiplied
by zero, so a NaN or inf sitting at a padding position (e.g. a log-prob of `-inf`)
never leaks into the result or its gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_sum(values: Tensor, mask: Tensor, dim: int | None = None, keepdim: bool = False) -> Tensor:
    """Sum of `values` where `mask` is true (or non-zero).

    Args:
        values: Any shape, e.g. `[B*G, T]`.
        mask: Same shape as `values`; bool or 0/1.
        dim: Dimension to reduce; `None` reduces everything to a scalar.
        keepdim: Keep the reduced dimension (only with `dim`).
    """
    kept = torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))
    return kept.sum() if dim is None else kept.sum(dim=dim, keepdim=keepdim)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None, keepdim: bool = False) -> Tensor:
    """Mean of `values` over the positions where `mask` is true.

    A row (or a whole tensor) with no true position has mean 0, not NaN: an empty
    completion contributes nothing instead of poisoning the batch.
    """
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim=dim, keepdim=keepdim)
    return masked_sum(values, mask, dim, keepdim) / count.clamp(min=1).to(values.dtype)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of `values` over the positions where `mask` is true (a scalar).

    With fewer than two positions (`unbiased`) or none at all the variance is 0.
    """
    count = mask.bool().sum()
    centred = values - masked_mean(values, mask)
    denom = (count - 1) if unbiased else count
    return masked_sum(centred.square(), mask) / denom.clamp(min=1).to(values.dtype)
