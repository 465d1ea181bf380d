"""Callbacks: reference refresh, reasoning-length statistics, rejection-sampling writer."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from r1_lightning.callbacks import ReasoningLengthLogger, ReferenceModelRefresh, RejectionSamplingWriter
from r1_lightning.callbacks.reasoning_length import reasoning_stats
from r1_lightning.callbacks.reference_refresh import mix_into
from r1_lightning.data.cold_start import ColdStartDataModule
from r1_lightning.errors import ConfigError
from r1_lightning.policy import build_builtin_tokenizer


# ----------------------------------------------------------------------------- reference refresh
def _pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)


def test_hard_copy_sets_reference_to_policy() -> None:
    reference, policy = _pair()
    mix_into(reference, policy, alpha=1.0)
    for r, p in zip(reference.parameters(), policy.parameters()):
        assert torch.equal(r, p)


def test_mixup_is_alpha_policy_plus_one_minus_alpha_reference() -> None:
    reference, policy = _pair()
    before = [r.detach().clone() for r in reference.parameters()]
    mix_into(reference, policy, alpha=0.25)
    for r, b, p in zip(reference.parameters(), before, policy.parameters()):
        # ref ← 0.25·policy + 0.75·ref, element by element
        torch.testing.assert_close(r, 0.25 * p + 0.75 * b)


class _Module(SimpleNamespace):
    pass


def _grpo_like() -> _Module:
    reference, policy = _pair()
    return _Module(model=policy, ref_model=reference, hparams=SimpleNamespace(lora=None))


def test_refresh_every_n_steps_and_not_between() -> None:
    module = _grpo_like()
    callback = ReferenceModelRefresh(every_n_steps=3)
    original = [p.detach().clone() for p in module.ref_model.parameters()]
    trainer = SimpleNamespace(global_step=0)
    for step in (1, 2):  # no multiple of 3 crossed: the reference must not move
        with torch.no_grad():
            module.model.weight.add_(1.0)
        trainer.global_step = step
        callback.on_train_batch_end(trainer, module, None, None, step)
        assert all(torch.equal(a, b) for a, b in zip(module.ref_model.parameters(), original))
    trainer.global_step = 4  # a batch of several optimizer steps crossed step 3
    callback.on_train_batch_end(trainer, module, None, None, 3)
    assert torch.equal(module.ref_model.weight, module.model.weight)
    assert callback.state_dict() == {"refreshes": 1, "last_refresh_step": 4}


def test_refresh_state_round_trips_and_skips_fit_start_refresh_on_resume() -> None:
    callback = ReferenceModelRefresh(every_n_steps=2, at_fit_start=True)
    callback.refreshes, callback.last_refresh_step = 3, 6
    restored = ReferenceModelRefresh(every_n_steps=2, at_fit_start=True)
    restored.load_state_dict(callback.state_dict())
    assert restored.state_dict() == {"refreshes": 3, "last_refresh_step": 6}
    module = _grpo_like()
    before = module.ref_model.weight.detach().clone()
    restored.on_train_start(SimpleNamespace(global_step=6), module)  # resumed: keep the saved reference
    assert torch.equal(module.ref_model.weight, before)


@pytest.mark.parametrize("kwargs", [{"every_n_steps": 0}, {"alpha": 0.0}, {"alpha": 1.5}])
def test_refresh_rejects_bad_options(kwargs) -> None:
    with pytest.raises(ConfigError):
        ReferenceModelRefresh(**kwargs)


def test_refresh_under_lora_makes_the_disabled_adapter_model_equal_the_policy() -> None:
    peft = pytest.importorskip("peft")
    from r1_lightning.callbacks.reference_refresh import merge_and_restart_adapter
    from r1_lightning.policy import load_model

    tokenizer = build_builtin_tokenizer()
    model = load_model("builtin:tiny-small", vocab_size=len(tokenizer))
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():  # a trained adapter: non-zero update
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    ids = torch.tensor([tokenizer("Compute 12+34.")["input_ids"]])
    policy_before = model(ids).logits
    with model.disable_adapter():
        reference_before = model(ids).logits
    assert not torch.allclose(policy_before, reference_before)
    merge_and_restart_adapter(model)
    with model.disable_adapter():
        reference_after = model(ids).logits
    torch.testing.assert_close(model(ids).logits, policy_before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reference_after, policy_before, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------- reasoning-length logger
def test_reasoning_stats_on_a_hand_made_batch() -> None:
    tokenizer = build_builtin_tokenizer()  # one token per byte: lengths are character counts
    texts = [
        "<think>\nabcd\n</think>\n<answer>\n12\n</answer>",  # think "abcd" = 4, answer "12" = 2, correct
        "<think>\nWait, verify\n</think>\n<answer>\n7\n</answer>",  # think 12 chars, 2 reflections, wrong
        "no tags at all",  # no think, no answer
        "<think>\nabcdefgh",  # truncated inside the reasoning: think = 8, no answer
    ]
    truncated = torch.tensor([False, False, False, True])
    accuracy = torch.tensor([1.0, 0.0, 0.0, float("nan")])
    logger = ReasoningLengthLogger(reflection_words=["wait", "verify"])
    values = logger.measure(tokenizer, texts, truncated, accuracy)
    assert values["think_lengths"].tolist() == [4, 12, -1, 8]
    assert values["answer_lengths"].tolist() == [2, 1, -1, -1]
    stats = reasoning_stats(**values)
    assert stats["think_length_mean"].item() == pytest.approx(8.0)  # (4 + 12 + 8) / 3
    assert stats["think_length_median"].item() == 8.0
    assert stats["think_length_max"].item() == 12.0
    assert stats["think_length_p90"].item() == pytest.approx(8 + 0.8 * (12 - 8))  # linear interpolation at 0.9·(3-1) = 1.8
    assert stats["no_think_frac"].item() == 0.25
    assert stats["answer_length_mean"].item() == 1.5
    assert stats["truncated_frac"].item() == 0.25
    assert stats["think_length_correct"].item() == 4.0
    assert stats["think_length_incorrect"].item() == 12.0  # the no-think wrong sample has no think length
    assert stats["reflection_rate"].item() == 0.5  # 2 reflections over 4 completions
    assert stats["reflection_frac"].item() == 0.25


# -------------------------------------------------------------------- rejection-sampling writer
def _prediction(indices: list[int]) -> dict:
    """Two prompts × 3 samples; per prompt: correct+formatted, duplicate of it, wrong."""
    completions, accuracy, fmt, total, lengths, truncated = [], [], [], [], [], []
    for index in indices:
        good = f"<think>\nwork {index}\n</think>\n<answer>\n{index}\n</answer>"
        completions += [good, good + " ", f"<think>\nx\n</think>\n<answer>\n{index + 1}\n</answer>"]
        accuracy += [1.0, 1.0, 0.0]
        fmt += [1.0, 1.0, 1.0]
        total += [2.0, 2.0, 1.0]
        lengths += [30, 31, 20]
        truncated += [False, False, False]
    return {
        "indices": indices, "prompts": [f"Compute {i}." for i in indices], "columns": {"answer": [str(i) for i in indices]},
        "num_generations": 3, "completions": completions, "lengths": lengths, "truncated": truncated, "total": total,
        "scores": {"accuracy": accuracy, "lenient_format": fmt},
    }


def _run_writer(tmp_path, shares: list[list[int]], keep: str = "best") -> list[dict]:
    """Each rank's writer sees its prompts; the ranks end in reverse order so rank 0 merges last."""
    output = tmp_path / "accepted.jsonl"
    world = len(shares)
    strategy = SimpleNamespace(barrier=lambda *args: None, reduce=lambda tensor, reduce_op: tensor)
    module = SimpleNamespace(device=torch.device("cpu"))
    for rank in reversed(range(world)):
        writer = RejectionSamplingWriter(str(output), keep=keep)
        trainer = SimpleNamespace(
            default_root_dir=str(tmp_path), global_rank=rank, world_size=world, is_global_zero=rank == 0, strategy=strategy, loggers=[]
        )
        writer.on_predict_start(trainer, module)
        writer.write_on_batch_end(trainer, module, _prediction(shares[rank]), None, None, 0)
        writer.on_predict_epoch_end(trainer, module)
    assert not list(tmp_path.glob("*.rank*")), "the per-rank shares are merged and removed"
    return [json.loads(line) for line in output.read_text().splitlines()]


def test_writer_keeps_exactly_the_accepted_deduplicated_rows(tmp_path) -> None:
    rows = _run_writer(tmp_path, [[0, 1]], keep="all")
    # per prompt: the correct sample kept once (its whitespace twin is a duplicate), the wrong one rejected
    assert [(r["prompt"], r["answer"]) for r in rows] == [("Compute 0.", "0"), ("Compute 1.", "1")]
    assert all("<answer>" in r["completion"] for r in rows)


def test_two_ranks_write_the_same_file_as_one(tmp_path) -> None:
    one = _run_writer(tmp_path / "one", [[0, 1, 2, 3]])
    # DistributedSampler(num_replicas=2) interleaves and pads: rank 1 repeats prompt 0.
    two = _run_writer(tmp_path / "two", [[0, 2], [1, 3, 0]])
    assert one == two
    assert len(one) == 4


def test_writer_output_is_read_by_the_cold_start_data_module(tmp_path) -> None:
    _run_writer(tmp_path, [[5, 6]])
    module = ColdStartDataModule(path=str(tmp_path / "accepted.jsonl"), tokenizer=build_builtin_tokenizer(), max_length=128)
    module.setup("fit")
    assert len(module.train_examples) == 2
    assert module.train_examples[0]["answer"] == "5"


def test_writer_rejection_reasons() -> None:
    writer = RejectionSamplingWriter(max_tokens=25)
    prediction = _prediction([0])
    assert writer.rejection_reason(prediction, 0) == "length"  # 30 tokens > 25
    assert writer.rejection_reason(prediction, 2) == "accuracy"
    prediction["truncated"][2] = True
    assert writer.rejection_reason(prediction, 2) == "truncated"
    prediction["scores"]["language_consistency"] = [0.5, 1.0, 1.0]
    assert RejectionSamplingWriter().rejection_reason(prediction, 0) == "language_mixing"


def test_refreshed_reference_and_refresh_state_are_in_the_checkpoint(tmp_path) -> None:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from grpo_helpers import TextHash

    from r1_lightning import GRPO, PromptDataModule

    torch.set_num_threads(1)
    refresh = ReferenceModelRefresh(every_n_steps=2)
    module = GRPO(
        "builtin:tiny-small", rewards=[TextHash()], num_generations=2, max_new_tokens=6, beta=0.1, learning_rate=1e-2, export_hf=False
    )
    data = PromptDataModule(batch_size=2, num_samples=8, num_val_samples=2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = L.Trainer(max_steps=3, logger=False, enable_progress_bar=False, callbacks=[refresh, checkpoint], limit_val_batches=0)
    trainer.fit(module, data)
    assert refresh.refreshes == 1 and refresh.last_refresh_step == 2
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    state = saved["state_dict"]
    policy = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    reference = {k[len("ref_model."):]: v for k, v in state.items() if k.startswith("ref_model.")}
    assert policy.keys() == reference.keys()
    # refreshed at step 2, then the policy took one more step: the saved reference is neither the
    # base model nor the final policy, and resuming loads it back
    assert any(not torch.equal(policy[k], reference[k]) for k in policy)
    base = GRPO("builtin:tiny-small", beta=0.1)
    base.configure_model()
    assert any(not torch.equal(base.ref_model.state_dict()[k], reference[k]) for k in reference)
    resumed = GRPO("builtin:tiny-small", beta=0.1)
    resumed.configure_model()
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.ref_model.state_dict()[k], reference[k]) for k in reference)
    callback_state = next(v for k, v in saved["callbacks"].items() if "ReferenceModelRefresh" in k)
    assert callback_state == {"refreshes": 1, "last_refresh_step": 2}
