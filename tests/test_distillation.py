"""Distillation: the divergences by hand, chunked vs naive, vocabularies, on-policy rows, and learning runs."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from test_logprobs import _PeakTensorBytes

from r1_lightning import ColdStartDataModule, Distillation, PolicySFT, PromptDataModule
from r1_lightning.data.cold_start import pack, pad
from r1_lightning.errors import ConfigError
from r1_lightning.policy import build_builtin_model, build_builtin_tokenizer, load_model
from r1_lightning.recipe import load_recipe, run_stage
from r1_lightning.modules.divergences import (
    ForwardKL,
    GeneralizedJSD,
    ReverseKL,
    chunked_divergence,
    distillation_loss,
    naive_divergence,
    resolve_divergence,
)

LN2, LN3 = math.log(2), math.log(3)
QUIET = dict(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False)


def _divergence_of_probs(divergence, student_probs, teacher_probs, temperature=1.0, top_k=0):
    """chunked_divergence on logits = log p: hidden = log p and an identity head (H = V)."""
    student = torch.tensor(student_probs, dtype=torch.float64).log().requires_grad_()  # [M, V]
    teacher = torch.tensor(teacher_probs, dtype=torch.float64).log()  # [M, V]
    eye = torch.eye(student.shape[-1], dtype=torch.float64)
    values, agree = chunked_divergence(student, eye, teacher, eye, divergence, temperature, top_k, chunk_size=1)
    return values, agree, student


# ----------------------------------------------------------------------------- hand values
# p_T = [3/4, 1/4], p_S = [1/2, 1/2]:
#   forward KL(p_T‖p_S) = 3/4 ln(3/2) + 1/4 ln(1/2) = 3/4 ln 3 - ln 2                    = 0.1308120
#   reverse KL(p_S‖p_T) = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3)                           = 0.1438410
#   JSD(1/2): M = [5/8, 3/8]; 1/2 [3/4 ln(6/5) + 1/4 ln(2/3)] + 1/2 [1/2 ln(4/5) + 1/2 ln(4/3)]
#           = 1/2 (0.0353732) + 1/2 (0.0322689)                                          = 0.0338221
#   JSD(1/4): M = 1/4 p_T + 3/4 p_S = [9/16, 7/16];
#           1/4 [3/4 ln(4/3) + 1/4 ln(4/7)] + 3/4 [1/2 ln(8/9) + 1/2 ln(8/7)]             = 0.0248700
HAND = [
    (ForwardKL(), 0.75 * LN3 - LN2),
    (ReverseKL(), 0.5 * math.log(4 / 3)),
    (GeneralizedJSD(0.5), 0.5 * (0.75 * math.log(6 / 5) + 0.25 * math.log(2 / 3)) + 0.5 * (0.5 * math.log(4 / 5) + 0.5 * math.log(4 / 3))),
    (GeneralizedJSD(0.25), 0.25 * (0.75 * math.log(4 / 3) + 0.25 * math.log(4 / 7)) + 0.75 * (0.5 * math.log(8 / 9) + 0.5 * math.log(8 / 7))),
]


@pytest.mark.parametrize(("divergence", "expected"), HAND, ids=lambda x: repr(x) if not isinstance(x, float) else "")
def test_divergences_hand_values(divergence, expected):
    values, _, _ = _divergence_of_probs(divergence, [[0.5, 0.5]], [[0.75, 0.25]])
    torch.testing.assert_close(values, torch.tensor([expected], dtype=torch.float64))
    reference = naive_divergence(torch.tensor([[0.5, 0.5]]).log(), torch.tensor([[0.75, 0.25]]).log(), divergence.name, getattr(divergence, "beta", 0.5))
    torch.testing.assert_close(reference, torch.tensor([expected], dtype=torch.float32))


def test_gradients_by_hand():
    # Same p_T, p_S; the head is the identity, so d/d hidden = d/d logits.
    # forward KL: d/dz = p_S - p_T = [1/2 - 3/4, 1/2 - 1/4] = [-1/4, 1/4].
    values, _, student = _divergence_of_probs(ForwardKL(), [[0.5, 0.5]], [[0.75, 0.25]])
    values.sum().backward()
    torch.testing.assert_close(student.grad, torch.tensor([[-0.25, 0.25]], dtype=torch.float64))
    # reverse KL: d/dz = p_S (log p_S - log p_T - KL) = 1/2 [ln(2/3) - 1/2 ln(4/3), ln 2 - 1/2 ln(4/3)]
    #           = 1/2 [-1/2 ln 3, 1/2 ln 3] = [-ln 3 / 4, ln 3 / 4].
    values, _, student = _divergence_of_probs(ReverseKL(), [[0.5, 0.5]], [[0.75, 0.25]])
    values.sum().backward()
    torch.testing.assert_close(student.grad, torch.tensor([[-LN3 / 4, LN3 / 4]], dtype=torch.float64))


def test_jsd_ends_are_forward_and_reverse_kl():
    student, teacher = [[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]], [[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]
    forward = _divergence_of_probs(ForwardKL(), student, teacher)[0]
    reverse = _divergence_of_probs(ReverseKL(), student, teacher)[0]
    # By definition (the module docstring): β = 0 is forward KL, β = 1 reverse KL, exactly.
    torch.testing.assert_close(_divergence_of_probs(GeneralizedJSD(0.0), student, teacher)[0], forward)
    torch.testing.assert_close(_divergence_of_probs(GeneralizedJSD(1.0), student, teacher)[0], reverse)
    # ... which are the limits of JSD(β)/β as β → 0 and JSD(β)/(1-β) as β → 1 (the error is O(β)).
    eps = 1e-5
    torch.testing.assert_close(_divergence_of_probs(GeneralizedJSD(eps), student, teacher)[0] / eps, forward, rtol=1e-4, atol=0)
    torch.testing.assert_close(_divergence_of_probs(GeneralizedJSD(1 - eps), student, teacher)[0] / eps, reverse, rtol=1e-4, atol=0)
    # β = 1/2 is symmetric in the two distributions and at most ln 2.
    half = _divergence_of_probs(GeneralizedJSD(0.5), student, teacher)[0]
    torch.testing.assert_close(half, _divergence_of_probs(GeneralizedJSD(0.5), teacher, student)[0])
    assert (half <= LN2).all() and (half > 0).all()


def test_top_k_teacher_hand_values():
    # Teacher [0.5, 0.3, 0.2] cut to its top 2 and renormalised: p_T^k = [5/8, 3/8, 0]; student uniform.
    # forward KL = 5/8 ln((5/8)/(1/3)) + 3/8 ln((3/8)/(1/3)) + 0 = 5/8 ln(15/8) + 3/8 ln(9/8)        = 0.4370497
    # JSD(1/2): M = [23/48, 17/48, 8/48]; the third token (teacher 0) adds 1/2 · 1/3 ln((1/3)/(1/6)):
    #   1/2 [5/8 ln(30/23) + 3/8 ln(18/17)] + 1/2 · 1/3 [ln(16/23) + ln(16/17) + ln 2]             = 0.1000990
    student, teacher = [[1 / 3, 1 / 3, 1 / 3]], [[0.5, 0.3, 0.2]]
    forward = _divergence_of_probs(ForwardKL(), student, teacher, top_k=2)[0]
    torch.testing.assert_close(forward, torch.tensor([5 / 8 * math.log(15 / 8) + 3 / 8 * math.log(9 / 8)], dtype=torch.float64))
    jsd = _divergence_of_probs(GeneralizedJSD(0.5), student, teacher, top_k=2)[0]
    expected = 0.5 * (5 / 8 * math.log(30 / 23) + 3 / 8 * math.log(18 / 17)) + 0.5 / 3 * (math.log(16 / 23) + math.log(16 / 17) + LN2)
    torch.testing.assert_close(jsd, torch.tensor([expected], dtype=torch.float64))
    # Reverse KL against a teacher that is 0 on a token the student likes is infinite: refused.
    with pytest.raises(ValueError, match="top_k=2"):
        _divergence_of_probs(ReverseKL(), student, teacher, top_k=2)


def test_teacher_agreement_compares_argmax_tokens():
    # Row 0: both argmax 0. Row 1: student 2, teacher 1. Row 2: both 1 (temperature keeps the argmax).
    student = [[0.6, 0.3, 0.1], [0.2, 0.3, 0.5], [0.1, 0.8, 0.1]]
    teacher = [[0.5, 0.4, 0.1], [0.1, 0.7, 0.2], [0.3, 0.4, 0.3]]
    _, agree, _ = _divergence_of_probs(ForwardKL(), student, teacher, temperature=3.0)
    assert agree.tolist() == [True, False, True] and not agree.requires_grad


def test_temperature_squared_scaling():
    # distillation_loss = τ² · the token mean of the τ-softened divergence.
    per_token = torch.tensor([0.1, 0.3])
    loss, metrics = distillation_loss(per_token, temperature=2.0)
    torch.testing.assert_close(loss, torch.tensor(0.8))  # 4 · 0.2
    torch.testing.assert_close(metrics["divergence"], torch.tensor(0.2))
    # Why τ²: d KL(τ)/dz = (q - p)/τ, and for large τ, q ≈ (1 + (z - z̄)/τ)/V, so
    # τ² · d KL/dz_S → ((z_S - z̄_S) - (z_T - z̄_T)) / V: independent of τ (Hinton et al. 2015, eq. 3).
    gen = torch.Generator().manual_seed(0)
    z_student, z_teacher = torch.randn(1, 7, generator=gen, dtype=torch.float64), torch.randn(1, 7, generator=gen, dtype=torch.float64)
    expected = ((z_student - z_student.mean()) - (z_teacher - z_teacher.mean())) / 7
    eye = torch.eye(7, dtype=torch.float64)
    for tau in (1e3, 1e4):
        hidden = z_student.clone().requires_grad_()
        values, _ = chunked_divergence(hidden, eye, z_teacher, eye, ForwardKL(), temperature=tau)
        distillation_loss(values, temperature=tau)[0].backward()
        torch.testing.assert_close(hidden.grad, expected, rtol=0, atol=10 / tau)


# --------------------------------------------------------------------------- chunked vs naive
CASES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.0), ("jsd", 1.0)]
SETTINGS = [  # temperature, top_k, extra head rows (padding past the tokenizer), bias
    (1.0, 0, 0, False),
    (0.7, 0, 3, True),
    (2.0, 5, 2, True),
]


# Top-k refuses the divergences that need the whole teacher distribution (reverse KL; tested above): not generated.
VALID = [
    (name, beta, *setting)
    for name, beta in CASES
    for setting in SETTINGS
    if not (setting[1] and resolve_divergence(name, beta).needs_full_teacher)
]


@pytest.mark.parametrize("chunk_size", [1, 3, 10, 64])  # M = 10: one row, non-divisible, exact, larger than M
@pytest.mark.parametrize(("name", "beta", "temperature", "top_k", "padding", "with_bias"), VALID)
def test_chunked_matches_naive(name, beta, temperature, top_k, padding, with_bias, chunk_size):
    divergence = resolve_divergence(name, beta)
    gen = torch.Generator().manual_seed(0)
    m, h_s, h_t, v = 10, 6, 5, 23
    f64 = dict(generator=gen, dtype=torch.float64)
    s_hidden = torch.randn(m, h_s, **f64).requires_grad_()
    s_weight = torch.randn(v + padding, h_s, **f64).requires_grad_()
    s_bias = torch.randn(v + padding, **f64).requires_grad_() if with_bias else None
    t_hidden, t_weight = torch.randn(m, h_t, **f64), torch.randn(v + 2 * padding, h_t, **f64)  # the teacher pads more
    upstream = torch.randn(m, **f64)  # a non-uniform incoming gradient
    inputs = [s_hidden, s_weight] + ([s_bias] if with_bias else [])

    values, agree = chunked_divergence(
        s_hidden, s_weight, t_hidden, t_weight, divergence, temperature, top_k, v, student_bias=s_bias, chunk_size=chunk_size
    )
    grads = torch.autograd.grad((values * upstream).sum(), inputs)
    s_logits = s_hidden @ s_weight.T + (0 if s_bias is None else s_bias)
    reference = naive_divergence(s_logits, t_hidden @ t_weight.T, name, beta, temperature, top_k, v)
    ref_grads = torch.autograd.grad((reference * upstream).sum(), inputs)

    torch.testing.assert_close(values, reference)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref)
    if padding:
        assert (grads[1][v:] == 0).all()  # padding rows of the head never enter the softmax
    torch.testing.assert_close(agree, s_logits[:, :v].argmax(-1) == (t_hidden @ t_weight.T)[:, :v].argmax(-1))


@pytest.mark.parametrize("divergence", [ReverseKL(), GeneralizedJSD(0.3)], ids=repr)
def test_gradcheck(divergence):
    # The closed-form gradients against finite differences (independent of the naive reference).
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, generator=gen, dtype=torch.float64, requires_grad=True)
    t_hidden, t_weight = torch.randn(5, 4, generator=gen, dtype=torch.float64), torch.randn(7, 4, generator=gen, dtype=torch.float64)

    def fn(h, w, b):
        return chunked_divergence(h, w, t_hidden, t_weight, divergence, temperature=1.3, student_bias=b, chunk_size=2)[0]

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def test_low_precision_inputs():
    gen = torch.Generator().manual_seed(2)
    s_hidden = torch.randn(6, 8, generator=gen).bfloat16().requires_grad_()
    s_weight = torch.randn(16, 8, generator=gen).bfloat16().requires_grad_()
    t_hidden, t_weight = torch.randn(6, 4, generator=gen).bfloat16(), torch.randn(16, 4, generator=gen).bfloat16()
    values, _ = chunked_divergence(s_hidden, s_weight, t_hidden, t_weight, GeneralizedJSD(0.5), chunk_size=4)
    values.sum().backward()
    # Computed in float32 from the bf16 values; gradients in the inputs' dtypes.
    assert values.dtype == torch.float32 and s_hidden.grad.dtype == s_weight.grad.dtype == torch.bfloat16
    ref = naive_divergence(s_hidden.detach().float() @ s_weight.detach().float().T, t_hidden.float() @ t_weight.float().T, "jsd")
    torch.testing.assert_close(values, ref)


def test_peak_memory_is_bounded_by_the_chunk_not_the_tokens():
    m, h_s, h_t, v, chunk = 256, 32, 48, 32_000, 16
    gen = torch.Generator().manual_seed(0)
    s_hidden = torch.randn(m, h_s, generator=gen).requires_grad_()
    s_weight = (0.02 * torch.randn(v, h_s, generator=gen)).requires_grad_()
    t_hidden, t_weight = torch.randn(m, h_t, generator=gen), 0.02 * torch.randn(v, h_t, generator=gen)
    # Alive at once at most: the weight-gradient accumulator (V·H_S·4, independent of M), a handful of
    # [chunk, V] float32 buffers of both models, and O(M·H) rows.
    bound = v * h_s * 4 + 8 * chunk * v * 4 + 8 * m * (h_s + h_t) * 4 + (1 << 20)
    assert bound < m * v * 4  # below ONE model's [tokens, V] float32 logits

    for divergence in (ForwardKL(), ReverseKL(), GeneralizedJSD(0.5)):
        s_weight.grad = s_hidden.grad = None
        with _PeakTensorBytes() as meter:
            values, _ = chunked_divergence(s_hidden, s_weight, t_hidden, t_weight, divergence, temperature=2.0, chunk_size=chunk)
            values.sum().backward()
        assert meter.peak <= bound, f"{divergence!r}: peak {meter.peak / 1e6:.1f} MB > bound {bound / 1e6:.1f} MB"
        assert s_weight.grad is not None and s_hidden.grad is not None

    with _PeakTensorBytes() as meter:  # the meter does see [tokens, V] logits
        naive_divergence(s_hidden @ s_weight.T, t_hidden @ t_weight.T, "forward_kl").sum().backward()
    assert meter.peak > bound


def test_bad_arguments_are_named():
    eye = torch.eye(3)
    with pytest.raises(ValueError, match="chunk_size=0"):
        chunked_divergence(eye, eye, eye, eye, ForwardKL(), chunk_size=0)
    with pytest.raises(ValueError, match=r"teacher hidden \(2, 3\)"):
        chunked_divergence(eye, eye, eye[:2], eye, ForwardKL())
    with pytest.raises(ValueError, match="beta=1.5"):
        GeneralizedJSD(1.5)
    with pytest.raises(ValueError, match="'kl'"):
        resolve_divergence("kl")


# ------------------------------------------------------------------------------- the module
@pytest.fixture(scope="module")
def tokenizer():
    return build_builtin_tokenizer()


def _save_model(path: Path, tokenizer, vocab_size: int, seed: int = 0, name: str = "builtin:tiny") -> Path:
    build_builtin_model(name, vocab_size, seed=seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_different_vocabularies_are_refused_with_both_paths(tmp_path, tokenizer):
    extra = build_builtin_tokenizer()
    extra.add_tokens(["<extra>"])  # one more token: every id stays, the vocabulary differs
    teacher = _save_model(tmp_path / "extra", extra, len(extra))
    with pytest.raises(ConfigError, match=r"model_name_or_path='builtin:tiny-small' and teacher_name_or_path='.*extra'.*id 263"):
        Distillation("builtin:tiny-small", str(teacher))
    special = build_builtin_tokenizer()
    special.add_special_tokens({"additional_special_tokens": ["<think>"]})  # same ids, <think> now special
    assert special.get_vocab() == tokenizer.get_vocab()
    teacher = _save_model(tmp_path / "special", special, len(special))
    with pytest.raises(ConfigError, match=r"special tokens differ, e.g. id 259"):
        Distillation("builtin:tiny-small", str(teacher))
    short = _save_model(tmp_path / "short", tokenizer, len(tokenizer) - 3)  # a head that cannot cover the tokenizer
    # Refused when the tokenizer loads (from config.json), before any model is built.
    with pytest.raises(ConfigError, match=r"teacher_name_or_path=.*the tokenizer has 263 tokens but the model's vocab_size \(config.json\) is 260"):
        Distillation("builtin:tiny-small", str(short))


@pytest.fixture(scope="module")
def batch(tokenizer) -> dict:
    data = ColdStartDataModule(num_samples=4, max_length=200, tokenizer=tokenizer)
    data.setup("fit")
    return data.collate(data.train_examples)


def test_padding_only_head_difference_is_cut_off(tmp_path, tokenizer, batch):
    # Teacher A: 263 rows. Teacher B: the same weights plus 37 padding rows whose logits would dominate
    # any softmax over them. Same tokenizer: B is accepted and scores exactly as A.
    plain = build_builtin_model("builtin:tiny", len(tokenizer), seed=3)
    padded = build_builtin_model("builtin:tiny", len(tokenizer) + 37, seed=3)
    state = plain.state_dict()
    with torch.no_grad():
        for name, tensor in padded.state_dict().items():
            tensor[: state[name].shape[0]] = state[name]
        padded.get_output_embeddings().weight[len(tokenizer):] = 5.0  # tied: the embedding rows too
    for model, name in ((plain, "plain"), (padded, "padded")):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    terms = {}
    for name in ("plain", "padded"):
        module = Distillation("builtin:tiny-small", str(tmp_path / name), logprob_chunk_size=32)
        module.configure_model()
        assert module.vocab_size == len(tokenizer)
        with torch.no_grad():
            terms[name] = module._token_terms({k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "loss_mask")}, with_kl=True)
    assert load_model(str(tmp_path / "padded")).get_output_embeddings().weight.shape[0] == len(tokenizer) + 37
    for key in ("divergence", "agree", "kl"):
        torch.testing.assert_close(terms["padded"][key], terms["plain"][key])


def test_sft_loss_is_policy_sft_completion_loss(batch):
    module = Distillation("builtin:tiny-small", "builtin:tiny", loss="sft", logprob_chunk_size=32)
    module.configure_model()
    sft = PolicySFT("builtin:tiny-small", logprob_chunk_size=32)
    sft.configure_model()  # the same seed: the same initial weights
    terms = module._token_terms({k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "loss_mask")})
    torch.testing.assert_close(terms["nll"].mean(), sft.completion_loss(batch)[0])
    assert not terms["divergence"].requires_grad  # for sft the divergence is a diagnostic only


def test_packed_rows_give_the_same_terms_as_padded(tokenizer):
    module = Distillation("builtin:tiny-small", "builtin:tiny", logprob_chunk_size=16)
    module.configure_model()
    data = ColdStartDataModule(num_samples=4, max_length=400, tokenizer=tokenizer)
    data.setup("fit")
    padded, packed = pad(data.train_examples, tokenizer.pad_token_id), pack(data.train_examples, 400, tokenizer.pad_token_id)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]
    with torch.no_grad():
        # Samples keep their order in both layouts, so the [M] completion tokens line up one to one.
        terms = [module._token_terms(rows, with_kl=True) for rows in (padded, packed)]
    for key in ("divergence", "agree", "kl"):
        torch.testing.assert_close(terms[1][key], terms[0][key], atol=1e-5, rtol=1e-5)


def _fit(module, data, tmp_path, steps, **kwargs) -> L.Trainer:
    options = dict(limit_val_batches=0, logger=False, enable_checkpointing=False, **QUIET)
    trainer = L.Trainer(max_steps=steps, default_root_dir=tmp_path, **{**options, **kwargs})
    trainer.fit(module, datamodule=data)
    return trainer


def test_on_policy_samples_are_seeded_per_prompt_so_ranks_sample_as_one_process(batch):
    """The batch split as two ranks get it (DistributedSampler interleaves): every prompt's sample is the one
    the whole batch in one process gets, because its generator is seeded by (seed, dataset index, step)."""
    module = Distillation("builtin:tiny-small", "builtin:tiny", loss="jsd", on_policy_fraction=1.0, max_new_tokens=8)
    module.configure_model()
    whole = module._training_rows(batch, 0)[0][0]
    assert batch["indices"] == [0, 1, 2, 3]

    def completions(rows):  # the sampled completion tokens of each row
        return [ids[mask].tolist() for ids, mask in zip(rows["input_ids"], rows["loss_mask"])]

    expected = completions(whole)
    assert len(set(map(tuple, expected))) == 4  # temperature 1: distinct samples, not one repeated stream
    for rank in (0, 1):
        rows = [0 + rank, 2 + rank]
        share = {k: [v[i] for i in rows] if isinstance(v, list) else v[rows] for k, v in batch.items()}
        assert completions(module._training_rows(share, 0)[0][0]) == [expected[i] for i in rows]


def test_on_policy_rows_are_the_students_samples(batch):
    module = Distillation(
        "builtin:tiny-small", "builtin:tiny", loss="jsd", on_policy_fraction=0.5, max_new_tokens=6, generation_temperature=0.0
    )
    module.configure_model()
    parts, share = module._training_rows(batch, 0)
    assert share == 0.5 and len(parts) == 2  # 2 of the 4 rows sampled, 2 teacher-written
    sampled, offline = parts
    greedy = module.engine.generate(module.model, batch["prompt_ids"][:2], 1, module._sampling(6, 0.0))
    torch.testing.assert_close(sampled["input_ids"], greedy.model_inputs()["input_ids"])
    assert sampled["loss_mask"].sum() == greedy.completion_mask.sum()  # the loss covers the sampled completion
    torch.testing.assert_close(offline["input_ids"], batch["input_ids"][2:])

    module.hparams.on_policy_fraction = 0.3  # 1.2 rows on average: 1 or 2, never another count
    counts = {round(module._training_rows(batch, i)[1] * 4) for i in range(12)}
    assert counts == {1, 2}

    loss = module.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in module.model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in module.teacher.parameters())

    packed = pack([{"prompt_ids": p, "completion_ids": [5, 6]} for p in batch["prompt_ids"]], 400, 0)
    with pytest.raises(ConfigError, match="packing: false"):
        module._training_rows({**packed, "prompt_ids": batch["prompt_ids"]}, 0)


def test_prompt_batches_are_sampled_from_the_student_or_for_sft_the_teacher(tmp_path):
    data = PromptDataModule(num_samples=4, num_val_samples=2, batch_size=2)
    for loss, writer in (("sft", "teacher"), ("forward_kl", "model")):  # the last one is fitted below
        module = Distillation("builtin:tiny-small", "builtin:tiny", loss=loss, max_new_tokens=5, generation_temperature=0.0, eval_max_new_tokens=4)
        module.configure_model()
        data.tokenizer = module.tokenizer
        data.setup("fit")
        prompts = next(iter(data.train_dataloader()))
        (rows,), share = module._training_rows(prompts, 0)
        expected = module.engine.generate(getattr(module, writer), prompts["prompt_ids"], 1, module._sampling(5, 0.0))
        assert share == 1.0 and torch.equal(rows["input_ids"], expected.model_inputs()["input_ids"])
    trainer = _fit(module, data, tmp_path, 2, limit_val_batches=1, num_sanity_val_steps=0, val_check_interval=2)
    metrics = trainer.callback_metrics
    assert {"train/loss", "train/forward_kl", "train/teacher_agreement", "val/kl", "val/accuracy", "val/format"} <= metrics.keys()


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="loss='kl'"):
        Distillation(loss="kl")
    with pytest.raises(ConfigError, match="top_k=5 with loss='reverse_kl'"):
        Distillation(loss="reverse_kl", top_k=5)
    with pytest.raises(ConfigError, match="jsd_beta=1.0"):
        Distillation(loss="jsd", jsd_beta=1.0, top_k=5)
    with pytest.raises(ConfigError, match="on_policy_fraction > 0 needs a divergence"):
        Distillation(loss="sft", on_policy_fraction=0.5)
    with pytest.raises(ConfigError, match="temperature=0"):
        Distillation(temperature=0)


def test_checkpoints_leave_the_teacher_out_and_load_back(tmp_path):
    module = Distillation("builtin:tiny-small", "builtin:tiny", export_hf=False)
    data = ColdStartDataModule(num_samples=4, num_val_samples=2, batch_size=4, max_length=200)
    trainer = L.Trainer(max_steps=1, limit_val_batches=0, logger=False, default_root_dir=tmp_path, **QUIET)
    trainer.fit(module, datamodule=data)
    (path,) = (tmp_path / "checkpoints").glob("*.ckpt")
    state = torch.load(path, weights_only=False)["state_dict"]
    assert state and not any(k.startswith("teacher.") for k in state)
    loaded = Distillation.load_from_checkpoint(path)  # strict: the teacher comes from its path
    for name, tensor in module.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], tensor)


def test_recipe_teacher_from_sets_the_teacher_path(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("r1_lightning.recipe._cli", lambda args, run=True: calls.append(args))
    stage = {"name": "distill", "config": ["configs/distill.yaml"], "model_from": "student", "teacher_from": "grpo"}
    run_stage(stage, tmp_path / "distill", tmp_path)
    args = calls[0]
    assert args[args.index("--model.init_args.teacher_name_or_path") + 1] == str(tmp_path / "grpo" / "hf_model")
    assert args[args.index("--model.init_args.model_name_or_path") + 1] == str(tmp_path / "student" / "hf_model")
    recipe = tmp_path / "recipe.yaml"
    config = Path(__file__).resolve().parents[1] / "configs" / "distill.yaml"
    recipe.write_text(f"stages:\n  - {{name: distill, config: [{config}], teacher_from: grpo}}\n")
    with pytest.raises(ConfigError, match="teacher_from='grpo', which is not an earlier stage"):
        load_recipe(str(recipe))


# ---------------------------------------------------------------------------- learning runs
@pytest.fixture(scope="module")
def trained_teacher(tmp_path_factory) -> Path:
    """builtin:tiny after 30 SFT steps on the built-in task (~10 s): a peaked, task-aware teacher."""
    root = tmp_path_factory.mktemp("teacher")
    L.seed_everything(0)
    teacher = PolicySFT("builtin:tiny", learning_rate=3e-3, warmup_steps=5)
    _fit(teacher, ColdStartDataModule(num_samples=320, num_val_samples=0, batch_size=16, max_length=160), root, 30)
    return root / "hf_model"


def _held_out_metrics(module, data) -> dict[str, float]:
    return L.Trainer(logger=False, **QUIET).validate(module, datamodule=data, verbose=False)[0]


@pytest.mark.slow
@pytest.mark.parametrize(("loss", "on_policy_fraction"), [("forward_kl", 0.0), ("jsd", 0.5)])
def test_distillation_lowers_held_out_kl(trained_teacher, tmp_path, loss, on_policy_fraction):
    L.seed_everything(0)
    module = Distillation(
        "builtin:tiny-small", str(trained_teacher), loss=loss, on_policy_fraction=on_policy_fraction, max_new_tokens=48,
        learning_rate=3e-3, warmup_steps=5, eval_max_new_tokens=4, export_hf=False,
    )
    data = ColdStartDataModule(num_samples=320, num_val_samples=16, batch_size=16, max_length=160)
    before = _held_out_metrics(module, data)
    _fit(module, data, tmp_path, 30)
    after = _held_out_metrics(module, data)
    # Measured KL(teacher ‖ student) at τ = 1 on the held-out rows (forward_kl: 2.76 → 0.45 when written).
    assert after["val/kl"] < 0.5 * before["val/kl"], (before["val/kl"], after["val/kl"])
    assert after["val/teacher_agreement"] > before["val/teacher_agreement"] + 0.2


@pytest.mark.slow
def test_sft_distillation_learns_and_exports_the_student(trained_teacher, tmp_path):
    from safetensors.torch import load_file

    L.seed_everything(0)
    module = Distillation("builtin:tiny-small", str(trained_teacher), loss="sft", learning_rate=3e-3, warmup_steps=5, eval_max_new_tokens=4)
    data = ColdStartDataModule(num_samples=320, num_val_samples=16, batch_size=16, max_length=160)
    before = _held_out_metrics(module, data)
    _fit(module, data, tmp_path, 30)
    after = _held_out_metrics(module, data)
    assert after["val/loss"] < 0.6 * before["val/loss"] and after["val/kl"] < 0.5 * before["val/kl"]
    target = tmp_path / "hf_model"
    assert (target / "config.json").is_file() and (target / "tokenizer.json").is_file()
    saved = load_file(target / "model.safetensors")
    trained = module.model.state_dict()
    assert saved.keys() <= trained.keys() and all(torch.equal(saved[k], trained[k]) for k in saved)  # the student, not the teacher
    batch = {k: v for k, v in pad(data.val_examples[:2], module.tokenizer.pad_token_id).items() if k != "loss_mask"}
    with torch.no_grad():
        torch.testing.assert_close(load_model(str(target))(**batch).logits, module.model.eval()(**batch).logits)


@pytest.mark.slow
def test_cli_runs_the_distill_config(trained_teacher, tmp_path, cli):
    config = Path(__file__).resolve().parents[1] / "configs" / "distill.yaml"
    result = cli(
        ["fit", "--config", config, "--model.init_args.teacher_name_or_path", trained_teacher, "--trainer.max_steps", "3",
         "--trainer.limit_val_batches", "0", "--model.init_args.on_policy_fraction", "0.5", "--model.init_args.max_new_tokens", "8",
         "--data.init_args.num_samples", "32"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "runs" / "distill" / "latest" / "hf_model" / "config.json").is_file()
