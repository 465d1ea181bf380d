"""The compiled training forward (`r1_lightning.engines.compiled_forward`) against the Hugging Face forward.

The layer functions run eagerly (`compile=False`) must give the Hugging Face path's hidden states and
gradients bit for bit on GRPO-shaped rows (left-padded prompts, ragged completions, one empty) for
Qwen2, Llama (biases, no GQA, head_dim != hidden/heads) and Mistral; compiled, they must agree to
float rounding (slow: compiling takes a minute on a cold cache). Models the functions do not
reproduce are refused, and a compiler failure falls back to the eager functions with one warning. For long
completions the eager functions split the attention (`suffix_attention`) and agree to float rounding; the
reference pass takes them there, a grad pass without recompute keeps the Hugging Face forward.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from r1_lightning.policy import LoraSettings, apply_lora, build_builtin_model, load_model, token_logprobs
from r1_lightning.engines import compiled_forward, suffix_attention
from r1_lightning.engines.logprobs import shared_prefix_hidden
from r1_lightning.rl import cpu_matmul

VOCAB = 96
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=256)


def _qwen2():
    return Qwen2ForCausalLM(Qwen2Config(**SHAPE, num_attention_heads=4, num_key_value_heads=2))


def _llama():
    return LlamaForCausalLM(LlamaConfig(
        **SHAPE, num_attention_heads=4, num_key_value_heads=4, head_dim=8, attention_bias=True, mlp_bias=True,
        tie_word_embeddings=False,
    ))


def _mistral():
    return MistralForCausalLM(MistralConfig(**SHAPE, num_attention_heads=8, num_key_value_heads=2, sliding_window=None))


def _build(factory) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return factory().train()


def _rows(vocab: int = VOCAB):
    """3 prompts (left padding 0, 3, 5) x G = 4 completions of ragged lengths (one empty), as GRPO builds them."""
    gen = torch.Generator().manual_seed(1)
    prompt_lengths, G, P, T = [7, 4, 2], 4, 7, 9
    lengths = torch.tensor([9, 3, 0, 6, 1, 9, 8, 2, 5, 4, 9, 7])
    prompt_mask = (torch.arange(P) >= P - torch.tensor(prompt_lengths)[:, None]).long().repeat_interleave(G, 0)
    completion_mask = (torch.arange(T) < lengths[:, None]).long()
    ids = torch.randint(1, vocab, (3, P), generator=gen).repeat_interleave(G, 0)
    input_ids = torch.cat([ids, torch.randint(1, vocab, (12, T), generator=gen)], 1)
    attention_mask = torch.cat([prompt_mask, completion_mask], 1)
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    needed = (lengths - 1).clamp(min=0)  # the last completion token predicts nothing
    valid = attention_mask.bool().clone()
    valid[:, P:] &= torch.arange(T) < needed[:, None]
    return (input_ids, attention_mask, position_ids, P, needed), valid


def _hidden_and_grads(model, layers, rows, valid, recompute=False):
    model.zero_grad(set_to_none=True)
    hidden = shared_prefix_hidden(model.model, *rows, layers, recompute)
    upstream = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(2))
    (hidden[valid] * upstream[valid]).sum().backward()
    return hidden.detach()[valid], {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("factory", [_qwen2, _llama, _mistral], ids=["qwen2", "llama", "mistral"])
def test_eager_layer_functions_equal_the_hugging_face_forward(factory):
    model = _build(factory)
    assert compiled_forward.unsupported_reason(model) is None
    rows, valid = _rows()
    expected = _hidden_and_grads(model, None, rows, valid)
    got = _hidden_and_grads(model, compiled_forward.CompiledLayers(model, compile=False), rows, valid)
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    assert got[1].keys() == expected[1].keys()
    for name, grad in expected[1].items():
        torch.testing.assert_close(got[1][name], grad, rtol=0, atol=1e-7, msg=name)  # KV grads: head sums in another order


@pytest.mark.parametrize("factory", [_qwen2, _llama, _mistral], ids=["qwen2", "llama", "mistral"])
def test_recomputed_suffix_layers_give_the_same_values_and_gradients_and_run_again_in_the_backward(factory, monkeypatch):
    model = _build(factory)
    layers = compiled_forward.CompiledLayers(model, compile=False)
    rows, valid = _rows()
    calls = []
    counted = compiled_forward._call
    monkeypatch.setattr(compiled_forward, "_call", lambda kind, *args: calls.append((kind, torch.is_grad_enabled())) or counted(kind, *args))
    expected = _hidden_and_grads(model, layers, rows, valid)
    kept = list(calls)
    calls.clear()
    got = _hidden_and_grads(model, layers, rows, valid, recompute=True)
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    assert got[1].keys() == expected[1].keys()
    for name, grad in expected[1].items():
        torch.testing.assert_close(got[1][name], grad, rtol=0, atol=0, msg=name)  # the same operations on the same inputs
    # Without recompute each suffix layer runs once; with it, once more in the backward (the prefix layers never again).
    suffix_calls = sum(kind == "suffix" for kind, _ in kept)
    assert suffix_calls > 0 and calls[: len(kept)] == kept
    assert calls[len(kept):] == [("suffix", True)] * suffix_calls


@pytest.fixture(params=["default", "onednn"])
def products(request, monkeypatch):
    """The eager training products on the default BLAS, then on oneDNN (`cpu_matmul.onednn_linears`)."""
    if request.param == "onednn" and cpu_matmul._onednn_op() is None:
        pytest.skip("this torch build has no oneDNN linear op")
    monkeypatch.setenv(cpu_matmul.ENV, request.param)
    cpu_matmul.clear_decisions()
    yield request.param
    cpu_matmul.clear_decisions()


@pytest.mark.parametrize("compile, recompute", [(True, False), (False, True), (True, True)])
def test_token_logprobs_runs_the_layer_functions_in_the_grad_pass(compile, recompute, products, monkeypatch):
    # Under oneDNN the recompute in the backward must run oneDNN's products too, though the backward runs after the
    # forward's `onednn_linears()` has closed: other products save other tensors, and the checkpoint refused them.
    # The lean layers swap the modules' forwards for the pass, and the layer functions refuse a swapped forward:
    # they must be chosen before, or compile and recompute would silently keep the Hugging Face forward.
    model = _build(_qwen2)
    (input_ids, attention_mask, position_ids, P, _), _ = _rows()
    target_mask = attention_mask.bool().clone()
    target_mask[:, :P] = False
    calls = []

    def eager(kind, shape, compile, *args):  # the compiled call, run eagerly (compiling takes a minute)
        calls.append(kind)
        return compiled_forward._layer_function(kind, shape)(*args)

    monkeypatch.setattr(compiled_forward, "_call", eager)
    expected = token_logprobs(model, input_ids, attention_mask, position_ids, target_mask, prompt_length=P)[0]
    assert calls == []
    got = token_logprobs(
        model, input_ids, attention_mask, position_ids, target_mask, prompt_length=P, compile=compile, recompute=recompute
    )[0]
    forward = calls.count("suffix")
    assert calls.count("prefix") == 2 and forward > 0 and forward % 2 == 0  # 2 layers, once per length bucket
    got.sum().backward()
    assert calls.count("suffix") == (2 * forward if recompute else forward)  # recomputed: each again in the backward
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_hugging_face_checkpointing_recomputes_with_the_forwards_products(products):
    # gradient_checkpointing=True (Hugging Face's, non-reentrant), as the real-model configs set it. The recompute runs
    # after token_logprobs' contexts have closed; it once ran other forwards than the pass (the lean layers' swap
    # gone; under oneDNN, MKL's products), and the checkpoint refused what they saved (CheckpointError).
    plain = load_model("builtin:tiny", vocab_size=VOCAB).train()
    checkpointed = load_model("builtin:tiny", vocab_size=VOCAB, gradient_checkpointing=True).train()
    assert checkpointed.is_gradient_checkpointing
    torch.testing.assert_close(checkpointed.state_dict(), plain.state_dict(), rtol=0, atol=0)
    (input_ids, attention_mask, position_ids, P, _), _ = _rows()
    target_mask = attention_mask.bool().clone()
    target_mask[:, :P] = False
    grads = []
    for model in (plain, checkpointed):
        token_logprobs(model, input_ids, attention_mask, position_ids, target_mask)[0].sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name, grad in grads[0].items():
        # Float32 rounding only: the checkpointed layers run the plain MLP and norm forwards, not the lean ones.
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_recompute_needs_the_layer_functions():
    model = _build(_qwen2)
    rows, _ = _rows()
    with pytest.raises(ValueError, match="recompute needs the layer functions"):
        shared_prefix_hidden(model.model, *rows, None, True)


def test_prompt_padding_rows_stay_finite():
    # A left-padding query sees no key; it attends to itself, so nothing turns NaN (a NaN there would
    # poison every weight gradient through 0 * NaN).
    model = _build(_qwen2)
    (input_ids, attention_mask, position_ids, P, _), _ = _rows()
    hidden, cache = compiled_forward.CompiledLayers(model, compile=False).prefix(input_ids[:, :P], attention_mask[:, :P], position_ids[:, :P])
    assert torch.isfinite(hidden).all() and all(torch.isfinite(k).all() and torch.isfinite(v).all() for k, v in cache)


@pytest.mark.slow
def test_compiled_layers_match_the_hugging_face_forward_and_grpo_uses_them():
    # The benchmark's model shape (builtin:tiny), so inductor's on-disk cache serves the benchmark after this test.
    model = build_builtin_model("builtin:tiny", vocab_size=VOCAB, seed=0).train()
    rows, valid = _rows()
    expected = _hidden_and_grads(model, None, rows, valid)
    got = _hidden_and_grads(model, compiled_forward.compiled_layers(model), rows, valid)
    assert not compiled_forward._FAILED
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
    for name, grad in expected[1].items():
        # Inductor sums in other orders: float32 rounding (HF's own float32 gradients are ~1e-4 from float64's here).
        assert (got[1][name] - grad).norm() <= 1e-4 * grad.norm() + 1e-7, name

    # Through token_logprobs, as GRPO calls it, with and without grad (the reference's pass).
    input_ids, attention_mask, position_ids, P, _ = rows
    target_mask = attention_mask.bool().clone()
    target_mask[:, :P] = False
    for grad_mode in (True, False):
        with torch.set_grad_enabled(grad_mode):
            eager = token_logprobs(model, input_ids, attention_mask, position_ids, target_mask, prompt_length=P)[0]
            compiled = token_logprobs(model, input_ids, attention_mask, position_ids, target_mask, prompt_length=P, compile=True)[0]
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)

    # Compiled and recomputed in the backward (torch.utils.checkpoint around the compiled layers): the same gradients.
    grads = []
    for recompute in (False, True):
        model.zero_grad(set_to_none=True)
        logprobs = token_logprobs(
            model, input_ids, attention_mask, position_ids, target_mask, prompt_length=P, compile=True, recompute=recompute
        )[0]
        logprobs.sum().backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    assert not compiled_forward._FAILED
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_a_compiler_failure_falls_back_to_the_eager_functions_once(monkeypatch):
    model = _build(_qwen2)
    rows, valid = _rows()
    calls = []

    def broken_compile(fn, **kwargs):
        def run(*args):
            calls.append(fn.__name__)
            raise RuntimeError("no C++ compiler\nsecond line")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(compiled_forward, "_COMPILED", {})
    monkeypatch.setattr(compiled_forward, "_FAILED", [])
    expected = _hidden_and_grads(model, None, rows, valid)
    with pytest.warns(UserWarning, match="torch.compile failed .RuntimeError: no C\\+\\+ compiler.; training forwards run eagerly"):
        got = _hidden_and_grads(model, compiled_forward.CompiledLayers(model), rows, valid)
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    assert calls == ["prefix"]  # tried once, then eager for the rest of the process
    assert compiled_forward.unsupported_reason(model).startswith("compiling failed earlier in this process: RuntimeError")


def test_models_it_does_not_reproduce_are_refused():
    lora = apply_lora(_build(_qwen2), LoraSettings(r=4, target_modules=["q_proj", "v_proj"]))
    assert "adapters" in compiled_forward.unsupported_reason(lora.get_base_model())
    assert "sliding-window" in compiled_forward.unsupported_reason(
        MistralForCausalLM(MistralConfig(**SHAPE, num_attention_heads=8, num_key_value_heads=2, sliding_window=16))
    )
    dropout = Qwen2ForCausalLM(Qwen2Config(**SHAPE, num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.1))
    assert compiled_forward.unsupported_reason(dropout.train()) == "attention dropout"
    assert compiled_forward.unsupported_reason(dropout.eval()) is None
    assert compiled_forward.compiled_layers(dropout.train()) is None


def test_grpo_warns_when_compile_cannot_apply():
    from r1_lightning import GRPO

    module = GRPO(model_name_or_path="builtin:tiny", compile=True, lora=LoraSettings(r=4, target_modules=["q_proj"]), beta=0.0)
    with pytest.warns(UserWarning, match=r"GRPO\(compile=True\): the training forwards stay eager: module .* is a"):
        module.configure_model()
    module = GRPO(model_name_or_path="builtin:tiny", compile=True, gradient_checkpointing=True)
    with pytest.warns(UserWarning, match=r"stay eager: module model.embed_tokens has forward hooks"):  # HF checkpointing hooks
        module.configure_model()


def test_compile_pays_when_the_saving_over_the_steps_left_exceeds_the_one_time_cost():
    # saving = 0.15 * training seconds * steps left, against 120 s: 0.15 * 10 * 100 = 150 > 120; 0.15 * 10 * 80 = 120 (not >);
    # the tiny model's 0.2 s over 1,000 steps: 30 s.
    assert (compiled_forward.AUTO_COMPILE_SAVING, compiled_forward.AUTO_COMPILE_COST_S) == (0.15, 120.0)
    assert compiled_forward.compile_pays(10.0, 100)
    assert not compiled_forward.compile_pays(10.0, 80)
    assert not compiled_forward.compile_pays(0.2, 1_000)
    assert compiled_forward.compile_pays(0.2, float("inf"))  # a run without max_steps or max_epochs
    assert not compiled_forward.compile_pays(500.0, 0)  # the last step


def test_grpo_compile_auto_decides_after_the_first_step_with_one_log_line(tmp_path, monkeypatch, caplog):
    from grpo_helpers import fit, prompt_data, tiny_grpo

    from r1_lightning.rl import cpu_matmul

    monkeypatch.setenv(cpu_matmul.ENV, "default")  # the BLAS compiled layers use too (oneDNN: the test below)
    cpu_matmul.clear_decisions()
    module = tiny_grpo()
    assert module.hparams.compile == "auto" and not module._compile_now
    with caplog.at_level("INFO"):
        fit(module, prompt_data(), tmp_path / "short", max_steps=3)
    lines = [r.getMessage() for r in caplog.records if "GRPO(compile='auto')" in r.getMessage()]
    # Decided once, after the second step (the first carries warm-up costs): one step is left.
    assert len(lines) == 1 and "stay eager" in lines[0] and "in the second step" in lines[0] and "1 more steps" in lines[0], lines
    assert not module._compile_now

    # A run long enough to repay it turns compiling on for the steps after the first (here there are none).
    monkeypatch.setattr(compiled_forward, "compile_pays", lambda seconds, remaining: True)
    module = tiny_grpo()
    caplog.clear()
    with caplog.at_level("INFO"):
        fit(module, prompt_data(), tmp_path / "long", max_steps=2)
    lines = [r.getMessage() for r in caplog.records if "GRPO(compile='auto')" in r.getMessage()]
    assert len(lines) == 1 and "compiled from the next step" in lines[0], lines
    assert module._compile_now
    cpu_matmul.clear_decisions()


def test_grpo_compile_auto_stays_eager_where_matmuls_run_through_onednn(tmp_path, monkeypatch, caplog):
    from grpo_helpers import fit, prompt_data, tiny_grpo

    from r1_lightning.rl import cpu_matmul

    if cpu_matmul._onednn_op() is None:
        pytest.skip("this torch build has no oneDNN linear op")
    monkeypatch.setenv(cpu_matmul.ENV, "onednn")
    cpu_matmul.clear_decisions()
    monkeypatch.setattr(compiled_forward, "compile_pays", lambda seconds, remaining: True)  # however long the run
    # Each process probes its own backend, so ranks can disagree: this rank must still join rank 0's broadcast
    # (it once returned early, and a 2-process run hung at the second step).
    from lightning.pytorch.strategies import SingleDeviceStrategy

    broadcasts = []
    monkeypatch.setattr(SingleDeviceStrategy, "broadcast", lambda self, obj, src=0: broadcasts.append(obj) or obj)
    module = tiny_grpo()
    with caplog.at_level("INFO"):
        fit(module, prompt_data(), tmp_path / "run", max_steps=2)
    cpu_matmul.clear_decisions()
    lines = [r.getMessage() for r in caplog.records if "GRPO(compile='auto')" in r.getMessage()]
    assert len(lines) == 1 and "stay eager: its float32 matmuls run through oneDNN" in lines[0], lines
    assert not module._compile_now
    assert [b for b in broadcasts if isinstance(b, bool)] == [False]  # (Lightning broadcasts its log dir too)


# Long completions: the layer functions skip the causal half of their attention (`suffix_attention`).
def test_layer_functions_split_long_completions_and_match_the_hugging_face_forward(monkeypatch):
    model = _build(_qwen2)
    rows, valid = _rows()
    expected = _hidden_and_grads(model, None, rows, valid)
    kinds = []
    counted = compiled_forward._call
    monkeypatch.setattr(compiled_forward, "_call", lambda kind, *args: kinds.append(kind) or counted(kind, *args))
    monkeypatch.setattr(suffix_attention, "MIN_COMPLETION_LENGTH", 1)
    layers = compiled_forward.CompiledLayers(model, compile=False)
    for recompute in (False, True):
        kinds.clear()
        got = _hidden_and_grads(model, layers, rows, valid, recompute=recompute)
        assert "causal_suffix" in kinds and "suffix" not in kinds, kinds
        torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
        assert got[1].keys() == expected[1].keys()
        for name, grad in expected[1].items():  # float rounding of sums over many tokens: relative to the largest entry
            assert (got[1][name] - grad).abs().max() <= 2e-6 * grad.abs().max(), name


@pytest.mark.parametrize("minimum, kind", [(1, "causal_suffix"), (10_000, None)])
def test_the_reference_pass_runs_the_split_layer_functions_for_long_completions_only(minimum, kind, monkeypatch):
    model = _build(_qwen2).eval()
    (input_ids, attention_mask, position_ids, P, _), _ = _rows()
    target_mask = torch.zeros_like(attention_mask, dtype=torch.bool)
    target_mask[:, P:] = attention_mask[:, P:].bool()
    with torch.no_grad():
        expected, _ = token_logprobs(model, input_ids, attention_mask, position_ids, target_mask)  # whole rows, HF forward
        kinds = []
        counted = compiled_forward._call
        monkeypatch.setattr(compiled_forward, "_call", lambda k, *args: kinds.append(k) or counted(k, *args))
        monkeypatch.setattr(suffix_attention, "MIN_COMPLETION_LENGTH", minimum)
        got, _ = token_logprobs(model, input_ids, attention_mask, position_ids, target_mask, prompt_length=P)
    assert (kind in kinds) if kind else not kinds, kinds  # short completions keep the Hugging Face forward
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_grad_pass_without_recompute_keeps_the_hugging_face_forward_for_long_completions(monkeypatch):
    # Its lean layers keep fewer activations for the backward than the layer functions would.
    model = _build(_qwen2)
    (input_ids, attention_mask, position_ids, P, _), _ = _rows()
    target_mask = torch.zeros_like(attention_mask, dtype=torch.bool)
    target_mask[:, P:] = attention_mask[:, P:].bool()
    kinds = []
    counted = compiled_forward._call
    monkeypatch.setattr(compiled_forward, "_call", lambda k, *args: kinds.append(k) or counted(k, *args))
    monkeypatch.setattr(suffix_attention, "MIN_COMPLETION_LENGTH", 1)
    logprobs, _ = token_logprobs(model, input_ids, attention_mask, position_ids, target_mask, prompt_length=P)
    assert logprobs.requires_grad and not kinds, kinds
