"""Log how long the policy reasons: the signals of R1's "aha moment" (reasoning grows during RL)."""

from __future__ import annotations

import re
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from typing_extensions import override

from r1_lightning.rewards.parsing import extract_answer, extract_reasoning

DEFAULT_REFLECTION_WORDS = ("wait", "verify", "re-check", "recheck", "double-check", "let me check", "however", "mistake")


class ReasoningLengthLogger(Callback):
    """Per GRPO batch: ``<think>`` and answer lengths in tokens, truncation share, reflection-word rate.

    Logs ``reasoning/think_length_{mean,median,p90,max}``, ``reasoning/answer_length_mean``,
    ``reasoning/truncated_frac``, ``reasoning/no_think_frac``, ``reasoning/think_length_{correct,incorrect}``
    (split by the ``accuracy`` reward when there is one), ``reasoning/reflection_rate`` (reflection
    words per completion) and ``reasoning/reflection_frac`` (share with at least one). The numbers
    are computed over the completions of all ranks (gathered), not rank 0's alone. Every
    ``sample_every_n_steps`` steps, a histogram of think lengths and a few completions go to
    TensorBoard.

    Args:
        reflection_words: Words/phrases counted (case-insensitive, whole words).
        correctness_reward: Name of the reward whose score > 0 marks a completion correct.
        sample_every_n_steps: Histogram + sample texts every this many batches (0 = never).
        num_samples: Completions written as text each time.

    Example:
        >>> trainer = L.Trainer(callbacks=[ReasoningLengthLogger(reflection_words=["wait", "verify"])])
    """

    def __init__(
        self,
        reflection_words: list[str] = list(DEFAULT_REFLECTION_WORDS),
        correctness_reward: str = "accuracy",
        sample_every_n_steps: int = 20,
        num_samples: int = 2,
    ) -> None:
        self.reflection_words = list(reflection_words)
        self.correctness_reward = correctness_reward
        self.sample_every_n_steps, self.num_samples = sample_every_n_steps, num_samples
        self._pattern = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in self.reflection_words) + r")\b", re.IGNORECASE) if self.reflection_words else None

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        record = outputs.get("rollout") if isinstance(outputs, dict) else None
        if record is None:
            return
        per_completion = self.measure(pl_module.tokenizer, record.texts, record.rollout.truncated, record.reward_scores.get(self.correctness_reward))
        if trainer.world_size > 1:
            per_completion = {k: pl_module.all_gather(v.to(pl_module.device)).reshape(-1).cpu() for k, v in per_completion.items()}
        stats = reasoning_stats(**per_completion)
        pl_module.log_dict({f"reasoning/{k}": v for k, v in stats.items()}, batch_size=len(record.texts))
        if self.sample_every_n_steps and batch_idx % self.sample_every_n_steps == 0 and trainer.is_global_zero:
            self._write_samples(trainer, per_completion["think_lengths"], record.texts)

    def measure(self, tokenizer, texts: list[str], truncated: torch.Tensor, correctness: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Per completion: think/answer token lengths (-1 = absent), truncated, correct (NaN = unknown), reflections."""
        thinks, answers = [extract_reasoning(t) for t in texts], [extract_answer(t) for t in texts]

        def lengths(parts: list[str | None]) -> torch.Tensor:
            ids = tokenizer([p or "" for p in parts], add_special_tokens=False)["input_ids"]
            return torch.tensor([len(i) if p is not None else -1 for i, p in zip(ids, parts)], dtype=torch.float32)

        if correctness is None:
            correct = torch.full((len(texts),), float("nan"))
        else:
            scores = correctness.float().cpu()
            correct = torch.where(scores.isnan(), scores, (scores > 0).float())  # NaN: reward not applicable
        reflections = torch.tensor([len(self._pattern.findall(t)) if self._pattern else 0 for t in texts], dtype=torch.float32)
        return {
            "think_lengths": lengths(thinks), "answer_lengths": lengths(answers), "truncated": truncated.float().cpu(),
            "correct": correct, "reflections": reflections,
        }

    def _write_samples(self, trainer: L.Trainer, think_lengths: torch.Tensor, texts: list[str]) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                present = think_lengths[think_lengths >= 0]
                if present.numel():
                    logger.experiment.add_histogram("reasoning/think_length", present, trainer.global_step)
                sample = "\n\n---\n\n".join(f"```\n{t}\n```" for t in texts[: self.num_samples])
                logger.experiment.add_text("reasoning/samples", sample, trainer.global_step)


def reasoning_stats(
    think_lengths: torch.Tensor, answer_lengths: torch.Tensor, truncated: torch.Tensor, correct: torch.Tensor, reflections: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Summary statistics from per-completion values ([N] each; a length of -1 means the part is absent).

    Think-length statistics cover completions that have a ``<think>`` segment; ``no_think_frac``
    counts the others. Correct/incorrect splits use completions with known correctness.
    """
    has_think = think_lengths >= 0  # [N]
    thinks = think_lengths[has_think]
    nan = torch.tensor(float("nan"))
    stats = {
        "think_length_mean": thinks.mean() if thinks.numel() else nan,
        "think_length_median": thinks.median() if thinks.numel() else nan,
        "think_length_p90": torch.quantile(thinks, 0.9) if thinks.numel() else nan,
        "think_length_max": thinks.max() if thinks.numel() else nan,
        "no_think_frac": (~has_think).float().mean(),
        "answer_length_mean": answer_lengths[answer_lengths >= 0].mean() if (answer_lengths >= 0).any() else nan,
        "truncated_frac": truncated.float().mean(),
        "reflection_rate": reflections.mean(),
        "reflection_frac": (reflections > 0).float().mean(),
    }
    for name, selected in (("correct", correct == 1), ("incorrect", correct == 0)):
        chosen = think_lengths[selected & has_think]
        stats[f"think_length_{name}"] = chosen.mean() if chosen.numel() else nan
    return stats
