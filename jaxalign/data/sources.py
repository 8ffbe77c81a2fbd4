"""Random-access record sources for Grain: JSONL (optionally .gz) files matched by a glob.

Records are dicts. Every bad record is reported as `file:line`: with `on_error="error"` a `DataError` is raised,
with `on_error="skip"` the record reads as `None` (filtered out by the pipelines) and is counted.
"""

from __future__ import annotations

import bisect
import glob as glob_lib
import gzip
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxalign.errors import DataError


def expand_glob(pattern: str) -> list[str]:
    """Sorted files matching a glob (or comma-separated globs); a pattern matching nothing is an error."""
    files: list[str] = []
    for part in [p for p in pattern.split(",") if p]:
        matched = sorted(glob_lib.glob(os.path.expanduser(part), recursive=True))
        if not matched:
            raise DataError(f"data glob {part!r} matches no files")
        files.extend(f for f in matched if f not in files)
    if not files:
        raise DataError(f"data glob {pattern!r} matches no files")
    return files


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-finite number literal {name}")


def parse_json_line(line: bytes, where: str) -> dict[str, Any]:
    """Parses one JSONL line; NaN/Infinity literals, invalid UTF-8 and non-object records are errors."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: invalid UTF-8 at byte {e.start}") from None
    try:
        record = json.loads(text, parse_constant=_reject_constant)
    except (json.JSONDecodeError, ValueError) as e:
        raise DataError(f"{where}: invalid JSON ({e})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


class JsonlSource:
    """A Grain random-access source over the non-empty lines of JSONL(.gz) files.

    Plain files are indexed by byte offset and read lazily; gzip files are decompressed into memory once.
    """

    def __init__(self, pattern: str | Sequence[str], on_error: str = "error"):
        self.files = expand_glob(pattern) if isinstance(pattern, str) else list(pattern)
        self.on_error = on_error
        self.skipped = 0
        self._offsets: list[np.ndarray] = []  # per file: byte offset of each non-empty line
        self._line_numbers: list[np.ndarray] = []
        self._gz_data: dict[int, bytes] = {}
        for i, path in enumerate(self.files):
            data = self._read_all(i, path)
            starts = np.concatenate([[0], np.flatnonzero(np.frombuffer(data, np.uint8) == ord("\n")) + 1])
            ends = np.concatenate([starts[1:] - 1, [len(data)]])
            nonempty = np.array([bool(data[s:e].strip()) for s, e in zip(starts, ends, strict=True)], dtype=bool)
            self._offsets.append(np.stack([starts[nonempty], ends[nonempty]], axis=1))
            self._line_numbers.append(np.flatnonzero(nonempty) + 1)
        self._cumulative = np.cumsum([0] + [len(o) for o in self._offsets]).tolist()

    def _read_all(self, i: int, path: str) -> bytes:
        try:
            if path.endswith(".gz"):
                with gzip.open(path, "rb") as f:
                    data = f.read()
                self._gz_data[i] = data
                return data
            with open(path, "rb") as f:
                return f.read()
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: cannot read ({e})") from None

    def __len__(self) -> int:
        return self._cumulative[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """(file index, 1-based line number) of record `index`."""
        f = bisect.bisect_right(self._cumulative, index) - 1
        return f, int(self._line_numbers[f][index - self._cumulative[f]])

    def where(self, index: int) -> str:
        f, line = self.locate(index)
        return f"{self.files[f]}:{line}"

    def _line(self, index: int) -> bytes:
        f = bisect.bisect_right(self._cumulative, index) - 1
        start, end = self._offsets[f][index - self._cumulative[f]]
        if f in self._gz_data:
            return self._gz_data[f][start:end]
        with open(self.files[f], "rb") as fh:
            fh.seek(int(start))
            return fh.read(int(end - start))

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        if not 0 <= index < len(self):
            raise IndexError(index)
        try:
            record = parse_json_line(self._line(index), self.where(index))
        except DataError:
            if self.on_error == "skip":
                self.skipped += 1
                return None
            raise
        record["_where"] = self.where(index)
        return record


def require_fields(record: dict[str, Any], fields: Sequence[str]) -> None:
    """Raises a DataError naming file:line when a required field is missing or not a string."""
    for field in fields:
        value = record.get(field)
        if value is None:
            raise DataError(f"{record.get('_where', '?')}: missing field {field!r} (has {sorted(record)})")
        if isinstance(value, float) and not math.isfinite(value):
            raise DataError(f"{record.get('_where', '?')}: field {field!r} is {value}")
