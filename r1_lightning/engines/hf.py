"""`HFGenerateEngine`: a KV-cached decode loop on the policy itself, any Hugging Face causal LM.

Why not `model.generate`: the loop below gets each sampled token's log-prob for free
(no second forward pass for `old_logprobs`), runs the prompt through the model once per
prompt rather than once per completion, and keeps every rank of a sharded (FSDP) model
stepping in lockstep.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
import torch.distributed as dist
from torch import Tensor, nn
from typing_extensions import override

from r1_lightning.engines.base import (
    Rollout, RolloutEngine, SamplingParams, cache_argument, check_generate_request, left_pad, model_device, output_cache,
)
from r1_lightning.engines.fast_decode import fast_decode_step
from r1_lightning.engines.kv_cache import preallocate
from r1_lightning.rl.cpu_matmul import onednn_linears
from r1_lightning.rl.groups import per_completion

# Finished rows leave the decode batch once they are this fraction of it (a KV-cache copy each time).
COMPACT_FRACTION = 1 / 8

try:
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    _FSDP_MODULES: tuple[type, ...] = (FSDPModule, FullyShardedDataParallel)
except ImportError:  # torch built without distributed support
    _FSDP_MODULES = ()


class HFGenerateEngine(RolloutEngine):
    """KV-cached sampling loop on a Hugging Face causal LM.

    Each distinct prompt is prefilled once; its KV cache is then copied G times and the
    `B*G` completions decode together. Once an eighth of the rows in the batch have finished,
    they leave it (their KV cache rows too; `compact_rows`), so a step costs what the rows
    still running cost; the rest of the loop, and the sampling noise every row draws, are those
    of a batch that keeps every row (same tokens). A rank whose rows are all done keeps stepping
    its last rows until every rank is done.

    Example:
        >>> engine = HFGenerateEngine()
        >>> params = SamplingParams(max_new_tokens=64, eos_token_ids=[tokenizer.eos_token_id],
        ...                         pad_token_id=tokenizer.pad_token_id)
        >>> rollout = engine.generate(model, [[1, 2, 3], [4, 5]], num_generations=8, params=params)
        >>> rollout.completion_ids.shape  # [2*8, T]
    """

    @override
    def generate(
        self,
        model: nn.Module,
        prompt_ids: list[list[int]],
        num_generations: int,
        params: SamplingParams,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> Rollout:
        check_generate_request("HFGenerateEngine", prompt_ids, num_generations)
        device = model_device(model)
        generators = generator if isinstance(generator, (list, tuple)) else [generator]
        if isinstance(generator, (list, tuple)) and len(generator) != len(prompt_ids):
            raise ValueError(
                f"HFGenerateEngine.generate: {len(generator)} generators for {len(prompt_ids)} prompts; pass one per prompt"
            )
        for g in generators:
            if g is not None and g.device.type != device.type:
                raise ValueError(
                    f"HFGenerateEngine.generate: the generator lives on {g.device} but the model on {device}; "
                    f"create it with torch.Generator(device={str(device)!r})"
                )
        prompts, prompt_mask = left_pad(prompt_ids, params.pad_token_id, device)  # [B, P]

        with _eval_mode(model), _no_grad(model), onednn_linears():  # prefill, and decode steps the fast step does not take
            tokens, logprobs, finished = _decode(model, prompts, prompt_mask, num_generations, params, generator)

        # Outside inference mode these ops turn inference tensors into normal ones, which
        # autograd accepts as inputs (embedding indices, masks) in the training step.
        eos = torch.tensor(params.eos_token_ids, dtype=torch.long, device=device)
        completion_ids = tokens.clone()  # [N, T]
        is_eos = torch.isin(completion_ids, eos)
        completion_mask = ((is_eos.cumsum(-1) - is_eos.long()) == 0).long()  # no EOS strictly before
        return Rollout(
            prompt_ids=per_completion(prompts, num_generations),
            prompt_mask=per_completion(prompt_mask, num_generations),
            completion_ids=completion_ids,
            completion_mask=completion_mask,
            logprobs=logprobs.clone(),
            truncated=~finished,
        )


def _decode(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    num_generations: int,
    params: SamplingParams,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The decode loop. Returns tokens `[N, T']`, log-probs `[N, T']` (T' the steps taken), and `finished` `[N]`."""
    B, P = prompt_ids.shape
    G, T = num_generations, params.max_new_tokens
    N = B * G
    device = prompt_ids.device

    # Prefill: once per distinct prompt, only the last position's logits.
    position_ids = (prompt_mask.cumsum(-1) - 1).clamp_(min=0)  # [B, P]
    out = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=position_ids,
        use_cache=True,
        logits_to_keep=1,
    )
    cache = output_cache(out)
    logits = per_completion(out.logits[:, -1], G)  # [N, V]
    if G > 1:
        # Every cache layer type implements `reorder_cache` (an index_select on the batch
        # dim), including linear-attention layers that lack `batch_repeat_interleave`.
        cache.reorder_cache(per_completion(torch.arange(B, device=device), G))
    preallocate(cache, P + T)

    # Left padding puts a real token last, so the next position is the prompt length.
    next_position = per_completion(position_ids[:, -1:], G) + 1  # [N, 1]
    attention_mask = torch.cat([per_completion(prompt_mask, G), prompt_mask.new_ones(N, T)], dim=1)
    attention_mask = _decode_mask(model, attention_mask)
    fast_step = fast_decode_step(model, cache, attention_mask)  # None: the Hugging Face forward
    eos = torch.tensor(params.eos_token_ids, dtype=torch.long, device=device)
    finished = torch.zeros(N, dtype=torch.bool, device=device)
    rows = torch.arange(N, device=device)  # the rows of the full batch still in the decode batch
    # Written in place, one column a step: a list of small per-step tensors kept between the step's large transient
    # ones fragmented the heap (RSS grew ~0.5 MB a step at a 151,936-token vocabulary).
    tokens = torch.full((N, T), params.pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(N, T, dtype=torch.float32, device=device)
    for t in range(T):
        sampled, logprob = sample_next_token(logits.float(), params, generator, rows if len(rows) < N else None, N)
        running = ~finished[rows]
        tokens[rows, t] = sampled.masked_fill(~running, params.pad_token_id)
        logprobs[rows, t] = logprob.masked_fill(~running, 0.0)
        token = tokens[:, t]
        finished = finished | torch.isin(token, eos)
        if t == T - 1 or not any_rank_running(~finished):
            break
        keep = ~finished[rows]
        if 0 < int(keep.sum()) <= len(rows) - max(1, math.ceil(len(rows) * COMPACT_FRACTION)):  # drop the finished rows
            kept = keep.nonzero().squeeze(1)
            rows, token = rows[kept], token[rows[kept]]
            attention_mask, next_position = attention_mask[kept], next_position[kept]
            cache.reorder_cache(kept)
        else:
            token = token[rows]
        if fast_step is not None:
            logits = fast_step(token[:, None], attention_mask[..., : P + t + 1], next_position)
        else:
            out = model(
                input_ids=token[:, None],
                attention_mask=attention_mask[..., : P + t + 1],
                position_ids=next_position,
                use_cache=True,
                **cache_argument(model, cache),
            )
            logits = out.logits[:, -1]
        next_position = next_position + 1
    return tokens[:, : t + 1], logprobs[:, : t + 1], finished


def _decode_mask(model: nn.Module, attention_mask: Tensor) -> Tensor:
    """The `[N, P+T]` padding mask, or for SDPA models whose every layer attends fully, the
    `[N, 1, 1, P+T]` boolean mask SDPA takes, which the model then uses as is instead of
    rebuilding it at every step (a query attends to all cached positions but padding)."""
    config = getattr(model, "config", None)
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "_attn_implementation", None) != "sdpa" or any(t != "full_attention" for t in layer_types):
        return attention_mask
    if getattr(config, "use_sliding_window", False) or not layer_types and getattr(config, "sliding_window", None):
        return attention_mask
    return attention_mask.bool()[:, None, None, :]


def any_rank_running(running: Tensor) -> bool:
    """Whether any row on any rank is still generating; the loop's single device sync.

    A sharded model (FSDP) gathers its weights collectively in every forward, so all ranks
    must run the same number of forward passes: a rank whose rows are done keeps stepping
    until the MAX of this flag over ranks is 0.
    """
    flag = running.any()
    if dist.is_available() and dist.is_initialized():
        flag = flag.int()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def sample_next_token(
    logits: Tensor,
    params: SamplingParams,
    generator: torch.Generator | list[torch.Generator] | None = None,
    rows: Tensor | None = None,
    num_rows: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Pick the next token of each row and its log-prob under the sampling policy.

    Args:
        logits: `[N, V]` float32 next-token logits.
        params: Temperature, top-k and top-p.
        generator: RNG for the sampling noise; or a list of B generators, one per block of
            `N / B` consecutive rows (a prompt's G completions), each drawing its block's noise.
        rows: With `num_rows`: `logits` are these rows of a batch of `num_rows`; the noise is
            drawn for the whole batch (the same stream as without the others gone) and these rows used.

    Returns:
        `[N]` token ids and `[N]` log-probs from `log_softmax(logits / temperature)` over
        the full vocabulary (unfiltered; temperature 1 when greedy).
    """
    if params.greedy:
        token = logits.argmax(-1)
        logprobs = logits.log_softmax(-1)
    else:
        logits = logits / params.temperature if params.temperature != 1 else logits
        logprobs = logits.log_softmax(-1)
        if params.top_k > 0 or params.top_p < 1:
            candidates, index = _top_k_top_p(logits, params.top_k, params.top_p)  # [N, K], [N, K]
            token = index.gather(-1, _gumbel_argmax(candidates, generator, rows, num_rows)[:, None]).squeeze(-1)
        else:
            token = _gumbel_argmax(logits, generator, rows, num_rows)
    return token, logprobs.gather(-1, token[:, None]).squeeze(-1)


def _top_k_top_p(logits: Tensor, top_k: int, top_p: float) -> tuple[Tensor, Tensor]:
    """The candidate logits, sorted descending (filtered-out ones `-inf`), and their token ids.

    Top-k first, then top-p on the renormalised top-k distribution (Hugging Face's order).
    With top-k the nucleus is searched among k candidates instead of sorting the vocabulary.
    """
    if 0 < top_k < logits.shape[-1]:
        candidates, index = logits.topk(top_k, dim=-1)  # sorted descending
    else:
        candidates, index = logits.sort(dim=-1, descending=True)
    if top_p < 1:
        probs = candidates.softmax(-1)
        # Drop a token once the more likely ones already reach top_p; the first always stays.
        candidates = candidates.masked_fill(probs.cumsum(-1) - probs >= top_p, float("-inf"))
    return candidates, index


def _gumbel_argmax(
    logits: Tensor, generator: torch.Generator | list[torch.Generator] | None, rows: Tensor | None = None, num_rows: int | None = None
) -> Tensor:
    """Sample from `softmax(logits)` as `argmax(logits + Gumbel noise)`, with no device sync.

    Gumbel noise is `-log(-log(u))` for uniform `u`; drawn from `uniform_` it is several times
    cheaper on CPU than `exponential_` (which `multinomial` uses for one sample). With a list of
    B generators, generator b draws the noise of rows `b*N/B ... (b+1)*N/B - 1` only. With `rows`,
    `logits` are those rows of a batch of `num_rows`: the noise of all `num_rows` is drawn, these rows' used.
    """
    total = logits.shape[0] if rows is None else num_rows
    if isinstance(generator, (list, tuple)):
        per_generator = total // len(generator)
        if per_generator * len(generator) != total:
            raise ValueError(f"{total} rows cannot be split evenly over {len(generator)} generators")
        uniform = torch.cat([logits.new_empty(per_generator, logits.shape[-1]).uniform_(generator=g) for g in generator])
    else:
        uniform = logits.new_empty(total, logits.shape[-1]).uniform_(generator=generator)  # [N, V]
    if rows is not None:
        uniform = uniform.index_select(0, rows)
    neg_gumbel = uniform.log_().neg_().log_()
    return (logits - neg_gumbel).argmax(-1)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout; no gradient checkpointing, which would drop the KV cache), then
    each submodule's own previous mode back: a frozen part may have been in eval on purpose."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _no_grad(model: nn.Module) -> AbstractContextManager:
    """`inference_mode`, except for FSDP-sharded models, which get `no_grad`.

    Under `inference_mode` FSDP allocates its all-gather buffers as inference tensors, and
    the next training forward then fails to write into them ("Inplace update to inference
    tensor outside InferenceMode").
    """
    sharded = any(isinstance(module, _FSDP_MODULES) for module in model.modules())
    return torch.no_grad() if sharded else torch.inference_mode()
