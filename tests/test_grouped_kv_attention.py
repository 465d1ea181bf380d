"""`shared_prefix_hidden` on CPU lets SDPA read grouped KV heads in place (no `repeat_kv` copies):
the same hidden states bit for bit, the same gradients to float rounding, the user's setting kept."""

from __future__ import annotations

import os

import torch

from r1_lightning.policy import load_model
from r1_lightning.engines import logprobs
from r1_lightning.engines.base import build_model_inputs, left_pad


def _inputs():
    # Two prompts (different lengths: left padding) × G = 3 completions of different lengths.
    prompts, prompt_mask = left_pad([[5, 17, 33, 2, 9], [12, 40]], 0)
    prompts, prompt_mask = prompts.repeat_interleave(3, 0), prompt_mask.repeat_interleave(3, 0)
    completions = torch.randint(3, 200, (6, 7), generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([7, 3, 5, 1, 6, 7])
    completion_mask = (torch.arange(7)[None] < lengths[:, None]).long()
    return build_model_inputs(prompts, prompt_mask, completions * completion_mask, completion_mask), prompts.shape[1]


def _hidden_and_grads(model, inputs, P):
    model.zero_grad(set_to_none=True)
    hidden = logprobs.shared_prefix_hidden(model.model, inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"], P)
    assert hidden is not None  # the shared-prefix path ran
    (hidden * torch.linspace(-1, 1, hidden.shape[-1])).sum().backward()
    return hidden.detach(), [p.grad.clone() for p in model.parameters()]


def test_grouped_kv_attention_changes_nothing_but_the_copies(monkeypatch):
    model = load_model("builtin:tiny", vocab_size=263)  # 4 query heads on 2 KV heads
    model.train()
    inputs, P = _inputs()
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("enable_gqa", False))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    monkeypatch.setenv(logprobs._FORCE_GQA, "0")  # a user's explicit setting wins: transformers' repeat_kv
    copied_hidden, copied_grads = _hidden_and_grads(model, inputs, P)
    assert calls and not any(calls)

    monkeypatch.delenv(logprobs._FORCE_GQA)
    calls.clear()
    hidden, grads = _hidden_and_grads(model, inputs, P)
    assert calls and all(calls)
    assert logprobs._FORCE_GQA not in os.environ  # restored after the call
    assert torch.equal(hidden, copied_hidden)
    for grad, copied in zip(grads, copied_grads):
        torch.testing.assert_close(grad, copied, rtol=1e-5, atol=1e-6)
