"""A decode step for Llama-family models (Qwen2, Llama, Mistral) with the Hugging Face forward's
maths and a fraction of its ops.

Sampling one token from a small model is bound by per-op overhead, not arithmetic: a Hugging Face
Qwen2 forward issues ~285 PyTorch ops and ~58 module calls per token (output capture, mask and
rotary preparation, cache bookkeeping, keyword plumbing). `fast_decode_step` returns a plain
function that runs one decode step of the same network on the model's own parameters and the
rollout engine's preallocated KV cache (~214 ops, no module calls): the formulas of the Hugging
Face modules in their order and the same SDPA call, with

- the query, key and value projections as one matmul, and gate and up as another;
- every linear weight stored transposed (`[in, out]`): `x @ W` is 1.2-1.8x faster than
  `F.linear`'s `x @ W.T` at decode's few rows with MKL; where float32 products run through oneDNN
  (`rl.cpu_matmul`, 1.5-2.3x MKL's at 8 rows on AMD EPYC) the weights keep their `[out, in]` layout,
  and a single linear's weight is used in place, not copied; where the decode probe picks oneDNN on
  packed weights (`cpu_matmul.use_packed_decode`: 1.4-1.5x MKL's at 8 rows on an AVX2-only AMD EPYC,
  where plain oneDNN was not faster), every weight is reordered once per call into oneDNN's layout;
- 2-D activations (one position per row) and rotary embedding on queries and keys in one pass.

The fused, transposed or packed weights are copies made at every `generate` call (the others the model's
own tensors), so an optimizer step between calls is always seen; at most `MAX_WEIGHT_BYTES` of
them. Tokens are the Hugging Face forward's; with the default BLAS, log-probs are bit-identical at
24+ rows and in bfloat16 and within 1e-6 at a few rows, where MKL rounds the transposed product
differently; through oneDNN they differ from the forward's MKL products by float32 rounding
(tests/test_fast_decode.py allows 1e-5).

Anything it does not reproduce exactly gets `None`, and the caller keeps the Hugging Face
forward: other architectures, rotary scaling, sliding windows, attention other than SDPA,
peft/LoRA or quantised layers, hooks, FSDP/DTensor parameters, untested dtypes or devices.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from r1_lightning.engines.kv_cache import PreallocatedLayer
from r1_lightning.optim import mapped_zeros
from r1_lightning.rl import cpu_matmul

# Architectures whose decode step is reproduced here: the causal-LM class and the submodule classes
# of its modeling file that the step replaces (anything else inside the model means "fall back").
_CLASS_PREFIXES = {"qwen2": "Qwen2", "llama": "Llama", "mistral": "Mistral"}
_PARTS = ("ForCausalLM", "Model", "DecoderLayer", "Attention", "MLP", "RMSNorm", "RotaryEmbedding")
_FAMILIES = {family: tuple(prefix + part for part in _PARTS) for family, prefix in _CLASS_PREFIXES.items()}
# What tests/test_fast_decode.py compares against the Hugging Face forward.
TESTED_DTYPES = (torch.float32, torch.bfloat16)
TESTED_DEVICES = ("cpu",)
# The step works on per-call copies of the linear weights (fused, transposed), so it is for models whose
# decode is bound by per-op overhead: small ones. Past this size a step is arithmetic, and the copies cost memory.
MAX_WEIGHT_BYTES = 1 << 30

DecodeStep = Callable[[Tensor, Tensor, Tensor], Tensor]


def fast_decode_step(model: nn.Module, cache, attention_mask: Tensor) -> DecodeStep | None:
    """A function `step(input_ids [N, 1], attention_mask [N, 1, 1, L], position_ids [N, 1]) -> logits [N, V]`
    equal to `model(input_ids, attention_mask, position_ids, past_key_values=cache).logits[:, -1]`,
    writing the new keys and values into `cache` as that call would; or None where `model`, `cache`
    or the mask is not one it reproduces exactly (`unsupported_reason` says why).

    Args:
        model: The policy, a Hugging Face causal LM.
        cache: The rollout engine's KV cache after prefill, every layer preallocated.
        attention_mask: The decode mask the caller will pass (a slice of it each step).
    """
    if unsupported_reason(model, cache, attention_mask) is not None:
        return None
    return _build_step(model, cache)


def unsupported_reason(model: nn.Module, cache, attention_mask: Tensor) -> str | None:
    """Why `fast_decode_step` would fall back to the Hugging Face forward, or None if it would not."""
    reason = model_unsupported_reason(model)
    if reason is not None:
        return reason
    if sum(p.numel() * p.element_size() for p in model.parameters()) > MAX_WEIGHT_BYTES:
        return f"weights over {MAX_WEIGHT_BYTES >> 20} MiB (a decode step is arithmetic, not overhead, there)"
    layers = getattr(cache, "layers", None)
    if PreallocatedLayer is None or layers is None or len(layers) != len(model.model.layers) or any(
        type(layer) is not PreallocatedLayer for layer in layers
    ):
        return "the KV cache is not the rollout engine's preallocated cache"
    if attention_mask.dim() != 4 or attention_mask.dtype != torch.bool:
        return "the decode mask is not a [N, 1, 1, L] boolean SDPA mask"
    return None


def model_unsupported_reason(model: nn.Module) -> str | None:
    """Why the plain functions of this module (and `engines.compiled_forward`) cannot stand in for `model`'s
    forward, or None: the architecture, modules, configuration, parameters, dtype and device checks."""
    family = _family(model)
    if family is None:
        return f"architecture {type(model).__name__} is not one of {sorted(_FAMILIES)}"
    module_types, expected = _module_types(family), (nn.Linear, nn.Embedding, nn.ModuleList)
    for name, module in model.named_modules():
        kind = type(module)
        if kind not in module_types and kind not in expected and not is_silu(module):
            return f"module {name or 'model'} is a {kind.__name__} (adapters, quantisation, wrappers are not reproduced)"
        if module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__:
            return f"module {name or 'model'} has forward hooks or a replaced forward"
        if kind in module_types and kind.forward.__module__ != kind.__module__:
            return f"{kind.__name__}.forward was replaced (e.g. by a hub kernel)"
    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return f"attention implementation {getattr(config, '_attn_implementation', None)!r} (only sdpa is reproduced)"
    rotary = model.model.rotary_emb
    if getattr(rotary, "rope_type", None) != "default" or rotary.attention_scaling != 1.0:
        return f"rope type {getattr(rotary, 'rope_type', None)!r} (only the default rotary embedding is reproduced)"
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "sliding_window", None) is not None or any(t != "full_attention" for t in layer_types):
        return "sliding-window attention"
    if getattr(config, "hidden_act", None) != "silu":
        return f"activation {getattr(config, 'hidden_act', None)!r}"
    parameters, buffers = list(model.parameters()), list(model.buffers())
    if any(type(t) not in (nn.Parameter, Tensor) for t in parameters + buffers):
        return "parameters are tensor subclasses (DTensor / FSDP shards / quantised)"
    dtype, device = model.model.embed_tokens.weight.dtype, model.model.embed_tokens.weight.device
    if dtype not in TESTED_DTYPES or device.type not in TESTED_DEVICES:
        return f"dtype {dtype} on {device.type} is not tested (tested: {TESTED_DTYPES} on {TESTED_DEVICES})"
    if any(t.device != device for t in parameters + buffers) or any(p.dtype != dtype for p in parameters):
        return "parameters on several devices or in several dtypes"
    return None


def _family(model: nn.Module) -> str | None:
    for family, names in _FAMILIES.items():
        module = _modeling(family)
        if module is not None and type(model) is getattr(module, names[0], None):
            return family
    return None


def _modeling(family: str):
    try:
        return importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    except ImportError:
        return None


def part_types(part: str) -> tuple[type, ...]:
    """The classes named `<prefix><part>` (e.g. "MLP": Qwen2MLP, LlamaMLP, MistralMLP) of the installed families."""
    modules = [(_modeling(family), prefix + part) for family, prefix in _CLASS_PREFIXES.items()]
    return tuple(getattr(module, name) for module, name in modules if module is not None and hasattr(module, name))


def _module_types(family: str) -> set[type]:
    module = _modeling(family)
    return {getattr(module, name) for name in _FAMILIES[family]}


def is_silu(module: nn.Module) -> bool:
    """The module is a SiLU activation (PyTorch's or transformers')."""
    kind = type(module)
    return kind is nn.SiLU or (kind.__name__ == "SiLUActivation" and kind.__module__ == "transformers.activations")


def _build_step(model: nn.Module, cache) -> DecodeStep:
    """Gather the parameters (fused, transposed or packed copies) and return the step closure."""
    backbone = model.model
    packed = cpu_matmul.packed_eligible(model.lm_head.weight)
    onednn = cpu_matmul.eligible(model.lm_head.weight)
    linear = cpu_matmul.mm_packed if packed else cpu_matmul.mm_nt if onednn else _linear
    groups = [
        group
        for layer in backbone.layers
        for group in (
            (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj), (layer.self_attn.o_proj,),
            (layer.mlp.gate_proj, layer.mlp.up_proj), (layer.mlp.down_proj,),
        )
    ]
    groups.append((model.lm_head,))
    rows = cache.layers[0].keys.shape[0]
    weights = iter(packed_weights(groups, rows) if packed else fused_weights(groups, transposed=not onednn))
    layers = []
    for layer, cache_layer in zip(backbone.layers, cache.layers):
        (w_qkv, b_qkv), (w_o, b_o), (w_gu, b_gu), (w_down, b_down) = (next(weights) for _ in range(4))
        layers.append((
            layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon, w_qkv, b_qkv, w_o, b_o,
            layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon,
            w_gu, b_gu, w_down, b_down, cache_layer,
        ))
    head_weight, head_bias = next(weights)
    attn = backbone.layers[0].self_attn
    heads, kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
    head_dim, scale = attn.head_dim, attn.scaling
    embed, inv_freq = backbone.embed_tokens.weight, backbone.rotary_emb.inv_freq
    norm_weight, norm_eps = backbone.norm.weight, backbone.norm.variance_epsilon
    groups = heads // kv_heads
    rotated = heads + kv_heads  # query and key heads, rotated together

    def step(input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        n = input_ids.shape[0]
        hidden = F.embedding(input_ids.view(n), embed)  # [N, H]: one position per row, no sequence dim
        cos, sin = rotary(position_ids, inv_freq, hidden.dtype)  # [N, 1, D]
        for ln1, eps1, w_qkv, b_qkv, w_o, b_o, ln2, eps2, w_gu, b_gu, w_down, b_down, cache_layer in layers:
            qkv = linear(rms_norm(hidden, ln1, eps1), w_qkv, b_qkv).view(n, -1, head_dim)  # [N, h + 2 kv, D]
            qk = apply_rotary(qkv[:, :rotated], cos, sin)  # [N, h + kv, D]
            keys, values = cache_layer.update(qk[:, heads:, None], qkv[:, rotated:, None])  # [N, kv, L, D] each
            # As transformers' SDPA path for one query: the `groups` query heads of a KV head are its "rows".
            query = qk[:, :heads].reshape(n, kv_heads, groups, head_dim) if groups > 1 else qk[:, :heads, None]
            out = F.scaled_dot_product_attention(query, keys, values, attn_mask=attention_mask, dropout_p=0.0, scale=scale)
            hidden = hidden + linear(out.reshape(n, heads * head_dim), w_o, b_o)
            gate, up = linear(rms_norm(hidden, ln2, eps2), w_gu, b_gu).chunk(2, dim=-1)  # [N, I] each
            hidden = hidden + linear(F.silu(gate) * up, w_down, b_down)
        return linear(rms_norm(hidden, norm_weight, norm_eps), head_weight, head_bias)  # [N, V]

    return step


def fused_weights(groups: list[tuple[nn.Linear, ...]], transposed: bool = False) -> list[tuple[Tensor, Tensor | None]]:
    """Each group's weights as one `[sum(out), in]` matrix (a single linear's own weight, not a copy; several
    concatenated, a copy), or as one contiguous `[in, sum(out)]` copy `transposed`, and their concatenated
    bias (None when none has one, zeros where only some do).

    The copies are carved out of one zeroed block (`optim.mapped_zeros`: on CPU an anonymous mapping of
    its own) rather than allocated one by one: freed with the step, they go back to the system whole
    instead of leaving ~0.5 GiB of free heap (SmolLM2-135M, transposed) between the training step's blocks.
    """
    copied = [transposed or len(group) > 1 for group in groups]
    first = groups[0][0].weight  # one dtype and device: `model_unsupported_reason`
    size = sum(linear.weight.numel() for group, copy in zip(groups, copied) if copy for linear in group)
    block = mapped_zeros(size, first.dtype, first.device)
    fused, offset = [], 0
    for group, copy in zip(groups, copied):
        if copy:
            rows, columns = sum(linear.out_features for linear in group), group[0].in_features
            weight, offset = block[offset : offset + rows * columns], offset + rows * columns
            weight = weight.view(columns, rows) if transposed else weight.view(rows, columns)
            start = 0
            for linear in group:
                end, source = start + linear.out_features, linear.weight.detach()
                if transposed:
                    weight[:, start:end].copy_(source.t())
                else:
                    weight[start:end].copy_(source)
                start = end
        else:
            weight = group[0].weight.detach()
        fused.append((weight, fused_bias(group)))
    return fused


def packed_weights(groups: list[tuple[nn.Linear, ...]], rows: int) -> list[tuple[Tensor, Tensor | None]]:
    """Each group's weights concatenated (`fused_weights`' `[sum(out), in]`) and packed for oneDNN products at about
    ``rows`` rows (`cpu_matmul.pack_nt`), and their concatenated bias: the packed copies are the only ones kept."""
    packed = []
    for group in groups:
        weight = group[0].weight if len(group) == 1 else torch.cat([linear.weight.detach() for linear in group])
        packed.append((cpu_matmul.pack_nt(weight, rows), fused_bias(group)))
    return packed


def fused_bias(group: tuple[nn.Linear, ...]) -> Tensor | None:
    """The group's biases concatenated: None when none has one, zeros where only some do."""
    if all(linear.bias is None for linear in group):
        return None
    return torch.cat([linear.bias if linear.bias is not None else linear.weight.new_zeros(linear.out_features) for linear in group])


def _linear(x: Tensor, weight_t: Tensor, bias: Tensor | None) -> Tensor:
    """`F.linear(x, weight_t.T, bias)` for 2-D `x`."""
    return torch.mm(x, weight_t) if bias is None else torch.addmm(bias, x, weight_t)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """transformers' Llama/Qwen2 RMSNorm: normalised in float32, scaled in the input dtype."""
    dtype = x.dtype
    x32 = x if dtype == torch.float32 else x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x32 if dtype == torch.float32 else x32.to(dtype))


def rotary(position_ids: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin `[N, 1, D]` of the default rotary embedding, computed as transformers does."""
    freqs = position_ids[..., None].float() * inv_freq.float()  # [N, 1, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [N, 1, D]
    cos, sin = emb.cos(), emb.sin()
    if dtype != torch.float32:
        cos, sin = cos.to(dtype), sin.to(dtype)
    return cos, sin


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x · cos + rotate_half(x) · sin, rotate_half(x) = [-x2, x1]."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
