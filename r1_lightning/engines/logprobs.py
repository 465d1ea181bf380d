"""Log-probs of chosen tokens without materialising `[rows, vocab]` logits.

With a 152k vocabulary, float32 logits for 8k completion tokens are 4.9 GB, and a plain
`log_softmax` keeps them (and more) alive until the backward pass. The caller gathers the
final hidden states of the completion positions only (`[M, H]`, prompt and padding cost
nothing) and `chunked_token_logprobs` projects them through the LM head `chunk_size` rows
at a time, forward and backward: peak extra memory is O(chunk_size × V), not O(M × V).

The logits are computed in float32 (float64 for float64 inputs): RL is sensitive to small
probability mismatches between the sampler and the trainer, and MiniMax-M1
(https://arxiv.org/abs/2506.13585) traced such a mismatch to a low-precision LM head. For a
bf16 head this costs an upcast copy of the weight per pass and a float32 weight-gradient
accumulator, V × H × 4 bytes each, independent of M. Gradients return in the inputs' dtypes.

`shared_prefix_hidden` cuts the transformer's share for GRPO batches: each prompt runs once
for its G completions (its KV cache is shared, gradients included), and the completions run
in length buckets that skip the padding after short ones.
"""

from __future__ import annotations

import functools
import math
import os
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from r1_lightning.engines.base import cache_argument
from r1_lightning.rl import cpu_matmul
from r1_lightning.rl.cpu_matmul import mm_nt
from r1_lightning.rl.logits import chunk_logits, compute_dtype

try:
    from transformers.cache_utils import DynamicCache, DynamicLayer
except ImportError:  # transformers without per-layer caches: no prompt sharing
    DynamicCache = DynamicLayer = None

if TYPE_CHECKING:
    from r1_lightning.engines.compiled_forward import CompiledLayers

try:
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    _FSDP_MODULES: tuple[type, ...] = (FSDPModule, FullyShardedDataParallel)
except ImportError:  # torch built without distributed support
    _FSDP_MODULES = ()


def selective_log_softmax(logits: Tensor, index: Tensor) -> Tensor:
    """log softmax(logits)[index] in float32 (float64 for float64 logits): the naive reference.

    Args:
        logits: `[..., V]`.
        index: `[...]` chosen token ids.

    Returns:
        `[...]` log-probs. Holds a full float32 copy of `logits` (and keeps the
        `log_softmax` output for backward); for tests and small vocabularies.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.log_softmax(logits, dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)


# Rows per block of the exp-and-sum passes: their scratch is [SCRATCH_ROWS, V], not a second [C, V].
SCRATCH_ROWS = 64
# Without a `chunk_size`, a chunk's `[C, V]` float32 logits take at most this much: 1,024 rows up to a 16,384-token
# vocabulary, fewer above it (341 at SmolLM2's 49,152, 110 at Qwen2's 151,936), so the head's buffer does not grow
# with the vocabulary. The buffer lives while the forward's activations are all held (end of forward, start of
# backward), so it adds to the step's peak: at 151,936 and 2,048-token completions a 1,024-row chunk (622 MB) was a
# fifth of it. 110 to 441 rows at 151,936, and 128 to 512 at 49,152, ran head forward + backward equally fast (benchmarks/).
CHUNK_LOGITS_BYTES = 64 << 20
MAX_CHUNK_ROWS = 1024


def default_chunk_rows(vocab_size: int) -> int:
    """Rows per LM-head chunk when none is given: ``CHUNK_LOGITS_BYTES`` of float32 logits, within
    [SCRATCH_ROWS, MAX_CHUNK_ROWS]."""
    return max(SCRATCH_ROWS, min(MAX_CHUNK_ROWS, CHUNK_LOGITS_BYTES // (4 * vocab_size)))


def _forward_chunk(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, temperature: float, with_entropy: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """log p(target), logsumexp and (optionally) entropy of `C` rows in one `[C, V]` buffer, which dies on return."""
    logits = chunk_logits(hidden, weight, bias, temperature)  # [C, V]
    peak = logits.amax(dim=-1)  # [C]
    shifted = logits.sub_(peak[:, None])  # [C, V] z - max, in place: torch.logsumexp would allocate a copy
    # One exp pass serves both sums: Z = Σ e^z and, for the entropy log Z - Σ e^z z / Z, Σ e^z z.
    sums, weighted = [], []
    for block in shifted.split(SCRATCH_ROWS):
        e = block.exp()  # [SCRATCH_ROWS, V] scratch
        sums.append(e.sum(dim=-1))
        if with_entropy:
            weighted.append(e.mul_(block).sum(dim=-1))
    log_z = torch.cat(sums).log_()  # [C]
    logprobs = shifted.gather(-1, targets[:, None]).squeeze(-1) - log_z  # [C]
    entropy = log_z - torch.cat(weighted) / log_z.exp() if with_entropy else None  # [C]
    return logprobs, peak + log_z, entropy


def _backward_chunk(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, lse: Tensor, grad: Tensor,
    temperature: float, grad_weight: Tensor | None, grad_bias: Tensor | None,
) -> Tensor:
    """Accumulate `C` rows' weight/bias gradients in place and return their hidden gradient `[C, H]`."""
    # d log p(y) / d z = onehot(y) - softmax(z), with z = (h W^T + b) / τ.
    grad_logits = chunk_logits(hidden, weight, bias, temperature).sub_(lse[:, None]).exp_()  # [C, V] softmax
    grad_logits.mul_(-grad[:, None]).scatter_add_(1, targets[:, None], grad[:, None])  # g · (onehot - p)
    if temperature != 1.0:
        grad_logits.div_(temperature)
    if grad_weight is not None:
        _accumulate_weight_grad(grad_weight, grad_logits, hidden.to(weight.dtype))  # [V, H]
    if grad_bias is not None:
        grad_bias += grad_logits.sum(dim=0)  # [V]
    return mm_nt(grad_logits, weight.T)  # [C, H] = grad_logits @ W


# Vocabulary rows per block of the head's weight-gradient product where it runs through oneDNN, which
# writes a fresh output: a [block, H] temporary instead of a second [V, H] one.
WEIGHT_GRAD_BLOCK = 8192


def _accumulate_weight_grad(grad_weight: Tensor, grad_logits: Tensor, hidden: Tensor) -> None:
    """grad_weight [V, H] += grad_logits.T [V, C] @ hidden [C, H]."""
    if not cpu_matmul.eligible(grad_weight, grad_logits, hidden):
        grad_weight.addmm_(grad_logits.T, hidden)
        return
    for start in range(0, grad_weight.shape[0], WEIGHT_GRAD_BLOCK):
        block = slice(start, start + WEIGHT_GRAD_BLOCK)
        grad_weight[block] += mm_nt(grad_logits[:, block].T, hidden.T)  # [block, H]


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """Forward keeps no logits (saves inputs + per-row logsumexp); backward recomputes them per chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, with_entropy):
        dtype = compute_dtype(hidden, weight, bias)
        w, b = weight.to(dtype), (bias.to(dtype) if bias is not None else None)  # [V, H], [V]
        logprobs = hidden.new_empty(hidden.shape[0], dtype=dtype)  # [M]
        lse = torch.empty_like(logprobs)  # [M]
        entropy = torch.empty_like(logprobs) if with_entropy else logprobs.new_empty(0)  # [M]
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], chunk_size):
                rows = slice(s, s + chunk_size)
                lp, chunk_lse, ent = _forward_chunk(hidden[rows], w, b, targets[rows], temperature, with_entropy)
                logprobs[rows], lse[rows] = lp, chunk_lse
                if with_entropy:
                    entropy[rows] = ent
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        dtype = compute_dtype(hidden, weight, bias)
        w, b = weight.to(dtype), (bias.to(dtype) if bias is not None else None)  # [V, H], [V]
        g = grad_logprobs.to(dtype)  # [M]
        grad_hidden = torch.empty_like(hidden)  # [M, H]
        grad_w = torch.zeros_like(w) if ctx.needs_input_grad[1] else None  # [V, H], in the compute dtype
        grad_b = torch.zeros_like(b) if ctx.needs_input_grad[2] else None  # [V]
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], ctx.chunk_size):
                rows = slice(s, s + ctx.chunk_size)
                grad_hidden[rows] = _backward_chunk(
                    hidden[rows], w, b, targets[rows], lse[rows], g[rows], ctx.temperature, grad_w, grad_b
                )
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
        return grad_hidden, grad_w, grad_b, None, None, None, None


def chunked_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    return_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """log π(target) = log_softmax((hidden @ weight.T + bias) / temperature)[target], chunked.

    Equals `selective_log_softmax(lm_head(hidden) / temperature, targets)` in value and
    gradient (wrt `hidden`, `weight`, `bias`), but neither pass ever holds more than
    `chunk_size × V` logits: the backward recomputes each chunk's logits from the saved
    inputs and the per-row logsumexp.

    Args:
        hidden: Final hidden states of the positions that predict `targets`, `[M, H]`
            (or `[..., H]`), any float dtype.
        weight: LM-head weight, `[V, H]`.
        targets: Chosen token ids, `[M]` (or `[...]`).
        bias: Optional LM-head bias, `[V]`.
        temperature: The sampling temperature the policy is scored at.
        chunk_size: Rows per chunk; the extra memory is one `chunk_size × V` float32 buffer
            (plus `SCRATCH_ROWS × V` scratch). Default: `default_chunk_rows(V)`.
        return_entropy: Also return the entropy of each row's (temperature-scaled) distribution,
            detached, for logging.

    Returns:
        Float32 log-probs shaped like `targets`, and the entropies (same shape) or `None`.
    """
    if chunk_size is None:
        chunk_size = default_chunk_rows(weight.shape[0])
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    if hidden.shape[:-1] != targets.shape or hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and targets {tuple(targets.shape)} "
            "must be [..., H], [V, H] and [...]"
        )
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1).long()  # [M, H], [M]
    logprobs, entropy = _ChunkedTokenLogprobs.apply(
        flat_hidden, weight, bias, flat_targets, float(temperature), chunk_size, return_entropy
    )
    return logprobs.view(targets.shape), (entropy.view(targets.shape) if return_entropy else None)


# One more forward + backward call costs about as much as this many token positions on the tiny
# CPU model (~7 ms a call, ~0.1 ms a position); a length bucket is split off only when it saves more.
# Swept 0 / 32 / 64 / 128: 64 and 128 were best (benchmarks/README.md).
BUCKET_OVERHEAD_TOKENS = 64

# transformers' switch for SDPA's own grouped-query attention (`enable_gqa`); it is read at every call.
# Versions without it (5.19 and older) decide in `sdpa_attention.use_gqa_in_sdpa`, which is swapped instead.
_FORCE_GQA = "TRANSFORMERS_SDPA_FORCE_GQA"
try:
    from transformers.integrations import sdpa_attention as _sdpa_attention
except ImportError:  # transformers without the SDPA integration module: nothing to swap
    _sdpa_attention = None


def _grouped_kv_attention_on_cpu(fn):
    """Run `fn(backbone, input_ids, ...)` with SDPA reading each KV head in place for its query heads, on CPU.

    With a mask, transformers copies every KV head to each of its query heads (`repeat_kv`) before
    SDPA, because CUDA's fast kernels take grouped heads only without a mask; CPU's flash kernel takes
    both. Attention values are the same bit for bit (each query head meets the same keys), KV
    gradients sum the query heads in another order (equal to float rounding); on the tiny benchmark
    model, reference forward + policy forward + backward took 6% less time. A user's own setting wins.
    """

    @functools.wraps(fn)
    def wrapper(backbone, input_ids, *args, **kwargs):
        if input_ids.device.type != "cpu" or _FORCE_GQA in os.environ:
            return fn(backbone, input_ids, *args, **kwargs)
        os.environ[_FORCE_GQA] = "1"
        decide = getattr(_sdpa_attention, "use_gqa_in_sdpa", None)
        if decide is not None:
            _sdpa_attention.use_gqa_in_sdpa = _always_grouped
        try:
            return fn(backbone, input_ids, *args, **kwargs)
        finally:
            os.environ.pop(_FORCE_GQA, None)
            if decide is not None:
                _sdpa_attention.use_gqa_in_sdpa = decide

    return wrapper


def _always_grouped(*args, **kwargs) -> bool:
    return True


@_grouped_kv_attention_on_cpu
def shared_prefix_hidden(
    backbone: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    position_ids: Tensor,
    prefix_length: int,
    suffix_lengths: Tensor | None = None,
    layers: CompiledLayers | None = None,
    recompute: bool = False,
) -> Tensor | None:
    """Final hidden states `[N, L, H]`: each distinct prefix run once, the suffixes in length buckets.

    GRPO scores G completions of every prompt: rows `b*G ... b*G+G-1` share their prompt. Each run
    of identical consecutive prefixes (ids, mask and positions) goes through the model once; its
    KV cache is then copied to the rows that share it (an `index_select`, differentiable, so
    gradients flow back into the shared prompt) and only the suffixes run on top of it. The
    suffixes run in buckets of similar length, each cut to its longest row, so the padding after
    a short completion costs nothing (`length_buckets`). The result equals the backbone's hidden
    states on the whole rows, up to float rounding, wherever a caller needs them.

    Args:
        backbone: The transformer body (hidden states out; see `backbone_and_head`).
        input_ids: `[N, L]`.
        attention_mask: `[N, L]` 0/1.
        position_ids: `[N, L]`.
        prefix_length: P, the width of the (left-padded) prompt block.
        suffix_lengths: `[N]` leading suffix positions whose hidden states are needed (default all
            `L - P`); the others come back as zeros.
        layers: Run the passes through these compiled decoder layers (`engines.compiled_forward`) instead
            of the backbone's forward.
        recompute: With `layers`, the suffixes' layers keep only their inputs and run again in the backward
            (`CompiledLayers.suffix`); the passes then run this way even where sharing saves nothing.

    Returns:
        `[N, L, H]`, or None where this does not apply or saves nothing (no repeated prefix and no
        padding to skip; packed rows; gradient checkpointing or a sharded model, which need one
        forward per step; cache layers other than plain `DynamicLayer`): the caller then runs the
        whole rows.
    """
    if recompute and layers is None:
        raise ValueError("recompute needs the layer functions (layers=CompiledLayers(model, compile=False))")
    n, width = input_ids.shape
    if attention_mask is None or position_ids is None or not 0 < prefix_length < width:
        return None
    if layers is None and not _can_share_prefix(backbone):  # the layer functions use no cache, hooks or shards
        return None
    suffix = width - prefix_length
    lengths = [suffix] * n if suffix_lengths is None else suffix_lengths.clamp(0, suffix).tolist()
    prefix = torch.cat([input_ids[:, :prefix_length], attention_mask[:, :prefix_length].long(), position_ids[:, :prefix_length]], 1)
    starts = torch.ones(n, dtype=torch.bool, device=input_ids.device)  # [N] True where a new prefix begins
    starts[1:] = (prefix[1:] != prefix[:-1]).any(-1)
    first = starts.nonzero().squeeze(1)  # [U]
    buckets = length_buckets(lengths, BUCKET_OVERHEAD_TOKENS)
    if not recompute and first.numel() == n and sum(len(rows) * longest for rows, longest in buckets) == n * suffix:
        return None
    prompts = input_ids[first, :prefix_length], attention_mask[first, :prefix_length], position_ids[first, :prefix_length]
    if layers is not None:
        head, kv = layers.prefix(*prompts)  # [U, P, H], per layer [U, kv, P, D] keys and values
    else:
        cache = DynamicCache(config=backbone.config)
        if any(type(layer) is not DynamicLayer for layer in getattr(cache, "layers", [])):
            return None
        head = backbone(
            input_ids=prompts[0], attention_mask=prompts[1], position_ids=prompts[2], use_cache=True, **cache_argument(backbone, cache),
        ).last_hidden_state  # [U, P, H]
    owner = starts.cumsum(0) - 1  # [N] index of each row's prefix
    pieces, order = [], []
    for rows, longest in buckets:
        index = torch.tensor(rows, device=input_ids.device)
        columns, seen = slice(prefix_length, prefix_length + longest), slice(0, prefix_length + longest)
        if layers is not None:
            past = [(keys.index_select(0, owner[index]), values.index_select(0, owner[index])) for keys, values in kv]
            tail = layers.suffix(
                input_ids[index, columns], attention_mask[index, seen], position_ids[index, columns], past, recompute
            )
        else:
            tail = backbone(
                input_ids=input_ids[index, columns], attention_mask=attention_mask[index, seen],
                position_ids=position_ids[index, columns], use_cache=True, **cache_argument(backbone, _select_rows(cache, owner[index])),
            ).last_hidden_state  # [n_b, longest, H]
        pieces.append(torch.nn.functional.pad(tail, (0, 0, 0, suffix - longest)))  # [n_b, L-P, H]
        order += rows
    skipped = [row for row, length in enumerate(lengths) if length == 0]
    if skipped:
        pieces.append(head.new_zeros(len(skipped), suffix, head.shape[-1]))
        order += skipped
    inverse = torch.empty(n, dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(n)
    tails = torch.cat(pieces).index_select(0, inverse.to(head.device))  # [N, L-P, H]
    return torch.cat([head.index_select(0, owner), tails], dim=1)  # [N, L, H]


def length_buckets(lengths: list[int], overhead: int) -> list[tuple[list[int], int]]:
    """Group rows of similar length: minimise Σ rows × longest + `overhead` per group (rows of length 0 left out).

    Returns `(row indices, longest length)` per bucket, shortest first. An optimal grouping of
    length-sorted rows is contiguous, so a dynamic programme over the distinct lengths finds it.
    """
    by_length: dict[int, list[int]] = {}
    for row, length in enumerate(lengths):
        if length > 0:
            by_length.setdefault(length, []).append(row)
    distinct = sorted(by_length)
    counts = [0]
    for length in distinct:
        counts.append(counts[-1] + len(by_length[length]))
    best, cut = [0.0] + [math.inf] * len(distinct), [0] * (len(distinct) + 1)
    for j in range(1, len(distinct) + 1):  # bucket = distinct lengths i..j-1, padded to distinct[j-1]
        for i in range(j):
            cost = best[i] + (counts[j] - counts[i]) * distinct[j - 1] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    buckets, j = [], len(distinct)
    while j:
        i = cut[j]
        buckets.append(([row for length in distinct[i:j] for row in by_length[length]], distinct[j - 1]))
        j = i
    return buckets[::-1]


def _select_rows(cache, index: Tensor):
    """A new `DynamicCache` holding rows `index` of `cache` (differentiable)."""
    selected = DynamicCache()
    for layer_idx, layer in enumerate(cache.layers):
        selected.update(layer.keys.index_select(0, index), layer.values.index_select(0, index), layer_idx)
    return selected


def _can_share_prefix(backbone: torch.nn.Module) -> bool:
    if DynamicCache is None:
        return False
    for module in backbone.modules():
        if isinstance(module, _FSDP_MODULES) or (module.training and getattr(module, "gradient_checkpointing", False)):
            return False
    return True
