"""Rejection sampling (R1 section 2.3.3): keep correct, readable samples of the RL model as a new SFT set."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from typing_extensions import override

from r1_lightning.atomic import remove_stray_temporaries, write_text_atomic
from r1_lightning.errors import ConfigError, UserError
from r1_lightning.rl.groups import group_indices


class RejectionSamplingWriter(BasePredictionWriter):
    """Filter GRPO ``predict`` samples and write the kept ones as a JSONL that ``ColdStartDataModule`` reads.

    A sample is kept when every reward in ``require`` scores above 0 (by default correct and
    well formed), it was not truncated, its length is within bounds, its language-consistency
    score (if that reward is used) reaches ``min_language_consistency``, and it is not a
    duplicate of a kept sample of the same prompt. Per prompt, ``keep: best`` keeps the sample
    with the highest total reward (the shortest on ties), ``keep: all`` keeps every accepted one.
    Each rank writes its share; rank 0 merges the shares in dataset order, dropping the
    duplicates that a distributed sampler's padding creates, so N ranks write the same file as one.
    The file is replaced atomically (a temporary sibling, fsync, rename). A run that accepts no
    sample at all writes nothing and raises one error with the rejection counts: an earlier
    ``accepted.jsonl`` stays as it was, and a recipe stops there instead of training on nothing.

    Args:
        output_path: The JSONL to write (rows: prompt, completion, the prompt's columns, reward);
            default ``<trainer.default_root_dir>/accepted.jsonl``.
        keep: ``best`` (one per prompt) or ``all`` accepted samples.
        require: Reward names that must score > 0.
        min_tokens: Shortest accepted completion (tokens, EOS included).
        max_tokens: Longest accepted completion (``None``: no bound beyond truncation).
        min_language_consistency: Threshold on the ``language_consistency`` reward when present.
        drop_truncated: Reject completions that hit the token limit.

    Example:
        >>> trainer = L.Trainer(callbacks=[RejectionSamplingWriter("runs/rs/accepted.jsonl")])
        >>> trainer.predict(grpo_module, datamodule=prompts, return_predictions=False)
    """

    def __init__(
        self,
        output_path: str | None = None,
        keep: Literal["best", "all"] = "best",
        require: list[str] = ["accuracy", "lenient_format"],
        min_tokens: int = 1,
        max_tokens: int | None = None,
        min_language_consistency: float = 0.95,
        drop_truncated: bool = True,
    ) -> None:
        super().__init__(write_interval="batch")
        if keep not in ("best", "all"):
            raise ConfigError(f"RejectionSamplingWriter: keep={keep!r}: choose best or all")
        self.output_path = Path(output_path) if output_path else None
        self.keep, self.require = keep, list(require)
        self.min_tokens, self.max_tokens = min_tokens, max_tokens
        self.min_language_consistency, self.drop_truncated = min_language_consistency, drop_truncated
        self.stats: Counter = Counter()
        self._rows: list[dict[str, Any]] = []

    @override
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.stats, self._rows = Counter(), []
        if self.output_path is None:
            self.output_path = Path(trainer.default_root_dir) / "accepted.jsonl"
        self._share(trainer.global_rank).unlink(missing_ok=True)  # left by a killed run
        if trainer.is_global_zero:
            remove_stray_temporaries(self.output_path.parent)

    @override
    def write_on_batch_end(self, trainer, pl_module, prediction: dict[str, Any], batch_indices, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        missing = [name for name in self.require if name not in prediction["scores"]]
        if missing:
            raise ConfigError(f"RejectionSamplingWriter: require={missing} are not among the rewards ({', '.join(prediction['scores'])})")
        G = prediction["num_generations"]
        for p, index in enumerate(prediction["indices"]):
            accepted = []
            for i in group_indices(p, G):
                reason = self.rejection_reason(prediction, i)
                self.stats["samples"] += 1
                self.stats[f"rejected_{reason}" if reason else "accepted"] += 1
                if reason is None:
                    accepted.append(i)
            self.stats["prompts"] += 1
            rows = self._select(prediction, p, index, accepted)
            self.stats["prompts_with_a_sample"] += bool(rows)
            self._rows.extend(rows)

    def rejection_reason(self, prediction: dict[str, Any], i: int) -> str | None:
        """Why sample ``i`` is rejected (a short name), or None when it is accepted."""
        if self.drop_truncated and prediction["truncated"][i]:
            return "truncated"
        for name in self.require:
            score = prediction["scores"][name][i]
            if math.isnan(score) or score <= 0:
                return name
        length = prediction["lengths"][i]
        if length < self.min_tokens or (self.max_tokens is not None and length > self.max_tokens):
            return "length"
        language = prediction["scores"].get("language_consistency")
        if language is not None and not language[i] >= self.min_language_consistency:
            return "language_mixing"
        return None

    def _select(self, prediction: dict[str, Any], p: int, index: int, accepted: list[int]) -> list[dict[str, Any]]:
        seen, unique = set(), []
        for i in accepted:
            key = " ".join(prediction["completions"][i].split())
            if key not in seen:
                seen.add(key)
                unique.append(i)
        self.stats["duplicates"] += len(accepted) - len(unique)
        if self.keep == "best" and unique:
            unique = [max(unique, key=lambda i: (prediction["total"][i], -prediction["lengths"][i]))]
        columns = {name: values[p] for name, values in prediction["columns"].items()}
        return [
            {"index": index, "prompt": prediction["prompts"][p], "completion": prediction["completions"][i], **columns, "reward": prediction["total"][i]}
            for i in unique
        ]

    @override
    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.output_path.parent.mkdir(parents=True, exist_ok=True)
        share = self._share(trainer.global_rank)
        share.write_text("".join(json.dumps(row) + "\n" for row in self._rows))
        stats = dict(self.stats)
        if trainer.world_size > 1:  # sum the counts of all ranks over a key list every rank knows
            keys = ["samples", "accepted", "prompts", "prompts_with_a_sample", "duplicates"]
            keys += [f"rejected_{r}" for r in ["truncated", "length", "language_mixing", *self.require]]
            totals = trainer.strategy.reduce(torch.tensor([float(self.stats[k]) for k in keys], device=pl_module.device), reduce_op="sum")
            stats = {k: float(v) for k, v in zip(keys, totals.tolist()) if v}
        trainer.strategy.barrier("rejection_sampling_shares")
        if not stats.get("accepted"):  # every rank knows the total: all stop together
            share.unlink(missing_ok=True)
            raise UserError(
                f"rejection sampling accepted none of {int(stats.get('samples', 0))} samples ({_rejections(stats)}); "
                f"{self.output_path} was not written (an earlier file there is kept as it was): loosen the filters "
                "(require, max_tokens, drop_truncated, min_language_consistency) or sample more (num_generations, num_samples)"
            )
        if trainer.is_global_zero:
            self._merge(trainer.world_size)
            self._report(trainer, stats)
        trainer.strategy.barrier("rejection_sampling_merged")

    def _share(self, rank: int) -> Path:
        return self.output_path.with_name(f"{self.output_path.name}.rank{rank}")

    def _merge(self, world_size: int) -> None:
        rows = []
        for rank in range(world_size):
            share = self._share(rank)
            rows += [(row["index"], rank, row) for row in map(json.loads, share.read_text().splitlines())]
            share.unlink()
        # A distributed sampler repeats a few prompts to even out the ranks: keep one rank's rows per prompt.
        owner = {}
        for index, rank, _ in rows:
            owner.setdefault(index, rank)
        merged = [
            {k: v for k, v in row.items() if k != "index"}
            for index, rank, row in sorted(rows, key=lambda r: (r[0], r[1]))
            if owner[index] == rank
        ]
        write_text_atomic(self.output_path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in merged))
        self.written = len(merged)

    def _report(self, trainer: L.Trainer, stats: dict[str, Any]) -> None:
        samples = max(1.0, float(stats.get("samples", 0)))
        rate = float(stats.get("accepted", 0)) / samples
        lines = [f"rejection sampling: wrote {self.written} rows to {self.output_path}; acceptance {rate:.1%} of {int(samples)} samples"]
        lines += [f"  {k}: {int(v)}" for k, v in sorted(stats.items())]
        print("\n".join(lines))
        for logger in trainer.loggers:
            logger.log_metrics({"rejection/acceptance_rate": rate, **{f"rejection/{k}": float(v) for k, v in stats.items()}}, step=0)


def _rejections(stats: dict[str, Any]) -> str:
    """``rejected: accuracy 30, truncated 2`` from the writer's counts."""
    counts = [f"{k.removeprefix('rejected_')} {int(v)}" for k, v in sorted(stats.items()) if k.startswith("rejected_") and v]
    return "rejected: " + (", ".join(counts) if counts else "none")
