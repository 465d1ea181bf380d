"""A training sampler that resumes mid-epoch: same order, no sample skipped or repeated.

Lightning restores a loader's position only for a "stateful" loader, and then only when the
loader is built after the checkpoint is restored: not in an epoch-based run whose
``configure_optimizers`` asks for ``trainer.estimated_stepping_batches`` (every module here
does), nor under strategies that restore after setup (FSDP, ModelParallel, DeepSpeed). So the
data modules keep the position themselves: the sampler counts the batches the training loop
actually received (not the ones Lightning prefetched), the data module's ``state_dict`` saves
that count, and the next ``train_dataloader()`` starts after it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

from r1_lightning.errors import ConfigError


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (per-epoch shuffle seeded by ``seed + epoch``, rank ``r`` takes every
    ``W``-th index) that skips the batches a checkpoint says were already trained on.

    Being a ``DistributedSampler``, Lightning uses it as it is under DDP instead of wrapping it,
    and calls ``set_epoch`` at every epoch start.

    Args:
        dataset: The training examples (only the length is used).
        batch_size: Samples per batch on this rank: the unit of ``consumed``.
        shuffle: Shuffle every epoch (deterministically) or keep the dataset order.
        seed: Seed of the shuffle; epoch ``e`` uses ``seed + e``.
        num_replicas: World size W.
        rank: This process's global rank.

    Example:
        >>> sampler = ResumableSampler(range(10), batch_size=2, shuffle=True, seed=0)
        >>> sampler.load_state_dict({"epoch": 0, "consumed": 3})  # 3 batches were trained on
        >>> len(list(sampler))
        4
    """

    def __init__(self, dataset: Sized, batch_size: int, shuffle: bool, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.batch_size = batch_size
        self.consumed = 0  # batches of the current epoch the training loop has received

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())  # [num_samples] of this rank for self.epoch
        if self.consumed * self.batch_size >= len(indices) > 0:
            # Saved after the epoch's last batch: the uninterrupted run's next sample is the next epoch's first.
            self.set_epoch(self.epoch + 1)
            indices = list(super().__iter__())
        yield from indices[self.consumed * self.batch_size :]

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.consumed = 0
        super().set_epoch(epoch)

    def batch_done(self) -> None:
        """Count one batch received by the training loop (prefetched batches are not counted)."""
        self.consumed += 1

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])


def run_seed(seed: int | None) -> int:
    """``seed``, or the run's seed (``seed_everything`` sets ``PL_GLOBAL_SEED``), or 0."""
    return int(seed if seed is not None else os.environ.get("PL_GLOBAL_SEED", 0))


def resumable_train_loader(
    dataset: Any, batch_size: int, shuffle: bool, seed: int, trainer: Any, collate_fn, num_workers: int, pending: dict | None
) -> DataLoader:
    """A training ``DataLoader`` over ``dataset`` with a ``ResumableSampler`` for this rank.

    ``pending`` is a position from ``position_state`` restored from a checkpoint (or ``None``).
    The loader's own generator (not the global one) seeds its iterators, so creating one does not
    move the global torch RNG that a resumed run restores.
    """
    world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    sampler = ResumableSampler(dataset, batch_size, shuffle, seed, num_replicas=world, rank=rank)
    if pending is not None:
        sampler.load_state_dict(pending)
    generator = torch.Generator().manual_seed(seed)
    return ResumableLoader(
        dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn, num_workers=num_workers, generator=generator
    )


class ResumableLoader(DataLoader):
    """A ``DataLoader`` whose position is its ``ResumableSampler``'s: Lightning sees it as resumable
    (and saves/restores that position too, where its own mechanism works)."""

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)


def position_state(sampler: ResumableSampler | None, num_examples: int, world_size: int) -> dict[str, int]:
    """What a data module's ``state_dict`` saves: the sampler's position and what it depends on."""
    state = sampler.state_dict() if sampler is not None else {"epoch": 0, "consumed": 0}
    return {**state, "num_examples": num_examples, "world_size": world_size}


def check_position(state: dict[str, int], num_examples: int | None, world_size: int, source: str) -> dict[str, int] | None:
    """The saved position, if it means the same samples now; ``ConfigError`` naming ``source`` otherwise.

    ``num_examples`` is ``None`` when the data is not loaded yet. A checkpoint without a position
    (written before data modules saved one) gives ``None``: the epoch restarts, as Lightning does.
    """
    if not state:
        return None
    if state["world_size"] != world_size:
        raise ConfigError(
            f"{source}: the checkpoint was saved by {state['world_size']} processes and this run has {world_size}: "
            f"the data position cannot be resumed exactly. Resume with {state['world_size']} devices × nodes"
        )
    if num_examples is not None and state["num_examples"] != num_examples:
        raise ConfigError(
            f"{source}: the checkpoint was saved with {state['num_examples']} training examples and the data now has "
            f"{num_examples}: the data position cannot be resumed. Resume with the same data"
        )
    return {"epoch": state["epoch"], "consumed": state["consumed"]}


def count_training_batch(sampler: ResumableSampler | None, trainer: Any) -> None:
    """Called by a data module for each batch on its way to a step: count it if it is a training batch.

    Also repairs Lightning's epoch bookkeeping after a resume at an epoch's end: Lightning 2.6
    closes the saved epoch but does not mark the next one ready/started, so a checkpoint taken
    during it records the epoch as never started and the next resume runs it a second time.
    (A ``max_steps`` run resumed from an epoch-end checkpoint takes this path too: the modules'
    ``on_load_checkpoint`` turns its progress into the last batch's, ``r1_lightning.resume.load_resume_state``.)
    """
    if sampler is None or trainer is None or not trainer.training:
        return
    sampler.batch_done()
    progress = trainer.fit_loop.epoch_progress
    if progress.total.started == progress.total.processed:  # a training batch outside any started epoch
        progress.increment_ready()
        progress.increment_started()


def forget_stale_train_loader(trainer: Any) -> None:
    """Make fit rebuild the training loader after a late restore.

    Strategies that restore the checkpoint after setting up (FSDP, ModelParallel, DeepSpeed) have
    already built and prefetched from the training loader when ``configure_optimizers`` asked for
    ``estimated_stepping_batches``; that iterator started at the old position.
    """
    fit_loop = getattr(trainer, "fit_loop", None)
    if fit_loop is not None and getattr(fit_loop, "_combined_loader", None) is not None:
        fit_loop._combined_loader = None


class TrainPosition:
    """A data module's training position: the live sampler, and a position restored from a checkpoint
    that the next ``loader`` starts from. The data modules delegate their resume hooks to it.

    Example:
        >>> self.position = TrainPosition()                                   # __init__
        >>> return self.position.loader(examples, 16, True, 0, self.trainer, collate, 0)  # train_dataloader
    """

    def __init__(self) -> None:
        self.sampler: ResumableSampler | None = None
        self.pending: dict[str, int] | None = None

    def loader(self, dataset: Any, batch_size: int, shuffle: bool, seed: int, trainer: Any, collate_fn, num_workers: int) -> DataLoader:
        loader = resumable_train_loader(dataset, batch_size, shuffle, seed, trainer, collate_fn, num_workers, self.pending)
        self.sampler, self.pending = loader.sampler, None
        return loader

    def count_batch(self, trainer: Any) -> None:
        count_training_batch(self.sampler, trainer)

    def state_dict(self, trainer: Any, num_examples: int) -> dict[str, int]:
        return position_state(self.sampler, num_examples, _world_size(trainer))

    def load_state_dict(self, state: dict[str, int], trainer: Any, num_examples: int | None, source: str) -> None:
        self.pending = check_position(state, num_examples, _world_size(trainer), source)
        forget_stale_train_loader(trainer)


def _world_size(trainer: Any) -> int:
    return trainer.world_size if trainer is not None else 1
