"""Outputs that are either the old complete version or the new complete version, never a mix.

Every output a user or the next stage reads (``hf_model/``, ``stage.json``, ``results.csv``,
``accepted.jsonl``) is written to a temporary sibling named ``.<name>.tmp-<pid>``, fsynced, and
renamed over the target, then the parent directory is fsynced so the rename itself survives a
crash. A directory cannot be renamed over a non-empty one, so ``replace_directory`` first moves
the old version aside to ``.<name>.old-<pid>``; a kill between the two renames leaves the old
version there, and ``remove_stray_temporaries`` (run before the next write) puts it back.

Example:
    >>> write_text_atomic(Path("runs/x/stage.json"), '{"stage": "sft"}')
    >>> with directory_writer(Path("runs/x/hf_model")) as tmp:
    ...     model.save_pretrained(tmp)
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

_STRAY = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)$")


def temporary_sibling(path: Path, kind: str = "tmp") -> Path:
    """``.<name>.<kind>-<pid>`` beside ``path``: hidden, and named after the process that owns it."""
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


def fsync_directory(path: Path) -> None:
    """Make the entries of ``path`` (a rename into it) durable."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


@contextmanager
def file_writer(path: Path) -> Iterator[BinaryIO]:
    """Yield a binary handle on a temporary sibling of ``path``; on success it replaces ``path``.

    The handle is flushed and fsynced, renamed over ``path`` with ``os.replace`` and the parent
    directory fsynced. If the body raises, the temporary file is removed and ``path`` is untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_sibling(path)
    try:
        with open(temporary, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling, fsync, ``os.replace``."""
    with file_writer(path) as handle:
        handle.write(data)


def write_text_atomic(path: Path, text: str) -> None:
    """``write_bytes_atomic`` of ``text`` in UTF-8."""
    write_bytes_atomic(path, text.encode("utf-8"))


@contextmanager
def directory_writer(target: Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``target``; on success it replaces ``target`` whole.

    Whatever the body writes is fsynced, then ``replace_directory`` swaps it in. If the body
    raises (disk full, a file-size limit, a bug), the temporary directory is removed and
    ``target`` is left exactly as it was.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stray_temporaries(target.parent)
    temporary = temporary_sibling(target)
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        yield temporary
        _fsync_tree(temporary)
        replace_directory(temporary, target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def replace_directory(source: Path, target: Path) -> None:
    """Rename the complete directory ``source`` to ``target``, replacing an existing ``target``."""
    old = None
    if target.exists() or target.is_symlink():
        old = temporary_sibling(target, "old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(source, target)
    fsync_directory(target.parent)
    if old is None:
        return
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


def remove_stray_temporaries(directory: Path) -> list[Path]:
    """Clean up after saves that were killed mid-way in ``directory`` (not below it); returns what was removed.

    ``.<name>.tmp-<pid>`` files and directories of processes that are gone are deleted. A
    ``.<name>.old-<pid>`` (an old version moved aside just before a kill) is renamed back to
    ``<name>`` when ``<name>`` is missing, else deleted. Entries of live processes other than
    this one are left alone: they may be writing right now.
    """
    removed = []
    if not directory.is_dir():
        return removed
    for entry in sorted(directory.iterdir()):
        match = _STRAY.match(entry.name)
        if match is None or _alive(int(match["pid"])):
            continue
        final = directory / match["name"]
        if match["kind"] == "old" and not (final.exists() or final.is_symlink()):
            os.replace(entry, final)
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftover from an earlier, failed write
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(directory, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_directory(Path(directory))
