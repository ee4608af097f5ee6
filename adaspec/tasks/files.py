"""Local data files: read rows from .jsonl, .json (a list of objects) and .csv (with header).

`data_files` (one path or a sequence) names files that are concatenated in the given order; each
row comes with where it sits ('train.jsonl line 4', 'alpaca.json item 7', 'news.csv line 2', the
line a CSV record starts on) so that errors about a row name the place to fix.
`data_files_hash` fingerprints the files' bytes for cache manifests.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from adaspec.errors import UserError

DataFiles = str | Path | Sequence[str | Path]
Rows = list[tuple[Any, str]]  # (row, where it sits)


def as_paths(data_files: DataFiles) -> list[Path]:
    if isinstance(data_files, str | Path):
        return [Path(data_files)]
    return [Path(path) for path in data_files]


def _check_exists(path: Path) -> None:
    if path.is_dir():
        raise UserError(f"data file {path} is a directory; pass a .jsonl, .json or .csv file")
    if not path.is_file():
        raise UserError(f"data file not found: {path}; check the --data-files path")


def _not_utf8(name: str, data: bytes, err: UnicodeDecodeError, line: int | None = None
              ) -> UserError:
    """The one-line error for bytes that are not UTF-8, naming the line they sit on."""
    if line is None:
        line = data.count(b"\n", 0, err.start) + 1
    return UserError(f"{name} line {line} is not UTF-8 text (byte "
                     f"{data[err.start:err.start + 1]!r}); data files must be UTF-8")


def _jsonl_rows(path: Path) -> Rows:
    rows = []
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                # utf-8-sig: a byte-order mark would otherwise hide the first line's name
                line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise _not_utf8(path.name, raw, err, line_number) from None
            if not line.strip():
                continue
            try:
                rows.append((json.loads(line), f"{path.name} line {line_number}"))
            except json.JSONDecodeError as error:
                raise UserError(
                    f"{path.name} line {line_number}: invalid JSON ({error.msg}); fix that line"
                ) from None
    return rows


def _json_rows(path: Path) -> Rows:
    try:
        items = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as error:
        raise UserError(
            f"{path.name} line {error.lineno}: invalid JSON ({error.msg}); fix the file"
        ) from None
    if not isinstance(items, list):
        raise UserError(f"{path.name}: expected a JSON list of objects, got {type(items).__name__}")
    return [(item, f"{path.name} item {index}") for index, item in enumerate(items)]


def _csv_rows(path: Path) -> Rows:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # news articles overflow the default
    rows = []
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        start_line = reader.line_num + 2  # the line after the header
        for row in reader:
            rows.append((row, f"{path.name} line {start_line}"))
            start_line = reader.line_num + 1
    return rows


_READERS: dict[str, Callable[[Path], Rows]] = {
    ".jsonl": _jsonl_rows,
    ".json": _json_rows,
    ".csv": _csv_rows,
}


def check_files(data_files: DataFiles | None) -> None:
    """Cheap checks of --data-files before any model loads: each path is an existing file of a
    supported type whose start decodes as UTF-8 (a wrong path fails in a second, not after a
    minute of loading; damage further in is still named when the rows are read)."""
    if data_files is None:
        return
    import codecs

    for path in as_paths(data_files):
        _check_exists(path)
        suffix = path.suffix.lower()
        if suffix not in _READERS:
            raise UserError(f"--data-files {path.name}: unsupported file type {suffix!r}; use "
                            ".jsonl, .json or .csv")
        with path.open("rb") as handle:
            head = handle.read(1 << 16)
        try:
            codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        except UnicodeDecodeError as err:
            raise _not_utf8(path.name, head, err) from None


def read_rows(path: Path) -> Rows:
    """Rows of one local file with where each row sits ('name line N' / 'name item N')."""
    _check_exists(path)
    suffix = path.suffix.lower()
    if suffix not in _READERS:
        raise UserError(f"{path.name}: unsupported file type {suffix!r}; use .jsonl, .json or .csv")
    try:
        return _READERS[suffix](path)
    except UnicodeDecodeError:  # .json/.csv: find the first bad byte in the whole file
        data = path.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise _not_utf8(path.name, data, err) from None
        raise


def data_files_hash(data_files: DataFiles | None) -> str | None:
    """sha256 hex digest over the bytes of the files in order (one file: its sha256sum); None
    for the hub."""
    if data_files is None:
        return None
    digest = hashlib.sha256()
    for path in as_paths(data_files):
        _check_exists(path)
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
