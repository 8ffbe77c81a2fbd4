"""Random-access record sources for Grain: JSONL (optionally .gz), Parquet and ArrayRecord files matched by globs.

`open_source("a/*.jsonl,b/*.parquet")` expands comma-separated globs (sorted, de-duplicated; a glob matching nothing
is an error) and dispatches each file by its extension:

    .jsonl .json .jsonl.gz .json.gz       one JSON object per non-empty line
    .parquet .pq                          one record per row (pyarrow; nested columns become lists and dicts)
    .array_record .arrayrecord (-NNNNN-of-NNNNN shard suffixes allowed)    one JSON object per record, UTF-8 bytes

Records are dicts with an added `_where`: `file:line` for JSONL, `file:record N` (1-based) for the others. A bad record
(invalid JSON or UTF-8, NaN/Infinity, not an object) is reported by its `_where`: with `on_error="error"` a
`DataError` is raised, with `on_error="skip"` the record reads as `None` (filtered out by the pipelines) and is counted
in `skipped` (per process: worker processes count their own). `read(index)` always raises.
"""

from __future__ import annotations

import bisect
import contextlib
import gzip
import json
import math
import os
import re
import shutil
import tempfile
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import IO, Any

import numpy as np
from absl import logging

from jaxalign import storage
from jaxalign.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")
_ARRAY_RECORD_RE = re.compile(r"\.(array_record|arrayrecord)(-\d+-of-\d+)?$")
_MAX_LOGGED_SKIPS = 10


def expand_glob(pattern: str) -> list[str]:
    """Sorted files matching a glob (or comma-separated globs); a pattern matching nothing is an error."""
    files: list[str] = []
    for part in [p.strip() for p in pattern.split(",") if p.strip()]:
        matched = storage.glob(part)  # local or object store (gs://...), `**` included
        if not matched:
            raise DataError(f"data glob {part!r} matches no files")
        files.extend(f for f in matched if f not in files)
    if not files:
        raise DataError(f"data glob {pattern!r} matches no files")
    return files


def file_format(path: str) -> str:
    """ "jsonl", "parquet" or "array_record" by the file name; anything else is a DataError."""
    name = os.path.basename(path).lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if _ARRAY_RECORD_RE.search(name):
        return "array_record"
    raise DataError(
        f"{path}: unknown data file type; accepted: {', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)}, "
        ".array_record (optionally -NNNNN-of-NNNNN)"
    )


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-finite number literal {name}")


def parse_json_line(line: bytes, where: str) -> dict[str, Any]:
    """Parses one JSON record; NaN/Infinity literals, invalid UTF-8 and non-object records are errors."""
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


def _check_finite(value: Any, where: str, path: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise DataError(f"{where}: field {path} is {value}")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, where, f"{path}.{k}" if path else repr(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_finite(v, where, f"{path}[{i}]")


class Source:
    """Records of a list of files, addressed by one global index (files in order)."""

    files: list[str]

    def __init__(self, files: Sequence[str], on_error: str):
        if on_error not in ("error", "skip"):
            raise ValueError(f"on_error must be 'error' or 'skip', got {on_error!r}")
        self.files = list(files)
        self.on_error = on_error
        self.skipped = 0
        self._cumulative = [0]

    def _set_lengths(self, lengths: Sequence[int]) -> None:
        self._cumulative = np.cumsum([0, *lengths]).tolist()

    def __len__(self) -> int:
        return self._cumulative[-1]

    def _file_of(self, index: int) -> tuple[int, int]:
        """(file index, index within that file) of record `index`."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        f = bisect.bisect_right(self._cumulative, index) - 1
        return f, index - self._cumulative[f]

    def where(self, index: int) -> str:
        f, local = self._file_of(index)
        return f"{self.files[f]}:record {local + 1}"

    def read(self, index: int) -> dict[str, Any]:
        """Record `index` with its `_where`; raises DataError for a bad record."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        try:
            return self.read(index)
        except DataError as e:
            if self.on_error == "skip":
                self.skipped += 1
                if self.skipped <= _MAX_LOGGED_SKIPS:
                    logging.warning("skipping a bad record: %s", e)
                return None
            raise


# Indexing reads a file in chunks of this many bytes: its memory is O(records + chunk), whatever the file's size.
_INDEX_CHUNK = 1 << 20
_WHITESPACE = np.frombuffer(b" \t\r\n\f\v", np.uint8)


def index_lines(
    f: IO[bytes], sink: IO[bytes] | None = None, stop: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """([start, end) byte offsets (n, 2), 1-based line numbers (n,)) of the non-empty lines of the binary stream `f`
    (a line is non-empty when it holds a byte other than ASCII whitespace; `end` excludes the newline), read in
    chunks of `_INDEX_CHUNK` bytes, each also written to `sink` when given. Offsets and line numbers count from
    where `f` is. With `stop`, only the lines starting before byte `stop` are indexed (the last may end past it),
    and reading ends with that line."""
    offsets: list[np.ndarray] = []
    numbers: list[np.ndarray] = []
    pos = 0  # bytes read so far
    lines = 0  # newlines seen so far
    line_start = 0  # where the line being read started
    line_solid = False  # whether it has a non-whitespace byte so far
    while chunk := f.read(_INDEX_CHUNK):
        if sink is not None:
            sink.write(chunk)
        data = np.frombuffer(chunk, np.uint8)
        solid = np.concatenate([[0], np.cumsum(~np.isin(data, _WHITESPACE), dtype=np.int32)])
        newlines = np.flatnonzero(data == ord("\n"))
        if len(newlines):
            starts = np.concatenate([[0], newlines[:-1] + 1])
            nonempty = solid[newlines] > solid[starts]
            nonempty[0] |= line_solid
            global_starts = pos + starts
            global_starts[0] = line_start
            offsets.append(np.stack([global_starts, pos + newlines], axis=1)[nonempty])
            numbers.append((lines + 1 + np.arange(len(newlines)))[nonempty])
            lines += len(newlines)
            line_start = pos + int(newlines[-1]) + 1
            line_solid = bool(solid[-1] > solid[newlines[-1] + 1])
        else:
            line_solid |= bool(solid[-1] > 0)
        pos += len(data)
        if stop is not None and line_start >= stop:  # every line starting before `stop` is complete
            break
    if line_solid and (stop is None or line_start < stop):  # a last line without a newline
        offsets.append(np.array([[line_start, pos]], np.int64))
        numbers.append(np.array([lines + 1], np.int64))
    if stop is not None and offsets:  # only the last chunk read can hold lines starting at or past `stop`
        keep = offsets[-1][:, 0] < stop
        offsets[-1], numbers[-1] = offsets[-1][keep], numbers[-1][keep]
    if not offsets:
        return np.zeros((0, 2), np.int64), np.zeros((0,), np.int64)
    # No copy beyond the concatenation: the index is the memory that scales with the corpus.
    return (
        np.concatenate(offsets).astype(np.int64, copy=False),
        np.concatenate(numbers).astype(np.int64, copy=False),
    )


def _remove_if_owner(directory: str, owner: int) -> None:
    if os.getpid() == owner:
        shutil.rmtree(directory, ignore_errors=True)


class JsonlSource(Source):
    """The non-empty lines of JSONL(.gz) files, indexed by byte offset in one streaming pass (memory O(records), not
    O(bytes)) and read lazily: plain local files by `pread`, object-store files by ranged reads, and gzip files
    from a decompressed copy written once, during that pass, to a local temporary directory (removed with the source
    by the process that made it), so neither this process nor a worker holds a whole decompressed file.

    `ranges` (one per file, None for the whole file) limits an uncompressed file to the lines starting in its byte
    range [start, end) (`jaxalign.data.file_shards`): only those bytes, and the rest of the last line, are read.
    Such a record's `_where` is `file:byte N` (the line's 0-based start offset) when its range starts mid-file."""

    def __init__(
        self,
        pattern: str | Sequence[str],
        on_error: str = "error",
        ranges: Sequence[tuple[int, int] | None] | None = None,
    ):
        super().__init__(expand_glob(pattern) if isinstance(pattern, str) else pattern, on_error)
        self._ranges = list(ranges) if ranges is not None else [None] * len(self.files)
        if len(self._ranges) != len(self.files):
            raise ValueError(f"{len(self._ranges)} ranges for {len(self.files)} files")
        self._offsets: list[np.ndarray] = []  # per file: [start, end) byte offsets of each non-empty line
        self._line_numbers: list[np.ndarray] = []
        self._local: dict[int, str] = {}  # file index -> its decompressed local copy (gzip files)
        self._fds: dict[int, int] = {}
        self._remote: dict[int, Any] = {}  # object-store readers (seek + read under the lock)
        self._remote_lock = threading.Lock()
        self._tmp = ""
        for i, path in enumerate(self.files):
            offsets, numbers = self._index(i, path)
            self._offsets.append(offsets)
            self._line_numbers.append(numbers)
        self._set_lengths([len(o) for o in self._offsets])

    def _index(self, i: int, path: str) -> tuple[np.ndarray, np.ndarray]:
        try:
            if self._ranges[i] is not None:
                if path.endswith(".gz"):
                    raise ValueError(f"{path}: a gzip file is read whole, not by byte range")
                return self._index_range(path, *self._ranges[i])
            if not path.endswith(".gz"):
                with storage.open_binary(path) as f:
                    return index_lines(f)
            if not self._tmp:
                self._tmp = tempfile.mkdtemp(prefix="jaxalign-jsonl-")
                weakref.finalize(self, _remove_if_owner, self._tmp, os.getpid())
            self._local[i] = os.path.join(self._tmp, f"{i}.jsonl")
            with (
                storage.open_binary(path) as raw,
                gzip.open(raw, "rb") as f,
                open(self._local[i], "wb") as sink,
            ):
                return index_lines(f, sink)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise DataError(f"{path}: cannot read ({e})") from None

    @staticmethod
    def _index_range(path: str, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """`index_lines` over the lines of `path` starting in bytes [start, end): absolute offsets; line numbers
        counted from the first of those lines."""
        with storage.open_binary(path) as f:
            first = start  # where the first line starting at or after `start` starts
            if start > 0:
                f.seek(start - 1)  # a line starts at `start` when the byte before it is a newline
                while chunk := f.read(_INDEX_CHUNK):
                    newline = chunk.find(b"\n")
                    if newline >= 0:
                        first += newline
                        break
                    first += len(chunk)
                else:
                    first = end  # no newline up to the end of the file: no line starts in the range
            if first >= end:
                return np.zeros((0, 2), np.int64), np.zeros((0,), np.int64)
            f.seek(first)
            offsets, numbers = index_lines(f, stop=end - first)
            offsets += first  # in place: no second copy of the index
            return offsets, numbers

    def locate(self, index: int) -> tuple[int, int]:
        """(file index, 1-based line number) of record `index` (counted from its range's first line when a range
        starts mid-file)."""
        f, local = self._file_of(index)
        return f, int(self._line_numbers[f][local])

    def where(self, index: int) -> str:
        f, local = self._file_of(index)
        if self._ranges[f] is not None and self._ranges[f][0] > 0:
            return f"{self.files[f]}:byte {int(self._offsets[f][local, 0])}"
        return f"{self.files[f]}:{int(self._line_numbers[f][local])}"

    def _line(self, index: int) -> bytes:
        f, local = self._file_of(index)
        start, end = self._offsets[f][local]
        if f not in self._local and not storage.is_local(self.files[f]):
            with self._remote_lock:
                if f not in self._remote:
                    self._remote[f] = storage.open_binary(self.files[f], random_access=True)
                self._remote[f].seek(int(start))
                return self._remote[f].read(int(end - start))
        fd = self._fds.get(f)
        if fd is None:  # one descriptor per file and process; pread needs no seek, so threads can share it
            fd = self._fds[f] = os.open(self._local.get(f, self.files[f]), os.O_RDONLY)
        return os.pread(fd, int(end - start), int(start))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fds": {}, "_remote": {}, "_remote_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _remote_lock=threading.Lock())

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)
        for reader in getattr(self, "_remote", {}).values():
            reader.close()

    def read(self, index: int) -> dict[str, Any]:
        where = self.where(index)
        record = parse_json_line(self._line(index), where)
        record["_where"] = where
        return record


def _import_pyarrow_parquet(path: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    return pq


@contextlib.contextmanager
def _parquet_input(path: str) -> Iterator[Any]:
    """What pyarrow opens: a local path itself, an object (gs://...) through epath's seekable reader."""
    if storage.is_local(path):
        yield path
    else:
        with storage.open_binary(path) as f:
            yield f


def _row_group_middle(group: Any) -> int:
    """The byte offset of the middle of a Parquet row group (pyarrow RowGroupMetaData): its column chunks'."""
    chunks = [group.column(c) for c in range(group.num_columns)]
    starts = [c.dictionary_page_offset if c.has_dictionary_page else c.data_page_offset for c in chunks]
    end = max(s + c.total_compressed_size for s, c in zip(starts, chunks, strict=True))
    return (min(starts) + end) // 2


class ParquetSource(Source):
    """Rows of Parquet files. A row is read with its whole row group, and the last few row groups stay cached, so
    sequential reads are cheap and shuffled reads of large row groups are not: write small row groups (~1k rows).

    `ranges` (one per file, None for the whole file) keeps only the row groups whose middle byte lies in the file's
    byte range [start, end) (as Spark splits Parquet; `jaxalign.data.file_shards`); `_where` keeps the row's true
    1-based number in its file."""

    _CACHED_GROUPS = 4

    def __init__(
        self,
        files: Sequence[str],
        on_error: str = "error",
        ranges: Sequence[tuple[int, int] | None] | None = None,
    ):
        super().__init__(files, on_error)
        ranges = list(ranges) if ranges is not None else [None] * len(self.files)
        pq = _import_pyarrow_parquet(self.files[0])
        self._groups: list[list[int]] = []  # per file: the row groups read
        # Per file: the first row of each of those groups in this source's numbering, then the row count.
        self._group_starts: list[list[int]] = []
        self._first_rows: list[list[int]] = []  # per file: first row of each of them in the file
        for path, byte_range in zip(self.files, ranges, strict=True):
            try:
                with _parquet_input(path) as source:
                    meta = pq.ParquetFile(source).metadata
            except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...
                raise DataError(f"{path}: cannot read Parquet ({e})") from None
            sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            groups = list(range(meta.num_row_groups))
            if byte_range is not None:
                groups = [
                    g for g in groups if byte_range[0] <= _row_group_middle(meta.row_group(g)) < byte_range[1]
                ]
            first_rows = np.cumsum([0, *sizes]).tolist()
            self._groups.append(groups)
            self._first_rows.append([first_rows[g] for g in groups])
            self._group_starts.append(np.cumsum([0, *(sizes[g] for g in groups)]).tolist())
        self._set_lengths([starts[-1] for starts in self._group_starts])
        self._cache: dict[tuple[int, int], list[dict]] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _rows(self, f: int, group: int) -> list[dict]:
        key = (f, group)
        with self._lock:
            rows = self._cache.get(key)
        if rows is None:
            pq = _import_pyarrow_parquet(self.files[f])
            try:
                with _parquet_input(self.files[f]) as source:
                    rows = pq.ParquetFile(source).read_row_group(group).to_pylist()
            except Exception as e:
                raise DataError(f"{self.files[f]}: cannot read row group {group} ({e})") from None
            with self._lock:
                self._cache[key] = rows
                while len(self._cache) > self._CACHED_GROUPS:
                    self._cache.pop(next(iter(self._cache)))
        return rows

    def _position(self, index: int) -> tuple[int, int, int]:
        """(file index, row group, row within it) of record `index`."""
        f, local = self._file_of(index)
        kept = bisect.bisect_right(self._group_starts[f], local) - 1
        return f, kept, local - self._group_starts[f][kept]

    def where(self, index: int) -> str:
        f, kept, row = self._position(index)
        return f"{self.files[f]}:record {self._first_rows[f][kept] + row + 1}"

    def read(self, index: int) -> dict[str, Any]:
        where = self.where(index)
        f, kept, row = self._position(index)
        record = dict(self._rows(f, self._groups[f][kept])[row])
        _check_finite(record, where, "")
        record["_where"] = where
        return record


class ArrayRecordSource(Source):
    """Records of ArrayRecord files, each a JSON object encoded as UTF-8 bytes."""

    def __init__(self, files: Sequence[str], on_error: str = "error"):
        super().__init__(files, on_error)
        try:
            from array_record.python import array_record_data_source
        except ImportError:
            raise DataError(
                f"{self.files[0]}: reading ArrayRecord needs array_record (pip install array-record)"
            ) from None
        self._sources = []
        for path in self.files:
            if not storage.is_local(path):
                raise DataError(
                    f"{path}: ArrayRecord files are read from local disk only; accepted there: JSONL, Parquet"
                )
            try:
                self._sources.append(array_record_data_source.ArrayRecordDataSource([path]))
            except Exception as e:  # the reader raises ValueError/RuntimeError on a corrupt file
                raise DataError(f"{path}: cannot read ArrayRecord ({e})") from None
        self._set_lengths([len(s) for s in self._sources])

    def read(self, index: int) -> dict[str, Any]:
        f, local = self._file_of(index)
        where = f"{self.files[f]}:record {local + 1}"
        record = parse_json_line(self._sources[f][local], where)
        record["_where"] = where
        return record


class ConcatSource(Source):
    """Several sources one after the other (files of different formats)."""

    def __init__(self, sources: Sequence[Source], on_error: str = "error"):
        super().__init__([f for s in sources for f in s.files], on_error)
        self._sources = list(sources)
        self._set_lengths([len(s) for s in self._sources])

    def _part(self, index: int) -> tuple[Source, int]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        s = bisect.bisect_right(self._cumulative, index) - 1
        return self._sources[s], index - self._cumulative[s]

    def where(self, index: int) -> str:
        source, local = self._part(index)
        return source.where(local)

    def read(self, index: int) -> dict[str, Any]:
        source, local = self._part(index)
        return source.read(local)


FORMATS = {"jsonl": JsonlSource, "parquet": ParquetSource, "array_record": ArrayRecordSource}


def open_source(pattern: str | Sequence[str], on_error: str = "error") -> Source:
    """The records of every file matched by `pattern` (comma-separated globs, or a list of paths), in sorted order
    per glob; consecutive files of one format share one source."""
    files = expand_glob(pattern) if isinstance(pattern, str) else list(pattern)
    if not files:
        raise DataError(f"data glob {pattern!r} matches no files")
    groups: list[tuple[str, list[str]]] = []
    for path in files:
        kind = file_format(path)
        if groups and groups[-1][0] == kind:
            groups[-1][1].append(path)
        else:
            groups.append((kind, [path]))
    sources = [FORMATS[kind](paths, on_error) for kind, paths in groups]
    return sources[0] if len(sources) == 1 else ConcatSource(sources, on_error)
