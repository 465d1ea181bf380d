"""PolicySFT: the completion loss by hand, packed vs padded equivalence, and a short learning run."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from r1_lightning import ColdStartDataModule, PolicySFT
from r1_lightning.data.cold_start import pack, pad
from r1_lightning.policy import load_model, load_tokenizer, token_logprobs


@pytest.fixture(scope="module")
def sft() -> PolicySFT:
    module = PolicySFT("builtin:tiny", logprob_chunk_size=64)  # small chunks: several per batch
    module.configure_model()
    return module


@pytest.fixture(scope="module")
def examples(sft) -> list[dict]:
    dm = ColdStartDataModule(num_samples=6, max_length=256, tokenizer=sft.tokenizer)
    dm.setup("fit")
    lengths = [len(e["prompt_ids"]) + len(e["completion_ids"]) for e in dm.train_examples]
    assert len(set(lengths)) > 1  # different lengths: padding and packing both matter
    return dm.train_examples


def _loss_and_grads(module: PolicySFT, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    module.model.zero_grad()
    loss, tokens = module.completion_loss(batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.model.named_parameters()}
    module.model.zero_grad()
    return loss.detach(), tokens, grads


def test_completion_loss_is_minus_mean_logprob_of_completion_tokens(sft, examples):
    loss, tokens = sft.completion_loss(pad(examples, sft.tokenizer.pad_token_id))
    # By hand: one unpadded forward per sample; -log p(token t | tokens < t) for every completion
    # token t (EOS included), averaged over all completion tokens of the batch. Prompt tokens are
    # context only.
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            ids = torch.tensor([e["prompt_ids"] + e["completion_ids"]])
            logprobs = torch.log_softmax(sft.model(input_ids=ids).logits[0].float(), dim=-1)  # [T, V]
            for t in range(len(e["prompt_ids"]), ids.shape[1]):
                total -= logprobs[t - 1, ids[0, t]].item()
                count += 1
    assert tokens == count == sum(len(e["completion_ids"]) for e in examples)
    torch.testing.assert_close(loss.item(), total / count, atol=1e-5, rtol=1e-5)


def test_packed_batch_has_the_same_loss_and_gradients_as_padded(sft, examples):
    pad_id = sft.tokenizer.pad_token_id
    longest = max(len(e["prompt_ids"]) + len(e["completion_ids"]) for e in examples)
    packed = pack(examples, 2 * longest + 5, pad_id)
    assert packed["input_ids"].shape[0] < len(examples)  # really packed: rows hold several samples
    assert (packed["position_ids"] == 0).sum() > packed["input_ids"].shape[0]  # positions restart inside rows

    padded_loss, padded_tokens, padded_grads = _loss_and_grads(sft, pad(examples, pad_id))
    packed_loss, packed_tokens, packed_grads = _loss_and_grads(sft, packed)

    assert packed_tokens == padded_tokens
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=0)
    assert padded_grads.keys() == packed_grads.keys()
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(sft, examples):
    # Hugging Face's checkpointing, as the real-model configs set it: its recompute once ran other forwards than the
    # pass (the lean layers' swap had ended) and raised CheckpointError at the first backward.
    checkpointed = PolicySFT("builtin:tiny", logprob_chunk_size=64, gradient_checkpointing=True)
    checkpointed.configure_model()
    checkpointed.model.load_state_dict(sft.model.state_dict())
    was_training = sft.model.training
    sft.model.train()  # Hugging Face checkpoints only in training mode
    checkpointed.model.train()
    assert checkpointed.model.is_gradient_checkpointing
    batch = pad(examples, sft.tokenizer.pad_token_id)
    try:
        loss, tokens, grads = _loss_and_grads(sft, batch)
    finally:  # the module fixture is shared: leave its mode as it was
        sft.model.train(was_training)
    checkpointed_loss, checkpointed_tokens, checkpointed_grads = _loss_and_grads(checkpointed, batch)
    assert checkpointed_tokens == tokens
    torch.testing.assert_close(checkpointed_loss, loss, atol=1e-6, rtol=0)
    assert checkpointed_grads.keys() == grads.keys()
    for name, grad in grads.items():  # the plain forwards in place of the lean ones: float rounding
        torch.testing.assert_close(checkpointed_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_packed_sample_does_not_see_its_neighbour(sft, examples):
    tokenizer, pad_id = sft.tokenizer, sft.tokenizer.pad_token_id
    sample, neighbour = examples[0], examples[1]
    shifted = {**neighbour, "completion_ids": [(t + 7) % 256 for t in neighbour["completion_ids"]]}  # same length, other tokens
    longer = {**neighbour, "prompt_ids": neighbour["prompt_ids"] + tokenizer("Really?")["input_ids"]}  # other length

    def sample_logprobs(batch: dict, offset: int) -> torch.Tensor:
        with torch.no_grad():
            logprobs, _ = token_logprobs(
                sft.model, batch["input_ids"], batch["attention_mask"], batch["position_ids"], batch["loss_mask"]
            )
        n = len(sample["prompt_ids"]) + len(sample["completion_ids"])
        return logprobs[0, offset : offset + n]

    alone = sample_logprobs(pad([sample], pad_id), 0)
    assert (alone != 0).sum() == len(sample["completion_ids"])
    for before in (neighbour, shifted, longer):
        batch = pack([before, sample], 10_000, pad_id)
        assert batch["input_ids"].shape[0] == 1  # both in one row, `sample` second
        offset = len(before["prompt_ids"]) + len(before["completion_ids"])
        torch.testing.assert_close(sample_logprobs(batch, offset), alone, atol=1e-5, rtol=1e-5)


def test_padding_does_not_change_a_sample_logprobs(sft, examples):
    # The same sample alone and next to a much longer one (right padding) scores the same.
    short = min(examples, key=lambda e: len(e["prompt_ids"]) + len(e["completion_ids"]))
    long = max(examples, key=lambda e: len(e["prompt_ids"]) + len(e["completion_ids"]))

    def logprobs(batch: dict) -> torch.Tensor:
        with torch.no_grad():
            inputs = (batch["input_ids"], batch["attention_mask"], batch["position_ids"])
            return token_logprobs(sft.model, *inputs, batch["loss_mask"])[0]

    pad_id = sft.tokenizer.pad_token_id
    alone, together = logprobs(pad([short], pad_id)), logprobs(pad([short, long], pad_id))
    assert together.shape[1] > alone.shape[1]
    torch.testing.assert_close(together[0, : alone.shape[1]], alone[0], atol=1e-5, rtol=1e-5)


class _TrainLosses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


@pytest.mark.slow
def test_sft_learns_the_builtin_task_and_exports_the_model(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    L.seed_everything(0)
    module = PolicySFT("builtin:tiny", learning_rate=3e-3, warmup_steps=5, eval_max_new_tokens=8)
    data = ColdStartDataModule(num_samples=160, num_val_samples=16, batch_size=16, max_length=160)
    quiet = dict(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False)
    evaluator = L.Trainer(logger=False, **quiet)
    before = evaluator.validate(module, datamodule=data, verbose=False)[0]
    initial = {k: v.clone() for k, v in module.model.state_dict().items()}

    losses = _TrainLosses()
    trainer = L.Trainer(
        max_steps=30, limit_val_batches=0, enable_checkpointing=False, callbacks=[losses],
        logger=TensorBoardLogger(tmp_path, name="sft", version="v0"), log_every_n_steps=5, **quiet,
    )
    trainer.fit(module, datamodule=data)
    after = evaluator.validate(module, datamodule=data, verbose=False)[0]

    assert len(losses.losses) == 30
    first, last = sum(losses.losses[:5]) / 5, sum(losses.losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    assert after["val/loss"] < 0.5 * before["val/loss"], (before["val/loss"], after["val/loss"])
    assert {"val/accuracy", "val/format"} <= after.keys()

    # hf_model/ lands in the logger's directory, loads as a plain HF model, and holds the trained weights.
    target = tmp_path / "sft" / "v0" / "hf_model"
    assert (target / "config.json").is_file() and (target / "tokenizer.json").is_file()
    saved = load_file(target / "model.safetensors")
    trained = module.model.state_dict()
    assert all(torch.equal(saved[k], trained[k]) for k in saved)
    assert sum(not torch.equal(saved[k], initial[k]) for k in saved) == len(saved)  # every tensor moved
    batch = {k: v for k, v in pad(data.val_examples[:2], module.tokenizer.pad_token_id).items() if k != "loss_mask"}
    with torch.no_grad():
        torch.testing.assert_close(load_model(str(target))(**batch).logits, module.model.eval()(**batch).logits)


def test_exported_tokenizer_encodes_like_the_input_one(tmp_path, tiny_model_dir, tokenizer_texts):
    # Export through PolicySFT.on_fit_end from a saved directory (the second-stage path).
    module = PolicySFT(str(tiny_model_dir), eval_max_new_tokens=4)
    data = ColdStartDataModule(num_samples=4, num_val_samples=2, batch_size=4, max_length=160)
    trainer = L.Trainer(
        max_steps=1, limit_val_batches=0, logger=False, default_root_dir=tmp_path, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
    )
    trainer.fit(module, datamodule=data)
    original, exported = load_tokenizer(str(tiny_model_dir)), load_tokenizer(str(tmp_path / "hf_model"))
    assert len(exported) == len(original) and exported.get_vocab() == original.get_vocab()  # no token added
    for text in tokenizer_texts:
        assert exported(text)["input_ids"] == original(text)["input_ids"]
        assert exported.decode(exported(text)["input_ids"]) == text
    assert exported.chat_template == original.chat_template
    assert (exported.eos_token, exported.pad_token) == (original.eos_token, original.pad_token)
