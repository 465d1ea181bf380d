"""Llama-family layers keeping fewer activations (`engines.lean_layers`): same values and gradients, less saved for backward."""

import pytest
import torch
from torch import nn

from r1_lightning.engines.lean_layers import lean_layers, rms_norm_keeping_input, silu_gated_down


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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_rms_norm_values_and_gradients_equal_transformers(dtype):
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    generator = torch.Generator().manual_seed(2)
    norm = Qwen2RMSNorm(16, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16, generator=generator))
    x = (3 * torch.randn(2, 7, 16, generator=generator)).to(dtype).requires_grad_()
    grad = torch.randn(2, 7, 16, generator=generator).to(dtype)
    expected = norm(x)
    expected_grads = torch.autograd.grad(expected, [x, norm.weight], grad)
    ours = rms_norm_keeping_input(x, norm.weight, norm.variance_epsilon)
    ours_grads = torch.autograd.grad(ours, [x, norm.weight], grad)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)  # the same operations
    tolerance = {"float64": {}, "float32": {"rtol": 1e-5, "atol": 1e-5}, "bfloat16": {"rtol": 2e-2, "atol": 2e-2}}
    for a, b in zip(ours_grads, expected_grads, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tolerance[str(dtype).split(".")[1]])


def test_swapped_into_a_qwen2_model_with_fewer_activations(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = model.config
    ids = torch.randint(3, config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))

    plain_bytes, plain = _saved_bytes(lambda: model(input_ids=ids).logits)
    with lean_layers(model):
        assert all("forward" in layer.mlp.__dict__ for layer in model.model.layers)
        assert all("forward" in layer.input_layernorm.__dict__ for layer in model.model.layers)
        lean_bytes, lean = _saved_bytes(lambda: model(input_ids=ids).logits)
    assert not any("forward" in module.__dict__ for module in model.modules())  # restored

    # Per layer, silu(gate) and the product are no longer kept (2 x [80 tokens, intermediate] float32), nor
    # the normalised input of each RMSNorm (two a layer and the final one: [80, hidden] each).
    layers, tokens = config.num_hidden_layers, ids.numel()
    mlp_bytes, norm_bytes = layers * 2 * tokens * config.intermediate_size * 4, (2 * layers + 1) * tokens * config.hidden_size * 4
    assert plain_bytes - lean_bytes == mlp_bytes + norm_bytes
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
    with torch.no_grad(), lean_layers(model):
        assert not any("forward" in layer.mlp.__dict__ for layer in model.model.layers)
    with torch.autocast("cpu", dtype=torch.bfloat16), lean_layers(model):  # mixed precision: the modules' own
        assert not any("forward" in module.__dict__ for module in model.modules())
    with lean_layers(model):
        assert "forward" not in hooked.__dict__  # a hook may read the intermediate tensors: its own forward
        assert all("forward" in layer.mlp.__dict__ for layer in model.model.layers[1:])
