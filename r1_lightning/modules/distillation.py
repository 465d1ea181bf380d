"""Distil a frozen teacher into a smaller student: logit-level (KL / JSD on soft targets) or sequence-level (SFT).

DeepSeek-R1 (https://arxiv.org/abs/2501.12948), section 2.4: fine-tuning small dense models on R1's
samples (sequence-level distillation, ``loss: sft``) beats RL on the small model alone. Logit-level
distillation matches the teacher's whole next-token distribution at every completion position
(``forward_kl``, ``reverse_kl``, ``jsd``; see ``r1_lightning.modules.divergences``). GKD (Agarwal et al.
2024, https://arxiv.org/abs/2306.13649) adds on-policy distillation: a share λ of the rows is
sampled from the student and scored by the teacher, so the student learns on its own mistakes.

Teacher generations are produced once and reused with the rejection-sampling stage:
``r1-lightning predict --config configs/rejection_sampling.yaml --model.model_name_or_path TEACHER``
writes ``accepted.jsonl``, which ``ColdStartDataModule(path=...)`` reads for this module.
"""

from __future__ import annotations

import random
from contextlib import nullcontext
from typing import Any

import lightning as L
import torch
from typing_extensions import override

from r1_lightning.engines import HFGenerateEngine, RolloutEngine, SamplingParams
from r1_lightning.engines.logprobs import chunked_token_logprobs
from r1_lightning.errors import ConfigError
from r1_lightning.evaluation import generate_and_score
from r1_lightning.guards import NonFinite, StepGuard
from r1_lightning.metrics import ReasoningMetrics
from r1_lightning.modules.divergences import (
    DIVERGENCES,
    Divergence,
    ForwardKL,
    chunked_divergence,
    distillation_loss,
    resolve_divergence,
)
from r1_lightning.modules.plumbing import (
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
from r1_lightning.optim import check_optimizer_options
from r1_lightning.parallel import global_normalizer, is_sharded, run_gathered
from r1_lightning.policy import LoraSettings, backbone_and_head, load_tokenizer

ROW_KEYS = ("input_ids", "attention_mask", "position_ids", "loss_mask")


class Distillation(L.LightningModule):
    """A trainable student learns a frozen teacher's next-token distributions on completion tokens.

    Batches come from a ``ColdStartDataModule`` (teacher-written completions, e.g. the
    rejection-sampling output; the loss covers completion tokens) or a ``PromptDataModule``
    (prompts only: every row is sampled, from the student, or from the teacher for ``loss: sft``).
    Teacher and student must share the tokenizer; heads padded past it are cut to its size.
    Prompts are rendered with the student's tokenizer (and chat template).

    Args:
        model_name_or_path: The student: a local Hugging Face directory, a hub id or ``builtin:tiny-small``.
        teacher_name_or_path: The frozen teacher (any causal LM with the same tokenizer, e.g. an
            earlier stage's ``hf_model/``). A built-in teacher is initialised with ``seed + 1``.
        loss: ``forward_kl`` KL(teacher ‖ student), ``reverse_kl`` KL(student ‖ teacher), ``jsd``
            (generalised JSD with ``jsd_beta``), ``sft`` (cross-entropy on the completion tokens, R1's
            form), or a ``Divergence`` (``class_path``).
        temperature: τ softening both distributions; the loss is multiplied by τ².
        jsd_beta: β of ``jsd``: weight of the teacher in the mixture; 0 is forward KL, 1 reverse KL.
        top_k: Keep the teacher's top-k logits per position, renormalised (0 = the whole vocabulary).
        on_policy_fraction: λ, the share of each batch's rows replaced by completions sampled from the
            student (GKD); prompt-only batches are always sampled.
        max_new_tokens: Token budget of a sampled completion.
        generation_temperature: Temperature of sampled completions (not τ).
        learning_rate: Peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps before the cosine decay.
        min_lr_ratio: The cosine ends at ``min_lr_ratio * learning_rate``.
        nonfinite: A NaN/inf loss or gradient ``raise``-s one error naming the step and rank, or
            ``skip``-s that optimizer step (``train/skipped_steps/nonfinite``). A step with an exactly
            zero gradient never moves the weights (``train/skipped_steps/no_signal``); see
            ``r1_lightning.guards``.
        dtype: Student weights dtype: ``auto``, ``float32``, ``bfloat16`` or ``float16``.
        teacher_dtype: Teacher weights dtype (default ``dtype``).
        gradient_checkpointing: Recompute the student's activations in the backward pass.
        lora: Train a LoRA adapter on the student instead of all weights (needs ``peft``).
        trust_remote_code: Allow model code from the model directories.
        logprob_chunk_size: Tokens per chunk when projecting onto the vocabulary (a few
            ``[chunk, V]`` float32 buffers of both models live at once).
        eval_max_new_tokens: Token budget of generated answers in validation.
        eval_num_samples: Completions per validation prompt (k of ``val/maj@k``).
        eval_temperature: Sampling temperature in validation (0 = greedy).
        rollout_engine: How the student's completions are sampled (on-policy rows, validation):
            ``HFGenerateEngine`` (default) or ``VLLMEngine`` (``class_path``, or an instance from Python).
        export_hf: Write ``<log dir>/hf_model/`` (the student) when fit ends.
        seed: Seed of sampling and of a built-in student's initial weights.
        fsdp_param_dtype: Under ``ModelParallelStrategy`` (FSDP2): the dtype weights are gathered and
            computed in (e.g. ``bfloat16`` over ``dtype: float32`` weights and optimizer state); None:
            the weights' dtype. The teacher is sharded the same way. See ``r1_lightning.parallel``.
    """

    def __init__(
        self,
        model_name_or_path: str = "builtin:tiny-small",
        teacher_name_or_path: str = "builtin:tiny",
        loss: str | Divergence = "forward_kl",
        temperature: float = 1.0,
        jsd_beta: float = 0.5,
        top_k: int = 0,
        on_policy_fraction: float = 0.0,
        max_new_tokens: int = 256,
        generation_temperature: float = 1.0,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 10,
        min_lr_ratio: float = 0.1,
        nonfinite: NonFinite = "raise",
        dtype: str = "auto",
        teacher_dtype: str | None = None,
        gradient_checkpointing: bool = False,
        lora: LoraSettings | None = None,
        trust_remote_code: bool = False,
        logprob_chunk_size: int = 256,
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
        self.sft = loss == "sft"
        self.divergence = _check_options(loss, temperature, jsd_beta, top_k, on_policy_fraction)
        check_optimizer_options(learning_rate, weight_decay, warmup_steps, min_lr_ratio)
        self.tokenizer = load_tokenizer(model_name_or_path, trust_remote_code)
        teacher_tokenizer = load_tokenizer(teacher_name_or_path, trust_remote_code, option="teacher_name_or_path")
        self.vocab_size = shared_vocab_size(self.tokenizer, teacher_tokenizer, model_name_or_path, teacher_name_or_path)
        self.engine = rollout_engine or HFGenerateEngine()
        self.model: torch.nn.Module | None = None
        self.teacher: torch.nn.Module | None = None
        self.val_metrics = ReasoningMetrics()
        self.guard = StepGuard(nonfinite)
        self.seeds = SamplingSeeds(seed)

    @override
    def configure_model(self) -> None:
        if self.model is not None:
            return
        hp = self.hparams
        common = dict(vocab_size=len(self.tokenizer), trust_remote_code=hp.trust_remote_code, fsdp_param_dtype=hp.fsdp_param_dtype)
        # Student and frozen teacher sharded alike (FSDP2 only; DDP and FSDP wrap the module themselves).
        self.model = load_policy(
            self, hp.model_name_or_path, dtype=hp.dtype, gradient_checkpointing=hp.gradient_checkpointing, lora=hp.lora, seed=hp.seed,
            **common,
        )
        self.teacher = load_frozen(self, hp.teacher_name_or_path, dtype=hp.teacher_dtype or hp.dtype, seed=hp.seed + 1, **common)
        for option, model in (("model_name_or_path", self.model), ("teacher_name_or_path", self.teacher)):
            rows = backbone_and_head(model)[1].weight.shape[0]
            if rows < self.vocab_size:
                raise ConfigError(
                    f"{option}={hp[option]!r}: the LM head has {rows} rows, fewer than the tokenizer's {self.vocab_size} tokens"
                )

    @override
    def configure_callbacks(self) -> list[L.Callback]:
        return [EngineLifecycle(self.engine, max(self.hparams.max_new_tokens, self.hparams.eval_max_new_tokens))]

    # -------------------------------------------------------------------------------- training
    @override
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        parts, on_policy = self._training_rows(batch, batch_idx)
        terms = [self._token_terms(rows) for rows in parts]
        values = torch.cat([t["divergence"] for t in terms])  # [M] over every part
        tokens = values.numel()
        # Token mean over all ranks' batches: N ranks then train as one process on the global batch.
        scale = tokens / global_normalizer(float(tokens))
        if self.sft:
            loss = torch.cat([t["nll"] for t in terms]).mean() * scale
        else:
            loss = distillation_loss(values, self.hparams.temperature)[0] * scale
        self.log("train/loss", loss, prog_bar=True, batch_size=tokens, sync_dist=True)  # mean over ranks = global loss
        self.log(f"train/{self.divergence.name}", values.detach().mean(), batch_size=tokens)
        self.log("train/teacher_agreement", torch.cat([t["agree"] for t in terms]).mean(), prog_bar=True, batch_size=tokens)
        self.log("train/on_policy_frac", float(on_policy), batch_size=1)
        self.log("train/tokens", float(tokens), reduce_fx="sum", batch_size=1)
        self.guard.record_loss(loss)
        return loss

    @override
    def on_before_optimizer_step(self, optimizer) -> None:
        # After the backward, before the step: no-signal and (with nonfinite: skip) NaN steps drop their gradients.
        self.guard.before_optimizer_step(self, optimizer)
        self.log_dict(self.guard.pop_skipped(), batch_size=1)

    def _training_rows(self, batch: dict[str, Any], batch_idx: int) -> tuple[list[dict[str, torch.Tensor]], float]:
        """The rows to learn on: teacher-written rows and rows sampled from the student (GKD's λ)."""
        # Seeded per prompt by (seed, dataset index, step): N ranks sample what one process would, and a
        # resumed run what the uninterrupted one would.
        hp, generators = self.hparams, self.seeds.for_batch(batch, self.global_step, self.global_rank, self.device)
        params = self._sampling(hp.max_new_tokens, hp.generation_temperature)
        if "input_ids" not in batch:  # prompts only: sequence-level KD samples the teacher, on-policy KD the student
            if self.sft and not self.engine.samples_from_policy:
                raise ConfigError(
                    "loss: sft on prompt-only data samples the frozen teacher, and rollout_engine follows the student: use "
                    "HFGenerateEngine, or write the teacher's samples once with `r1-lightning predict` and train on them"
                )
            return [self._sample_rows(self.teacher if self.sft else self.model, batch["prompt_ids"], params, generators)], 1.0
        if hp.on_policy_fraction == 0:
            return [{k: batch[k] for k in ROW_KEYS}], 0.0
        if batch["attention_mask"] is None:
            raise ConfigError("on_policy_fraction > 0 needs unpacked rows: set the data module's packing: false")
        prompts = batch["prompt_ids"]
        # Rounded stochastically (the share is λ on average), with one draw for all ranks: sampling is collective.
        expected, draw = hp.on_policy_fraction * len(prompts), random.Random(f"{hp.seed}-{self.global_step}-{batch_idx}").random()
        n = int(expected) + int(draw < expected - int(expected))
        first_n = generators[:n] if isinstance(generators, list) else generators
        parts = [self._sample_rows(self.model, prompts[:n], params, first_n)] if n else []
        if n < len(prompts):
            parts.append({k: batch[k][n:] for k in ROW_KEYS})
        return parts, n / len(prompts)

    def _sample_rows(
        self, model: torch.nn.Module, prompt_ids: list[list[int]], params: SamplingParams,
        generator: torch.Generator | list[torch.Generator],
    ) -> dict[str, torch.Tensor]:
        """One completion per prompt from ``model``, as teacher-forcing inputs with the completion as loss mask."""
        rollout = self.engine.generate(model, prompt_ids, 1, params, generator)
        loss_mask = torch.cat([torch.zeros_like(rollout.prompt_mask, dtype=torch.bool), rollout.completion_mask.bool()], dim=1)
        return {**rollout.model_inputs(), "loss_mask": loss_mask}  # [N, P+T] each

    def _token_terms(self, rows: dict[str, torch.Tensor], with_kl: bool = False) -> dict[str, torch.Tensor]:
        """Per completion token ``[M]``: the divergence, teacher agreement, the NLL (``sft``), and KL at τ = 1 (``with_kl``)."""
        # Bodies and heads are called separately: under FSDP2 both models' root units stay gathered throughout.
        return run_gathered(self.model, lambda: run_gathered(self.teacher, self._gathered_token_terms, rows, with_kl))

    def _gathered_token_terms(self, rows: dict[str, torch.Tensor], with_kl: bool) -> dict[str, torch.Tensor]:
        hp = self.hparams
        targets = rows["loss_mask"][:, 1:].bool()  # [B, T-1]: position t predicts token t+1
        student_hidden = _completion_hidden(self.model, rows, targets)  # [M, H_S]
        with torch.no_grad():
            teacher_hidden = _completion_hidden(self.teacher, rows, targets)  # [M, H_T]
        student_head, teacher_head = backbone_and_head(self.model)[1], backbone_and_head(self.teacher)[1]

        def divergence(spec: Divergence, temperature: float, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
            return chunked_divergence(
                student_hidden, student_head.weight, teacher_hidden, teacher_head.weight, spec, temperature, top_k,
                self.vocab_size, getattr(student_head, "bias", None), getattr(teacher_head, "bias", None), hp.logprob_chunk_size,
            )

        with torch.no_grad() if self.sft else nullcontext():  # for sft the divergence is a diagnostic
            values, agree = divergence(self.divergence, hp.temperature, hp.top_k)
        terms = {"divergence": values, "agree": agree.float()}
        if self.sft:
            logprobs, _ = chunked_token_logprobs(
                student_hidden, student_head.weight, rows["input_ids"][:, 1:][targets], bias=getattr(student_head, "bias", None),
                chunk_size=hp.logprob_chunk_size,
            )
            terms["nll"] = -logprobs
        if with_kl:
            plain = isinstance(self.divergence, ForwardKL) and hp.temperature == 1.0 and not hp.top_k
            terms["kl"] = values if plain else divergence(ForwardKL(), 1.0, 0)[0]
        return terms

    # ------------------------------------------------------------------------------ evaluation
    @override
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Divergences on the held-out rows (the student's own samples for prompt-only batches), then generated answers."""
        hp = self.hparams
        if "input_ids" in batch:
            rows = {k: batch[k] for k in ROW_KEYS}
        else:
            params = self._sampling(hp.max_new_tokens, hp.generation_temperature)
            generators = self.seeds.evaluation(batch, batch_idx, self.global_rank, self.device)
            rows = self._sample_rows(self.model, batch["prompt_ids"], params, generators)
        terms = self._token_terms(rows, with_kl=True)
        tokens = terms["divergence"].numel()
        loss = terms["nll"].mean() if self.sft else distillation_loss(terms["divergence"], hp.temperature)[0]
        self.log("val/loss", loss, prog_bar=True, batch_size=tokens, sync_dist=True)
        self.log(f"val/{self.divergence.name}", terms["divergence"].mean(), batch_size=tokens, sync_dist=True)
        self.log("val/kl", terms["kl"].mean(), prog_bar=True, batch_size=tokens, sync_dist=True)
        self.log("val/teacher_agreement", terms["agree"].mean(), batch_size=tokens, sync_dist=True)
        answers = batch.get("answers") or batch.get("columns", {}).get("answer")
        if answers is not None:
            params = self._sampling(hp.eval_max_new_tokens, hp.eval_temperature)
            scored = generate_and_score(
                self.model, self.tokenizer, self.engine, batch["prompt_ids"], answers, params, hp.eval_num_samples,
                self.seeds.evaluation(batch, batch_idx, self.global_rank, self.device),
            )
            self.val_metrics.update(scored.correct, scored.answers, scored.formatted, scored.reasoning_lengths)

    @override
    def on_validation_epoch_end(self) -> None:
        self.val_metrics.log_and_reset(self, "val", self.hparams.eval_num_samples)

    def _sampling(self, max_new_tokens: int, temperature: float) -> SamplingParams:
        return sampling_params(self.tokenizer, self.model, max_new_tokens, temperature)

    # ----------------------------------------------------------------- optimizer, checkpoints, export
    @override
    def configure_optimizers(self) -> dict:
        return policy_optimizer(self)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The teacher is frozen and reloads from its path: a 7B teacher need not be in every checkpoint.
        # A sharded (FSDP) checkpoint keeps it: its loader expects every key, and each rank writes 1/N of it.
        if not is_sharded(self):
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}
        save_training_state(self, checkpoint)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Runs before the state dict is loaded (strictly): put the loaded teacher's weights back in.
        if self.teacher is not None and "state_dict" in checkpoint:  # a sharded checkpoint has loaded its state already
            checkpoint["state_dict"].update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})
        load_training_state(self, checkpoint)

    @override
    def on_fit_end(self) -> None:
        export_at_fit_end(self)


def shared_vocab_size(student_tokenizer, teacher_tokenizer, student_path: str, teacher_path: str) -> int:
    """V, the size of the one vocabulary both tokenizers must have (token → id and special tokens alike).

    Raises:
        ConfigError: naming both paths and the first token id that differs.
    """
    student_ids = {i: t for t, i in student_tokenizer.get_vocab().items()}
    teacher_ids = {i: t for t, i in teacher_tokenizer.get_vocab().items()}
    problem = None
    if student_ids != teacher_ids:
        differing = sorted(i for i in student_ids.keys() | teacher_ids.keys() if student_ids.get(i) != teacher_ids.get(i))
        first = differing[0]
        problem = f"{len(differing)} token ids differ, e.g. id {first} is {student_ids.get(first)!r} vs {teacher_ids.get(first)!r}"
    else:
        special = [
            {i: (t.content, t.special) for i, t in tok.added_tokens_decoder.items()} for tok in (student_tokenizer, teacher_tokenizer)
        ]
        if special[0] != special[1]:
            first = min(i for i in special[0].keys() | special[1].keys() if special[0].get(i) != special[1].get(i))
            problem = f"the added/special tokens differ, e.g. id {first} is {special[0].get(first)} vs {special[1].get(first)}"
    if problem:
        raise ConfigError(
            f"model_name_or_path={student_path!r} and teacher_name_or_path={teacher_path!r} have different tokenizers: "
            f"{problem}. Logit distillation needs one shared vocabulary (for different tokenizers, distil by SFT on the "
            "teacher's text with PolicySFT)"
        )
    return max(student_ids) + 1


def _completion_hidden(model: torch.nn.Module, rows: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Final hidden states ``[M, H]`` of the positions that predict the target tokens (``targets`` ``[B, T-1]``)."""
    backbone, _ = backbone_and_head(model)
    hidden = backbone(
        input_ids=rows["input_ids"], attention_mask=rows["attention_mask"], position_ids=rows["position_ids"], use_cache=False
    ).last_hidden_state  # [B, T, H]
    return hidden[:, :-1][targets]


def _check_options(loss, temperature, jsd_beta, top_k, on_policy_fraction) -> Divergence:
    """The divergence to train on (or to report, for ``sft``); ConfigError for a bad option."""
    if not (isinstance(loss, Divergence) or loss == "sft" or loss in DIVERGENCES):
        raise ConfigError(f"loss={loss!r}: choose one of {', '.join([*DIVERGENCES, 'sft'])} or a Divergence (class_path)")
    if temperature <= 0:
        raise ConfigError(f"temperature={temperature}: must be > 0")
    if not 0.0 <= jsd_beta <= 1.0:
        raise ConfigError(f"jsd_beta={jsd_beta}: must be in [0, 1] (0 = forward KL, 1 = reverse KL)")
    if top_k < 0:
        raise ConfigError(f"top_k={top_k}: must be >= 0 (0 = the whole vocabulary)")
    if not 0.0 <= on_policy_fraction <= 1.0:
        raise ConfigError(f"on_policy_fraction={on_policy_fraction}: must be in [0, 1]")
    if loss == "sft" and on_policy_fraction > 0:
        raise ConfigError("loss='sft' learns the teacher's completions; on_policy_fraction > 0 needs a divergence loss")
    divergence = ForwardKL() if loss == "sft" else resolve_divergence(loss, jsd_beta)
    if top_k and divergence.needs_full_teacher:
        raise ConfigError(
            f"top_k={top_k} with loss={loss!r} (jsd_beta={jsd_beta}): reverse KL is infinite against a teacher cut to its top-k; "
            "use forward_kl, or jsd with jsd_beta < 1"
        )
    return divergence
