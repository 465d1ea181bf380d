"""Completion queries attending to [prompt; completion] keys, with the completion's causal half skipped (CPU).

GRPO's training forwards run each prompt once and the completions on top of its keys and values
(`logprobs.shared_prefix_hidden`). A completion query then sees every prompt key (but padding) and the
completion keys up to its own position. As one SDPA call with that mask, PyTorch's CPU flash kernel scores
every (query, key) pair: a mask cannot tell it which blocks are empty, only `is_causal` can, and `is_causal`
aligns the diagonal at the top left, which holds for the completion's square part alone. So the attention
runs as two flash calls, the prompt part (mask, no causality) and the completion part (`is_causal`: key
blocks past the diagonal skipped), merged by their log-sum-exps:

    lse = logaddexp(lse_p, lse_c),   out = exp(lse_p - lse) * out_p + exp(lse_c - lse) * out_c.

The backward needs no merge of its own: the flash backward of each part, given the merged output and
log-sum-exp, computes the attention probabilities of that part's keys as they are in the whole softmax, so
its query gradients add up and its key and value gradients are the part's own. Values and gradients equal
the single masked call's to float rounding (tests/test_suffix_attention.py).

The kernel splits keys into blocks of 512 (`kvSplitSize` in ATen's `FlashAttentionKernel.cpp`), so a
completion shorter than that skips nothing; `MIN_COMPLETION_LENGTH` is where it pays. One core of an
AVX-512 AMD EPYC, SmolLM2-135M's heads (9 query, 3 KV, 64 dims), a 42-token prompt, forward and backward of
one completion (one-off script, two alternating repeats): 512 tokens 35.5 vs 36.4-42.2 ms (no gain);
768: 70-80 vs 58-61 ms; 1,024: 134-138 vs 96-97 ms; 2,048: 508-522 vs 296-335 ms.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Completion lengths from which the split pays (module docstring); shorter completions keep one masked call.
MIN_COMPLETION_LENGTH = 768

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def applies(prompt_mask: Tensor, completion_mask: Tensor) -> bool:
    """Whether `causal_suffix_attention` stands in for the masked call here: CPU, a completion at least
    `MIN_COMPLETION_LENGTH` wide whose mask is each row's leading positions (padding only after them, as GRPO's
    completions end), and at least one prompt key in every row (a row of only masked keys has no softmax).

    Args:
        prompt_mask: `[n, P]` 0/1 over the prompt positions.
        completion_mask: `[n, S]` 0/1 over the completion positions.
    """
    if completion_mask.device.type != "cpu" or completion_mask.shape[1] < MIN_COMPLETION_LENGTH:
        return False
    leading = completion_mask.bool().cummin(dim=1).values  # [n, S]: True up to each row's first 0
    return bool(torch.equal(leading, completion_mask.bool()) and prompt_mask.bool().any(dim=1).all())


def additive_prompt_mask(prompt_mask: Tensor, queries: int, dtype: torch.dtype) -> Tensor:
    """The prompt part's mask as the flash kernel takes it: `[n, 1, queries, P]`, 0 at keys and -inf at padding."""
    blocked = ~prompt_mask.bool()[:, None, None, :]  # [n, 1, 1, P]
    additive = torch.zeros(blocked.shape, dtype=dtype, device=prompt_mask.device).masked_fill(blocked, float("-inf"))
    return additive.expand(-1, -1, queries, -1)


def causal_suffix_attention(
    query: Tensor, prompt_keys: Tensor, prompt_values: Tensor, keys: Tensor, values: Tensor, prompt_mask: Tensor, scale: float
) -> Tensor:
    """Attention output `[n, h, S, D]` of completion queries over prompt keys (masked by `prompt_mask`) and
    completion keys (causally): the same as one SDPA call with the combined mask, and GQA (`kv` dividing `h`).

    Args:
        query: `[n, h, S, D]`, the completion positions.
        prompt_keys: `[n, kv, P, D]`; `prompt_values` likewise.
        keys: `[n, kv, S, D]`, the completion positions; `values` likewise.
        prompt_mask: `[n, 1, S, P]` additive (`additive_prompt_mask`), in the query's dtype.
        scale: The softmax scale.
    """
    return _CausalSuffixAttention.apply(query, prompt_keys, prompt_values, keys, values, prompt_mask, scale)


class _CausalSuffixAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, prompt_keys, prompt_values, keys, values, prompt_mask, scale):
        out_prompt, lse_prompt = _flash(query, prompt_keys, prompt_values, 0.0, False, attn_mask=prompt_mask, scale=scale)[:2]
        out_completion, lse_completion = _flash(query, keys, values, 0.0, True, scale=scale)[:2]
        lse = torch.logaddexp(lse_prompt, lse_completion)  # [n, h, S] float32
        out = torch.exp(lse_prompt - lse)[..., None] * out_prompt + torch.exp(lse_completion - lse)[..., None] * out_completion
        out = out.to(query.dtype)
        ctx.save_for_backward(query, prompt_keys, prompt_values, keys, values, prompt_mask, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):
        query, prompt_keys, prompt_values, keys, values, prompt_mask, out, lse = ctx.saved_tensors
        dq_prompt, dk_prompt, dv_prompt = _flash_backward(
            grad, query, prompt_keys, prompt_values, out, lse, 0.0, False, attn_mask=prompt_mask, scale=ctx.scale
        )
        dq_completion, dk, dv = _flash_backward(grad, query, keys, values, out, lse, 0.0, True, scale=ctx.scale)
        return dq_prompt + dq_completion, dk_prompt, dv_prompt, dk, dv, None, None
