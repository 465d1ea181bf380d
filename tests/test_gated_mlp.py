"""The gated MLP that keeps gate and up only (`engines.gated_mlp`): same values and gradients, less saved for backward."""

import pytest
import torch
from torch import nn

from r1_lightning.engines.gated_mlp import lean_gated_mlps, silu_gated_down


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward while `fn` runs (each storage once)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_bias", [False, True])
def test_values_and_gradients_equal_autograd(dtype, with_bias):
    generator = torch.Generator().manual_seed(0)
    down = nn.Linear(24, 10, bias=with_bias).to(dtype)
    gate = torch.randn(3, 5, 24, dtype=dtype, generator=generator, requires_grad=True)
    up = torch.randn(3, 5, 24, dtype=dtype, generator=generator, requires_grad=True)
    grad = torch.randn(3, 5, 10, dtype=dtype, generator=generator)

    expected = down(torch.nn.functional.silu(gate) * up)
    expected_grads = torch.autograd.grad(expected, [gate, up, *down.parameters()], grad)
    ours = silu_gated_down(gate, up, down)
    ours_grads = torch.autograd.grad(ours, [gate, up, *down.parameters()], grad)

    tolerance = {} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(ours, expected, **tolerance)
    for a, b in zip(ours_grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b, **tolerance)


def test_swapped_into_a_qwen2_model_with_half_the_mlp_activations(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = model.config
    ids = torch.randint(3, config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))

    plain_bytes, plain = _saved_bytes(lambda: model(input_ids=ids).logits)
    with lean_gated_mlps(model):
        assert all("forward" in layer.mlp.__dict__ for layer in model.model.layers)
        lean_bytes, lean = _saved_bytes(lambda: model(input_ids=ids).logits)
    assert not any("forward" in layer.mlp.__dict__ for layer in model.model.layers)  # restored

    # Per layer, silu(gate) and the product are no longer kept: 2 x [80 tokens, intermediate] float32.
    assert plain_bytes - lean_bytes == config.num_hidden_layers * 2 * ids.numel() * config.intermediate_size * 4
    torch.testing.assert_close(lean, plain, rtol=1e-5, atol=1e-5)  # down through oneDNN where chosen: rounding
    grads = {}
    for name, out in (("plain", plain), ("lean", lean)):
        model.zero_grad()
        out.logsumexp(-1).sum().backward()
        grads[name] = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads["lean"], grads["plain"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_left_alone_without_grad_and_where_not_recognised(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    hooked = model.model.layers[0].mlp
    hooked.register_forward_hook(lambda *args: None)
    with torch.no_grad(), lean_gated_mlps(model):
        assert not any("forward" in layer.mlp.__dict__ for layer in model.model.layers)
    with lean_gated_mlps(model):
        assert "forward" not in hooked.__dict__  # a hook may read the intermediate tensors: its own forward
        assert all("forward" in layer.mlp.__dict__ for layer in model.model.layers[1:])
