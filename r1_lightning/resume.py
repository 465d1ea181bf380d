"""Exact resume: every rank's random number generator states travel in the checkpoint.

Lightning checkpoints hold the weights, optimizer, LR schedule, loop progress, callbacks and
data-module state, but no RNG state: a resumed run would draw different dropout masks, samples
or shuffles than the uninterrupted one. Each module calls these two functions from its
``on_save_checkpoint`` / ``on_load_checkpoint``::

    save_rng_states(self, checkpoint)     # all ranks: gathered, rank 0 writes them
    load_resume_state(self, checkpoint)   # each rank restores its own; fixes an epoch-end checkpoint's loop progress

The states are plain tensors, ints and tuples, so the checkpoint still loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist

from r1_lightning.checkpoint import check_checkpoint_fits
from r1_lightning.data.tasks import ArithmeticTask
from r1_lightning.errors import ConfigError
from r1_lightning.policy import LoraSettings
from r1_lightning.modules.divergences import ForwardKL, GeneralizedJSD, ReverseKL

RNG_KEY = "r1_rng_states"

# Plain-data classes that end up in hyper-parameters when a module is built in Python (the CLI
# stores their YAML form instead): weights_only loads may rebuild them; unpickling one only sets
# its fields. A user's own class in hyper-parameters needs torch.serialization.add_safe_globals.
torch.serialization.add_safe_globals([LoraSettings, ArithmeticTask, ForwardKL, ReverseKL, GeneralizedJSD])


def rng_states() -> dict[str, Any]:
    """This process's RNG states: torch CPU (and CUDA), Python ``random`` and NumPy's global generator."""
    numpy_state = np.random.get_state(legacy=False)
    # The key array becomes a tensor: an ndarray would need unsafe globals to unpickle.
    key = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {**numpy_state, "state": {**numpy_state["state"], "key": key}},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what ``rng_states`` returned."""
    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = states["numpy"]
    key = numpy_state["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state({**numpy_state, "state": {**numpy_state["state"], "key": key}})
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_rng_states(module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
    """Put every rank's RNG states in ``checkpoint`` (a collective: call it on all ranks, as Lightning does)."""
    states = rng_states()
    if dist.is_available() and dist.is_initialized():
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, states)
    else:
        gathered = [states]
    checkpoint[RNG_KEY] = gathered  # [world_size], indexed by global rank


def load_rng_states(module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
    """Restore this rank's RNG states when ``fit`` resumes; ``ConfigError`` if the world size changed.

    Loading weights outside ``fit`` (``load_from_checkpoint``, ``validate``) leaves the RNG alone.
    An older checkpoint without the states resumes with the current RNG (not exactly).
    """
    trainer = module._trainer
    if trainer is None or trainer.state.fn != "fit" or RNG_KEY not in checkpoint:
        return
    saved = checkpoint[RNG_KEY]
    if len(saved) != trainer.world_size:
        raise ConfigError(
            f"ckpt_path={trainer.ckpt_path!r}: saved by {len(saved)} processes, and this run has {trainer.world_size}; "
            "the per-rank random states and data positions cannot be resumed exactly. Resume with the same number of "
            "devices × nodes"
        )
    set_rng_states(saved[trainer.global_rank])


def load_resume_state(module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
    """Everything a module's ``on_load_checkpoint`` does for an exact resume (before Lightning restores the loops).

    Puts the loop progress of a checkpoint saved at an epoch's end in the form a ``max_steps`` run
    resumes from correctly (``resume_epoch_end_as_last_batch``), then restores this rank's RNG states.
    First refuses a checkpoint of another module class or model shape (``check_checkpoint_fits``).
    """
    check_checkpoint_fits(module, checkpoint)
    trainer = module._trainer
    if trainer is not None and trainer.state.fn == "fit" and trainer.max_steps != -1:
        resume_epoch_end_as_last_batch(checkpoint)
    load_rng_states(module, checkpoint)


def resume_epoch_end_as_last_batch(checkpoint: dict[str, Any]) -> bool:
    """Rewrite the loop progress of a checkpoint saved in ``on_train_epoch_end`` to that of the epoch's last
    ``on_train_batch_end`` (in place); True if it was one.

    ``ModelCheckpoint`` saves at an epoch's end by default (and with ``every_n_epochs``) after
    Lightning has counted the epoch as processed but not completed. A run bounded by ``max_steps``
    always resumes "restarting", and Lightning 2.6 then closes that epoch a second time: it counts
    it processed again, runs a batch of the next epoch as part of it (without validation) or reruns
    its end hooks (with validation), and sets the samplers to one epoch too far, so the steps after
    the resume train on the epoch after the right one. (A run bounded by ``max_epochs`` resumes
    correctly; it is left alone.) At the last batch's ``on_train_batch_end`` the same training is
    done, and Lightning resumes from there into the next epoch's first batch: the batch is counted
    complete, the epoch processed and completed. What ran at the epoch's end (validation, epoch-end
    hooks) is in the checkpoint already and is not run again.
    """
    loop = checkpoint.get("loops", {}).get("fit_loop")
    if not loop or "epoch_progress" not in loop or "epoch_loop.batch_progress" not in loop:
        return False
    epochs, batch_progress = loop["epoch_progress"], loop["epoch_loop.batch_progress"]
    e, b = epochs["total"], batch_progress["total"]
    at_epoch_end = e["ready"] == e["started"] == e["processed"] == e["completed"] + 1  # inside on_train_epoch_end
    all_batches_done = b["ready"] == b["started"] == b["processed"] == b["completed"] > 0 and batch_progress["is_last_batch"]
    if not (at_epoch_end and all_batches_done):  # e.g. max_steps reached mid-epoch: left to Lightning
        return False
    for scope in ("total", "current"):
        epochs[scope]["processed"] -= 1  # counted just before on_train_epoch_end
        batch_progress[scope]["completed"] -= 1  # counted just after on_train_batch_end
    epoch_loop_state = loop.get("epoch_loop.state_dict", {})
    if "_batches_that_stepped" in epoch_loop_state:
        epoch_loop_state["_batches_that_stepped"] -= 1  # the logging step: counted after on_train_batch_end too
    return True
