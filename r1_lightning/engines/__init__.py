"""Rollout engines behind one interface (set-up, weight sync, generate, tear-down).

- `HFGenerateEngine`: the project's KV-cached decode loop on the policy itself (with its CPU fast
  paths, `fast_decode` and `compiled_forward`); the default.
- `VLLMEngine`: vLLM in the training process, weights pushed in place after every optimizer step.

`logprobs` holds the chunked log-prob kernels the trainer scores completions with.
"""

from r1_lightning.engines.base import Rollout, RolloutEngine, SamplingParams
from r1_lightning.engines.hf import HFGenerateEngine
from r1_lightning.engines.vllm import VLLMEngine

__all__ = ["HFGenerateEngine", "Rollout", "RolloutEngine", "SamplingParams", "VLLMEngine"]
