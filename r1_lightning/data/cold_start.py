"""Prompt → completion pairs for supervised fine-tuning (the R1 cold start, and SFT on rejection samples)."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from r1_lightning.errors import ConfigError
from r1_lightning.data.resumable import TrainPosition, run_seed
from r1_lightning.data.sources import DataError, RowSource, check_prompt, load_rows, require_columns
from r1_lightning.data.tasks import ArithmeticTask
from r1_lightning.policy import encode_prompt, render_prompt
from r1_lightning.rewards.parsing import extract_answer

Overlong = Literal["error", "drop", "truncate"]


class ColdStartDataModule(L.LightningDataModule):
    """Tokenised prompt/completion pairs (or chat conversations), loss on completion tokens only, optional packing.

    A row is either a prompt and a completion, or (when the data has ``messages_column``) a
    conversation: a list of ``{"role", "content"}`` messages as chat SFT sets store them. A
    conversation is rendered with the chat template and the loss covers the assistant turns
    only (each turn's content and its end-of-turn token); system and user turns and the
    template's own text are context. Its last assistant turn is the completion that
    validation compares against.

    The tokenizer comes from the LightningModule (``trainer.lightning_module.tokenizer``) in
    ``setup()``, or is passed explicitly for use outside a Trainer.

    Args:
        path: Training data: a JSONL/JSON/Parquet/CSV file, a saved ``datasets`` directory or a
            hub dataset name. ``None`` uses the built-in arithmetic task.
        val_path: Validation data in the same forms; ``None`` uses the built-in held-out set
            (or no validation when ``path`` is set).
        prompt_column: Column with the prompt: a string or a list of chat messages.
        completion_column: Column with the target completion.
        messages_column: Column with whole conversations; used when the data has it.
        answer_column: Optional column with the reference answer for ``val/accuracy``; when a row
            has none, the completion's ``<answer>`` is the reference.
        batch_size: Samples per batch (per device).
        max_length: Most tokens of prompt + completion.
        overlong: What to do with a longer sample: ``error``, ``drop`` (counted and logged) or
            ``truncate`` (the completion's end is cut).
        packing: Pack the samples of a batch into as few rows of ``max_length`` as possible
            (position ids restart per sample, so samples never attend to each other).
        system_prompt: Added as a system message to every prompt.
        assistant_prefill: Text that opens the assistant's turn of every prompt (as in the GRPO stage's
            ``PromptDataModule``, so that SFT on its rejection samples sees the same prompts).
        task: The built-in task (used when ``path`` / ``val_path`` is ``None``).
        num_samples: Samples drawn from the built-in task for training.
        num_val_samples: Held-out samples of the built-in task for validation.
        split: Split of a saved ``DatasetDict`` or hub dataset for training.
        val_split: Split for validation.
        num_workers: DataLoader workers.
        shuffle_seed: Seed of the per-epoch shuffle (the order depends only on it and the epoch); ``None``
            takes the run's ``seed_everything`` (or 0).
    """

    def __init__(
        self,
        path: str | None = None,
        val_path: str | None = None,
        prompt_column: str = "prompt",
        completion_column: str = "completion",
        messages_column: str = "messages",
        answer_column: str = "answer",
        batch_size: int = 16,
        max_length: int = 512,
        overlong: Overlong = "error",
        packing: bool = False,
        system_prompt: str | None = None,
        assistant_prefill: str = "",
        task: ArithmeticTask | None = None,
        num_samples: int = 512,
        num_val_samples: int = 64,
        split: str = "train",
        val_split: str = "validation",
        num_workers: int = 0,
        tokenizer: Any = None,
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__()
        if overlong not in ("error", "drop", "truncate"):
            raise ConfigError(f"overlong={overlong!r}: choose one of error, drop, truncate")
        if batch_size < 1 or max_length < 2:
            raise ConfigError(f"batch_size={batch_size}, max_length={max_length}: both must be positive (max_length >= 2)")
        self.save_hyperparameters(ignore=["tokenizer"])
        self.task = task or ArithmeticTask()
        self.tokenizer = tokenizer
        self.train_examples: list[dict[str, Any]] = []
        self.val_examples: list[dict[str, Any]] = []
        self.num_dropped = 0
        self._position = TrainPosition()  # the training loader's position, saved in checkpoints

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            self.tokenizer = self.trainer.lightning_module.tokenizer
        hp = self.hparams
        if stage in (None, "fit") and not self.train_examples:
            rows = self.task.rows("sft", hp.num_samples) if hp.path is None else self._read(hp.path, hp.split, "path")
            self.train_examples = self._tokenize(rows, RowSource.of(f"path={hp.path!r}" if hp.path else "built-in task", rows))
            if not self.train_examples:
                raise DataError(f"path={hp.path!r}: every sample was dropped as longer than max_length={hp.max_length}")
        if stage in (None, "fit", "validate") and not self.val_examples:
            if hp.val_path is not None:
                rows = self._read(hp.val_path, hp.val_split, "val_path")
            elif hp.path is None:
                rows = self.task.rows("eval", hp.num_val_samples)
            else:
                rows = []
            name = f"val_path={hp.val_path!r}" if hp.val_path else "built-in held-out set"
            self.val_examples = self._tokenize(rows, RowSource.of(name, rows))

    def _read(self, path: str, split: str, option: str) -> list[dict[str, Any]]:
        dataset = load_rows(path, split, option)
        if self.hparams.messages_column not in dataset.column_names:
            require_columns(dataset, [self.hparams.prompt_column, self.hparams.completion_column], f"{option}={path!r}")
        return dataset  # `Rows`: keeps each row's file line for error messages

    def _tokenize(self, rows: list[dict[str, Any]], source: RowSource) -> list[dict[str, Any]]:
        hp, examples, dropped = self.hparams, [], 0
        for index, row in enumerate(rows):
            if hp.messages_column in row and hp.prompt_column not in row:
                example = self._tokenize_conversation(row, source.row(index))
                if example is not None:
                    examples.append({"index": index, **example})
                continue
            prompt, completion = row.get(hp.prompt_column), row.get(hp.completion_column)
            check_prompt(prompt, source.row(index), hp.prompt_column)
            if not isinstance(completion, str) or not isinstance(prompt, (str, list)):
                raise DataError(
                    f"{source.row(index)}: {hp.prompt_column!r} must be a string or chat messages and {hp.completion_column!r} a string"
                )
            prompt_ids = encode_prompt(self.tokenizer, render_prompt(self.tokenizer, prompt, hp.system_prompt, hp.assistant_prefill))
            completion_ids = self.tokenizer(completion, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            if len(prompt_ids) + len(completion_ids) > hp.max_length:
                if hp.overlong == "error" or (hp.overlong == "truncate" and len(prompt_ids) >= hp.max_length):
                    raise DataError(
                        f"{source.row(index)}: the sample has {len(prompt_ids) + len(completion_ids)} tokens "
                        f"> max_length={hp.max_length} "
                        "(set overlong: drop or truncate, or raise max_length)"
                    )
                if hp.overlong == "drop":
                    dropped += 1
                    continue
                completion_ids = completion_ids[: hp.max_length - len(prompt_ids)]
            answer = row.get(hp.answer_column)
            if answer is None or not str(answer).strip():  # `or` would also discard a numeric 0 answer
                answer = extract_answer(completion)
            # No reference stays None (Accuracy: not applicable), never the string "None".
            examples.append(
                {"index": index, "prompt_ids": prompt_ids, "completion_ids": completion_ids, "answer": None if answer is None else str(answer)}
            )
        if dropped:
            self.num_dropped += dropped
            rank_zero_warn(f"{source}: dropped {dropped} samples longer than max_length={hp.max_length}")
        return examples

    def _tokenize_conversation(self, row: dict[str, Any], where: str) -> dict[str, Any] | None:
        """One conversation: ``prompt_ids`` up to its last assistant turn, that turn as ``completion_ids``,
        and a ``loss_mask`` over both that marks every assistant turn; None when dropped as over-long."""
        hp = self.hparams
        messages = conversation_messages(row[hp.messages_column], f"{where}: column {hp.messages_column!r}")
        if hp.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": hp.system_prompt}] + messages
        spans = assistant_spans(self.tokenizer, messages, f"{where}: column {hp.messages_column!r}")
        ids: list[int] = []
        mask: list[bool] = []
        for text, trained in spans:
            piece = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            mask += [trained] * len(piece)
        if len(ids) > hp.max_length:
            if hp.overlong == "drop":
                self.num_dropped += 1
                rank_zero_warn(f"{where}: dropped, the conversation has {len(ids)} tokens > max_length={hp.max_length}")
                return None
            raise DataError(
                f"{where}: the conversation has {len(ids)} tokens > max_length={hp.max_length} (set overlong: drop, or raise max_length)"
            )
        last_start = len(ids) - len(self.tokenizer(spans[-1][0], add_special_tokens=False)["input_ids"])
        answer = row.get(hp.answer_column)
        if answer is None or not str(answer).strip():
            answer = extract_answer(messages[-1]["content"])
        return {
            "prompt_ids": ids[:last_start], "completion_ids": ids[last_start:], "loss_mask": mask,
            "answer": None if answer is None else str(answer),
        }

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        return self._position.loader(self.train_examples, hp.batch_size, True, run_seed(hp.shuffle_seed), self.trainer, self.collate, hp.num_workers)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        self._position.count_batch(self.trainer)
        return batch

    def state_dict(self) -> dict[str, int]:
        return self._position.state_dict(self.trainer, len(self.train_examples))

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        count = len(self.train_examples) or None  # None: not loaded yet
        self._position.load_state_dict(state_dict, self.trainer, count, f"path={self.hparams.path!r}")

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_examples:
            return []
        return DataLoader(self.val_examples, batch_size=self.hparams.batch_size, collate_fn=self.collate, num_workers=self.hparams.num_workers)

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = pack(examples, self.hparams.max_length, self.tokenizer.pad_token_id) if self.hparams.packing else pad(examples, self.tokenizer.pad_token_id)
        batch["prompt_ids"] = [e["prompt_ids"] for e in examples]
        batch["answers"] = [e["answer"] for e in examples]
        batch["indices"] = [e["index"] for e in examples]  # seeds a prompt's samples wherever it lands (distillation)
        return batch


def conversation_messages(value: Any, where: str) -> list[dict[str, str]]:
    """A conversation as ``[{"role", "content"}, ...]`` ending in an assistant turn; DataError naming ``where`` otherwise."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where} must be a non-empty list of {{role, content}} messages")
    messages = []
    for position, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: message {position} must be {{\"role\": str, \"content\": str}}, got {message!r}")
        messages.append({"role": message["role"], "content": message["content"]})
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's (the turn to learn), got role {messages[-1]['role']!r}")
    return messages


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]], where: str) -> list[tuple[str, bool]]:
    """The rendered conversation cut into ``(text, trained)`` pieces; the last piece is the last assistant turn.

    An assistant turn is trained from its content through the first EOS token the template writes
    after it (ChatML: ``content<|im_end|>``), so the model learns to end its turn; everything else
    (the template's role headers, system and user turns) is context. Every cut is checked: the
    template must write each earlier rendering as a prefix of the next, and an assistant's content verbatim.
    """
    if not tokenizer.chat_template:
        raise DataError(f"{where}: conversations need a tokenizer with a chat template")
    spans: list[tuple[str, bool]] = []
    consumed = ""
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        context = tokenizer.apply_chat_template(messages[:turn], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: turn + 1], tokenize=False)
        if not context.startswith(consumed) or not full.startswith(context + message["content"]):
            raise DataError(f"{where}: the chat template does not render message {turn} as a continuation of the earlier turns")
        end = full[len(context) + len(message["content"]) :]
        cut = end.find(tokenizer.eos_token) if tokenizer.eos_token else -1
        end = end[: cut + len(tokenizer.eos_token)] if cut != -1 else end
        spans += [(context[len(consumed) :], False), (message["content"] + end, True)]
        consumed = context + message["content"] + end
    return [(text, trained) for text, trained in spans if text]


def pad(examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded rows: ``input_ids``/``attention_mask``/``loss_mask`` [B, T]; loss_mask marks completion tokens
    (an example's own ``loss_mask``, for conversations, marks every assistant turn)."""
    rows = [e["prompt_ids"] + e["completion_ids"] for e in examples]
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    loss_mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (row, e) in enumerate(zip(rows, examples)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        loss_mask[i, : len(row)] = torch.tensor(example_loss_mask(e))
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, "loss_mask": loss_mask}


def pack(examples: list[dict[str, Any]], max_length: int, pad_id: int) -> dict[str, Any]:
    """Samples laid end to end in rows of at most ``max_length`` tokens; ``attention_mask`` is None.

    Position ids restart at 0 for every sample, which transformers turns into a block-diagonal
    causal mask, so a sample never sees another one.
    """
    rows: list[tuple[list[int], list[int], list[bool]]] = []
    for e in examples:
        ids, length = e["prompt_ids"] + e["completion_ids"], len(e["prompt_ids"]) + len(e["completion_ids"])
        if not rows or len(rows[-1][0]) + length > max_length:
            rows.append(([], [], []))
        rows[-1][0].extend(ids)
        rows[-1][1].extend(range(length))
        rows[-1][2].extend(example_loss_mask(e))
    width = max(len(r[0]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    # Padding at a row's end is one more "sample" with its own positions, masked out of the loss.
    position_ids = torch.arange(width).repeat(len(rows), 1)
    loss_mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (ids, positions, mask) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        position_ids[i, : len(ids)] = torch.tensor(positions)
        position_ids[i, len(ids) :] = torch.arange(width - len(ids))
        loss_mask[i, : len(ids)] = torch.tensor(mask)
    return {"input_ids": input_ids, "attention_mask": None, "position_ids": position_ids, "loss_mask": loss_mask}


def example_loss_mask(example: dict[str, Any]) -> list[bool]:
    """Which of an example's ``prompt_ids + completion_ids`` are trained: its own mask, or the completion."""
    if "loss_mask" in example:
        return list(example["loss_mask"])
    return [False] * len(example["prompt_ids"]) + [True] * len(example["completion_ids"])
