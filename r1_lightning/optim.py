"""AdamW with linear warm-up and cosine decay, shared by every module, and where its memory lives."""

from __future__ import annotations

import math
import mmap
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


def allocate_adam_state(optimizer: torch.optim.Optimizer) -> int:
    """Create the state torch's ``Adam``/``AdamW`` would create lazily at their first step, now; returns the
    number of parameters given state.

    The moments are as large as the weights twice over. Created lazily, they land in whatever heap the first
    step's activations and gradients have just freed, and on CPU that fragmented heap stays resident; created
    before the first rollout, they sit with the weights. The state is exactly torch's (``step`` a CPU scalar,
    zero moments shaped and strided like the parameter): the steps that follow are bit-identical. Parameters
    that already have state (a restored checkpoint) keep it; other optimizers, and fused, capturable or
    differentiable groups (their ``step`` lives elsewhere), are left to initialise themselves.
    """
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return 0
    step_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    allocated = 0
    for group in optimizer.param_groups:
        if group.get("fused") or group.get("capturable") or group.get("differentiable"):
            continue
        for p in group["params"]:
            state = optimizer.state[p]
            if len(state) > 0 or p.is_sparse:
                continue
            state["step"] = torch.tensor(0.0, dtype=step_dtype, device="cpu")
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            allocated += 1
    return allocated


# glibc's ceiling for its mmap threshold: a larger request gets a mapping of its own, handed back at free;
# smaller ones come from the heap.
GLIBC_HEAP_REQUEST_LIMIT = 32 * 2**20


def mapped_zeros(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.zeros(numel)``, on CPU in an anonymous mapping of its own: the kernel zeroes its pages as they are
    first touched and takes them back the moment the tensor is freed. (A request that fits the heap's free space
    is served from it, so a large ``torch.zeros`` can land in, and then hold open, the middle of the heap.)"""
    if torch.device(device).type != "cpu" or numel == 0:
        return torch.zeros(numel, dtype=dtype, device=device)
    return torch.frombuffer(mmap.mmap(-1, numel * dtype.itemsize), dtype=dtype, count=numel)  # keeps the mapping alive


class FlatGradients:
    """Each optimizer step's gradients in one zeroed block of their own, handed back whole when they are set to ``None``.

    On CPU, backward allocates each parameter's gradient when it arrives, in between the activations and their
    gradients, out of glibc's heap; so would one large ``torch.zeros`` wherever the heap has room (after a
    rollout, it has). Either way the heap grows by the gradients and keeps that size: freed heap in between
    live blocks is not returned to the system. The block is an anonymous mapping instead (``mapped_zeros``):
    the heap is left to the activations, and ``zero_grad(set_to_none=True)`` unmaps the gradients. With
    ``allocate_adam_state``, GRPO's peak RSS on SmolLM2-135M at 512-token completions went from 4,716 to
    4,475–4,635 MiB (benchmarks/README.md).
    Parameters above ``GLIBC_HEAP_REQUEST_LIMIT`` are mapped on their own by glibc already and keep torch's
    gradient, which backward hands over without a copy.

    Parameters that received no gradient when the optimizer steps get ``grad=None`` back (``drop_unreceived``),
    so ``torch.optim`` leaves them alone exactly as it would without the block: the steps are bit-identical.
    Meant for one process: DDP and FSDP place the gradients themselves.

    Example:
        >>> grads = FlatGradients(model.parameters())
        >>> grads.allocate()  # before the step's first backward
        >>> loss.backward()
        >>> grads.drop_unreceived()  # before clipping and ``optimizer.step()``
        >>> optimizer.step(); optimizer.zero_grad(set_to_none=True)
    """

    def __init__(self, parameters: Iterable[torch.nn.Parameter]):
        params = [p for p in parameters if p.requires_grad]
        self.parameters = [
            p for p in params
            if p.is_contiguous() and p.dtype == params[0].dtype and p.device == params[0].device
            and p.numel() * p.element_size() < GLIBC_HEAP_REQUEST_LIMIT
        ]
        self._received: set[int] = set()
        self._active = False
        self._hooks = [p.register_post_accumulate_grad_hook(self._receive) for p in self.parameters]

    def _receive(self, param: torch.Tensor) -> None:
        self._received.add(id(param))

    def allocate(self) -> None:
        """Point every parameter's ``grad`` into one zeroed block; a no-op while any of them still has a gradient."""
        self._active = bool(self.parameters) and all(p.grad is None for p in self.parameters)
        if not self._active:
            return
        flat = mapped_zeros(sum(p.numel() for p in self.parameters), self.parameters[0].dtype, self.parameters[0].device)
        offset = 0
        for p in self.parameters:
            p.grad = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        self._received.clear()

    def drop_unreceived(self) -> None:
        """``grad=None`` for the parameters backward gave nothing since ``allocate``."""
        if self._active:
            for p in self.parameters:
                if id(p) not in self._received:
                    p.grad = None
            self._active = False

    def remove(self) -> None:
        """Detach from the parameters (their gradients go back to torch's own allocation)."""
        for hook in self._hooks:
            hook.remove()
        self.parameters, self._hooks, self._active = [], [], False


def place_optimizer_memory(optimizer: torch.optim.Optimizer, device: torch.device, world_size: int) -> FlatGradients:
    """On CPU, keep the optimizer's memory out of the heap the steps' activations churn through: Adam's state now
    (``allocate_adam_state``), and, in one process, each step's gradients in a mapping of their own (the returned
    ``FlatGradients``; inert elsewhere: GPUs, and DDP/FSDP, which place the gradients themselves)."""
    if torch.device(device).type != "cpu":
        return FlatGradients([])
    allocate_adam_state(optimizer)
    return FlatGradients([p for group in optimizer.param_groups for p in group["params"]] if world_size == 1 else [])


def total_training_steps(trainer) -> int:
    """Optimizer steps the trainer will take (``max_steps`` or epochs × batches)."""
    steps = trainer.estimated_stepping_batches
    return int(steps) if math.isfinite(steps) else 1
