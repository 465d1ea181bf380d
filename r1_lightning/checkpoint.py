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
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from r1_lightning.atomic import file_writer, remove_stray_temporaries
from r1_lightning.errors import ConfigError
from r1_lightning.parallel import is_sharded

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
    """``torch.save`` to a temporary file beside ``path``, fsync, ``os.replace``, fsync the directory.

    Temporaries left beside it by saves that were killed mid-write (their process is gone) are
    removed first, so a preempted run's directory does not keep a stray copy per kill.
    """
    remove_stray_temporaries(path.parent)
    with file_writer(path) as handle:
        torch.save(checkpoint, handle)


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


def require_lightning_checkpoint(path: Any, checkpoint: Any) -> None:
    """Refuse a file that loads but is not a Lightning checkpoint (weights and a version), in one line."""
    if os.path.isdir(str(path)):
        return  # a sharded checkpoint: checked by ``_sharded_metadata``
    keys = list(checkpoint) if isinstance(checkpoint, dict) else []
    if not {"pytorch-lightning_version", "state_dict"} <= set(keys):
        held = ", ".join(map(str, keys[:6])) or type(checkpoint).__name__
        raise ConfigError(f"ckpt_path={str(path)!r}: not a Lightning checkpoint (it holds {held}; no state_dict and version)")


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


def check_checkpoint_fits(module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
    """Refuse a checkpoint of another module class or with weights of other names or shapes, in one line.

    Called before Lightning loads the weights (from ``on_load_checkpoint``, via ``load_resume_state``).
    The checkpoint's class is only read as a name, never imported. Its hyper-parameters never replace
    the run's (``r1-lightning`` does not merge them into the config); where they differ, one line says
    which the run uses.

    Raises:
        ConfigError: what the checkpoint holds and what the run's module asks for.
    """
    trainer = module._trainer
    where = f"ckpt_path={str(trainer.ckpt_path)!r}" if trainer is not None and trainer.ckpt_path else "the checkpoint"
    saved = checkpoint.get("hyper_parameters") or {}
    saved_class = saved.get("_class_path") if isinstance(saved, dict) else None
    ours = type(module)
    if isinstance(saved_class, str) and saved_class.rsplit(".", 1)[-1] != ours.__name__:
        raise ConfigError(
            f"{where} holds a {saved_class} checkpoint, but the config asks for {ours.__module__}.{ours.__name__}: "
            "resume a run with the module class that saved it"
        )
    if "state_dict" in checkpoint and not is_sharded(module):  # sharded weights are loaded (and checked) by the strategy
        problem = state_dict_mismatch(checkpoint["state_dict"], module.state_dict(), strict=module.strict_loading)
        if problem is not None:
            raise ConfigError(f"{where}: {problem}; a checkpoint of another model?")
    changed = hyperparameter_changes(saved, dict(module.hparams)) if isinstance(saved, dict) else []
    if changed:
        rank_zero_info(f"{where}: the config's values are used, not the checkpoint's: {'; '.join(changed)}")


def state_dict_mismatch(saved: dict[str, Any], expected: dict[str, Any], strict: bool = True) -> str | None:
    """What keeps ``saved`` from loading into a module whose state dict is ``expected``, or None.

    A shared name of another shape always does; missing or extra names only when ``strict``
    (as ``load_state_dict`` and Lightning's ``strict_loading``).

    >>> state_dict_mismatch({"w": torch.zeros(2, 3)}, {"w": torch.zeros(2, 4)})
    "it holds w of shape [2, 3], the config's model has [2, 4]"
    """
    for name, tensor in expected.items():
        if name in saved and list(getattr(tensor, "shape", [])) != list(getattr(saved[name], "shape", [])):
            return f"it holds {name} of shape {list(saved[name].shape)}, the config's model has {list(tensor.shape)}"
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    if strict and (missing or unexpected):
        parts = [f"{len(missing)} weight(s) of the config's model are missing (e.g. {missing[0]})"] if missing else []
        if unexpected:
            parts.append(f"it holds {len(unexpected)} weight(s) the config's model does not have (e.g. {unexpected[0]})")
        return "; ".join(parts)
    return None


def hyperparameter_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``name: checkpoint X, config Y`` for every plain-valued hyper-parameter that differs."""
    plain = (str, int, float, bool, type(None))
    return [
        f"{name}: checkpoint {saved[name]!r}, config {value!r}"
        for name, value in current.items()
        if name in saved and isinstance(value, plain) and isinstance(saved[name], plain) and saved[name] != value
    ]


class ConfigOverCheckpoint(Callback):
    """On resume, put the config's optimizer settings back over the ones the checkpoint restored.

    Lightning restores each optimizer's ``param_groups`` (learning rate, weight decay, betas ...) and each
    scheduler's ``base_lrs`` from the checkpoint, so ``--model.learning_rate 0.5 --ckpt_path FILE`` would
    train at the checkpoint's rate. This callback keeps what ``configure_optimizers`` built from the config
    (``on_fit_start``, before the restore) and reinstates it after the restore (``on_train_start``), keeping
    the schedule's position: the current rate is scaled by config base / checkpoint base.
    ``r1-lightning fit`` adds it.

    Example:
        >>> trainer = L.Trainer(callbacks=[ConfigOverCheckpoint()])
    """

    def __init__(self) -> None:
        self._groups: list[list[dict[str, Any]]] = []

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._groups = [[{k: v for k, v in g.items() if k != "params"} for g in o.param_groups] for o in trainer.optimizers]

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.ckpt_path or len(self._groups) != len(trainer.optimizers):
            return
        schedulers = {id(c.scheduler.optimizer): c.scheduler for c in trainer.lr_scheduler_configs}
        for optimizer, fresh_groups in zip(trainer.optimizers, self._groups):
            scheduler = schedulers.get(id(optimizer))
            restored_bases = list(getattr(scheduler, "base_lrs", [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]))
            for i, (group, fresh) in enumerate(zip(optimizer.param_groups, fresh_groups)):
                base = fresh.get("initial_lr", fresh["lr"])
                if restored_bases[i] != base:
                    rank_zero_info(f"learning rate: the config's {base:g} replaces the checkpoint's {restored_bases[i]:g}")
                    group["lr"] = group["lr"] * base / restored_bases[i] if restored_bases[i] else base
                group.update({k: v for k, v in fresh.items() if k != "lr"})
            if scheduler is not None and hasattr(scheduler, "base_lrs"):
                scheduler.base_lrs = [g.get("initial_lr", g["lr"]) for g in fresh_groups]
                scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]  # what get_last_lr() reports (and is logged)


class FreshRunCheck(Callback):
    """Refuse a fit without ``ckpt_path`` whose checkpoint directory holds an earlier run's checkpoints.

    With a fixed log directory (``version: latest``) a second fit would otherwise write its checkpoints
    among the earlier run's, and a later ``--ckpt_path last`` could pick either. Checked in ``setup``
    (after the data module's own checks, before the config is saved and the model loads).
    ``r1-lightning fit`` adds it and sets ``resuming`` from ``--ckpt_path``.

    Args:
        resuming: The fit resumes a checkpoint (``ckpt_path`` given): nothing to check.
    """

    def __init__(self, resuming: bool = False) -> None:
        self.resuming = resuming

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.resuming:
            return
        found = earlier_checkpoints(trainer)
        if found:
            raise ConfigError(
                f"{found[0].parent} holds checkpoints of an earlier run ({', '.join(p.name for p in found[:3])}"
                f"{', ...' if len(found) > 3 else ''}): resume it with --ckpt_path last, or start this run in another "
                "directory (another logger version or ModelCheckpoint dirpath) or clear that one"
            )


def earlier_checkpoints(trainer: L.Trainer) -> list[Path]:
    """The ``*.ckpt`` files (or sharded directories) already in the trainer's checkpoint directories, newest first."""
    found = [p for d in checkpoint_directories(trainer) if os.path.isdir(d) for p in Path(d).glob("*.ckpt")]
    return sorted(found, key=lambda p: p.stat().st_mtime_ns, reverse=True)
