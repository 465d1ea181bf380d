"""Llama-family layers keeping fewer activations for backward: the gated MLP and RMSNorm.

Autograd keeps four `[tokens, intermediate]` tensors per layer for the MLP's
`down(silu(gate) * up)`: silu's input (the gate), the product's two factors (silu(gate) and up)
and down's input (the product). Two of them are elementwise functions of the other two.
`silu_gated_down` keeps only gate and up and recomputes silu(gate) and the product in the
backward, an elementwise pass beside the two matrix products that backward runs anyway. An
RMSNorm keeps its input, its normalised input and the statistic; `rms_norm_keeping_input` keeps
the input and the statistic (one `[tokens, hidden]` tensor less, twice a layer). On SmolLM2-135M
(30 layers, hidden 576, intermediate 1,536) one 552-token completion's activations shrink by
~280 MB. Values are the same operations as the Hugging Face modules', gradients the same formulas
(PyTorch's silu derivative σ(x)(1 + x(1 − σ(x))); RMSNorm's r(g − n·mean(g·n)) with r the
reciprocal root mean square, n the normalised input, g the gradient reaching it), equal to float
rounding.

`lean_layers(model)` swaps them into the MLPs and RMSNorms of Qwen2, Llama and Mistral models for
the forwards inside it that build a graph outside autocast; modules it does not recognise exactly
(other activations, LoRA or quantised linears, hooks, a forward already replaced on the instance)
keep their own.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from r1_lightning.engines.fast_decode import is_silu, part_types
from r1_lightning.rl.cpu_matmul import mm_nt


class _SiluGatedDown(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, weight, bias):
        ctx.save_for_backward(gate, up, weight)
        ctx.has_bias = bias is not None
        product = F.silu(gate) * up  # [..., I]
        out = mm_nt(product.reshape(-1, product.shape[-1]), weight, bias)  # [M, H]
        return out.view(*gate.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        gate, up, weight = ctx.saved_tensors
        sigmoid = torch.sigmoid(gate)
        silu = gate * sigmoid
        grad_2d = grad.reshape(-1, grad.shape[-1])  # [M, H]
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[2]:
            grad_weight = mm_nt(grad_2d.T, (silu * up).reshape(-1, up.shape[-1]).T)  # [H, I] = grad.T @ product
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad_2d.sum(0)
        grad_product = mm_nt(grad_2d, weight.T).view_as(up)  # [..., I] = grad @ W
        grad_up = grad_product * silu
        grad_gate = grad_product * up * sigmoid * (1 + gate * (1 - sigmoid))
        return grad_gate, grad_up, grad_weight, grad_bias


def silu_gated_down(gate: Tensor, up: Tensor, down: nn.Linear) -> Tensor:
    """`down(F.silu(gate) * up)`, keeping `gate` and `up` (not the two products) for backward."""
    return _SiluGatedDown.apply(gate, up, down.weight, down.bias)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x32 = x.to(torch.float32)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # [..., 1]
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)  # as transformers' RMSNorm

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        normed = x.to(torch.float32) * rstd  # [..., H]
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed.to(x.dtype)).reshape(-1, grad.shape[-1]).sum(0)
        grad_normed = (grad * weight).to(torch.float32)
        grad_x = rstd * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight, None


def rms_norm_keeping_input(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """transformers' Llama/Qwen2 RMSNorm, keeping `x` and the statistic (not the normalised `x`) for backward."""
    return _RMSNorm.apply(x, weight, eps)


def _mlp_forward(self, x: Tensor) -> Tensor:
    return silu_gated_down(self.gate_proj(x), self.up_proj(x), self.down_proj)


def _norm_forward(self, x: Tensor) -> Tensor:
    return rms_norm_keeping_input(x, self.weight, self.variance_epsilon)


def _mlp_swappable(module: nn.Module) -> bool:
    linears = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    return is_silu(getattr(module, "act_fn", None)) and all(type(linear) is nn.Linear and _plain(linear) for linear in linears)


def _plain(module: nn.Module) -> bool:
    return "forward" not in module.__dict__ and not (module._forward_hooks or module._forward_pre_hooks)


def _checkpointed(model: nn.Module) -> bool:
    """Whether Hugging Face's gradient checkpointing is on in `model` (its flag on the model and its layers)."""
    return any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules())


def _autocast_enabled() -> bool:
    return any(torch.is_autocast_enabled(device) for device in ("cpu", "cuda", "xpu"))


@contextlib.contextmanager
def lean_layers(model: nn.Module) -> Iterator[None]:
    """Inside, the recognised gated MLPs and RMSNorms of `model` run `silu_gated_down` and
    `rms_norm_keeping_input` in forwards that build a graph (none under autocast)."""
    if not torch.is_grad_enabled() or _autocast_enabled() or _checkpointed(model):
        # autocast: the backward's dtypes would be autocast's. Hugging Face's gradient checkpointing runs each layer's
        # forward again in the backward, after this context has closed: through the plain forwards, which save other
        # tensors than the lean ones (non-reentrant checkpointing refuses the mismatch), and its layers keep only
        # their inputs anyway.
        yield
        return
    mlps, norms = part_types("MLP"), part_types("RMSNorm")
    swapped = []
    for module in model.modules():
        if type(module) in mlps and _plain(module) and _mlp_swappable(module):
            module.forward = types.MethodType(_mlp_forward, module)
        elif type(module) in norms and _plain(module) and isinstance(getattr(module, "weight", None), Tensor):
            module.forward = types.MethodType(_norm_forward, module)
        else:
            continue
        swapped.append(module)
    try:
        yield
    finally:
        for module in swapped:
            del module.forward
