"""The rollout interface: how a module asks for samples, and what it gets back.

A module talks to generation only through `RolloutEngine`: `generate` takes token-id lists
and returns a `Rollout` of padded tensors. An engine that is not the policy itself (vLLM) keeps
its own copy of the weights, so the interface also carries its lifecycle: `setup` once the policy
is built (and sharded), `mark_stale` after every optimizer step, `sync_weights` (also done lazily
by `generate`), and `teardown`. `HFGenerateEngine` samples from the policy itself: for it the
lifecycle is a no-op.
"""

from __future__ import annotations

import functools
import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class SamplingParams:
    """How to sample completions.

    Args:
        max_new_tokens: Most tokens generated per completion (the EOS token included).
        temperature: Softmax temperature; `0` means greedy decoding.
        top_p: Nucleus sampling: sample from the smallest set of most likely tokens whose
            probability reaches `top_p` (`1.0` disables it).
        top_k: Sample from the `top_k` most likely tokens (`0` disables it).
        eos_token_ids: Tokens that end a completion (a model may have several, e.g.
            `<|im_end|>` and `<|endoftext|>`). Empty: completions only end at `max_new_tokens`.
        pad_token_id: Fills prompts on the left and completions after their EOS.
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.eos_token_ids, int):  # as in many HF configs
            self.eos_token_ids = [self.eos_token_ids]
        self.eos_token_ids = list(self.eos_token_ids)
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0 (0 = disabled), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Rollout:
    """G sampled completions for each of B prompts, as padded tensors of `B*G` rows.

    The G completions of prompt `b` are the consecutive rows `b*G ... b*G+G-1`. Masks are
    `torch.long` 0/1, as Hugging Face attention masks are.

    Attributes:
        prompt_ids: `[B*G, P]` prompt tokens, left-padded with the pad id.
        prompt_mask: `[B*G, P]` 1 on real prompt tokens.
        completion_ids: `[B*G, T]` sampled tokens, right-padded with the pad id after EOS.
            `T <= max_new_tokens` is the longest completion of the batch (across ranks).
        completion_mask: `[B*G, T]` 1 on generated tokens up to and including the EOS.
        logprobs: `[B*G, T]` float32 log-probs of the sampled tokens under the sampling
            policy: `log_softmax(logits / temperature)` over the whole vocabulary (the raw
            `log_softmax(logits)` when greedy); 0 where masked. With top-k / top-p: before the
            filtering for `HFGenerateEngine`, after it (the distribution sampled) for `VLLMEngine`.
        truncated: `[B*G]` bool, True where no EOS came within `max_new_tokens`.
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    logprobs: Tensor
    truncated: Tensor

    @property
    def completion_lengths(self) -> Tensor:
        """`[B*G]` number of generated tokens per row, EOS included."""
        return self.completion_mask.sum(-1)

    def model_inputs(self) -> dict[str, Tensor]:
        """Keyword arguments for a teacher-forced forward over prompt + completion.

        See `build_model_inputs`.
        """
        return build_model_inputs(self.prompt_ids, self.prompt_mask, self.completion_ids, self.completion_mask)


def build_model_inputs(
    prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, completion_mask: Tensor
) -> dict[str, Tensor]:
    """Concatenate prompt and completion into one causal-LM input.

    Position ids count from 0 at the first real prompt token, as during generation, so
    a left-padded row sees the same positions (and rotary phases) as its unpadded self.
    The logits predicting the completion are `model(**inputs).logits[:, P - 1 : -1]`.

    Args:
        prompt_ids: `[N, P]` left-padded prompts.
        prompt_mask: `[N, P]`.
        completion_ids: `[N, T]` right-padded completions.
        completion_mask: `[N, T]`.

    Returns:
        `input_ids`, `attention_mask` and `position_ids`, each `[N, P+T]`.
    """
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # [N, P+T]
    attention_mask = torch.cat([prompt_mask, completion_mask.to(prompt_mask.dtype)], dim=1)  # [N, P+T]
    # Padding positions get a clamped, repeated index: they are masked out anyway.
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)  # [N, P+T]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}


class RolloutEngine(ABC):
    """Samples completions for a batch of tokenised prompts.

    An implementation may run the policy itself (`HFGenerateEngine`) or a separate inference
    engine that it keeps in sync with the policy (`VLLMEngine`). The modules call the lifecycle
    hooks from Lightning hooks: `setup` when a fit/validate/predict starts, `mark_stale` after each
    optimizer step, `sync_weights` before sampling, `teardown` when the stage ends. All of them
    are no-ops here; every rank calls them in the same order (a sync may be a collective).
    """

    @property
    def samples_from_policy(self) -> bool:
        """Whether the sampled log-probs are the policy's own (True) or another engine's (sampler/trainer mismatch)."""
        return True

    def check_lengths(self, longest_prompt: int, max_new_tokens: int) -> None:
        """Refuse, before any model loads, a length budget that cannot hold a prompt of `longest_prompt`
        tokens and `max_new_tokens` more (raises `ConfigError`)."""

    def setup(self, model: nn.Module) -> None:
        """Prepare to sample from `model` (built, and sharded where the strategy shards). Called again: nothing to do."""

    def mark_stale(self) -> None:
        """The policy's weights changed (an optimizer step): the next `sync_weights` or `generate` pushes them."""

    def sync_weights(self, model: nn.Module) -> float | None:
        """Bring the engine's weights up to `model`'s if they are stale; the seconds it took, or None if nothing was done."""
        return None

    def teardown(self) -> None:
        """Release what `setup` acquired; a later `setup` starts again."""

    @abstractmethod
    def generate(
        self,
        model: nn.Module,
        prompt_ids: list[list[int]],
        num_generations: int,
        params: SamplingParams,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> Rollout:
        """Sample `num_generations` completions for each prompt.

        Args:
            model: The current policy.
            prompt_ids: B prompts as token ids, unpadded.
            num_generations: G, completions per prompt.
            params: How to sample.
            generator: Source of randomness for reproducible sampling; the global RNG if None. A
                list holds one generator per prompt, which alone draws the noise of that prompt's
                G completions: a prompt then gets the same samples whatever batch (or rank) it is in.

        Returns:
            A `Rollout` of `B*G` rows on the model's device, the G rows of a prompt consecutive.
        """


def cache_argument(model: nn.Module, cache: Any) -> dict[str, Any]:
    """`cache` as the keyword argument `model.forward` takes it: `cache` in newer transformers (which
    deprecate `past_key_values` with a warning at every call), `past_key_values` up to 5.19."""
    return {_cache_keyword(type(model)): cache}


def output_cache(output: Any) -> Any:
    """The KV cache a forward returned, under either name (see `cache_argument`)."""
    return output["cache"] if "cache" in output else output.past_key_values


@functools.cache
def _cache_keyword(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def check_generate_request(engine: str, prompt_ids: list[list[int]], num_generations: int) -> None:
    """The checks every engine's ``generate`` makes first: prompts with tokens, G >= 1."""
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError(f"{engine}.generate: every prompt needs at least one token")
    if num_generations < 1:
        raise ValueError(f"{engine}.generate: num_generations must be >= 1, got {num_generations}")


def model_device(model: nn.Module) -> torch.device:
    """The device of `model`'s weights."""
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


def left_pad(sequences: list[list[int]], pad_token_id: int, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Left-pad token-id lists into `[B, P]` ids and a `[B, P]` long mask."""
    width = max(len(s) for s in sequences)
    ids = torch.tensor([[pad_token_id] * (width - len(s)) + list(s) for s in sequences], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences], dtype=torch.long, device=device)
    return ids, mask


