"""The parts every policy-training module shares, written once: small functions and objects, no base class.

``PolicySFT``, ``GRPO`` and ``Distillation`` are built from these, and a LightningModule of your own
can use them the same way:

- ``load_policy`` / ``load_frozen``: build the trained model (or a frozen reference / teacher) and
  shard it for the strategy (``configure_model``);
- ``policy_optimizer``: AdamW with warm-up and cosine decay over the run (``configure_optimizers``);
- ``save_training_state`` / ``load_training_state``: RNG states (and a rollout counter) for an exact
  resume (``on_save_checkpoint`` / ``on_load_checkpoint``);
- ``eos_token_ids`` / ``sampling_params``: where sampling stops, from the tokenizer *and* the
  model's generation config;
- ``SamplingSeeds``: every sampling seed of a run from one formula (per prompt, per rank, evaluation);
- ``EngineLifecycle``: the rollout engine's setup / stale weights / teardown, as a callback the module
  returns from ``configure_callbacks``.

Example:
    >>> class MyModule(L.LightningModule):  # doctest: +SKIP
    ...     def configure_model(self):
    ...         self.model = load_policy(self, "builtin:tiny", vocab_size=len(self.tokenizer))
    ...     def configure_callbacks(self):
    ...         return [EngineLifecycle(self.engine, max_new_tokens=64)]
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from r1_lightning.engines import RolloutEngine, SamplingParams
from r1_lightning.export import export_hf_model
from r1_lightning.optim import adamw_warmup_cosine, total_training_steps
from r1_lightning.parallel import shard_for_strategy
from r1_lightning.policy import LoraSettings, load_model
from r1_lightning.resume import load_resume_state, save_rng_states

ROLLOUT_STEP_KEY = "r1_rollout_step"

# Streams of `SamplingSeeds.per_prompt` besides training's (which count up from 0).
EVAL_STREAM, PREDICT_STREAM = -1, -2


# ------------------------------------------------------------------------------- models
def load_policy(
    module: L.LightningModule,
    model_name_or_path: str,
    *,
    vocab_size: int,
    dtype: str = "auto",
    gradient_checkpointing: bool = False,
    lora: LoraSettings | None = None,
    trust_remote_code: bool = False,
    seed: int = 0,
    fsdp_param_dtype: str | None = None,
) -> torch.nn.Module:
    """The trained model, in train mode, sharded where ``module``'s strategy shards (FSDP2; DDP/FSDP wrap it themselves)."""
    model = load_model(
        model_name_or_path, vocab_size=vocab_size, dtype=dtype, gradient_checkpointing=gradient_checkpointing, lora=lora,
        trust_remote_code=trust_remote_code, seed=seed,
    ).train()  # from_pretrained returns eval mode
    return shard_for_strategy(module, model, fsdp_param_dtype)


def load_frozen(
    module: L.LightningModule,
    model_name_or_path: str,
    *,
    vocab_size: int,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    seed: int = 0,
    fsdp_param_dtype: str | None = None,
) -> torch.nn.Module:
    """A frozen model (GRPO's reference, a distillation teacher): eval mode, no gradients, sharded like the policy."""
    model = load_model(model_name_or_path, vocab_size=vocab_size, dtype=dtype, trust_remote_code=trust_remote_code, seed=seed)
    return shard_for_strategy(module, model.eval().requires_grad_(False), fsdp_param_dtype)


def policy_optimizer(module: L.LightningModule, total_steps: int | None = None) -> dict:
    """AdamW + warm-up + cosine over ``module.model``, from its ``learning_rate``, ``weight_decay``,
    ``warmup_steps`` and ``min_lr_ratio`` hyperparameters; ``total_steps`` defaults to the trainer's."""
    hp = module.hparams
    total = total_training_steps(module.trainer) if total_steps is None else total_steps
    parameters = module.model.parameters()
    return adamw_warmup_cosine(parameters, hp.learning_rate, hp.weight_decay, hp.warmup_steps, total, hp.min_lr_ratio)


def export_at_fit_end(module: L.LightningModule) -> None:
    """Write ``<log dir>/hf_model/`` (model and tokenizer) when the module's ``export_hf`` is on."""
    if module.hparams.export_hf:
        export_hf_model(module.trainer, module.model, module.tokenizer)


# ---------------------------------------------------------------------------- checkpoints
def save_training_state(module: L.LightningModule, checkpoint: dict[str, Any], rollout_step: int | None = None) -> None:
    """``on_save_checkpoint``: every rank's RNG states, and the rollout counter sampling is seeded by (if any)."""
    if rollout_step is not None:
        checkpoint[ROLLOUT_STEP_KEY] = rollout_step
    save_rng_states(module, checkpoint)


def load_training_state(module: L.LightningModule, checkpoint: dict[str, Any]) -> int:
    """``on_load_checkpoint``: refuse a checkpoint that does not fit, restore the RNG states; returns the saved
    rollout step (0 if none)."""
    load_resume_state(module, checkpoint)
    return checkpoint.get(ROLLOUT_STEP_KEY, 0)


# ------------------------------------------------------------------------------- sampling
def eos_token_ids(tokenizer, model: torch.nn.Module | None) -> list[int]:
    """The ids sampling stops at: the tokenizer's EOS and every EOS of the model's generation config.

    Instruct models often end a turn with a token the tokenizer does not call EOS (Qwen's
    ``<|im_end|>`` next to ``<|endoftext|>``); the generation config lists both.
    """
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = list(configured) if isinstance(configured, (list, tuple)) else [configured]
    return sorted({e for e in (tokenizer.eos_token_id, *configured) if e is not None})


def sampling_params(
    tokenizer, model: torch.nn.Module | None, max_new_tokens: int, temperature: float, top_p: float = 1.0, top_k: int = 0
) -> SamplingParams:
    """``SamplingParams`` stopping at ``eos_token_ids`` and padding with the tokenizer's pad id."""
    return SamplingParams(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        eos_token_ids=eos_token_ids(tokenizer, model), pad_token_id=tokenizer.pad_token_id,
    )


class SamplingSeeds:
    """Every sampling seed of a run, from one formula: ``(seed · 1_000_003 + offset) mod 2⁶³``.

    A prompt with a dataset index gets its own generator, seeded by (index, stream): its samples
    then do not depend on which rank or batch holds it, so N ranks sample what one process would,
    and a resumed run (same stream) what the uninterrupted one would. A batch without ``indices``
    gets one generator per rank, seeded by (rank, stream). Evaluation uses its own constant
    streams, so every evaluation of a run samples with the same seeds.

    Args:
        seed: The run's seed (the modules' ``seed``).

    Example:
        >>> seeds = SamplingSeeds(0)
        >>> seeds.for_batch({"indices": [5]}, stream=3, rank=0)[0].initial_seed() == (6 * 1_000_033 + 3)
        True
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def generator(self, offset: int, device: torch.device | str = "cpu") -> torch.Generator:
        """A generator seeded by (seed, ``offset``)."""
        return torch.Generator(device=device).manual_seed((self.seed * 1_000_003 + offset) % (2**63))

    def per_prompt(self, indices, stream: int, device: torch.device | str = "cpu") -> list[torch.Generator]:
        """One generator per dataset index, seeded by (seed, index, stream)."""
        return [self.generator((int(index) + 1) * 1_000_033 + stream, device) for index in indices]

    def per_rank(self, rank: int, stream: int, device: torch.device | str = "cpu") -> torch.Generator:
        """One generator for a batch without dataset indices, seeded by (seed, rank, stream): ranks differ."""
        return self.generator(rank * 7919 + stream, device)

    def for_batch(
        self, batch: dict[str, Any], stream: int, rank: int, device: torch.device | str = "cpu"
    ) -> list[torch.Generator] | torch.Generator:
        """Per-prompt generators when ``batch`` has ``indices``, else the per-rank one."""
        indices = batch.get("indices")
        return self.per_rank(rank, stream, device) if indices is None else self.per_prompt(indices, stream, device)

    def evaluation(
        self, batch: dict[str, Any], batch_idx: int, rank: int, device: torch.device | str = "cpu"
    ) -> list[torch.Generator] | torch.Generator:
        """Validation / test sampling, independent of training progress."""
        indices = batch.get("indices")
        if indices is None:
            return self.per_rank(rank, 10_000_000 + batch_idx, device)
        return self.per_prompt(indices, EVAL_STREAM, device)


# --------------------------------------------------------------------------- rollout engine
class EngineLifecycle(Callback):
    """Runs a rollout engine alongside the module: returned from the module's ``configure_callbacks``.

    Before any model loads (``setup``), refuses an engine whose length budget cannot hold the data
    module's longest prompt (``max_prompt_length``, else ``max_length``) and ``max_new_tokens``.
    Starts the engine once the model is built and sharded (fit, validate, test, predict), marks its
    weights stale after every training batch (an engine with its own copy pushes them before it
    samples again) and stops it with the stage.

    Args:
        engine: The module's ``RolloutEngine``.
        max_new_tokens: The most tokens the module ever asks the engine to generate.
        model_attribute: The module attribute holding the model the engine samples from.
    """

    def __init__(self, engine: RolloutEngine, max_new_tokens: int, model_attribute: str = "model") -> None:
        self.engine = engine
        self.max_new_tokens = max_new_tokens
        self.model_attribute = model_attribute

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        data = getattr(getattr(trainer, "datamodule", None), "hparams", None)
        longest = getattr(data, "max_prompt_length", None) or getattr(data, "max_length", None)
        if longest is not None:
            self.engine.check_lengths(longest, self.max_new_tokens)

    def _start(self, pl_module: L.LightningModule) -> None:
        self.engine.setup(getattr(pl_module, self.model_attribute))

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(pl_module)

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(pl_module)

    @override
    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(pl_module)

    @override
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(pl_module)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        self.engine.mark_stale()

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.engine.teardown()
