"""Sums over all ranks for the maths that needs the global batch (a no-op in one process).

Every rank must call these at the same point (they are collectives). Without an initialised
`torch.distributed` process group, or with one rank, the input comes back unchanged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    """Ranks in the default process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_ranks_sum(values: Tensor) -> Tensor:
    """`values` summed over all ranks (same shape), in float64 so counts and sums stay exact."""
    if world_size() == 1:
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    total = values.detach().to(device=device, dtype=torch.float64).clone()
    dist.all_reduce(total)
    return total.to(device=values.device, dtype=values.dtype)
