"""GRPO's policy update: one pass over a batch of rollouts in mini-batches (one optimizer step each) of micro-batches.

``GRPO.training_step`` samples and scores the rollouts, computes the advantages, the loss mask and the reference and
old log-probs, then calls ``policy_update`` ``num_iterations`` times. The maths (policy loss, KL penalty, sampler
correction) lives in ``r1_lightning.rl``; this file assembles it per micro-batch and steps the optimizer.
"""

from __future__ import annotations

from typing import Any

import torch

from r1_lightning.modules.grpo_options import module_micro_batch, module_recompute
from r1_lightning.parallel import check_backward_passes, clip_grad_norm
from r1_lightning.rl.masked import masked_mean
from r1_lightning.rl.sampler_correction import sampler_weights


def policy_update(
    module: Any,
    inputs: dict[str, torch.Tensor],
    target_mask: torch.Tensor,
    P: int,
    loss_mask: torch.Tensor,
    advantages: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    sampler_logprobs: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """One pass over the rollouts in mini-batches (one optimizer step each) of micro-batches.

    Args:
        module: The ``GRPO`` module: its policy forward, loss, KL penalty, optimizer, scheduler and engine.
        inputs: Prompt + completion ``input_ids``, ``attention_mask`` and ``position_ids``, each [B*G, P+T].
        target_mask: The completion tokens of ``inputs`` [B*G, P+T].
        P: Prompt length (the completions start at column P).
        loss_mask: The completion tokens the loss covers [B*G, T].
        advantages: One advantage per completion [B*G].
        old_logprobs: π_old's log-probs [B*G, T]; None when ``num_iterations`` is 1 (π_old is then the detached policy).
        ref_logprobs: The reference's log-probs [B*G, T]; None when ``beta`` is 0.
        sampler_logprobs: The rollout engine's log-probs of its samples [B*G, T].

    Returns:
        The metrics of the pass: ``loss`` and ``policy_loss`` averaged over the mini-batches, ``sampler_is_ratio_max``
        the largest, the others weighted by each micro-batch's share of the rows.
    """
    hp, optimizer, scheduler = module.hparams, module.optimizers(), module.lr_schedulers()
    rows = advantages.shape[0]
    mini = hp.mini_batch_size or rows
    micro = min(hp.micro_batch_size or module_micro_batch(module, mini, inputs["input_ids"].shape[1] - P, P), mini)
    module._recompute = module_recompute(module, inputs["input_ids"].shape[1] - P)
    check_backward_passes(module, hp.num_iterations * sum(-(-min(mini, rows - s) // micro) for s in range(0, rows, mini)))
    totals: dict[str, torch.Tensor] = {}
    for start in range(0, rows, mini):
        stop = min(start + mini, rows)
        micro_batches = [slice(s, min(s + micro, stop)) for s in range(start, stop, micro)]
        # Denominators that make the micro-batch gradients add up to the mini-batch's (over all ranks
        # where the aggregation is global, so N ranks step as one process on the global batch).
        normalizers = module.policy_loss.normalizers(loss_mask, micro_batches, hp.max_new_tokens)
        module.flat_gradients.allocate()
        for r, normalizer in zip(micro_batches, normalizers):
            logprobs, entropy = module._policy_logprobs({k: v[r] for k, v in inputs.items()}, target_mask[r], P)  # [b, T] each
            old = logprobs.detach() if old_logprobs is None else old_logprobs[r]
            penalty, kl_metrics = None, {}
            if ref_logprobs is not None and module.kl_penalty.placement == "loss":
                penalty, kl_metrics = module.kl_penalty.loss_term(logprobs, old, ref_logprobs[r], loss_mask[r])
            weights, sampler_metrics = module_sampler_weights(module, old, sampler_logprobs[r], loss_mask[r])
            loss, metrics = module.policy_loss(
                logprobs, old, advantages[r], loss_mask[r], penalty=penalty, entropy=entropy, token_weights=weights,
                normalizer=normalizer, max_completion_length=hp.max_new_tokens,
            )
            metrics.update(kl_metrics)
            metrics.update(sampler_metrics)
            module.manual_backward(loss)
            module.guard.record_loss(loss)
            weight = (r.stop - r.start) / rows
            metrics = {**metrics, "loss": loss.detach(), "entropy": masked_mean(entropy, loss_mask[r])}
            for name, value in metrics.items():
                if name == "sampler_is_ratio_max":
                    totals[name] = torch.maximum(totals.get(name, value), value)
                    continue
                totals[name] = totals.get(name, 0.0) + value.detach() * (1.0 if name in ("loss", "policy_loss") else weight)
        module.flat_gradients.drop_unreceived()
        if hp.max_grad_norm > 0:
            clip_grad_norm(module, optimizer, hp.max_grad_norm)  # FSDP1 needs its root's own clipping
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        module.engine.mark_stale()  # an engine with its own copy of the weights pushes them before the next rollout
    num_minibatches = -(-rows // mini)
    return {k: v / num_minibatches if k in ("loss", "policy_loss") else v for k, v in totals.items()}


def module_sampler_weights(
    module: Any, old_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, loss_mask: torch.Tensor
) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """Importance weights π_old / π_sampler when the engine is not the policy itself; (None, {}) when it is.

    Args:
        module: The ``GRPO`` module: its engine and ``sampler_correction*`` options.
        old_logprobs: π_old's log-probs of a micro-batch [b, T].
        sampler_logprobs: The rollout engine's log-probs of the same tokens [b, T].
        loss_mask: The tokens the loss covers [b, T].

    Returns:
        The detached weights [b, T] (None with ``sampler_correction="none"``, where the mismatch is only logged)
        and the mismatch metrics (``sampler_logprob_diff``, ``sampler_is_ratio_mean`` / ``_max``, ``sampler_masked_frac``).
    """
    hp = module.hparams
    if module.engine.samples_from_policy:
        return None, {}
    weights, metrics = sampler_weights(
        old_logprobs, sampler_logprobs, loss_mask, hp.sampler_correction, hp.sampler_correction_level, hp.sampler_correction_threshold
    )
    return (None if hp.sampler_correction == "none" else weights), metrics
