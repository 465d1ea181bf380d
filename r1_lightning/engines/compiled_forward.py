"""GRPO's training forwards through `torch.compile`d decoder layers (Qwen2, Llama, Mistral).

The training forwards of a small model on CPU spend about a third of their time in elementwise
ops (RMSNorm, rotary embedding, SwiGLU, residual adds, and their backward formulas), each a full
pass over `[rows, length, hidden]` activations that no longer fit in cache. Inductor fuses them
into a few C++ loops. `CompiledLayers` runs the two passes `logprobs.shared_prefix_hidden` needs
on the model's own parameters (no copies: an optimizer step is always seen):

- `prefix`: each distinct prompt once, returning every layer's keys and values;
- `suffix`: completions on top of (row-selected) prompt keys and values.

The decoder layer is the Hugging Face one written as a plain function (the formulas of
`fast_decode`, whole sequences instead of one token, separate Q/K/V and gate/up matmuls so no
weight is copied) and compiled once per process with dynamic shapes: the policy (with grad) and
the frozen reference (no grad) share it. The first compile on a machine takes 1-2 min on a 2-core
CPU (most of it inductor's one-time C++ set-up), later processes ~20 s with inductor's on-disk
cache warm.
Hidden states equal the Hugging Face forward's to float rounding (tests/test_compiled_forward.py).

`GRPO(compile="auto")`, the default, decides after a process's second step (`compile_pays`; the first
carries one-time warm-up costs): it
compiles when ~15% of that step's training forwards and backward, over the steps left, outweighs a
cold compile; `compile=True` compiles from the first step. Compilation needs a C++ compiler. Anything `fast_decode.model_unsupported_reason` refuses (other architectures, adapters,
FSDP shards, rotary scaling, sliding windows, non-CPU devices...) or a model with attention
dropout keeps the Hugging Face forward; so does a process where compiling failed (one warning).
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from r1_lightning.engines import suffix_attention
from r1_lightning.engines.fast_decode import apply_rotary, model_unsupported_reason, rms_norm, rotary
from r1_lightning.rl import cpu_matmul

# compile="auto": a cold compile on the 2-core CPU took 75-115 s (warm 20-22 s); the compiled layers cut the training
# forwards and backward by ~16% on the benchmark's tiny model (benchmarks/README.md).
AUTO_COMPILE_COST_S = 120.0
AUTO_COMPILE_SAVING = 0.15

# Per process: the compiled layer functions (built on first use), and why compiling failed, if it did.
_COMPILED: dict[tuple, object] = {}  # (pass, shape) -> compiled function
_FAILED: list[str] = []


def ran_compiled() -> bool:
    """Whether this process has run compiled layers and never fell back (False before any compiled call)."""
    return bool(_COMPILED) and not _FAILED


def compile_pays(training_seconds: float, remaining_steps: float) -> bool:
    """Whether compiling now would repay its one-time cost: the expected saving, `AUTO_COMPILE_SAVING` of a step's
    training forwards and backward (`training_seconds`) over `remaining_steps`, exceeds `AUTO_COMPILE_COST_S`."""
    return AUTO_COMPILE_SAVING * training_seconds * remaining_steps > AUTO_COMPILE_COST_S


def auto_compile_decision(training_seconds: float, remaining_steps: float) -> tuple[bool, str]:
    """`compile="auto"`'s choice after a step whose training forwards and backward took `training_seconds`
    (CPU), with `remaining_steps` to go: whether to compile (`compile_pays`) and the one log line saying why."""
    pays = compile_pays(training_seconds, remaining_steps)
    saving = AUTO_COMPILE_SAVING * training_seconds * remaining_steps
    verdict = "are compiled from the next step (a one-time cost in that step)" if pays else "stay eager (compile: true forces compiling)"
    return pays, (
        f"the training forwards {verdict}: they took {training_seconds:.1f} CPU-s in the second step; "
        f"~{AUTO_COMPILE_SAVING:.0%} of that over {remaining_steps:.0f} more steps is {saving:.0f} s against a "
        f"one-time compile of up to ~{AUTO_COMPILE_COST_S:.0f} s"
    )


def auto_unsupported_reason(model: nn.Module) -> str | None:
    """Why `compile="auto"` keeps `model`'s training forwards eager whatever the run's length, or None: they
    cannot be compiled (`unsupported_reason`), or its float32 products run through oneDNN on this CPU, which
    the compiled layers would not use (inductor sends them to the default BLAS; `rl.cpu_matmul`)."""
    reason = unsupported_reason(model)
    if reason is None and cpu_matmul.eligible(next(model.parameters(), None)):
        reason = (
            f"its float32 matmuls run through oneDNN on this CPU, which the compiled layers would not use "
            f"({cpu_matmul.ENV}=default, or compile: true, to compile)"
        )
    return reason


def compiled_layers(model: nn.Module) -> CompiledLayers | None:
    """`CompiledLayers` for a Hugging Face causal LM, or None where they do not apply (`unsupported_reason`)."""
    return None if unsupported_reason(model) is not None else CompiledLayers(model)


def unsupported_reason(model: nn.Module) -> str | None:
    """Why `compiled_layers(model)` is None, or None."""
    if _FAILED:
        return f"compiling failed earlier in this process: {_FAILED[0]}"
    return layers_unsupported_reason(model)


def layers_unsupported_reason(model: nn.Module) -> str | None:
    """Why the layer functions (compiled or eager, `CompiledLayers(model, compile=False)`) cannot stand in for
    `model`'s decoder layers, or None."""
    reason = model_unsupported_reason(model)
    if reason is not None:
        return reason
    if getattr(model.config, "attention_dropout", 0.0) and model.training:
        return "attention dropout"
    return None


class CompiledLayers:
    """The decoder stack of `model` (a Qwen2/Llama/Mistral causal LM) as compiled prefix and suffix passes."""

    def __init__(self, model: nn.Module, compile: bool = True) -> None:
        backbone = model.model
        self.compile = compile  # False: the same layer functions, eager (tests compare them with the Hugging Face forward)
        attn = backbone.layers[0].self_attn
        self.heads, self.kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
        self.head_dim, self.scale = attn.head_dim, attn.scaling
        self.embed, self.inv_freq = backbone.embed_tokens.weight, backbone.rotary_emb.inv_freq
        self.norm_weight, self.norm_eps = backbone.norm.weight, backbone.norm.variance_epsilon
        self.layers = [
            (
                layer.input_layernorm.weight, layer.self_attn.q_proj.weight, layer.self_attn.q_proj.bias,
                layer.self_attn.k_proj.weight, layer.self_attn.k_proj.bias, layer.self_attn.v_proj.weight,
                layer.self_attn.v_proj.bias, layer.self_attn.o_proj.weight, layer.self_attn.o_proj.bias,
                layer.post_attention_layernorm.weight, layer.mlp.gate_proj.weight, layer.mlp.gate_proj.bias,
                layer.mlp.up_proj.weight, layer.mlp.up_proj.bias, layer.mlp.down_proj.weight, layer.mlp.down_proj.bias,
            )
            for layer in backbone.layers
        ]
        self.eps = backbone.layers[0].input_layernorm.variance_epsilon

    def prefix(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Hidden states `[U, P, H]` of whole prompts and each layer's keys and values `[U, kv, P, D]`.

        Query positions that see no key (left padding) attend to themselves instead, so they stay
        finite; their outputs, like the Hugging Face forward's there, mean nothing.
        """
        width = input_ids.shape[1]
        causal = torch.ones(width, width, dtype=torch.bool, device=input_ids.device).tril()  # [P, P]
        mask = causal & attention_mask.bool()[:, None, :]  # [U, P, P]
        mask = (mask | torch.eye(width, dtype=torch.bool, device=mask.device))[:, None]  # [U, 1, P, P]
        hidden, cos, sin = self._inputs(input_ids, position_ids)
        cache = []
        for weights in self.layers:
            hidden, keys, values = _call("prefix", self._shape, self.compile, hidden, weights, cos, sin, mask)
            cache.append((keys, values))
        return rms_norm(hidden, self.norm_weight, self.norm_eps), cache

    def suffix(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, past: list[tuple[Tensor, Tensor]], recompute: bool = False
    ) -> Tensor:
        """Hidden states `[n, S]` of suffixes after prompts whose keys and values are `past` (`[n, kv, P, D]`
        per layer); `attention_mask` is `[n, P + S]` over prompt and suffix.

        With `recompute` (and grad enabled), each layer keeps only its input for the backward, which runs the
        layer's forward again (`torch.utils.checkpoint`): `[n, S, H]` per layer instead of the layer's ~13
        hidden- and intermediate-sized activations, for one more forward of the suffix. Values and gradients
        are the same bit for bit (the same operations, run again on the same inputs).

        Eager, completions of `suffix_attention.MIN_COMPLETION_LENGTH` or more skip the causal half of their
        attention (`suffix_attention.causal_suffix_attention`; equal to float rounding).
        """
        width, prompt = input_ids.shape[1], past[0][0].shape[2]
        hidden, cos, sin = self._inputs(input_ids, position_ids)
        if not self.compile and suffix_attention.applies(attention_mask[:, :prompt], attention_mask[:, prompt:]):
            # Long completions: their causal half of the attention skipped (`suffix_attention`).
            kind, mask = "causal_suffix", suffix_attention.additive_prompt_mask(attention_mask[:, :prompt], width, hidden.dtype)
        else:
            query = torch.arange(prompt, prompt + width, device=input_ids.device)  # [S] absolute positions
            causal = torch.arange(prompt + width, device=input_ids.device)[None, :] <= query[:, None]  # [S, P + S]
            kind, mask = "suffix", (causal & attention_mask.bool()[:, None, :])[:, None]  # [n, 1, S, P + S]
        recompute = recompute and torch.is_grad_enabled()
        # A recompute stops early by raising through the layer function, which `_call` would take for a compiler error.
        with set_checkpoint_early_stop(False) if recompute and self.compile else contextlib.nullcontext():
            for weights, (past_keys, past_values) in zip(self.layers, past):
                args = (kind, self._shape, self.compile, hidden, weights, cos, sin, mask, past_keys, past_values)
                # No random numbers to replay: the layers have no dropout (attention dropout is refused).
                hidden = checkpoint(
                    _call, *args, use_reentrant=False, preserve_rng_state=False, context_fn=cpu_matmul.checkpoint_contexts
                ) if recompute else _call(*args)
        return rms_norm(hidden, self.norm_weight, self.norm_eps)

    @property
    def _shape(self) -> tuple[int, int, int, float, float]:
        return self.heads, self.kv_heads, self.head_dim, self.scale, self.eps

    def _inputs(self, input_ids: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        hidden = F.embedding(input_ids, self.embed)  # [n, L, H]
        cos, sin = rotary(position_ids, self.inv_freq, hidden.dtype)  # [n, L, D]
        return hidden, cos[:, None], sin[:, None]  # cos, sin [n, 1, L, D]: broadcast over heads


def _call(kind: str, shape: tuple[int, int, int, float, float], compile: bool, *args):
    """Run the compiled `kind` layer for `shape`; on a compile error, warn once and run (now and from then on) eagerly."""
    eager = _layer_function(kind, shape)
    if _FAILED or not compile:
        return eager(*args)
    if (kind, shape) not in _COMPILED:
        _COMPILED[kind, shape] = torch.compile(eager, dynamic=True)
    try:
        return _COMPILED[kind, shape](*args)
    except Exception as error:  # noqa: BLE001 - any compiler failure; the eager rerun surfaces real errors
        _FAILED.append(f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300])
        warnings.warn(f"compile=True: torch.compile failed ({_FAILED[0]}); training forwards run eagerly", stacklevel=2)
        return eager(*args)


@functools.cache  # one function per (pass, shape): `_call` runs for every layer of every pass
def _layer_function(kind: str, shape: tuple[int, int, int, float, float]):
    """The `prefix`, `suffix` or `causal_suffix` (`suffix_attention`) layer function with the model's head counts,
    head size, scale and epsilon as constants: passed as arguments they would become symbolic under dynamic shapes
    (and break the graph at SDPA)."""
    heads, kv_heads, head_dim, scale, eps = shape
    grouped = bool(heads != kv_heads)
    causal_suffix = kind == "causal_suffix"  # eager only: `suffix` runs these rows when compiled

    def layer(hidden, weights, cos, sin, mask, past_keys=None, past_values=None) -> tuple[Tensor, Tensor, Tensor]:
        """One Hugging Face Llama/Qwen2 decoder layer on `[n, L, H]`; also the new keys and values `[n, kv, L, D]`."""
        ln1, wq, bq, wk, bk, wv, bv, wo, bo, ln2, wg, bg, wu, bu, wd, bd = weights
        n, length, _ = hidden.shape
        x = rms_norm(hidden, ln1, eps)
        query = apply_rotary(F.linear(x, wq, bq).view(n, length, heads, head_dim).transpose(1, 2), cos, sin)  # [n, h, L, D]
        keys = apply_rotary(F.linear(x, wk, bk).view(n, length, kv_heads, head_dim).transpose(1, 2), cos, sin)  # [n, kv, L, D]
        values = F.linear(x, wv, bv).view(n, length, kv_heads, head_dim).transpose(1, 2)  # [n, kv, L, D]
        if causal_suffix:  # `mask` is the prompt part's alone; out [n, h, L, D]
            out = suffix_attention.causal_suffix_attention(query, past_keys, past_values, keys, values, mask, scale)
        else:
            all_keys = keys if past_keys is None else torch.cat([past_keys, keys], dim=2)  # [n, kv, P + L, D]
            all_values = values if past_values is None else torch.cat([past_values, values], dim=2)
            out = F.scaled_dot_product_attention(
                query, all_keys, all_values, attn_mask=mask, dropout_p=0.0, scale=scale, enable_gqa=grouped
            )  # [n, h, L, D]
        hidden = hidden + F.linear(out.transpose(1, 2).reshape(n, length, heads * head_dim), wo, bo)
        x = rms_norm(hidden, ln2, eps)
        hidden = hidden + F.linear(F.silu(F.linear(x, wg, bg)) * F.linear(x, wu, bu), wd, bd)
        return hidden, keys, values

    def prefix(hidden, weights, cos, sin, mask):
        return layer(hidden, weights, cos, sin, mask)

    def suffix(hidden, weights, cos, sin, mask, past_keys, past_values):
        return layer(hidden, weights, cos, sin, mask, past_keys, past_values)[0]

    return prefix if kind == "prefix" else suffix  # "suffix" and "causal_suffix"
