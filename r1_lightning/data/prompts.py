"""Prompts (plus reference answers and any other columns) for GRPO, evaluation and rejection sampling."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler

from r1_lightning.data.resumable import TrainPosition, run_seed
from r1_lightning.data.sources import DataError, RowSource, check_column_names, check_prompt, load_rows, require_columns
from r1_lightning.data.tasks import ArithmeticTask
from r1_lightning.errors import ConfigError
from r1_lightning.policy import encode_prompt, render_prompt

# What a reward receives besides the columns: `reward(completions, *, prompts, **columns)`.
REWARD_ARGUMENTS = ("prompts", "completions")


class PromptDataModule(L.LightningDataModule):
    """Tokenised prompts; every other column travels with its prompt to the rewards unchanged.

    ``batch_size`` counts prompts: the module samples ``num_generations`` completions for each,
    on the rank that holds the prompt, so a group never spans ranks. The tokenizer comes from
    the LightningModule in ``setup()`` (or pass it for use outside a Trainer).

    Args:
        path: Training prompts: a JSONL/JSON/Parquet/CSV file, a saved ``datasets`` directory or
            a hub dataset name; ``None`` uses the built-in arithmetic task.
        val_path: Validation prompts in the same forms; ``None`` uses the built-in held-out set
            (or none when ``path`` is set).
        predict_path: Prompts for ``predict`` (rejection sampling); ``None`` uses ``path``.
        prompt_column: Column with the prompt: a string or a list of chat messages.
        batch_size: Prompts per batch (per device).
        val_batch_size: Prompts per validation batch (default ``batch_size``).
        max_prompt_length: Most prompt tokens.
        overlong: A longer prompt is an ``error`` or is ``drop``-ped (counted, warned).
        system_prompt: Added as a system message to every prompt.
        assistant_prefill: Text that opens the assistant's turn of every prompt (e.g. ``"<think>\\n"``
            for a model whose template does not open the reasoning itself); rewards see the
            completion with a trailing ``<think>`` put back.
        task: The built-in task (used when a path is ``None``).
        num_samples: Built-in training prompts.
        num_val_samples: Built-in held-out prompts.
        split: Split of a saved ``DatasetDict`` or hub dataset for training (and predict).
        val_split: Split for validation.
        shuffle: Shuffle training prompts each epoch (the order depends only on ``shuffle_seed`` and the epoch).
        num_workers: DataLoader workers.
        shuffle_seed: Seed of the shuffle; ``None`` takes the run's ``seed_everything`` (or 0).
    """

    def __init__(
        self,
        path: str | None = None,
        val_path: str | None = None,
        predict_path: str | None = None,
        prompt_column: str = "prompt",
        batch_size: int = 8,
        val_batch_size: int | None = None,
        max_prompt_length: int = 512,
        overlong: Literal["error", "drop"] = "error",
        system_prompt: str | None = None,
        assistant_prefill: str = "",
        task: ArithmeticTask | None = None,
        num_samples: int = 1024,
        num_val_samples: int = 64,
        split: str = "train",
        val_split: str = "validation",
        shuffle: bool = True,
        num_workers: int = 0,
        tokenizer: Any = None,
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__()
        if overlong not in ("error", "drop"):
            raise ConfigError(f"overlong={overlong!r}: choose error or drop")
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size}: must be >= 1")
        if val_batch_size is not None and val_batch_size < 1:
            raise ConfigError(f"val_batch_size={val_batch_size}: must be >= 1 (or unset: batch_size)")
        self.save_hyperparameters(ignore=["tokenizer"])
        self.task = task or ArithmeticTask()
        self.tokenizer = tokenizer
        self.examples: dict[str, list[dict[str, Any]]] = {}
        self._position = TrainPosition()  # the training loader's position, saved in checkpoints

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            self.tokenizer = self.trainer.lightning_module.tokenizer
        hp = self.hparams
        if stage in (None, "fit") and "train" not in self.examples:
            self.examples["train"] = self._load(hp.path, hp.split, "path", "rl", hp.num_samples)
        if stage in (None, "fit", "validate", "test") and "val" not in self.examples:
            if hp.val_path is None and hp.path is not None:
                self.examples["val"] = []
            else:
                self.examples["val"] = self._load(hp.val_path, hp.val_split, "val_path", "eval", hp.num_val_samples)
        if stage in (None, "predict") and "predict" not in self.examples:
            path = hp.predict_path or hp.path
            self.examples["predict"] = self._load(path, hp.split, "predict_path" if hp.predict_path else "path", "rl", hp.num_samples)

    def _load(self, path: str | None, split: str, option: str, task_split: str, count: int) -> list[dict[str, Any]]:
        if path is None:
            rows, source = self.task.rows(task_split, count), RowSource("built-in task")
            rows = [{"prompt": r["prompt"], "answer": r["answer"]} for r in rows]
            column = "prompt"
        else:
            dataset = load_rows(path, split, option)
            source, column = RowSource.of(f"{option}={path!r}", dataset), self.hparams.prompt_column
            require_columns(dataset, [column], source)
            check_column_names([c for c in dataset.column_names if c != column], REWARD_ARGUMENTS, source)
            rows = [dict(r) for r in dataset]
        return self._tokenize(rows, column, source)

    def _tokenize(self, rows: list[dict[str, Any]], column: str, source: RowSource) -> list[dict[str, Any]]:
        hp, examples, dropped = self.hparams, [], 0
        for index, row in enumerate(rows):
            prompt = row.pop(column, None)
            check_prompt(prompt, source.row(index), column)
            text = render_prompt(self.tokenizer, prompt, hp.system_prompt, hp.assistant_prefill)
            ids = encode_prompt(self.tokenizer, text)
            if len(ids) > hp.max_prompt_length:
                if hp.overlong == "error":
                    raise DataError(
                        f"{source.row(index)}: prompt has {len(ids)} tokens > max_prompt_length={hp.max_prompt_length} "
                        "(set overlong: drop, or raise max_prompt_length)"
                    )
                dropped += 1
                continue
            examples.append({"index": index, "prompt": prompt, "prompt_text": text, "prompt_ids": ids, "columns": row})
        if dropped:
            rank_zero_warn(f"{source}: dropped {dropped} prompts longer than max_prompt_length={hp.max_prompt_length}")
        if not examples:
            raise DataError(f"{source}: no prompts left (all {len(rows)} longer than max_prompt_length={hp.max_prompt_length})")
        return examples

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        return self._position.loader(self.examples["train"], hp.batch_size, hp.shuffle, run_seed(hp.shuffle_seed), self.trainer, collate_prompts, hp.num_workers)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        self._position.count_batch(self.trainer)
        return batch

    def state_dict(self) -> dict[str, int]:
        return self._position.state_dict(self.trainer, len(self.examples.get("train", [])))

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        train = self.examples.get("train")
        count = None if train is None else len(train)  # None: not loaded yet
        self._position.load_state_dict(state_dict, self.trainer, count, f"path={self.hparams.path!r}")

    def draw_prompts(self, count: int, generator: torch.Generator, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
        """A batch of `count` training prompts drawn at random (DAPO dynamic sampling's extra draws).

        Every rank passes an identically seeded `generator`; `world_size × count` distinct prompts are
        drawn (with repeats only when the set is smaller) and rank `rank` gets its share, so ranks draw
        different prompts and a run with the same seeds draws the same ones (resumes included).

        Returns:
            A batch in `collate_prompts`' layout.
        """
        train = self.examples["train"]
        total = count * world_size
        order = torch.cat([torch.randperm(len(train), generator=generator) for _ in range(-(-total // len(train)))])
        return collate_prompts([train[i] for i in order[rank * count:(rank + 1) * count].tolist()])

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", self.hparams.val_batch_size or self.hparams.batch_size, False) if self.examples.get("val") else []

    def test_dataloader(self) -> DataLoader | list:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        batch_size = self.hparams.val_batch_size or self.hparams.batch_size
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.world_size == 1:
            return self._loader("predict", batch_size, False)
        # Every rank must run as many batches (generation steps all ranks together), so the prompts are padded
        # by repeating a few (DistributedSampler), not split unevenly as Lightning's predict sampler would; the
        # rejection-sampling writer drops the repeats.
        examples = self.examples["predict"]
        sampler = DistributedSampler(examples, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False)
        return DataLoader(
            examples, batch_size=batch_size, sampler=sampler, collate_fn=collate_prompts, num_workers=self.hparams.num_workers
        )

    def _loader(self, name: str, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(self.examples[name], batch_size=batch_size, shuffle=shuffle, collate_fn=collate_prompts, num_workers=self.hparams.num_workers)


def collate_prompts(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Lists, not tensors: prompts are padded by the rollout engine; columns keep their Python values."""
    names = sorted({name for e in examples for name in e["columns"]})
    return {
        "indices": [e["index"] for e in examples],
        "prompts": [e["prompt"] for e in examples],
        "prompt_texts": [e["prompt_text"] for e in examples],
        "prompt_ids": [e["prompt_ids"] for e in examples],
        "columns": {name: [e["columns"].get(name) for e in examples] for name in names},
    }
