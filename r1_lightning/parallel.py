"""Multi-device helpers: FSDP2 sharding of a causal LM, and loss normalisers that count over all ranks.

The modules run under Lightning's DDP (``strategy: ddp``), FSDP2 (``ModelParallelStrategy``) and
FSDP1 (``FSDPStrategy``), chosen in YAML.

- FSDP2: Lightning hands the module a device mesh and expects ``configure_model`` to shard.
  ``shard_for_strategy`` does that, once per model: ``fully_shard`` each decoder layer (the classes
  in the model's ``_no_split_modules``), then the root, whose unit keeps the embeddings, the final
  norm and the (tied) LM head. The root unit's parameters are gathered only inside a forward of the
  root module; our scoring code runs the transformer body and the LM head separately (the head is
  applied in chunks, never to ``[B, T, V]`` logits), so it goes through ``run_gathered``: a call
  registered as a forward method of the root unit (``register_fsdp_forward_method``), which gathers
  the root's parameters around it and hooks its outputs for the backward pass.
- FSDP1: Lightning wraps the whole LightningModule (``auto_wrap_policy``: the decoder-layer class)
  and runs each training/validation step inside the root unit's forward, so the root's weights are
  gathered throughout a step until its backward. Hence one backward pass per step
  (``check_backward_passes``), norm clipping through the root (``clip_grad_norm``), and gathered
  weights for the reference refresh and the export.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from r1_lightning.errors import ConfigError

T = TypeVar("T")
ROOT_CALL = "r1_run_gathered"  # the forward method registered on a sharded root unit
# `fsdp_param_dtype`'s values: the dtypes FSDP2 may gather weights in.
PARAM_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def decoder_layer_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The decoder-layer classes of a Hugging Face model: the units it must not be split inside."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(hf, "_no_split_modules", None) or [])
    classes = {type(m) for m in hf.modules() if type(m).__name__ in names}
    if not classes:
        raise ConfigError(
            f"{type(hf).__name__} names no decoder-layer class (_no_split_modules); FSDP cannot shard it layer by layer"
        )
    return classes


def data_parallel_mesh(module: nn.Module):
    """The 1-D data-parallel mesh of ``ModelParallelStrategy``, or None under any other strategy.

    Raises:
        ConfigError: for a tensor-parallel dimension > 1: the modules shard (FSDP2) only, and the
            sampler splits batches over the data-parallel ranks alone.
    """
    mesh = getattr(module, "_device_mesh", None)  # set by ModelParallelStrategy before configure_model
    if mesh is None:
        return None
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ConfigError(
            f"ModelParallelStrategy: tensor_parallel_size={mesh['tensor_parallel'].size()} is not supported; r1-lightning "
            "shards with FSDP2 over data-parallel ranks only: set data_parallel_size to the number of processes "
            "(devices x num_nodes) and tensor_parallel_size: 1"
        )
    return mesh["data_parallel"] if "data_parallel" in names else mesh


def shard_for_strategy(module: nn.Module, model: nn.Module | None, param_dtype: str | None = None) -> nn.Module | None:
    """FSDP2-shard ``model`` when ``module`` runs under ``ModelParallelStrategy``; otherwise return it as is.

    Call it at the end of ``configure_model`` for the policy and for every frozen model (reference,
    teacher): they are sharded the same way, so each rank holds 1/N of every model.

    Args:
        module: The LightningModule (its device mesh tells whether to shard).
        model: A Hugging Face causal LM built on this rank (None passes through).
        param_dtype: ``bfloat16``/``float16``/``float32``: dtype in which FSDP2 gathers the weights
            and computes (mixed precision: the sharded weights and the optimizer stay in their own
            dtype, gradients are reduced in float32). None: the weights' own dtype.
    """
    mesh = data_parallel_mesh(module)
    if mesh is None or model is None:
        return model
    if hasattr(model, "get_base_model"):
        raise ConfigError("lora with ModelParallelStrategy (FSDP2) is not supported; train LoRA adapters with strategy: ddp")
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if isinstance(model, FSDPModule):
        return model
    policy = MixedPrecisionPolicy()
    if param_dtype is not None:
        if param_dtype not in PARAM_DTYPES:
            raise ConfigError(f"fsdp_param_dtype={param_dtype!r}: choose one of {', '.join(PARAM_DTYPES)}")
        policy = MixedPrecisionPolicy(param_dtype=PARAM_DTYPES[param_dtype], reduce_dtype=torch.float32)
    layer_classes = tuple(decoder_layer_classes(model))
    for layer in [m for m in model.modules() if isinstance(m, layer_classes)]:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    # The root unit (embeddings, final norm, tied LM head) of a trained model stays gathered from its forward
    # to its backward; a frozen model has no backward, so it frees the root's gathered weights after each use.
    frozen = not any(p.requires_grad for p in model.parameters())
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=True if frozen else None)
    setattr(model, ROOT_CALL, _call.__get__(model))
    register_fsdp_forward_method(model, ROOT_CALL)
    return model


def _call(self: nn.Module, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return fn(*args, **kwargs)


def run_gathered(model: nn.Module, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` with the root FSDP2 unit of ``model`` gathered (as in its forward); a plain call otherwise.

    Needed wherever code touches root-unit parameters (embeddings, final norm, LM head) outside
    ``model.forward``: calling the transformer body and then the head weight directly.
    """
    method = getattr(model, ROOT_CALL, None)
    return fn(*args, **kwargs) if method is None else method(fn, *args, **kwargs)


def global_normalizer(count: torch.Tensor | float) -> torch.Tensor | float:
    """A loss denominator summed over all ranks and divided by their number.

    DDP and FSDP average gradients over ranks, so a rank's ``sum of its terms / global_normalizer``
    gives, after averaging, ``sum of all terms / sum of all counts``: the loss of one process
    holding the whole global batch. A rank's value of the loss is then its share times the
    number of ranks; the mean over ranks (``sync_dist``) is the global loss. Without a process
    group the count is returned unchanged.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return count
    device = count.device if isinstance(count, torch.Tensor) else _collective_device()
    total = torch.as_tensor(count, dtype=torch.float64, device=device).clone()  # float64: exact counts
    dist.all_reduce(total)
    return (total / dist.get_world_size()).float()


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _fsdp1_root(module) -> nn.Module | None:
    """The ``FullyShardedDataParallel`` root Lightning's ``FSDPStrategy`` wrapped around ``module``, if any."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    trainer = getattr(module, "_trainer", None)
    root = getattr(trainer.strategy, "model", None) if trainer is not None else None
    return root if isinstance(root, FullyShardedDataParallel) else None


def clip_grad_norm(module, optimizer, max_norm: float) -> None:
    """Clip gradients by their global norm under any strategy (a manual-optimization module's ``clip_gradients``).

    Under FSDP1 Lightning refuses norm clipping (``torch.nn.utils.clip_grad_norm_`` would see only
    local shards); the root's own ``clip_grad_norm_`` computes the norm over all shards.
    """
    root = _fsdp1_root(module)
    if root is not None:
        root.clip_grad_norm_(max_norm)
    else:
        module.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")


def check_backward_passes(module, passes: int) -> None:
    """Under FSDP1 a training step may run one backward pass: the first one frees the gathered root unit
    (embeddings, LM head) that the step's later forwards would need.

    Raises:
        ConfigError: for ``passes`` > 1 under ``FSDPStrategy``.
    """
    if passes > 1 and _fsdp1_root(module) is not None:
        raise ConfigError(
            f"FSDPStrategy (FSDP1) allows one backward pass per training step, this configuration takes {passes} "
            "(num_iterations, mini_batch_size, micro_batch_size): use ModelParallelStrategy (FSDP2) or DDP, or one update per batch"
        )


def is_sharded(module) -> bool:
    """Whether ``module`` runs under FSDP2 (``ModelParallelStrategy``) or FSDP1 (``FSDPStrategy``)."""
    return getattr(module, "_device_mesh", None) is not None or _fsdp1_root(module) is not None
