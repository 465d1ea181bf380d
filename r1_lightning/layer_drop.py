"""A smaller student with the same tokenizer: a copy of a model that keeps only some of its decoder layers.

Distillation needs a student that shares the teacher's vocabulary; the cheapest one is the
teacher's own family with most decoder layers removed (as DistilBERT took every second layer of
BERT). Embeddings, final norm, LM head and the kept layers are copied exactly; the kept layers are
renumbered 0..n-1 in their original order. The tokenizer and generation config (EOS ids) are
the parent's.

    from r1_lightning.layer_drop import write_layer_dropped_copy
    write_layer_dropped_copy("builtin:smollm2-135m-instruct", [0, 1, 2, 3, 4, 5, 6, 27, 28, 29], Path("student"))

In a recipe (``r1_lightning.recipe``), a stage with ``command: drop_layers`` does the same and
writes ``<output_dir>/<name>/hf_model/``::

    - name: student
      command: drop_layers
      model: builtin:smollm2-135m-instruct     # or model_from: <an earlier stage>
      keep_layers: [0, 1, 2, 3, 4, 5, 6, 27, 28, 29]
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from r1_lightning.errors import ConfigError
from r1_lightning.export import save_hf_directory
from r1_lightning.policy import load_model, load_tokenizer


def check_keep_layers(keep_layers: Any, num_layers: int | None = None, option: str = "keep_layers", parent: str = "") -> list[int]:
    """``keep_layers`` as a list of layer indices: non-empty, integers, strictly increasing, within ``num_layers``.

    Args:
        keep_layers: The indices (0-based) of the parent's decoder layers to keep.
        num_layers: The parent's layer count; None checks only what needs no model.
        option: The option's name for messages (a recipe passes ``stage 'x': keep_layers``).
        parent: The parent model's name, for messages.

    Raises:
        ConfigError: one line naming ``option`` and what is wrong.
    """
    where = f"{option}={keep_layers!r}"
    if not isinstance(keep_layers, (list, tuple)) or not keep_layers:
        raise ConfigError(f"{where}: give a non-empty list of decoder layer indices to keep, e.g. [0, 1, 2, 27, 28, 29]")
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in keep_layers):
        raise ConfigError(f"{where}: layer indices are integers >= 0 (0 is the layer next to the embeddings)")
    if any(b <= a for a, b in zip(keep_layers, keep_layers[1:])):
        raise ConfigError(f"{where}: list each layer once, in increasing order (the kept layers keep their order)")
    if num_layers is not None:
        of = f"{parent} has" if parent else "the model has"
        if keep_layers[-1] >= num_layers:
            raise ConfigError(f"{where}: layer {keep_layers[-1]} does not exist: {of} {num_layers} decoder layers (0-{num_layers - 1})")
        if len(keep_layers) == num_layers:
            raise ConfigError(f"{where}: keeps all {num_layers} layers: {of} no layer to drop; leave at least one out")
    return list(keep_layers)


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The state-dict prefix (``model.layers.``) and the list of decoder layers of a Hugging Face causal LM."""
    prefix = model.base_model_prefix
    layers = getattr(getattr(model, prefix, None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) != getattr(model.config, "num_hidden_layers", None):
        raise ConfigError(
            f"{type(model).__name__}: dropping layers needs the decoder layers at model.{prefix}.layers "
            "(Llama, Qwen, Mistral, SmolLM and most decoder-only models)"
        )
    return f"{prefix}.layers.", layers


def layer_dropped_model(model: torch.nn.Module, keep_layers: list[int], option: str = "keep_layers", parent: str = "") -> torch.nn.Module:
    """A new model of ``model``'s class with only ``keep_layers``, renumbered 0..n-1, every kept weight copied exactly.

    Per-layer lists in the config (``layer_types``) are cut to the kept layers; the generation config is copied.
    """
    prefix, layers = decoder_layers(model)
    keep = check_keep_layers(keep_layers, len(layers), option, parent)
    config = copy.deepcopy(model.config)
    for key, value in model.config.to_dict().items():
        if isinstance(value, list) and len(value) == len(layers):  # one entry per layer, e.g. layer_types
            setattr(config, key, [value[i] for i in keep])
    config.num_hidden_layers = len(keep)
    new_index = {old: new for new, old in enumerate(keep)}
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if not name.startswith(prefix):
            state[name] = tensor
            continue
        index, rest = name[len(prefix):].split(".", 1)
        if int(index) in new_index:
            state[f"{prefix}{new_index[int(index)]}.{rest}"] = tensor
    dtype = next(model.parameters()).dtype
    student = AutoModelForCausalLM.from_config(config, dtype=dtype)
    student.load_state_dict(state, strict=True)
    student.generation_config = copy.deepcopy(model.generation_config)
    return student


def write_layer_dropped_copy(
    parent: str, keep_layers: list[int], target: Path, option: str = "keep_layers", trust_remote_code: bool = False
) -> Path:
    """Write a copy of ``parent`` that keeps only ``keep_layers``, with the parent's tokenizer, to ``target``.

    Args:
        parent: Any ``model_name_or_path``: a Hugging Face directory, a hub id, a ``.gguf`` file, a ``builtin:`` name.
        keep_layers: Indices of the parent's decoder layers to keep, increasing (``check_keep_layers``).
        target: The directory to write (replaced atomically, like every ``hf_model/``).
        option: The option's name in error messages.
        trust_remote_code: Allow model code from the parent's directory.

    Returns:
        ``target``, a plain Hugging Face directory (``config.json``, safetensors, tokenizer, generation config).
    """
    check_keep_layers(keep_layers, option=option)
    tokenizer = load_tokenizer(parent, trust_remote_code)
    model = load_model(parent, vocab_size=len(tokenizer), trust_remote_code=trust_remote_code)
    student = layer_dropped_model(model, keep_layers, option, parent)
    save_hf_directory(Path(target), student, tokenizer)
    return Path(target)
