"""GRPO's option checks: a bad value fails in one line before the run starts, not at the first rollout."""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch.utilities import rank_zero_info

from r1_lightning.engines.compiled_forward import layers_unsupported_reason
from r1_lightning.errors import ConfigError
from r1_lightning.parallel import is_sharded
from r1_lightning.policy import unwrap_model
from r1_lightning.rl.losses import AGGREGATIONS


def check_sampling(max_new_tokens, temperature, top_p, top_k, eval_temperature, eval_num_samples) -> None:
    # Checked here, so a bad value fails before the run starts rather than at the first rollout.
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    if not temperature >= 0:
        raise ConfigError(f"temperature={temperature}: must be >= 0 (0 = greedy)")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p={top_p}: must be in (0, 1]")
    if top_k < 0:
        raise ConfigError(f"top_k={top_k}: must be >= 0 (0 = off)")
    if not eval_temperature >= 0:
        raise ConfigError(f"eval_temperature={eval_temperature}: must be >= 0 (0 = greedy)")
    if eval_num_samples < 1:
        raise ConfigError(f"eval_num_samples={eval_num_samples}: must be >= 1")


def check_update_split(epsilon, epsilon_high, mini_batch_size, micro_batch_size) -> None:
    if not epsilon >= 0:
        raise ConfigError(f"epsilon={epsilon}: must be >= 0 (the clip range is [1 - epsilon, 1 + epsilon_high])")
    if epsilon_high is not None and not epsilon_high >= 0:
        raise ConfigError(f"epsilon_high={epsilon_high}: must be >= 0")
    for name, value in (("mini_batch_size", mini_batch_size), ("micro_batch_size", micro_batch_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{name}={value}: must be >= 1 completions (or unset: the whole batch)")


def check_options(num_generations, beta, kl_placement, num_iterations, loss_aggregation, importance_level) -> None:
    if num_generations < 1:
        raise ConfigError(f"num_generations={num_generations}: must be >= 1 (GRPO needs >= 2 for a non-zero advantage)")
    if beta < 0:
        raise ConfigError(f"beta={beta}: must be >= 0")
    if kl_placement not in ("loss", "reward"):
        raise ConfigError(f"kl_placement={kl_placement!r}: choose loss or reward")
    if num_iterations < 1:
        raise ConfigError(f"num_iterations={num_iterations}: must be >= 1")
    if loss_aggregation not in AGGREGATIONS:
        raise ConfigError(f"loss_aggregation={loss_aggregation!r}: choose one of {', '.join(AGGREGATIONS)}")
    if importance_level not in ("token", "sequence"):
        raise ConfigError(f"importance_level={importance_level!r}: choose token or sequence")


# The constructor keys each component replaces: a component and a changed key together would ignore the key.
REPLACED_BY = {
    "policy_loss": ("epsilon", "epsilon_high", "importance_level", "loss_aggregation"),
    "kl_penalty": ("beta", "kl_estimator", "kl_placement"),
}


def check_component_options(components: dict[str, Any], options: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Refuse a component given together with a changed constructor key it replaces (``defaults``: the constructor's)."""
    for component, keys in REPLACED_BY.items():
        given = components[component]
        if given is None:
            continue
        changed = [key for key in keys if options[key] != defaults[key]]
        if changed:
            raise ConfigError(
                f"{component}={given!r} replaces {', '.join(changed)}: set {'them' if len(changed) > 1 else 'it'} "
                f"in {component}'s init_args instead"
            )


# Without `micro_batch_size`: the activations one forward keeps for its backward stay under about this much.
ACTIVATION_BUDGET_BYTES = 2 << 30


def activation_bytes_per_token(config: Any, dtype_bytes: int) -> int | None:
    """Roughly the bytes a decoder's backward keeps per token: per layer ~10 hidden-sized tensors (norms, Q/K/V,
    attention output, residuals) and 4 MLP-sized ones (gate, up, activation, product); None for a config without
    those sizes. On SmolLM2-135M (30 layers, 576 / 1,536): 30 * (5,760 + 6,144) * 4 B = 1.43 MB, measured ~1.6 MB."""
    sizes = [getattr(config, name, None) for name in ("num_hidden_layers", "hidden_size", "intermediate_size")]
    if not all(isinstance(size, int) and size > 0 for size in sizes):
        return None
    layers, hidden, intermediate = sizes
    return layers * (10 * hidden + 4 * intermediate) * dtype_bytes


# Once a group is split, its prompt runs again in every micro-batch: splitting further is kept while those extra
# prompt forwards stay under about this share of the completions' work.
PROMPT_RERUN_SHARE = 0.1


def default_micro_batch(
    rows: int, group: int, row_tokens: int, bytes_per_token: int, prompt_tokens: int = 0, budget: int = ACTIVATION_BUDGET_BYTES
) -> int:
    """Completions per micro-batch when none is set: all ``rows`` when their activations fit ``budget``; else as many
    whole groups of ``group`` as fit (a group's completions share one prompt forward). Where not even one group fits,
    the prompt runs again in every micro-batch anyway, so the micro-batch shrinks to the fewest completions (>= 1)
    whose ``row_tokens`` keep the extra ``prompt_tokens`` forwards under ``PROMPT_RERUN_SHARE`` of the work: the
    activations then take a fraction of the budget for a few percent more compute (SmolLM2-135M, 2 x 4 completions
    of 512 tokens: one completion per micro-batch, peak RSS 4,707 -> 3,709 MiB, step +1%; benchmarks/README.md)."""
    fit = max(1, budget // max(row_tokens * bytes_per_token, 1))
    if fit >= rows:
        return rows
    if fit >= group:
        return fit // group * group
    return min(fit, max(1, math.ceil(prompt_tokens / (PROMPT_RERUN_SHARE * max(row_tokens, 1)))))


def module_micro_batch(module: Any, mini: int, row_tokens: int, prompt_tokens: int) -> int:
    """A GRPO module's default micro-batch (no ``micro_batch_size``): the whole mini-batch, unless its activations
    would pass ``ACTIVATION_BUDGET_BYTES`` (then whole groups or a split group, ``default_micro_batch``). Only where the split cannot
    change the loss: one process, no FSDP1, and an aggregation over the whole mini-batch."""
    loss = module.policy_loss
    if (
        module.trainer.world_size > 1 or is_sharded(module) or getattr(loss, "aggregation", "bnpo") == "bnpo"
        or getattr(loss, "top_entropy_quantile", 1.0) < 1.0
    ):
        return mini
    model = unwrap_model(module.model)
    per_token = activation_bytes_per_token(model.config, next(model.parameters()).element_size())
    return mini if per_token is None else default_micro_batch(
        mini, module.hparams.num_generations, row_tokens, per_token, prompt_tokens
    )


def check_choices(**options: Any) -> None:
    """``compile`` and ``gradient_checkpointing``: true, false or auto."""
    for name, value in options.items():
        if value not in (True, False, "auto"):
            raise ConfigError(f"{name}={value!r}: choose true, false or auto")


def module_recompute(module: Any, row_tokens: int) -> bool:
    """Whether this update's completion passes recompute their decoder layers in the backward (``token_logprobs``'s
    ``recompute``). ``gradient_checkpointing="auto"``: where the layer functions apply (``compiled_forward``) and one
    group's activations (``num_generations`` completions of ``row_tokens``) would pass ``ACTIVATION_BUDGET_BYTES``.
    There the group is split into micro-batches anyway, and a completion's layers then keep their inputs only
    (SmolLM2-135M, 512-token completions: ~40 MB instead of ~470 MB each) for one more forward of the completions.
    ``True`` is Hugging Face's checkpointing, switched on at load; ``False`` never. Logs each change of decision."""
    hp = module.hparams
    decision, reason = False, None
    if hp.gradient_checkpointing == "auto":
        model = unwrap_model(module.model)
        per_token = activation_bytes_per_token(model.config, next(model.parameters()).element_size())
        group_bytes = hp.num_generations * row_tokens * (per_token or 0)
        if group_bytes > ACTIVATION_BUDGET_BYTES and layers_unsupported_reason(model) is None:
            decision, reason = True, (
                f"a group of {hp.num_generations} completions of {row_tokens} tokens would keep ~{group_bytes / 2**30:.1f} GiB "
                f"of activations, over the {ACTIVATION_BUDGET_BYTES / 2**30:.0f} GiB budget"
            )
    if decision != getattr(module, "_recompute", False):
        verdict = "recompute their decoder layers in the backward" if decision else "keep their activations again"
        rank_zero_info(
            f"GRPO(gradient_checkpointing='auto'): the completion passes {verdict}"
            + (f": {reason} (gradient_checkpointing: false keeps them)" if reason else "")
        )
    return decision
