"""Supervised fine-tuning of a policy on prompt → completion pairs (R1's cold start).

DeepSeek-R1 (https://arxiv.org/abs/2501.12948), section 2.3.1: a few thousand long
chain-of-thought samples teach the base model a readable ``<think>…</think>`` format before RL.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from typing_extensions import override

from r1_lightning.engines import HFGenerateEngine, RolloutEngine
from r1_lightning.evaluation import generate_and_score
from r1_lightning.guards import NonFinite, StepGuard
from r1_lightning.metrics import ReasoningMetrics
from r1_lightning.modules.plumbing import (
    EngineLifecycle,
    SamplingSeeds,
    export_at_fit_end,
    load_policy,
    load_training_state,
    policy_optimizer,
    sampling_params,
    save_training_state,
)
from r1_lightning.optim import check_optimizer_options
from r1_lightning.parallel import global_normalizer
from r1_lightning.policy import LoraSettings, load_tokenizer, token_logprobs


class PolicySFT(L.LightningModule):
    """Causal-LM loss on completion tokens; validation loss plus generated-answer accuracy and format.

    Args:
        model_name_or_path: A local Hugging Face directory, a hub id, or ``builtin:tiny``.
        learning_rate: Peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps before the cosine decay.
        min_lr_ratio: The cosine ends at ``min_lr_ratio * learning_rate``.
        nonfinite: A NaN/inf loss or gradient ``raise``-s one error naming the step and rank, or
            ``skip``-s that optimizer step (``train/skipped_steps/nonfinite``). A step with an exactly
            zero gradient never moves the weights (``train/skipped_steps/no_signal``); see
            ``r1_lightning.guards``.
        dtype: Weights dtype: ``auto`` (as saved), ``float32``, ``bfloat16`` or ``float16``.
        gradient_checkpointing: Recompute activations in the backward pass to save memory.
        lora: Train a LoRA adapter instead of all weights (needs ``peft``).
        trust_remote_code: Allow model code from the model directory (off: only transformers' own).
        logprob_chunk_size: Tokens per chunk when projecting onto the vocabulary (default:
            ``engines.logprobs.default_chunk_rows``).
        eval_max_new_tokens: Token budget of generated answers in validation.
        eval_num_samples: Completions per validation prompt (1 with ``eval_temperature: 0`` = greedy).
        eval_temperature: Sampling temperature in validation (0 = greedy).
        rollout_engine: How validation samples its answers: ``HFGenerateEngine`` (default) or
            ``VLLMEngine`` (``class_path``, or an instance from Python).
        export_hf: Write ``<log dir>/hf_model/`` when fit ends.
        seed: Seed of the built-in model's initial weights and of validation sampling.
        fsdp_param_dtype: Under ``ModelParallelStrategy`` (FSDP2): the dtype weights are gathered and
            computed in (e.g. ``bfloat16`` over ``dtype: float32`` weights and optimizer state); None:
            the weights' dtype. See ``r1_lightning.parallel``.
    """

    def __init__(
        self,
        model_name_or_path: str = "builtin:tiny",
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 10,
        min_lr_ratio: float = 0.1,
        nonfinite: NonFinite = "raise",
        dtype: str = "auto",
        gradient_checkpointing: bool = False,
        lora: LoraSettings | None = None,
        trust_remote_code: bool = False,
        logprob_chunk_size: int | None = None,
        eval_max_new_tokens: int = 160,
        eval_num_samples: int = 1,
        eval_temperature: float = 0.0,
        rollout_engine: RolloutEngine | None = None,
        export_hf: bool = True,
        seed: int = 0,
        fsdp_param_dtype: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["rollout_engine"])
        check_optimizer_options(learning_rate, weight_decay, warmup_steps, min_lr_ratio)
        # The tokenizer is light and needed by the data module's setup(), before configure_model.
        self.tokenizer = load_tokenizer(model_name_or_path, trust_remote_code)
        self.model: torch.nn.Module | None = None
        self.engine = rollout_engine or HFGenerateEngine()
        self.val_metrics = ReasoningMetrics()
        self.guard = StepGuard(nonfinite)
        self.seeds = SamplingSeeds(seed)

    @override
    def configure_model(self) -> None:
        if self.model is not None:
            return
        hp = self.hparams
        self.model = load_policy(
            self, hp.model_name_or_path, vocab_size=len(self.tokenizer), dtype=hp.dtype,
            gradient_checkpointing=hp.gradient_checkpointing, lora=hp.lora, trust_remote_code=hp.trust_remote_code, seed=hp.seed,
            fsdp_param_dtype=hp.fsdp_param_dtype,
        )

    @override
    def configure_callbacks(self) -> list[L.Callback]:
        return [EngineLifecycle(self.engine, self.hparams.eval_max_new_tokens)]

    def completion_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token-mean negative log-likelihood of the completion tokens over all ranks' batches; returns (loss, token count)."""
        loss_mask = batch["loss_mask"]  # [B, T]
        logprobs, _ = token_logprobs(
            self.model, batch["input_ids"], batch["attention_mask"], batch["position_ids"], loss_mask, chunk_size=self.hparams.logprob_chunk_size
        )
        tokens = loss_mask.sum()
        # The token count of the global batch: N ranks then train as one process on all of it.
        return -(logprobs * loss_mask).sum() / global_normalizer(tokens), tokens

    @override
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, tokens = self.completion_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=int(tokens), sync_dist=True)  # mean over ranks = global loss
        self.log("train/tokens", tokens.float(), reduce_fx="sum", batch_size=1)
        self.guard.record_loss(loss)
        return loss

    @override
    def on_before_optimizer_step(self, optimizer) -> None:
        # After the backward, before the step: no-signal and (with nonfinite: skip) NaN steps drop their gradients.
        self.guard.before_optimizer_step(self, optimizer)
        self.log_dict(self.guard.pop_skipped(), batch_size=1)

    @override
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss, tokens = self.completion_loss(batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=int(tokens), sync_dist=True)
        hp = self.hparams
        params = sampling_params(self.tokenizer, self.model, hp.eval_max_new_tokens, hp.eval_temperature)
        generators = self.seeds.evaluation(batch, batch_idx, self.global_rank, self.device)
        scored = generate_and_score(
            self.model, self.tokenizer, self.engine, batch["prompt_ids"], batch["answers"], params, hp.eval_num_samples, generators
        )
        self.val_metrics.update(scored.correct, scored.answers, scored.formatted, scored.reasoning_lengths)

    @override
    def on_validation_epoch_end(self) -> None:
        self.val_metrics.log_and_reset(self, "val", self.hparams.eval_num_samples, prog_bar=("accuracy", "format"))

    @override
    def configure_optimizers(self) -> dict:
        return policy_optimizer(self)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        save_training_state(self, checkpoint)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        load_training_state(self, checkpoint)

    @override
    def on_fit_end(self) -> None:
        export_at_fit_end(self)
