"""The fast decode step (`r1_lightning.engines.fast_decode`) against the Hugging Face forward it replaces.

Equivalence: whole `HFGenerateEngine.generate` calls with the fast step and with the Hugging Face
forward (the fallback, forced by patching `fast_decode_step` to return None) sample the same tokens
with the same log-probs, on left-padded prompts of different lengths, several G, rows that stop at
different times. Selection: every configuration the step does not reproduce falls back.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from r1_lightning.policy import LoraSettings, apply_lora, load_model
from r1_lightning.engines import HFGenerateEngine, SamplingParams, fast_decode, hf, kv_cache
from r1_lightning.rl import cpu_matmul

VOCAB = 96
PROMPTS = [[5, 17, 33, 2, 9, 41, 7], [12], [3, 3, 60, 8]]  # lengths 7, 1, 4: left padding of 0, 6, 3
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=256)


def _qwen2(**overrides) -> torch.nn.Module:
    return Qwen2ForCausalLM(Qwen2Config(**{**SHAPE, "num_attention_heads": 4, "num_key_value_heads": 2, **overrides}))


def _llama(**overrides) -> torch.nn.Module:
    # Biases everywhere, no GQA (one query head per KV head), a head_dim that is not hidden/heads, untied head.
    config = LlamaConfig(**{
        **SHAPE, "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 8, "attention_bias": True,
        "mlp_bias": True, "tie_word_embeddings": False, **overrides,
    })
    return LlamaForCausalLM(config)


def _mistral(**overrides) -> torch.nn.Module:
    config = MistralConfig(**{**SHAPE, "num_attention_heads": 8, "num_key_value_heads": 2, "sliding_window": None, **overrides})
    return MistralForCausalLM(config)


@pytest.fixture(params=["default", "onednn", "onednn-packed"])
def backend(request, monkeypatch):
    """Every float32 product path of the step (transposed copies with the default BLAS, `[out, in]` through oneDNN,
    oneDNN on packed weights), whichever this machine's probes picked."""
    if request.param != "default" and cpu_matmul._onednn_op() is None:
        pytest.skip("this torch build has no oneDNN linear op")
    if request.param == "onednn-packed" and cpu_matmul._reorder_op() is None:
        pytest.skip("this torch build cannot pack weights for oneDNN")
    monkeypatch.setenv(cpu_matmul.ENV, "default" if request.param == "default" else "onednn")
    if request.param == "onednn":
        monkeypatch.setattr(cpu_matmul, "packed_eligible", lambda *tensors: False)
    cpu_matmul.clear_decisions()
    yield request.param
    cpu_matmul.clear_decisions()


def _build(factory, dtype=torch.float32, **overrides) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = factory(**overrides)
    return model.to(dtype).eval()


def _generate(model, G: int, fast: bool, monkeypatch, temperature: float = 1.0, max_new_tokens: int = 24):
    """One generate call with the fast step (asserting it was used) or with the Hugging Face forward."""
    used = []

    def spy(*args):
        step = fast_decode.fast_decode_step(*args) if fast else None
        used.append(step is not None)
        return step

    monkeypatch.setattr(hf, "fast_decode_step", spy)
    # Two EOS ids that the random models emit now and then: rows stop at different steps.
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, eos_token_ids=[4, 11], pad_token_id=0)
    out = HFGenerateEngine().generate(model, PROMPTS, G, params, torch.Generator().manual_seed(7))
    assert used == [fast]
    return out


@pytest.mark.parametrize(
    "factory,dtype",
    [(_qwen2, torch.float32), (_llama, torch.float32), (_mistral, torch.float32), (_qwen2, torch.bfloat16)],
    ids=["qwen2", "llama-bias-untied-mha", "mistral-no-window", "qwen2-bf16"],
)
@pytest.mark.parametrize("G", [1, 3, 8])
def test_fast_step_samples_what_the_hf_forward_samples(factory, dtype, G, backend, monkeypatch):
    model = _build(factory, dtype)
    fast, hf = _generate(model, G, True, monkeypatch), _generate(model, G, False, monkeypatch)
    assert torch.equal(fast.completion_ids, hf.completion_ids)
    assert torch.equal(fast.completion_mask, hf.completion_mask)
    # bfloat16: on a CPU without native bfloat16 dot products (AVX2 only) the fused and the separate products round
    # differently (2.8e-4 at 8 rows measured; bfloat16 keeps ~3 digits); same tokens either way.
    torch.testing.assert_close(fast.logprobs, hf.logprobs, rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-3)
    lengths = fast.completion_mask.sum(-1)
    if G == 8 and dtype == torch.float32:  # the comparison covered rows that stopped early and rows that did not
        assert lengths.min() < fast.completion_ids.shape[1] and lengths.max() == fast.completion_ids.shape[1]


@pytest.mark.parametrize("transposed", [True, False], ids=["transposed", "as-stored"])
def test_copies_are_views_of_one_block_equal_to_the_weights(transposed):
    layer = _build(_llama).model.layers[0]  # biases everywhere
    attention, mlp = layer.self_attn, layer.mlp
    groups = [(attention.q_proj, attention.k_proj, attention.v_proj), (attention.o_proj,), (mlp.gate_proj, mlp.up_proj), (mlp.down_proj,)]
    fused = fast_decode.fused_weights(groups, transposed=transposed)
    for (weight, bias), group in zip(fused, groups):
        expected = torch.cat([linear.weight for linear in group])
        assert torch.equal(weight, expected.t() if transposed else expected) and weight.is_contiguous()
        assert torch.equal(bias, torch.cat([linear.bias for linear in group]))
    copies = [weight for (weight, _), group in zip(fused, groups) if transposed or len(group) > 1]
    assert len(copies) == (4 if transposed else 2) and len({w.untyped_storage().data_ptr() for w in copies}) == 1
    assert copies[0].untyped_storage().nbytes() == 4 * sum(linear.weight.numel() for group in groups for linear in group
                                                           if transposed or len(group) > 1)
    if not transposed:  # a single linear's own weight, no copy
        assert fused[1][0].data_ptr() == attention.o_proj.weight.data_ptr()


def test_packed_weights_give_each_groups_products():
    if cpu_matmul._reorder_op() is None:
        pytest.skip("this torch build cannot pack weights for oneDNN")
    layer = _build(_llama).model.layers[0]  # biases everywhere
    attention, mlp = layer.self_attn, layer.mlp
    groups = [(attention.q_proj, attention.k_proj, attention.v_proj), (attention.o_proj,), (mlp.gate_proj, mlp.up_proj), (mlp.down_proj,)]
    generator = torch.Generator().manual_seed(0)
    for (packed, bias), group in zip(fast_decode.packed_weights(groups, rows=8), groups):
        inputs = torch.randn(5, group[0].in_features, generator=generator)  # 5 rows where packing was told 8
        expected = torch.cat([linear(inputs) for linear in group], dim=-1)
        torch.testing.assert_close(cpu_matmul.mm_packed(inputs, packed, bias), expected, rtol=0, atol=1e-5)


def test_the_onednn_setting_packs_every_weight_once_per_generate(monkeypatch):
    if cpu_matmul._reorder_op() is None:
        pytest.skip("this torch build cannot pack weights for oneDNN")
    monkeypatch.setenv(cpu_matmul.ENV, "onednn")
    cpu_matmul.clear_decisions()
    packed = []
    pack = cpu_matmul.pack_nt
    monkeypatch.setattr(cpu_matmul, "pack_nt", lambda weight, rows: packed.append((tuple(weight.shape), rows)) or pack(weight, rows))
    model = _build(_qwen2)
    _generate(model, 3, True, monkeypatch)
    # Per layer Q/K/V fused (64 + 2 * 32 outputs), O, gate/up fused, down; then the head; for the 3 prompts x 3 rows.
    per_layer = [((128, 64), 9), ((64, 64), 9), ((256, 64), 9), ((64, 128), 9)]
    assert packed == per_layer * 2 + [((VOCAB, 64), 9)]
    cpu_matmul.clear_decisions()


def test_builtin_tiny_greedy_and_sampled_match(monkeypatch):
    model = load_model("builtin:tiny", vocab_size=263).eval()
    for temperature in (1.0, 0.0):
        fast = _generate(model, 8, True, monkeypatch, temperature=temperature, max_new_tokens=32)
        hf = _generate(model, 8, False, monkeypatch, temperature=temperature, max_new_tokens=32)
        assert torch.equal(fast.completion_ids, hf.completion_ids)
        torch.testing.assert_close(fast.logprobs, hf.logprobs, rtol=0, atol=1e-5)


def test_weights_changed_by_an_optimizer_step_are_seen(monkeypatch):
    """The step reads the module's parameters at every generate call: no stale copy survives an update."""
    model = _build(_qwen2)
    before = _generate(model, 3, True, monkeypatch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.tensor([PROMPTS[0]])
    model.train()
    model(input_ids=ids).logits.logsumexp(-1).mean().backward()
    optimizer.step()
    model.eval()
    after_fast, after_hf = _generate(model, 3, True, monkeypatch), _generate(model, 3, False, monkeypatch)
    assert torch.equal(after_fast.completion_ids, after_hf.completion_ids)
    torch.testing.assert_close(after_fast.logprobs, after_hf.logprobs, rtol=0, atol=1e-5)
    assert (after_fast.logprobs - before.logprobs).abs().max() > 1e-3  # the update did change the policy


def _reason(model) -> str | None:
    """What `fast_decode_step` says about `model` at the point where `_decode` asks."""
    prompts, mask = hf.left_pad(PROMPTS, 0)
    with torch.inference_mode():
        out = model(input_ids=prompts, attention_mask=mask, use_cache=True, logits_to_keep=1)
    kv_cache.preallocate(out.past_key_values, prompts.shape[1] + 8)
    return fast_decode.unsupported_reason(model, out.past_key_values, hf._decode_mask(model, mask))


def _hooked() -> torch.nn.Module:
    model = _build(_qwen2)
    model.model.layers[0].mlp.register_forward_hook(lambda module, args, output: output * 2)
    return model


@pytest.mark.parametrize(
    "make,why",
    [
        (lambda: apply_lora(_build(_qwen2), LoraSettings(r=4)), "architecture"),  # peft wrapper
        (lambda: apply_lora(_build(_qwen2), LoraSettings(r=4)).get_base_model(), "adapters"),  # LoRA layers inside
        (lambda: _build(_qwen2, use_sliding_window=True, sliding_window=4, max_window_layers=0), "sliding"),
        (lambda: _build(_mistral, sliding_window=4096), "sliding"),  # Mistral's default window
        (lambda: _build(_qwen2, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}), "rope"),
        (lambda: _build(_qwen2, attn_implementation="eager"), "attention implementation"),
        (lambda: _build(_llama, hidden_act="gelu"), "gelu"),
        (lambda: _build(_qwen2, dtype=torch.float64), "not tested"),
        (_hooked, "hooks"),
    ],
    ids=["peft-model", "lora-layers", "qwen2-window", "mistral-window", "rope-scaling", "eager", "gelu", "float64", "hook"],
)
def test_unsupported_models_fall_back(make, why, monkeypatch):
    model = make()
    reason = _reason(model)
    assert reason is not None and why.lower() in reason.lower(), reason
    _generate(model, 2, False, monkeypatch, max_new_tokens=4)  # and the Hugging Face forward still generates


def test_supported_model_and_size_budget(monkeypatch):
    model = _build(_qwen2)
    assert _reason(model) is None
    monkeypatch.setattr(fast_decode, "MAX_WEIGHT_BYTES", 1024)
    assert "weights over" in _reason(model)
