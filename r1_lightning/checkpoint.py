"""Checkpoints that are never half-written, loaded without running code, and resumed from the newest complete one.

Lightning's ``TorchCheckpointIO`` serialises into memory and writes through an fsspec
transaction: on a local disk that is a temporary file in the system temp directory moved into
place with ``shutil.move``, which falls back to a plain copy when ``/tmp`` is another file system
(so a kill mid-copy leaves a truncated ``.ckpt`` under its final name) and never fsyncs (so a
crash can leave a renamed but empty file). ``AtomicCheckpointIO`` writes next to the target,
fsyncs, and renames with ``os.replace``; ``resolve_checkpoint`` turns ``ckpt_path: last`` into
the newest checkpoint that loads, skipping broken ones.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from r1_lightning.errors import ConfigError

SHARDED_INDEX, SHARDED_STATE = ".metadata", "meta.pt"  # what a complete sharded checkpoint directory holds


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes atomically on local disks and always loads with ``weights_only=True``.

    A save goes to ``.<name>.tmp-<pid>`` in the target directory, is fsynced, renamed over the
    target with ``os.replace`` and the directory fsynced: a reader (or a resume after a kill)
    sees the previous complete file or the new complete file, never a partial one. Remote paths
    (``s3://`` ...) use Lightning's writer. Loading refuses pickled code (see ``load_checkpoint_file``).
    ``r1-lightning fit`` uses it unless the config names another ``CheckpointIO`` plugin.

    Example:
        >>> trainer = L.Trainer(plugins=[AtomicCheckpointIO()])
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_save(checkpoint, Path(path))

    @override
    def load_checkpoint(
        self, path: Any, map_location: Any = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return load_checkpoint_file(path, map_location)  # weights_only=True, whatever the caller asks


def atomic_save(checkpoint: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, ``os.replace``, fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            torch.save(checkpoint, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # makes the rename itself durable
    finally:
        os.close(directory)


def load_checkpoint_file(path: Any, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``, with one ``ConfigError`` naming the file for every way it can fail.

    ``weights_only`` unpickles only tensors and plain Python values: a file whose pickle would
    import a function or build an arbitrary object is refused before anything runs.
    """
    if not _is_local(path):
        from lightning.fabric.utilities.cloud_io import _load

        return _load(path, map_location=map_location, weights_only=True)
    where = f"ckpt_path={str(path)!r}"
    if not os.path.exists(path):
        raise ConfigError(f"{where}: no such file")
    if os.path.isdir(path):
        return _sharded_metadata(Path(path), where)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL [\w.]+", str(error))
        detail = found.group(0) if found else str(error).splitlines()[0]
        raise ConfigError(
            f"{where}: refused to load: it holds objects other than tensors and plain values ({detail}). Checkpoints "
            "load with weights_only=True so that a file cannot run code; if you trust it and it holds your own "
            "classes, register them with torch.serialization.add_safe_globals"
        ) from error
    except PermissionError as error:
        raise ConfigError(f"{where}: cannot be read ({error.strerror})") from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"{where}: not a complete PyTorch checkpoint (truncated or corrupt?): {first_line}") from error


def _sharded_metadata(path: Path, where: str) -> dict[str, Any]:
    """The trainer state of a sharded (FSDP / ModelParallel) checkpoint directory, if it is complete.

    Lightning writes the shards and their index (``.metadata``, last, by torch.distributed.checkpoint)
    and the trainer state (``meta.pt``); the weights themselves are loaded by the strategy.
    """
    if not (path / SHARDED_INDEX).is_file() or not (path / SHARDED_STATE).is_file():
        raise ConfigError(
            f"{where}: a directory but not a complete sharded checkpoint (it needs {SHARDED_INDEX} and {SHARDED_STATE})"
        )
    return load_checkpoint_file(path / SHARDED_STATE, mmap=True)


def resolve_checkpoint(trainer: L.Trainer, ckpt_path: str | None) -> str | None:
    """The checkpoint ``fit(ckpt_path=...)`` should load, checked; logs which one and its step.

    ``last`` is the most recently written ``*.ckpt`` in the ``ModelCheckpoint`` directories that
    loads (a broken one is skipped with a warning), not only ``last.ckpt``. ``best`` and ``hpc``
    go to Lightning unchanged.

    Raises:
        ConfigError: the file is missing, unreadable or corrupt, or ``last`` finds no complete checkpoint.
    """
    if ckpt_path is None or ckpt_path in ("best", "hpc"):
        return ckpt_path
    if ckpt_path != "last":
        return _announce(str(ckpt_path), load_checkpoint_file(ckpt_path, mmap=_is_local(ckpt_path)))
    directories = checkpoint_directories(trainer)
    if not directories:
        raise ConfigError(
            "ckpt_path='last' needs checkpoints: the trainer has no ModelCheckpoint callback (enable_checkpointing is off)"
        )
    candidates = [p for d in directories if os.path.isdir(d) for p in Path(d).glob("*.ckpt")]  # files, or sharded directories
    for path in sorted(candidates, key=lambda p: p.stat().st_mtime_ns, reverse=True):
        try:
            return _announce(str(path), load_checkpoint_file(path, mmap=True))
        except ConfigError as error:
            rank_zero_warn(f"skipping a checkpoint that does not load: {error}")
    raise ConfigError(
        f"ckpt_path='last': no complete checkpoint in {', '.join(map(str, directories))} "
        "(nothing saved yet? the first run starts without ckpt_path)"
    )


def checkpoint_directories(trainer: L.Trainer) -> list[str]:
    """Where the trainer's ``ModelCheckpoint`` callbacks write (their ``dirpath``, or Lightning's default rule)."""
    directories = []
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint):
            directories.append(str(callback.dirpath) if callback.dirpath is not None else _default_directory(trainer))
    return list(dict.fromkeys(directories))


def _default_directory(trainer: L.Trainer) -> str:
    # ModelCheckpoint's rule when it has no dirpath: <save_dir>/<name>/<version>/checkpoints of the
    # first logger, else <default_root_dir>/checkpoints.
    if trainer.loggers:
        logger = trainer.loggers[0]
        version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
        return os.path.join(logger.save_dir or trainer.default_root_dir, str(logger.name), version, "checkpoints")
    return os.path.join(trainer.default_root_dir, "checkpoints")


def _announce(path: str, checkpoint: dict[str, Any]) -> str:
    step, epoch = checkpoint.get("global_step"), checkpoint.get("epoch")
    rank_zero_info(f"Resuming from {path} (global step {step}, epoch {epoch})")
    return path


def _is_local(path: Any) -> bool:
    return type(get_filesystem(path)).__name__ == "LocalFileSystem"
