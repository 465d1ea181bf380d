"""Read rows from JSONL / JSON / Parquet / CSV files, a saved ``datasets`` directory or a hub dataset.

Every failure names what is wrong and where: the file and line of a malformed JSONL row, the
columns that do exist when one is missing, the source of an empty dataset.

Rows are named the same way everywhere: a JSONL row by its file and 1-based line, as
``data.jsonl:7`` (the form of the malformed-JSON errors and of editors; blank lines are
skipped, so line and row number can differ), any other row by its 1-based number, as
``path='data.parquet' row 3 (1-based)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import datasets

from r1_lightning.errors import UserError

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(UserError, ValueError):
    """Bad input data: the message names the file, line and column."""


class Rows(list):
    """Rows as plain Python dicts, plus the column names (JSON values are kept exactly as written:
    no Arrow type unification turns 1 into 1.0 or adds missing dict keys)."""

    def __init__(
        self, rows: list[dict], column_names: list[str] | None = None, path: Path | None = None, lines: list[int] | None = None
    ) -> None:
        super().__init__(rows)
        self.column_names = column_names if column_names is not None else list(dict.fromkeys(k for row in rows for k in row))
        self.path = path  # the JSONL file, and the 1-based line of each row, for error messages
        self.lines = lines

    @classmethod
    def from_dataset(cls, dataset: datasets.Dataset) -> "Rows":
        return cls(dataset.to_list(), list(dataset.column_names))


def load_rows(path: str, split: str = "train", option: str = "path") -> Rows:
    """Load a dataset from a file, a ``save_to_disk`` directory, or a hub name.

    Args:
        path: A ``.jsonl``/``.json``/``.parquet``/``.csv`` file, a directory written by
            ``Dataset.save_to_disk``, or a hub dataset name (``name`` or ``name:config``).
        split: The split of a ``DatasetDict`` or hub dataset.
        option: The name of the option that held ``path``, for error messages.
    """
    local = Path(path).expanduser()
    if local.suffix.lower() in FILE_FORMATS or local.exists() or path.startswith((".", "/", "~")):
        if not local.exists():
            raise DataError(f"{option}={path!r}: no such file or directory")
        dataset = _load_local(local, split, option)
    else:
        dataset = _load_hub(path, split, option)
    if len(dataset) == 0:
        raise DataError(f"{option}={path!r}: the dataset is empty")
    return dataset


@dataclass(frozen=True)
class RowSource:
    """Where rows came from (``path='data.jsonl'``, ``built-in task``), to name one of them in an error.

    ``str(source)`` is the name; ``source.row(i)`` names the row at 0-based index ``i``: ``data.jsonl:7``
    for a JSONL file (its line), else ``<name> row i+1 (1-based)``.
    """

    name: str
    path: Path | None = None
    lines: list[int] | None = None

    @classmethod
    def of(cls, name: str, rows: list | None = None) -> "RowSource":
        return cls(name, getattr(rows, "path", None), getattr(rows, "lines", None))

    def row(self, index: int) -> str:
        if self.lines is not None and self.path is not None:
            return f"{self.path}:{self.lines[index]}"
        return f"{self.name} row {index + 1} (1-based)"

    def __str__(self) -> str:
        return self.name


def require_columns(dataset: Rows, columns: list[str], source: str) -> None:
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise DataError(
            f"{source}: missing column(s) {', '.join(map(repr, missing))}; the columns are: {', '.join(dataset.column_names)}"
        )


def check_prompt(prompt: object, where: str, column: str) -> None:
    """A prompt is a non-empty string or a non-empty list of chat messages (``{"role": ..., "content": ...}``).

    Raises:
        DataError: naming the row (``where``) and the column, e.g. for a list of strings.
    """
    if isinstance(prompt, str) and prompt:
        return
    if isinstance(prompt, list) and prompt:
        bad = next((m for m in prompt if not (isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m)), None)
        if bad is None:
            return
        raise DataError(
            f"{where}: column {column!r} is a list, so it must hold chat messages ({{'role': ..., 'content': ...}}), "
            f"but it holds {type(bad).__name__} {str(bad)[:40]!r}; write a string prompt as one string"
        )
    raise DataError(f"{where}: {column!r} must be a string (not empty) or a list of chat messages, not {prompt!r:.40}")


def check_column_names(columns: list[str], reserved: tuple[str, ...], source: object) -> None:
    """Refuse a dataset column whose name a reward receives as its own argument (a reward gets columns by name)."""
    clash = [c for c in columns if c in reserved]
    if clash:
        raise DataError(
            f"{source}: column {clash[0]!r} has the name of a reward argument ({', '.join(reserved)} are given to every "
            "reward by the trainer); rename the column"
        )


def _load_local(path: Path, split: str, option: str) -> Rows:
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError as error:
            raise DataError(f"{option}={str(path)!r}: not a saved datasets directory ({error})") from None
        except Exception as error:  # e.g. an empty saved dataset: datasets fails with an IndexError
            raise DataError(f"{option}={str(path)!r}: cannot read the saved dataset ({type(error).__name__}: {error})") from None
        return Rows.from_dataset(_pick_split(loaded, split, f"{option}={str(path)!r}"))
    suffix = path.suffix.lower()
    if suffix not in FILE_FORMATS:
        raise DataError(f"{option}={str(path)!r}: unknown file type {suffix!r}; use one of {', '.join(FILE_FORMATS)}")
    if path.stat().st_size == 0:  # otherwise each reader fails in its own words ("Expecting value", ...)
        raise DataError(f"{option}={str(path)!r}: the file is empty")
    if suffix == ".jsonl":
        rows, lines = _read_jsonl(path)
        return Rows(rows, path=path, lines=lines)
    if suffix == ".json":
        return Rows(_read_json(path))
    try:
        return Rows.from_dataset(datasets.load_dataset(FILE_FORMATS[suffix], data_files=str(path), split="train"))
    except Exception as error:  # pyarrow/pandas errors are deep; name the file instead
        raise DataError(f"{path}: cannot read as {suffix[1:]}: {error}") from None


def _read_jsonl(path: Path) -> tuple[list[dict], list[int]]:
    """The rows of a JSONL file and the 1-based line of each (blank lines are skipped)."""
    rows, lines = [], []
    with path.open("rb") as handle:  # decoded line by line, so that bad bytes are named by their line
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                bad_byte = raw[error.start]
                raise DataError(f"{path}:{number}: not UTF-8 text (byte {bad_byte:#04x} at offset {error.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}:{error.colno}: malformed JSON line: {error.msg}") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object per line, got {type(row).__name__}")
            rows.append(row)
            lines.append(number)
    return rows, lines


def _read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}:{error.colno}: malformed JSON: {error.msg}") from None
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
        data = [dict(zip(data, values)) for values in zip(*data.values())]  # column-oriented JSON
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise DataError(f"{path}: expected a list of JSON objects (or an object of equal-length columns)")
    return data


def _load_hub(name: str, split: str, option: str) -> Rows:
    repo, _, config = name.partition(":")
    try:
        return Rows.from_dataset(datasets.load_dataset(repo, config or None, split=split))
    except Exception as error:
        raise DataError(f"{option}={name!r}: cannot load it as a hub dataset ({type(error).__name__}: {error})") from None


def _pick_split(loaded: datasets.Dataset | datasets.DatasetDict, split: str, source: str) -> datasets.Dataset:
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{source}: no split {split!r}; the splits are: {', '.join(loaded)}")
        return loaded[split]
    return loaded
