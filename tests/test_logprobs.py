import math
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from r1_lightning.engines.logprobs import chunked_token_logprobs, length_buckets, selective_log_softmax

LN2, LN3 = math.log(2), math.log(3)


def test_selective_log_softmax_hand_values():
    # softmax([0, ln 2, ln 3]) = [1, 2, 3] / 6 → log p = [log 1/6, log 1/3, log 1/2].
    logits = torch.tensor([[0.0, LN2, LN3], [0.0, LN2, LN3]])
    torch.testing.assert_close(selective_log_softmax(logits, torch.tensor([2, 0])), torch.tensor([-LN2, -math.log(6)]))


def test_chunked_hand_values():
    # H = 1, hidden = 1, weight = [0, ln 2, ln 3] → logits [0, ln 2, ln 3], p = [1/6, 1/3, 1/2], target 2.
    # log p = -ln 2.  d log p / d z = onehot - p = [-1/6, -1/3, 1/2]:
    #   grad hidden = Σ_v (onehot - p)_v W_v = -ln 2 / 3 + ln 3 / 2 = 0.3182570
    #   grad W_v = (onehot - p)_v · hidden = [-1/6, -1/3, 1/2]
    # entropy = ln 6 / 6 + ln 3 / 3 + ln 2 / 2 = 0.2986266 + 0.3662041 + 0.3465736 = 1.0114043
    hidden = torch.tensor([[1.0]], requires_grad=True)
    weight = torch.tensor([[0.0], [LN2], [LN3]], requires_grad=True)
    logprobs, entropy = chunked_token_logprobs(hidden, weight, torch.tensor([2]), return_entropy=True)
    logprobs.sum().backward()
    torch.testing.assert_close(logprobs, torch.tensor([-LN2]))
    torch.testing.assert_close(hidden.grad, torch.tensor([[0.3182570]]))
    torch.testing.assert_close(weight.grad, torch.tensor([[-1 / 6], [-1 / 3], [1 / 2]]))
    torch.testing.assert_close(entropy, torch.tensor([1.0114043]))
    assert not entropy.requires_grad


def _naive(hidden, weight, targets, bias, temperature):
    logits = hidden @ weight.T + (0 if bias is None else bias)  # [M, V]
    logprobs = selective_log_softmax(logits / temperature, targets)
    probs = torch.softmax(logits.detach() / temperature, dim=-1)
    return logprobs, -(probs * probs.log()).sum(-1)


@pytest.mark.parametrize("chunk_size", [1, 3, 10, 64])  # M = 10: non-divisible, exact, larger than M
@pytest.mark.parametrize(("temperature", "with_bias"), [(1.0, False), (0.7, True)])
def test_chunked_matches_naive(chunk_size, temperature, with_bias):
    gen = torch.Generator().manual_seed(0)
    m, h, v = 10, 6, 23
    hidden = torch.randn(m, h, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(v, generator=gen, dtype=torch.float64, requires_grad=True) if with_bias else None
    targets = torch.randint(0, v, (m,), generator=gen)
    upstream = torch.randn(m, generator=gen, dtype=torch.float64)  # a non-uniform incoming gradient
    inputs = [hidden, weight] + ([bias] if with_bias else [])

    logprobs, entropy = chunked_token_logprobs(
        hidden, weight, targets, bias=bias, temperature=temperature, chunk_size=chunk_size, return_entropy=True
    )
    grads = torch.autograd.grad((logprobs * upstream).sum(), inputs)
    ref_logprobs, ref_entropy = _naive(hidden, weight, targets, bias, temperature)
    ref_grads = torch.autograd.grad((ref_logprobs * upstream).sum(), inputs)

    torch.testing.assert_close(logprobs, ref_logprobs)
    torch.testing.assert_close(entropy, ref_entropy)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref)


def test_gradcheck():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 7, (5,), generator=gen)

    def fn(h, w, b):
        return chunked_token_logprobs(h, w, targets, bias=b, temperature=1.3, chunk_size=2)[0]

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def test_leading_dims_low_precision_and_frozen_hidden():
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 4, 8, generator=gen).bfloat16().requires_grad_()  # [B, T, H]
    weight = torch.randn(16, 8, generator=gen).bfloat16().requires_grad_()
    targets = torch.randint(0, 16, (2, 4), generator=gen)
    logprobs, entropy = chunked_token_logprobs(hidden, weight, targets, chunk_size=3)
    logprobs.sum().backward()
    # Computed in float32 from the bf16 values; gradients come back in the inputs' dtypes.
    assert logprobs.shape == (2, 4) and logprobs.dtype == torch.float32 and entropy is None
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    ref = selective_log_softmax(hidden.detach().float() @ weight.detach().float().T, targets)
    torch.testing.assert_close(logprobs, ref)
    # Only the LM head trains: no hidden gradient needed.
    frozen = hidden.detach()
    chunked_token_logprobs(frozen, weight, targets, chunk_size=5)[0].sum().backward()


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"hidden \(3, 4\)"):
        chunked_token_logprobs(torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size=0"):
        chunked_token_logprobs(torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(3, dtype=torch.long), chunk_size=0)


class _PeakTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storage created by ATen ops while active, forward and backward.

    Every op output whose storage is new (not a view of an input) is counted until a
    weakref finalizer sees the storage die. This is deterministic, unlike RSS (the CPU
    allocator and glibc keep or return pages at will, and max RSS never goes down).
    Temporaries internal to one kernel are not seen; in the chunked path every kernel
    only ever receives chunk-sized inputs, so those are bounded the same way.
    """

    def __init__(self):
        super().__init__()
        self.live, self.current, self.peak = set(), 0, 0

    def _free(self, key, nbytes):
        self.live.discard(key)
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes and key not in inputs and key not in self.live:
                self.live.add(key)
                self.current += nbytes
                self.peak = max(self.peak, self.current)
                weakref.finalize(storage, self._free, key, nbytes)
        return out


def test_peak_memory_is_bounded_by_the_chunk_not_the_rows():
    # Qwen2.5's vocabulary. Naive float32 logits alone would be M·V·4 = 311 MB.
    m, h, v, chunk = 512, 64, 151936, 64
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(m, h, generator=gen).requires_grad_()
    weight = (0.02 * torch.randn(v, h, generator=gen)).requires_grad_()
    targets = torch.randint(0, v, (m,), generator=gen)
    # What may be alive at once: the weight-gradient accumulator (V·H·4, independent of M),
    # two [chunk, V] float32 buffers (logits + softmax/entropy scratch), and O(M·H) rows.
    bound = v * h * 4 + 2 * chunk * v * 4 + 4 * m * h * 4 + (1 << 20)
    assert bound < m * v * 4 / 2

    with _PeakTensorBytes() as meter:
        logprobs, _ = chunked_token_logprobs(hidden, weight, targets, chunk_size=chunk, return_entropy=True)
        logprobs.sum().backward()
    assert meter.peak <= bound, f"peak {meter.peak / 1e6:.1f} MB > bound {bound / 1e6:.1f} MB"
    assert weight.grad is not None and hidden.grad is not None

    # The meter does see [rows, V] logits: the naive version breaks the bound with only 128 rows.
    with _PeakTensorBytes() as meter:
        selective_log_softmax(hidden[:128] @ weight.T, targets[:128]).sum().backward()
    assert meter.peak > bound


def test_length_buckets_hand_cases():
    # Lengths 1, 1, 2, 9 with overhead 4: one bucket costs 4 rows × 9 + 4 = 40; {1, 1, 2} + {9} costs
    # 3 × 2 + 4 + 9 + 4 = 23; {1, 1} + {2} + {9} costs 2 + 4 + 2 + 4 + 9 + 4 = 25. Rows of length 0 need no forward.
    assert length_buckets([9, 1, 0, 2, 1], overhead=4) == [([1, 4, 3], 2), ([0], 9)]
    # A huge overhead keeps one bucket, no overhead gives one bucket per distinct length.
    assert length_buckets([3, 1, 2], overhead=10**6) == [([1, 2, 0], 3)]
    assert length_buckets([3, 1, 2], overhead=0) == [([1], 1), ([2], 2), ([0], 3)]
    assert length_buckets([0, 0], overhead=1) == []


def _grpo_rows(vocab: int, prompts: list[list[int]], lengths: list[int], width: int, pad: int = 0):
    """Left-padded prompts (each repeated for its completions) + right-padded completions, as GRPO builds them."""
    from r1_lightning.engines.base import build_model_inputs, left_pad

    gen = torch.Generator().manual_seed(3)
    G = len(lengths) // len(prompts)
    prompt_ids, prompt_mask = left_pad(prompts, pad)
    prompt_ids, prompt_mask = prompt_ids.repeat_interleave(G, 0), prompt_mask.repeat_interleave(G, 0)
    completion_ids = torch.randint(1, vocab, (len(lengths), width), generator=gen)
    completion_mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
    inputs = build_model_inputs(prompt_ids, prompt_mask, completion_ids.masked_fill(completion_mask == 0, pad), completion_mask)
    target_mask = torch.cat([torch.zeros_like(prompt_mask, dtype=torch.bool), completion_mask.bool()], dim=1)
    return inputs, target_mask, prompt_ids.shape[1]


@pytest.mark.parametrize("lengths", [[7, 7, 7, 7, 7, 7], [1, 7, 3, 0, 6, 2]])  # full rows; ragged, one empty
def test_shared_prompt_and_length_buckets_match_whole_rows(lengths):
    # Each distinct prompt runs once and the completions run in length buckets: log-probs, entropies
    # and every parameter gradient equal those of one forward over the whole padded rows.
    from r1_lightning.policy import build_builtin_model, token_logprobs
    from r1_lightning.engines import logprobs as logprobs_module

    model = build_builtin_model("builtin:tiny-small", vocab_size=40, seed=0)
    inputs, target_mask, P = _grpo_rows(40, [[5, 6, 7, 8], [9, 10], [11, 12, 13]], lengths, width=7)
    upstream = torch.randn(target_mask.shape, generator=torch.Generator().manual_seed(4))

    def run(prompt_length, overhead=logprobs_module.BUCKET_OVERHEAD_TOKENS):
        model.zero_grad()
        logprobs_module.BUCKET_OVERHEAD_TOKENS, saved = overhead, logprobs_module.BUCKET_OVERHEAD_TOKENS
        try:
            logprobs, entropy = token_logprobs(model, **inputs, target_mask=target_mask, return_entropy=True, prompt_length=prompt_length)
        finally:
            logprobs_module.BUCKET_OVERHEAD_TOKENS = saved
        (logprobs * upstream).sum().backward()
        return logprobs.detach(), entropy, {n: p.grad.clone() for n, p in model.named_parameters()}

    expected = run(None)
    for overhead in (0, 10**6):  # one bucket per length, and a single bucket
        got = run(P, overhead)
        # Float32 rounding differs between the batch shapes, nothing else.
        torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)
        for name, grad in expected[2].items():
            torch.testing.assert_close(got[2][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_shared_prompt_forward_runs_each_prompt_once():
    from r1_lightning.policy import build_builtin_model, token_logprobs

    model = build_builtin_model("builtin:tiny-small", vocab_size=40, seed=0)
    inputs, target_mask, P = _grpo_rows(40, [[5, 6, 7, 8], [9, 10]], [4, 4, 4, 4], width=4)
    rows_seen = []
    handle = model.model.embed_tokens.register_forward_hook(lambda module, args, out: rows_seen.append(tuple(args[0].shape)))
    with torch.no_grad():
        token_logprobs(model, **inputs, target_mask=target_mask, prompt_length=P)
    handle.remove()
    # The 2 distinct prompts (P = 4 columns), then the 4 completions: their last token predicts nothing.
    assert rows_seen == [(2, P), (4, 3)]


def test_default_chunk_rows_bound_the_head_buffer_by_bytes():
    from r1_lightning.engines.logprobs import CHUNK_LOGITS_BYTES, default_chunk_rows

    # 64 MiB of float32 logits: 67,108,864 / (4 * 151,936) = 110.4 -> 110 rows (once a fixed 1,024: 622 MB);
    # 49,152 -> 341.3 -> 341; 8,192 -> 2,048, capped at 1,024; an absurd vocabulary still gets SCRATCH_ROWS rows.
    assert CHUNK_LOGITS_BYTES == 64 << 20
    assert default_chunk_rows(151_936) == 110
    assert default_chunk_rows(49_152) == 341
    assert default_chunk_rows(8_192) == 1024
    assert default_chunk_rows(10_000_000) == 64
    hidden, weight = torch.randn(1500, 8, dtype=torch.float64), torch.randn(300, 8, dtype=torch.float64)
    targets = torch.randint(0, 300, (1500,))
    default, _ = chunked_token_logprobs(hidden, weight, targets)  # no chunk_size: 1,024 rows, then 476
    torch.testing.assert_close(default, _naive(hidden, weight, targets, None, 1.0)[0])
