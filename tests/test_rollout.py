"""Tests for the rollout engine (`r1_lightning.engines.hf`) on a tiny random Qwen2."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers

from r1_lightning.engines.fast_decode import fast_decode_step
from r1_lightning.engines.hf import (
    HFGenerateEngine,
    Rollout,
    RolloutEngine,
    SamplingParams,
    left_pad,
    sample_next_token,
)

PAD, EOS, EOS2 = 0, 3, 4
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]  # different lengths -> left padding


def tiny_model(seed: int = 0) -> transformers.Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=PAD,
        eos_token_id=EOS,
    )
    return transformers.Qwen2ForCausalLM(config).eval()


def bias_tokens(model: torch.nn.Module, tokens: list[int], bias: float) -> torch.utils.hooks.RemovableHandle:
    """Add `bias` to the logits of `tokens` (Qwen2's lm_head has no bias of its own)."""
    offset = torch.zeros(model.config.vocab_size)
    offset[tokens] = bias
    return model.lm_head.register_forward_hook(lambda module, args, out: out + offset)


def params(**overrides) -> SamplingParams:
    return SamplingParams(**{"max_new_tokens": 12, "eos_token_ids": [EOS], "pad_token_id": PAD, **overrides})


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_engine_implements_the_interface():
    assert isinstance(HFGenerateEngine(), RolloutEngine)


@pytest.mark.parametrize(
    "bad",
    [
        {"max_new_tokens": 0},
        {"temperature": -0.1},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
    ],
)
def test_sampling_params_reject_bad_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        params(**bad)


def test_sampling_params_accept_a_single_eos_id():
    assert params(eos_token_ids=EOS).eos_token_ids == [EOS]


def test_shapes_row_order_and_masks():
    model = tiny_model()
    G = 4
    handle = bias_tokens(model, [EOS, EOS2], 2.5)  # ~4% each per step: some rows end, some run out
    rollout = HFGenerateEngine().generate(model, PROMPTS, G, params(max_new_tokens=16, eos_token_ids=[EOS, EOS2]), seeded(0))
    handle.remove()

    N, P = len(PROMPTS) * G, max(map(len, PROMPTS))
    T = rollout.completion_ids.shape[1]
    assert rollout.prompt_ids.shape == rollout.prompt_mask.shape == (N, P)
    assert rollout.completion_mask.shape == rollout.logprobs.shape == (N, T)
    assert rollout.truncated.shape == (N,) and rollout.truncated.dtype == torch.bool
    # Row order: the G rows of prompt b are b*G ... b*G+G-1.
    ids, mask = left_pad(PROMPTS, PAD)
    torch.testing.assert_close(rollout.prompt_ids, ids.repeat_interleave(G, 0))
    torch.testing.assert_close(rollout.prompt_mask, mask.repeat_interleave(G, 0))

    for row, mask_row, logprobs, truncated in zip(
        rollout.completion_ids.tolist(), rollout.completion_mask.tolist(), rollout.logprobs, rollout.truncated.tolist()
    ):
        ends = [t for t, token in enumerate(row) if token in (EOS, EOS2)]
        length = ends[0] + 1 if ends else T  # the EOS is part of the completion
        assert truncated == (not ends)
        assert mask_row == [1] * length + [0] * (T - length)
        assert row[length:] == [PAD] * (T - length)
        assert (logprobs[:length] < 0).all() and (logprobs[length:] == 0).all()
    # The mix this test is about, and T is the longest completion.
    assert rollout.truncated.any() and not rollout.truncated.all()
    assert T == 16 == rollout.completion_lengths.max()


@pytest.mark.parametrize("eos_bias, expected_length, truncated", [(100.0, 1, False), (-100.0, 7, True)])
def test_forced_eos_and_forced_truncation(eos_bias, expected_length, truncated):
    model = tiny_model()
    handle = bias_tokens(model, [EOS], eos_bias)
    rollout = HFGenerateEngine().generate(model, PROMPTS, 2, params(max_new_tokens=7), seeded(0))
    handle.remove()

    assert rollout.completion_ids.shape == (6, expected_length)
    assert (rollout.completion_mask == 1).all()
    assert (rollout.truncated == truncated).all()
    if not truncated:  # everyone stopped at once: the loop must not run on to max_new_tokens
        assert (rollout.completion_ids == EOS).all()


def test_greedy_matches_hf_generate():
    model = tiny_model()
    ids, mask = left_pad(PROMPTS, PAD)
    hf_kwargs = dict(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=10, pad_token_id=PAD)
    # Make the EOS a token that row 0 greedily emits at step 4, so rows end at different steps.
    eos = model.generate(**hf_kwargs, eos_token_id=299)[0, ids.shape[1] + 4].item()

    expected = model.generate(**hf_kwargs, eos_token_id=eos)[:, ids.shape[1] :]
    rollout = HFGenerateEngine().generate(
        model, PROMPTS, 1, params(max_new_tokens=10, temperature=0.0, eos_token_ids=[eos])
    )
    torch.testing.assert_close(rollout.completion_ids, expected)
    assert rollout.completion_mask[0].sum() <= 5 and rollout.truncated[1:].any()


def test_greedy_rows_of_a_prompt_are_identical_and_in_prompt_order():
    model = tiny_model()
    greedy = params(temperature=0.0)
    single = HFGenerateEngine().generate(model, PROMPTS, 1, greedy)
    grouped = HFGenerateEngine().generate(model, PROMPTS, 3, greedy)
    torch.testing.assert_close(grouped.completion_ids, single.completion_ids.repeat_interleave(3, 0))
    torch.testing.assert_close(grouped.logprobs, single.logprobs.repeat_interleave(3, 0))


def test_prefill_is_shared_by_the_group_and_sampling_is_seeded():
    model = tiny_model()
    handle = bias_tokens(model, [EOS], -100.0)  # every row runs the full 8 steps
    calls = []
    model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    G, B, P = 4, len(PROMPTS), max(map(len, PROMPTS))

    first = HFGenerateEngine().generate(model, PROMPTS, G, params(max_new_tokens=8, temperature=1.0), seeded(1))
    # One prefill on the B distinct prompts, then one single-token step per further token.
    assert calls == [(B, P)] + [(B * G, 1)] * 7

    again = HFGenerateEngine().generate(model, PROMPTS, G, params(max_new_tokens=8, temperature=1.0), seeded(1))
    other = HFGenerateEngine().generate(model, PROMPTS, G, params(max_new_tokens=8, temperature=1.0), seeded(2))
    handle.remove()
    torch.testing.assert_close(first.completion_ids, again.completion_ids)
    torch.testing.assert_close(first.logprobs, again.logprobs)
    assert not torch.equal(first.completion_ids, other.completion_ids)
    for group in first.completion_ids.view(B, G, -1):  # the G samples of a prompt differ
        assert len({tuple(row.tolist()) for row in group}) == G


@pytest.mark.parametrize(
    "sampling, eos_bias",  # biases chosen so that some rows, not all, end before max_new_tokens
    [
        (dict(temperature=0.0), 0.3),
        (dict(temperature=0.7, top_k=50), 1.5),  # filtered sampling, log-probs still over the full vocabulary
        (dict(temperature=1.3, top_p=0.9), 4.0),
    ],
)
def test_logprobs_match_a_teacher_forced_forward(sampling, eos_bias):
    model = tiny_model()
    handle = bias_tokens(model, [EOS], eos_bias)
    rollout = HFGenerateEngine().generate(model, PROMPTS, 3, params(max_new_tokens=10, **sampling), seeded(0))
    lengths = rollout.completion_lengths
    assert lengths.min() < lengths.max()

    P = rollout.prompt_ids.shape[1]
    temperature = sampling["temperature"] or 1.0  # greedy reports the raw distribution
    logits = model(**rollout.model_inputs()).logits[:, P - 1 : -1].float()  # [N, T, V]
    handle.remove()
    expected = (logits / temperature).log_softmax(-1).gather(-1, rollout.completion_ids[..., None]).squeeze(-1)
    mask = rollout.completion_mask.bool()
    torch.testing.assert_close(rollout.logprobs[mask], expected[mask], atol=1e-4, rtol=0)
    assert (rollout.logprobs[~mask] == 0).all()

    # The rollout's tensors are ordinary tensors, fit for a training step (not inference tensors).
    loss = -(expected * rollout.completion_mask * rollout.logprobs.exp()).sum()
    loss.backward()
    assert model.lm_head.weight.grad is not None


def test_top_k_1_and_tiny_top_p_equal_greedy():
    model = tiny_model()
    engine = HFGenerateEngine()
    greedy = engine.generate(model, PROMPTS, 2, params(temperature=0.0))
    for filtered in (params(temperature=1.0, top_k=1), params(temperature=1.0, top_p=1e-6)):
        rollout = engine.generate(model, PROMPTS, 2, filtered, seeded(0))
        torch.testing.assert_close(rollout.completion_ids, greedy.completion_ids)
        # At temperature 1 the sampling distribution is the greedy report's distribution.
        torch.testing.assert_close(rollout.logprobs, greedy.logprobs)


def test_sample_next_token_frequencies():
    # probs (0.5, 0.3, 0.2). top_p=0.6: token 0 alone has 0.5 < 0.6, so tokens {0, 1} stay and
    # renormalise to (0.625, 0.375); top_k=2 keeps the same two; top_p=0.45: token 0 alone.
    logits = torch.tensor([0.5, 0.3, 0.2]).log().expand(20_000, 3).contiguous()
    cases = [
        (dict(), [0.5, 0.3, 0.2]),
        (dict(top_p=0.6), [0.625, 0.375, 0.0]),
        (dict(top_k=2), [0.625, 0.375, 0.0]),
        (dict(top_p=0.45), [1.0, 0.0, 0.0]),
    ]
    for filtering, expected in cases:
        tokens, logprobs = sample_next_token(logits, params(temperature=1.0, **filtering), seeded(0))
        frequencies = torch.bincount(tokens, minlength=3) / len(tokens)
        torch.testing.assert_close(frequencies, torch.tensor(expected), atol=0.015, rtol=0)
        # Log-probs are of the unfiltered distribution.
        torch.testing.assert_close(logprobs, logits[0].log_softmax(-1)[tokens])


def test_train_mode_restored_and_gradient_checkpointing_tolerated():
    model = tiny_model()
    greedy = params(temperature=0.0)
    expected = HFGenerateEngine().generate(model, PROMPTS, 2, greedy)
    assert not model.training

    # `activation_checkpointing_enable` in newer transformers, `gradient_checkpointing_enable` up to 5.19.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.config.use_cache = False  # as training setups with checkpointing do
    model.train()
    calls = []
    model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(module.training), with_kwargs=True)
    model.model.layers[0].eval()  # a part frozen in eval on purpose keeps its mode
    rollout = HFGenerateEngine().generate(model, PROMPTS, 2, greedy)
    assert not any(calls)
    assert model.training and model.model.layers[1].training and not model.model.layers[0].training
    torch.testing.assert_close(rollout.completion_ids, expected.completion_ids)


def test_generator_on_another_device_is_rejected():
    if not torch.cuda.is_available():
        pytest.skip("needs a second device type")
    with pytest.raises(ValueError, match="generator"):
        HFGenerateEngine().generate(tiny_model(), PROMPTS, 2, params(), torch.Generator(device="cuda"))


def _lockstep_worker(rank: int, world_size: int, init_file: str, results: str) -> None:
    from torch.distributed.fsdp import fully_shard

    # A rank that fell out of step would block in an all-gather: fail instead of hanging.
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size, timeout=timedelta(seconds=30)
    )
    try:
        torch.set_num_threads(1)
        model = tiny_model()
        for layer in model.model.layers:
            fully_shard(layer)  # every forward all-gathers the weights across the two ranks
        fully_shard(model)
        bias_tokens(model, [EOS], 100.0 if rank == 0 else -100.0)  # rank 0 ends at once, rank 1 never
        calls = []
        model.register_forward_pre_hook(lambda *_: calls.append(1))
        rollout = HFGenerateEngine().generate(model, PROMPTS, 2, params(max_new_tokens=6), seeded(rank))
        forwards = len(calls)
        # The training step that follows generation must still work on the sharded model.
        model.train()
        model(**rollout.model_inputs()).logits.float().mean().backward()
        torch.save({"forwards": forwards, "rollout": rollout}, f"{results}/rank{rank}.pt")
        dist.barrier()  # neither rank tears gloo down while the other still has collectives in flight
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes
def test_ranks_step_in_lockstep_under_fsdp(tmp_path):
    mp.spawn(_lockstep_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    done, running = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert done["forwards"] == running["forwards"] == 6  # prefill + 5 decode steps, on both ranks
    # The finished rank kept stepping with masked pad rows; its result is unchanged by that.
    assert isinstance(done["rollout"], Rollout)
    assert done["rollout"].completion_mask.tolist() == [[1, 0, 0, 0, 0, 0]] * 6
    assert (done["rollout"].completion_ids[:, 1:] == PAD).all() and not done["rollout"].truncated.any()
    assert running["rollout"].truncated.all()


@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.7, top_k=50)])
@pytest.mark.parametrize("per_prompt_generators", [False, True])
@pytest.mark.parametrize("fast_step", [False, True])
def test_dropping_finished_rows_changes_no_token(sampling, per_prompt_generators, fast_step, monkeypatch):
    # Rows that end early leave the decode batch; every row still draws its sampling noise, so the tokens are those of
    # a batch that keeps them (log-probs to matmul rounding at other batch sizes). Ending early: a logit bias on EOS
    # (a hook: the Hugging Face forward) or 60 of the 300 tokens as EOS ids (no hook: the fast decode step).
    from r1_lightning.engines import hf

    model = tiny_model()
    handle = None if fast_step else bias_tokens(model, [EOS], 2.0)
    eos = list(range(3, 63)) if fast_step else [EOS]
    steps = []
    monkeypatch.setattr(hf, "fast_decode_step", lambda *a: steps.append(fast_decode_step(*a)) or steps[-1])

    def run():
        generator = [seeded(s) for s in range(len(PROMPTS))] if per_prompt_generators else seeded(0)
        return HFGenerateEngine().generate(model, PROMPTS, 4, params(max_new_tokens=16, eos_token_ids=eos, **sampling), generator)

    compacted = run()
    monkeypatch.setattr(hf, "COMPACT_FRACTION", 2.0)  # never
    kept = run()
    if handle is not None:
        handle.remove()
    assert all((step is not None) == fast_step for step in steps)
    lengths = kept.completion_lengths
    assert lengths.min() < lengths.max() and (lengths < 16).sum() >= 3  # rows did finish early
    assert torch.equal(compacted.completion_ids, kept.completion_ids)
    assert torch.equal(compacted.completion_mask, kept.completion_mask)
    torch.testing.assert_close(compacted.logprobs, kept.logprobs, atol=1e-5, rtol=0)
