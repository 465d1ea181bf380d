"""The split attention of long completions (`r1_lightning.engines.suffix_attention`) against one masked SDPA call.

Values and gradients must equal the masked call's to float rounding (both measured against float64), with
grouped KV heads, left-padded prompts and a query laid out as the layer functions make it (a transposed
view). Where the training forwards take it: tests/test_compiled_forward.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from r1_lightning.engines import suffix_attention


def _attention_inputs(n=3, heads=6, kv=2, prompt=5, completion=37, dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # The query as the layer functions make it: [n, L, h, D] transposed to [n, h, L, D] (not contiguous).
    query = torch.randn(n, completion, heads, dim, generator=gen).transpose(1, 2)
    prompt_keys, prompt_values = (torch.randn(n, kv, prompt, dim, generator=gen) for _ in range(2))
    keys, values = (torch.randn(n, kv, completion, dim, generator=gen) for _ in range(2))
    prompt_mask = torch.ones(n, prompt, dtype=torch.long)
    prompt_mask[0, :3] = 0  # left padding
    prompt_mask[1, :1] = 0
    return [query, prompt_keys, prompt_values, keys, values], prompt_mask


def _masked_sdpa(query, prompt_keys, prompt_values, keys, values, prompt_mask, scale):
    n, completion = query.shape[0], query.shape[2]
    causal = torch.ones(completion, completion, dtype=torch.bool).tril()
    mask = torch.cat([prompt_mask.bool()[:, None, :].expand(-1, completion, -1), causal.expand(n, -1, -1)], dim=-1)[:, None]
    all_keys, all_values = torch.cat([prompt_keys, keys], 2), torch.cat([prompt_values, values], 2)
    return F.scaled_dot_product_attention(query, all_keys, all_values, attn_mask=mask, scale=scale, enable_gqa=True)


def _value_and_grads(fn, tensors, upstream):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(upstream.to(out.dtype))
    return [out.detach()] + [leaf.grad for leaf in leaves]


def test_split_attention_equals_the_masked_call_to_float_rounding():
    tensors, prompt_mask = _attention_inputs()
    scale = 0.25
    upstream = torch.randn(tensors[0].shape, generator=torch.Generator().manual_seed(3))
    mask = suffix_attention.additive_prompt_mask(prompt_mask, tensors[0].shape[2], torch.float32)
    split = _value_and_grads(lambda *t: suffix_attention.causal_suffix_attention(*t, mask, scale), tensors, upstream)
    masked = _value_and_grads(lambda *t: _masked_sdpa(*t, prompt_mask, scale), tensors, upstream)
    exact = _value_and_grads(lambda *t: _masked_sdpa(*t, prompt_mask, scale), [t.double() for t in tensors], upstream)
    names = ["output", "query", "prompt keys", "prompt values", "keys", "values"]
    for name, got, single, truth in zip(names, split, masked, exact):
        assert got.shape == truth.shape, name
        # As close to float64 as the single float32 call is (a few float32 ulps of the values' scale).
        bound = max(4 * (single.double() - truth).abs().max().item(), 1e-6 * truth.abs().max().item())
        assert (got.double() - truth).abs().max().item() <= bound, name
    # And the part the split leaves out is really out: a completion key after a query changes nothing before it.
    changed = [t.clone() for t in tensors]
    changed[3][:, :, -1] += 10.0
    before = suffix_attention.causal_suffix_attention(*tensors, mask, scale)[:, :, :-1]
    after = suffix_attention.causal_suffix_attention(*changed, mask, scale)[:, :, :-1]
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_split_attention_in_bfloat16_stays_close_to_the_masked_call():
    tensors, prompt_mask = _attention_inputs(seed=4)
    tensors = [t.bfloat16() for t in tensors]
    mask = suffix_attention.additive_prompt_mask(prompt_mask, tensors[0].shape[2], torch.bfloat16)
    got = suffix_attention.causal_suffix_attention(*tensors, mask, 0.25)
    assert got.dtype == torch.bfloat16
    expected = _masked_sdpa(*[t.float() for t in tensors], prompt_mask, 0.25)
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)


def test_applies_only_to_long_leading_completions_with_a_prompt_key_in_every_row(monkeypatch):
    prompt_mask, completion_mask = torch.tensor([[0, 1, 1], [1, 1, 1]]), torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert not suffix_attention.applies(prompt_mask, completion_mask)  # shorter than MIN_COMPLETION_LENGTH
    monkeypatch.setattr(suffix_attention, "MIN_COMPLETION_LENGTH", 4)
    assert suffix_attention.applies(prompt_mask, completion_mask)
    assert not suffix_attention.applies(prompt_mask, torch.tensor([[1, 0, 1, 0], [1, 1, 1, 1]]))  # a hole
    assert not suffix_attention.applies(torch.tensor([[0, 0, 0], [1, 1, 1]]), completion_mask)  # no prompt key
