"""Group Relative Policy Optimization with rule-based rewards and a KL penalty to a frozen reference.

DeepSeekMath (https://arxiv.org/abs/2402.03300) introduced GRPO; DeepSeek-R1
(https://arxiv.org/abs/2501.12948) trains reasoning with it. For each prompt q, sample G
completions, score them with the rewards, take A_i = (r_i - mean r) / std r for every token of
o_i, and maximise mean_tokens min(ρA, clip(ρ, 1-ε, 1+ε)A) - β·KL(π_θ‖π_ref) with the k3 estimator.
Variants (Dr. GRPO, DAPO, GSPO, RLOO, CISPO, SAPO, ...) are components chosen by ``class_path``
(advantage estimator, policy loss, KL penalty; the old strings stay aliases); see ``r1_lightning.rl``.
"""

from __future__ import annotations

import inspect
import time
from contextlib import nullcontext
from functools import partial
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from r1_lightning.dynamic_sampling import SampledGroups, refill_informative_groups
from r1_lightning.engines import HFGenerateEngine, Rollout, RolloutEngine, SamplingParams
from r1_lightning.engines import compiled_forward
from r1_lightning.errors import ConfigError
from r1_lightning.evaluation import generate_and_score, raw_completions, scored_texts
from r1_lightning.guards import NonFinite, StepGuard
from r1_lightning.metrics import ReasoningMetrics
from r1_lightning.modules.grpo_options import (
    check_choices,
    check_component_options,
    check_options,
    check_sampling,
    check_update_split,
)
from r1_lightning.modules.grpo_update import policy_update
from r1_lightning.modules.plumbing import (
    PREDICT_STREAM,
    EngineLifecycle,
    SamplingSeeds,
    export_at_fit_end,
    load_frozen,
    load_policy,
    load_training_state,
    policy_optimizer,
    sampling_params,
    save_training_state,
)
from r1_lightning.optim import FlatGradients, check_optimizer_options, place_optimizer_memory, total_training_steps
from r1_lightning.policy import LoraSettings, load_tokenizer, token_logprobs, unwrap_model
from r1_lightning.rewards import Accuracy, LenientFormat, RewardFn, RewardSet
from r1_lightning.rl.advantages import AdvantageEstimator, dynamic_sampling_mask, resolve_advantage_estimator
from r1_lightning.rl.groups import per_completion, repeat_per_completion
from r1_lightning.rl.kl import KLEstimator, KLPenalty
from r1_lightning.rl.losses import ClippedLoss, PolicyLoss
from r1_lightning.rl.sampler_correction import CorrectionLevel, CorrectionMode


@dataclass
class RolloutBatch:
    """One step's rollouts as callbacks see them (``outputs["rollout"]`` in ``on_train_batch_end``)."""

    rollout: Rollout
    texts: list[str]
    rewards: torch.Tensor  # [B*G] weighted total, NaN where no reward applied
    reward_scores: dict[str, torch.Tensor]  # name -> [B*G]
    advantages: torch.Tensor  # [B*G]
    num_generations: int


class GRPO(L.LightningModule):
    """GRPO on a causal LM: group rollouts, pluggable rewards and KL estimator, clipped policy loss.

    ``trainer.max_steps`` counts optimizer steps: ``num_iterations × ceil(B·G / mini_batch_size)``
    per batch of prompts.

    Args:
        model_name_or_path: A local Hugging Face directory (e.g. the SFT stage's ``hf_model/``),
            a hub id, or ``builtin:tiny``.
        rewards: Reward functions or ``Reward`` objects (``class_path`` in YAML). Default:
            ``Accuracy`` and ``LenientFormat``.
        reward_weights: One weight per reward (default 1.0 each).
        reward_on_error: What a reward failure does. ``auto``: a sample a built-in reward could not
            score (math-verify timed out or crashed) or a built-in reward's time-out is left out of
            the advantages, counted in ``train/reward_failures/<name>`` and logged in one line; a reward
            that raises or returns bad scores stops the run with one error naming it and the sample.
            ``none`` tolerates every failure, ``raise`` none. See ``RewardSet``.
        reward_timeout: Seconds each reward may take per batch (``None``: no limit).
        reward_max_failure_frac: Tolerated failures on more than this share of a batch's completions
            stop the run (a verifier that always times out is a problem to fix, not noise).
        num_generations: G, completions sampled per prompt.
        max_new_tokens: Token budget of a completion.
        temperature: Sampling temperature (log-probs are scored at the same temperature).
        top_p: Nucleus sampling threshold.
        top_k: Top-k sampling (0 = off).
        beta: KL coefficient; 0 loads no reference model at all.
        kl_estimator: ``k1``, ``k2``, ``k3`` or a ``KLEstimator`` (``class_path``).
        kl_placement: ``loss`` (GRPO / R1) or ``reward`` (PPO-style: subtract β·KL per sequence).
        epsilon: Lower clip range ε.
        epsilon_high: Upper clip range (DAPO clip-higher); default ``epsilon``.
        num_iterations: μ, policy updates per batch of rollouts. At 1 the ratio is 1 in value
            and no extra forward computes π_old.
        mini_batch_size: Completions per optimizer step (default: all B·G of a batch).
        micro_batch_size: Completions per forward/backward (gradient accumulation within a mini-batch). Default:
            the whole mini-batch, or where its activations would pass ~2 GiB as many whole groups as fit, or
            the fewest completions whose prompt re-runs stay cheap (``grpo_options.module_micro_batch``).
        advantage_estimator: ``grpo`` (group mean/std), ``dr_grpo`` (mean only), ``batch_std``
            (group mean, std of the global batch) or ``rloo`` (leave-one-out), or an
            ``r1_lightning.rl.advantages.AdvantageEstimator`` (``class_path``).
        loss_aggregation: ``grpo`` (sequence mean), ``dapo`` (token mean of the mini-batch), ``bnpo``
            (mean of the micro-batches' token means) or ``dr_grpo`` (constant normaliser).
        importance_level: ``token`` ratios, or ``sequence`` (GSPO).
        policy_loss: A ``r1_lightning.rl.losses.PolicyLoss`` (``class_path``: ``ClippedLoss``,
            ``CISPOLoss``, ``SAPOLoss`` or your own; entropy options there). Default: ``ClippedLoss``
            from ``epsilon``, ``epsilon_high``, ``importance_level`` and ``loss_aggregation``, which
            must then be left at their defaults.
        kl_penalty: A ``r1_lightning.rl.kl.KLPenalty`` (``class_path``; e.g. ``importance_weighted``).
            Default: one from ``beta``, ``kl_estimator`` and ``kl_placement``, which must then be left
            at their defaults.
        normalize_each_reward: Normalise each reward within its group (mean 0, std 1) before the
            weighted sum (GDPO-style multi-reward training), so no reward's scale drowns the others.
        mask_truncated: Exclude completions that hit ``max_new_tokens`` from the loss (DAPO).
        dynamic_sampling: Drop groups whose rewards are all equal from the loss (DAPO).
        dynamic_sampling_max_draws: With ``dynamic_sampling``: draw up to this many extra batches of
            prompts per step until each rank holds B groups with reward spread (DAPO's over-sampling;
            ``train/dynamic_sampling_draws``; needs ``PromptDataModule``); 0: only drop, no refill.
            See ``r1_lightning.dynamic_sampling``.
        learning_rate: Peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up optimizer steps.
        min_lr_ratio: The cosine ends at ``min_lr_ratio * learning_rate``.
        max_grad_norm: Gradient clipping by global norm (0 = off).
        nonfinite: A NaN/inf loss or gradient ``raise``-s one error naming the step and rank, or
            ``skip``-s that optimizer step (``train/skipped_steps/nonfinite``). A mini-batch with an
            exactly zero gradient (no signal) never steps (``train/skipped_steps/no_signal``); see
            ``r1_lightning.guards``.
        dtype: Weights dtype: ``auto``, ``float32``, ``bfloat16`` or ``float16``.
        gradient_checkpointing: Recompute activations in the backward pass: ``true`` is Hugging Face's (every layer, one
            forward per step without prompt sharing); ``auto`` recomputes the completions' decoder layers, prompt sharing
            kept, where the layer functions apply (Qwen2/Llama/Mistral on CPU) and one group's activations would pass
            ~2 GiB (``grpo_options.module_recompute``: ~⅒ of the memory for one more forward of the completions).
        lora: Train a LoRA adapter; the reference is then the base model with the adapter disabled.
        trust_remote_code: Allow model code from the model directory.
        logprob_chunk_size: Tokens per chunk when projecting onto the vocabulary (default:
            ``engines.logprobs.default_chunk_rows``).
        eval_num_samples: k, completions per validation prompt (pass@1 averaged over k, maj@k).
        eval_temperature: Validation sampling temperature (0 = greedy, then use k = 1).
        eval_max_new_tokens: Validation token budget (default ``max_new_tokens``).
        answer_column: Column with the reference answer that validation scores against.
        rollout_engine: How completions are sampled, in training, validation and predict:
            ``HFGenerateEngine`` (default, the policy itself) or ``VLLMEngine`` (``class_path``, or an
            instance from Python).
        sampler_correction: For an engine that is not the policy itself (vLLM): weight each term by
            π_old / π_sampler, ``tis`` (truncated at the threshold), ``mis`` (terms above it dropped) or
            ``none`` (mismatch only logged). See ``r1_lightning.rl.sampler_correction``.
        sampler_correction_level: ``token`` or ``sequence`` importance ratios.
        sampler_correction_threshold: C, the largest importance weight kept.
        export_hf: Write ``<log dir>/hf_model/`` when fit ends.
        seed: Seed of sampling (per prompt and step) and of a built-in model's initial weights.
        fsdp_param_dtype: Under ``ModelParallelStrategy`` (FSDP2): the dtype weights are gathered and
            computed in (e.g. ``bfloat16`` over ``dtype: float32`` weights and optimizer state); None:
            the weights' dtype. The reference model is sharded the same way. See ``r1_lightning.parallel``.
        compile: ``torch.compile``d decoder layers for the training forwards (Qwen2/Llama/Mistral on CPU;
            ``engines.compiled_forward``): 10-20% less time per step after a 20 s-2 min one-time compile.
            ``auto`` (default): decided, with one log line, after the process's second step (the first is
            warm-up) from its CPU time and the steps left; ``True``: always; ``False``: never. Without a C++
            compiler, or on a model it does not apply to, the forward stays eager (one warning).
    """

    def __init__(
        self,
        model_name_or_path: str = "builtin:tiny",
        rewards: list[RewardFn] | None = None,
        reward_weights: list[float] | None = None,
        reward_on_error: Literal["auto", "none", "raise"] = "auto",
        reward_timeout: float | None = None,
        reward_max_failure_frac: float = 0.1,
        num_generations: int = 8,
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        beta: float = 0.04,
        kl_estimator: str | KLEstimator = "k3",
        kl_placement: Literal["loss", "reward"] = "loss",
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        num_iterations: int = 1,
        mini_batch_size: int | None = None,
        micro_batch_size: int | None = None,
        advantage_estimator: AdvantageEstimator | str = "grpo",
        loss_aggregation: str = "grpo",
        importance_level: Literal["token", "sequence"] = "token",
        policy_loss: PolicyLoss | None = None,
        kl_penalty: KLPenalty | None = None,
        normalize_each_reward: bool = False,
        mask_truncated: bool = False,
        dynamic_sampling: bool = False,
        dynamic_sampling_max_draws: int = 0,
        learning_rate: float = 1e-6,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.1,
        max_grad_norm: float = 1.0,
        nonfinite: NonFinite = "raise",
        dtype: str = "auto",
        gradient_checkpointing: bool | Literal["auto"] = "auto",
        lora: LoraSettings | None = None,
        trust_remote_code: bool = False,
        logprob_chunk_size: int | None = None,
        eval_num_samples: int = 4,
        eval_temperature: float = 1.0,
        eval_max_new_tokens: int | None = None,
        answer_column: str = "answer",
        rollout_engine: RolloutEngine | None = None,
        sampler_correction: CorrectionMode = "tis",
        sampler_correction_level: CorrectionLevel = "token",
        sampler_correction_threshold: float = 2.0,
        export_hf: bool = True,
        seed: int = 0,
        fsdp_param_dtype: str | None = None,
        compile: bool | Literal["auto"] = "auto",
    ) -> None:
        super().__init__()
        objects = ["rewards", "kl_estimator", "rollout_engine", "policy_loss", "kl_penalty"]
        self.save_hyperparameters(ignore=objects + ([] if isinstance(advantage_estimator, str) else ["advantage_estimator"]))
        check_options(num_generations, beta, kl_placement, num_iterations, loss_aggregation, importance_level)
        self.advantage_estimator = resolve_advantage_estimator(advantage_estimator)
        self.policy_loss = policy_loss or ClippedLoss(epsilon, epsilon_high, importance_level, loss_aggregation)
        self.kl_penalty = kl_penalty or KLPenalty(kl_estimator, beta, kl_placement)
        if dynamic_sampling_max_draws < 0:
            raise ConfigError(f"dynamic_sampling_max_draws={dynamic_sampling_max_draws}: must be >= 0")
        defaults = {name: p.default for name, p in inspect.signature(GRPO.__init__).parameters.items()}
        check_component_options(
            dict(policy_loss=policy_loss, kl_penalty=kl_penalty),
            dict(epsilon=epsilon, epsilon_high=epsilon_high, importance_level=importance_level, loss_aggregation=loss_aggregation,
                 beta=beta, kl_estimator=kl_estimator, kl_placement=kl_placement),
            defaults,
        )
        check_sampling(max_new_tokens, temperature, top_p, top_k, eval_temperature, eval_num_samples)
        check_update_split(epsilon, epsilon_high, mini_batch_size, micro_batch_size)
        check_optimizer_options(learning_rate, weight_decay, warmup_steps, min_lr_ratio)
        check_choices(compile=compile, gradient_checkpointing=gradient_checkpointing)
        self._compile_now = compile is True  # with "auto": decided after this process's second step
        self._recompute = False  # gradient_checkpointing="auto": decided per update (grpo_options.module_recompute)
        self._steps_in_process = 0
        if sampler_correction_threshold <= 0:
            raise ConfigError(f"sampler_correction_threshold={sampler_correction_threshold}: must be > 0")
        self.automatic_optimization = False
        self.tokenizer = load_tokenizer(model_name_or_path, trust_remote_code)
        rewards = rewards if rewards is not None else [Accuracy(), LenientFormat()]  # `[]` is refused, not replaced
        self.reward_set = RewardSet(rewards, reward_weights, reward_on_error, reward_timeout, reward_max_failure_frac)
        self.engine = rollout_engine or HFGenerateEngine()
        self.model: torch.nn.Module | None = None
        self.ref_model: torch.nn.Module | None = None
        self.val_metrics = ReasoningMetrics()
        self.rollout_step = 0  # batches of rollouts so far: seeds sampling, survives checkpoints
        self.guard = StepGuard(nonfinite)
        self.seeds = SamplingSeeds(seed)
        self.flat_gradients = FlatGradients([])  # inert until training starts on CPU

    # ----------------------------------------------------------------------------------- setup
    @override
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.num_generations < 2:  # before the model loads
            raise ConfigError(
                f"num_generations={self.hparams.num_generations}: GRPO training needs >= 2 completions per prompt "
                "(advantages are relative to the group: with 1 they are all 0 and nothing is learnt)"
            )

    @override
    def configure_model(self) -> None:
        if self.model is not None:
            return
        hp = self.hparams
        common = dict(
            vocab_size=len(self.tokenizer), dtype=hp.dtype, trust_remote_code=hp.trust_remote_code, seed=hp.seed,
            fsdp_param_dtype=hp.fsdp_param_dtype,
        )
        # Policy and reference sharded alike (FSDP2 only; DDP and FSDP wrap the module themselves).
        self.model = load_policy(
            self, hp.model_name_or_path, gradient_checkpointing=hp.gradient_checkpointing is True, lora=hp.lora, **common
        )
        if self.kl_penalty.beta > 0 and hp.lora is None:  # with LoRA the reference is the adapter-disabled policy
            self.ref_model = load_frozen(self, hp.model_name_or_path, **common)
        if hp.compile is True and (reason := compiled_forward.unsupported_reason(unwrap_model(self.model))) is not None:
            rank_zero_warn(f"GRPO(compile=True): the training forwards stay eager: {reason}")

    @override
    def configure_callbacks(self) -> list[L.Callback]:
        hp = self.hparams
        return [EngineLifecycle(self.engine, max(hp.max_new_tokens, hp.eval_max_new_tokens or 0))]

    def reference_context(self):
        """Context in which ``reference_model`` computes reference log-probs."""
        return self.model.disable_adapter() if self.hparams.lora is not None else nullcontext()

    @property
    def reference_model(self) -> torch.nn.Module:
        return self.model if self.hparams.lora is not None else self.ref_model

    # -------------------------------------------------------------------------------- training
    @override
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        hp, G = self.hparams, self.hparams.num_generations
        sync_seconds = self.engine.sync_weights(self.model)  # the weights of the last optimizer step
        sampled, draws = self._sample_groups(batch)
        rollout, scores = sampled.rollout, sampled.scores
        rewards = self._reward_total(scores).to(self.device)  # [B*G]

        inputs, target_mask, P = _training_inputs(rollout)
        completion_mask = rollout.completion_mask.bool()  # [B*G, T]
        training_start, steps_before = time.process_time(), self.trainer.global_step  # CPU time: load on the machine does not count
        ref_logprobs = self._ref_logprobs(inputs, target_mask, P) if self.kl_penalty.beta > 0 else None
        metrics: dict[str, torch.Tensor] = {}
        if ref_logprobs is not None and self.kl_penalty.placement == "reward":  # PPO-style: β·KL off each sequence's reward
            penalty, kl_metrics = self.kl_penalty.reward_penalty(rollout.logprobs, ref_logprobs, completion_mask)
            rewards, metrics = rewards - penalty, {**metrics, **kl_metrics}
        advantages, adv_metrics = self.advantage_estimator(rewards, G)
        loss_mask, mask_metrics = self._loss_mask(rollout, rewards, draws)
        old_logprobs = self._old_logprobs(inputs, target_mask, P) if hp.num_iterations > 1 else None

        for _ in range(hp.num_iterations):
            update_metrics = policy_update(
                self, inputs, target_mask, P, loss_mask, advantages, old_logprobs, ref_logprobs, rollout.logprobs
            )
        self._steps_in_process += 1
        if hp.compile == "auto" and self._steps_in_process == 2:  # once a process; its first step is warm-up
            self._decide_compile(time.process_time() - training_start, max(self.trainer.global_step - steps_before, 1))
        self.rollout_step += 1
        if sync_seconds is not None:
            metrics["weight_sync_s"] = torch.tensor(sync_seconds)
        self._log_step(rollout, scores, rewards, {**metrics, **mask_metrics, **adv_metrics, **update_metrics})
        record = RolloutBatch(rollout, sampled.texts, rewards.detach(), scores.scores, advantages, G)
        return {"loss": update_metrics["loss"], "rollout": record}

    def _decide_compile(self, training_seconds: float, steps_per_batch: int) -> None:
        """``compile="auto"``, after this process's second step: compile the training forwards from the next step
        if it pays over the steps left (``compiled_forward.auto_compile_decision``); one log line either way."""
        if (reason := compiled_forward.auto_unsupported_reason(unwrap_model(self.model))) is not None:
            pays, line = False, f"the training forwards stay eager: {reason}"
        else:
            remaining = (self.trainer.estimated_stepping_batches - self.trainer.global_step) / steps_per_batch
            pays, line = compiled_forward.auto_compile_decision(training_seconds, remaining)
        # Rank 0 decides for every rank, and every rank joins the broadcast: the ranks' timings differ, and so can
        # their reasons (each process probes its own CPU matmul backend), their runs must not.
        self._compile_now = bool(self.trainer.strategy.broadcast(pays))
        rank_zero_info(f"GRPO(compile='auto'): {line}")

    def _sample_groups(self, batch: dict[str, Any]) -> tuple[SampledGroups, int]:
        """This step's B groups of G scored completions, and the extra draws DAPO's over-sampling took to fill them."""
        hp = self.hparams
        sampled = self._sample(batch, self.rollout_step)
        if not (hp.dynamic_sampling and hp.dynamic_sampling_max_draws > 0):
            return sampled, 0
        # DAPO: draw more prompts until B groups have reward spread.
        draw = partial(self._draw, count=sampled.num_prompts)
        return refill_informative_groups(
            sampled, draw, self._reward_total, hp.num_generations, hp.dynamic_sampling_max_draws, self.tokenizer.pad_token_id
        )

    def _loss_mask(self, rollout: Rollout, rewards: torch.Tensor, draws: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The completion tokens the loss covers [B*G, T]: without truncated completions (DAPO's option) and flat groups
        (dynamic sampling)."""
        hp, G = self.hparams, self.hparams.num_generations
        loss_mask = rollout.completion_mask.bool()
        if hp.mask_truncated:
            loss_mask = loss_mask & ~rollout.truncated[:, None]
        if not hp.dynamic_sampling:
            return loss_mask, {}
        keep, metrics = dynamic_sampling_mask(rewards, G)
        return loss_mask & per_completion(keep, G)[:, None], {**metrics, "dynamic_sampling_draws": torch.tensor(float(draws))}

    def _sample(self, batch: dict[str, Any], stream: int) -> SampledGroups:
        """G completions for each prompt of ``batch``, and their rewards."""
        G = self.hparams.num_generations
        generators = self.seeds.for_batch(batch, stream, self.global_rank, self.device)
        rollout = self.engine.generate(self.model, batch["prompt_ids"], G, self.sampling_params(), generators)
        # What rewards score: the completion with any <think> the chat template opened put back.
        texts = scored_texts(self._prompt_texts(batch), raw_completions(self.tokenizer, rollout.completion_ids, rollout.completion_mask), G)
        columns = {k: repeat_per_completion(v, G) for k, v in batch["columns"].items()}
        scores = self.reward_set(texts, prompts=repeat_per_completion(batch["prompts"], G), **columns)
        return SampledGroups(batch, rollout, texts, scores)

    def _draw(self, draw: int, count: int) -> SampledGroups:
        """The ``draw``-th extra batch of ``count`` prompts of this step (DAPO), seeded by (seed, rollout step, draw)."""
        data = self.trainer.datamodule
        if not hasattr(data, "draw_prompts"):
            raise ConfigError(
                f"dynamic_sampling_max_draws needs a data module with draw_prompts (PromptDataModule), not {type(data).__name__}"
            )
        generator = self.seeds.generator(self.rollout_step * 1_009 + draw)
        batch = data.draw_prompts(count, generator, self.global_rank, self.trainer.world_size)
        return self._sample(batch, self.rollout_step + draw * 10_000_019)  # a stream of its own for each draw

    def _reward_total(self, scores) -> torch.Tensor:
        """The reward advantages start from: the weighted total, of each reward normalised in its group if asked."""
        G = self.hparams.num_generations
        return self.reward_set.group_normalized_total(scores, G) if self.hparams.normalize_each_reward else scores.total

    @override
    def on_before_optimizer_step(self, optimizer) -> None:
        # Called inside `optimizer.step()`: no-signal and (with nonfinite: skip) NaN steps drop their gradients.
        self.guard.before_optimizer_step(self, optimizer)

    def _prompt_texts(self, batch: dict[str, Any]) -> list[str]:
        """Rendered prompts: ``PromptDataModule`` sends them; another data module's ids are decoded."""
        return batch.get("prompt_texts") or self.tokenizer.batch_decode(batch["prompt_ids"], skip_special_tokens=False)

    def _policy_logprobs(self, inputs, target_mask, P) -> tuple[torch.Tensor, torch.Tensor]:
        return self._completion_logprobs(self.model, inputs, target_mask, P, return_entropy=True)

    @torch.no_grad()
    def _ref_logprobs(self, inputs, target_mask, P) -> torch.Tensor:
        with self.reference_context():
            return self._completion_logprobs(self.reference_model, inputs, target_mask, P)[0]

    @torch.no_grad()
    def _old_logprobs(self, inputs, target_mask, P) -> torch.Tensor:
        return self._completion_logprobs(self.model, inputs, target_mask, P)[0]

    def _completion_logprobs(self, model, inputs, target_mask, P, return_entropy: bool = False):
        """Log-probs (and entropy) of the completion tokens, [N, T], scored at the sampling temperature."""
        logprobs, entropy = token_logprobs(
            model, inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"], target_mask,
            temperature=self._score_temperature(), chunk_size=self.hparams.logprob_chunk_size, return_entropy=return_entropy, prompt_length=P,
            compile=self._compile_now, recompute=self._recompute,
        )
        return logprobs[:, P:], None if entropy is None else entropy[:, P:]

    def _score_temperature(self) -> float:
        return self.hparams.temperature if self.hparams.temperature > 0 else 1.0

    def sampling_params(self, evaluation: bool = False) -> SamplingParams:
        """Training's (or with ``evaluation``, validation's) sampling settings; stops at every EOS id (``eos_token_ids``)."""
        hp = self.hparams
        if evaluation:
            max_new_tokens = hp.eval_max_new_tokens or hp.max_new_tokens
            return sampling_params(self.tokenizer, self.model, max_new_tokens, hp.eval_temperature, hp.top_p, hp.top_k)
        return sampling_params(self.tokenizer, self.model, hp.max_new_tokens, hp.temperature, hp.top_p, hp.top_k)

    def _log_step(self, rollout: Rollout, scores, rewards: torch.Tensor, metrics: dict[str, torch.Tensor]) -> None:
        lengths = rollout.completion_lengths.float()
        logged = {
            "train/reward": torch.nanmean(rewards),
            "train/completion_length": lengths.mean(),
            "train/completion_length_max": lengths.max(),
            "train/truncated_frac": rollout.truncated.float().mean(),
            "train/loss": metrics["loss"],
            "train/policy_loss": metrics["policy_loss"],
            "train/entropy": metrics["entropy"],
            "train/zero_std_frac": metrics["zero_std_frac"],
            "train/reward_std": metrics["reward_std"],
        }
        # Reported by some options or losses only.
        optional = ("kl", "kept_frac", "dynamic_sampling_draws", "clip_ratio", "clip_ratio_low", "clip_ratio_high")
        for name in optional + ("gate_gradient_weight", "entropy_kept", "entropy_dropped", "entropy_kept_frac"):
            if name in metrics:
                logged[f"train/{name}"] = metrics[name]
        for name in ("sampler_logprob_diff", "sampler_is_ratio_mean", "sampler_masked_frac"):
            if name in metrics:
                logged[f"train/{name}"] = metrics[name]
        if "weight_sync_s" in metrics:
            logged["perf/weight_sync_s"] = metrics["weight_sync_s"]
        for name, values in scores.scores.items():
            logged[f"train/rewards/{name}"] = torch.nanmean(values)
        for name, count in scores.failures.items():
            logged[f"train/reward_failures/{name}"] = torch.tensor(float(count))
        logged.update(self.guard.pop_skipped())
        logged = {k: torch.as_tensor(v, dtype=torch.float32, device=self.device) for k, v in logged.items()}
        self.log("train/reward", logged.pop("train/reward"), prog_bar=True, sync_dist=True, batch_size=rewards.shape[0])
        self.log_dict(logged, sync_dist=True, batch_size=rewards.shape[0])
        if "sampler_is_ratio_max" in metrics:
            ratio_max = torch.as_tensor(metrics["sampler_is_ratio_max"], dtype=torch.float32, device=self.device)
            self.log("train/sampler_is_ratio_max", ratio_max, sync_dist=True, reduce_fx="max", batch_size=rewards.shape[0])
        self.log("lr", self.lr_schedulers().get_last_lr()[0], prog_bar=True)

    # ------------------------------------------------------------------------------ evaluation
    @override
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        answers = batch["columns"].get(self.hparams.answer_column)
        if answers is None:
            raise ConfigError(
                f"answer_column={self.hparams.answer_column!r}: validation prompts need it for val/accuracy; "
                f"their columns are: {', '.join(batch['columns']) or '(none)'}"
            )
        scored = generate_and_score(
            self.model, self.tokenizer, self.engine, batch["prompt_ids"], answers, self.sampling_params(evaluation=True),
            self.hparams.eval_num_samples, self.seeds.evaluation(batch, batch_idx, self.global_rank, self.device),
        )
        self.val_metrics.update(scored.correct, scored.answers, scored.formatted, scored.reasoning_lengths)

    @override
    def on_validation_epoch_end(self) -> None:
        self.val_metrics.log_and_reset(self, "val", self.hparams.eval_num_samples)

    @override
    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    @override
    def on_test_epoch_end(self) -> None:
        self.val_metrics.log_and_reset(self, "test", self.hparams.eval_num_samples, prog_bar=())

    @override
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Rejection sampling: ``num_generations`` scored samples per prompt (see ``RejectionSamplingWriter``)."""
        G = self.hparams.num_generations
        # One generator per prompt, seeded by its dataset index: N ranks write exactly what one would.
        sampled = self._sample(batch, PREDICT_STREAM)
        rollout, texts, scores = sampled.rollout, sampled.texts, sampled.scores  # texts: what rewards scored
        raw = raw_completions(self.tokenizer, rollout.completion_ids, rollout.completion_mask)  # what SFT trains on
        lengths, truncated = rollout.completion_lengths.tolist(), rollout.truncated.tolist()
        return {
            "indices": batch["indices"], "prompts": batch["prompts"], "columns": batch["columns"], "num_generations": G,
            "completions": raw, "scored_texts": texts, "lengths": lengths, "truncated": truncated,
            "total": scores.total.tolist(), "scores": {name: v.tolist() for name, v in scores.scores.items()},
        }

    # ----------------------------------------------------------------------- optimizer, export
    @override
    def configure_optimizers(self) -> dict:
        hp = self.hparams
        # Prompts per batch from a PromptDataModule-like `batch_size`; a data module without one counts as 1.
        rows = hp.num_generations * getattr(getattr(self.trainer.datamodule, "hparams", None), "batch_size", 1)
        steps_per_batch = hp.num_iterations * -(-rows // (hp.mini_batch_size or rows))
        total = total_training_steps(self.trainer) if self.trainer.max_steps > 0 else total_training_steps(self.trainer) * steps_per_batch
        return policy_optimizer(self, total)

    @override
    def on_train_start(self) -> None:
        # Adam's state before the first rollout, each step's gradients in one mapping (CPU only; benchmarks/README.md).
        self.flat_gradients = place_optimizer_memory(self.trainer.optimizers[0], self.device, self.trainer.world_size)

    @override
    def on_train_end(self) -> None:
        self.flat_gradients.remove()

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        save_training_state(self, checkpoint, self.rollout_step)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.rollout_step = load_training_state(self, checkpoint)

    @override
    def on_fit_end(self) -> None:
        export_at_fit_end(self)


def _training_inputs(rollout: Rollout) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
    """Prompt + completion inputs [N, P+T], the target mask (completion tokens) and P."""
    inputs = rollout.model_inputs()
    P = rollout.prompt_ids.shape[1]
    target_mask = torch.cat([torch.zeros_like(rollout.prompt_mask, dtype=torch.bool), rollout.completion_mask.bool()], dim=1)
    return inputs, target_mask, P
