"""`data.shard_by="file"`: each shard owns a contiguous span of the input's bytes, so a process opens and indexes
only the files (or byte ranges) of the shards it runs: on P processes, 1/P of the indexing time and index memory.

The input (its files in glob order, sizes from a `stat`, no read) is cut at `k * total_bytes // shards`, k = 1..
shards - 1, so shard k owns bytes [cut_k, cut_k+1) of the files' concatenation:
  - uncompressed JSONL files split anywhere, Hadoop-style: a line belongs to the shard owning its first byte, so a
    shard starting mid-line skips to the next line start and its last line may end past its range; one big file
    splits into `shards` pieces;
  - Parquet files split at row groups, as Spark does: a row group belongs to the shard holding its middle byte
    (from the footer, read only by the processes whose range meets the file); its rows keep true `file:record N`;
  - .gz JSONL and ArrayRecord files are whole units, owned by the shard holding their middle byte (a shard may then
    get none: `plan` refuses that, naming the shard).
Every process computes the same plan from the file sizes, so a fixed `data.shards` gives the same shards, and so
the same global batches, on any number of processes.

Records of a span that starts mid-file report `file:byte N` (N = the 0-based byte offset of the line's start: `tail
-c +N+1 file | head -1` prints it) instead of `file:line`, because counting the lines before the span would read
the bytes this mode exists to skip; spans starting at byte 0 keep true line numbers.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence

from jaxalign import storage
from jaxalign.data import sources
from jaxalign.errors import ConfigError, DataError


@dataclasses.dataclass(frozen=True)
class Span:
    """Bytes [start, end) of `file`, in which the lines starting there are this span's records (`whole`: the file
    is one unit, all its records)."""

    file: str
    start: int
    end: int
    whole: bool


def splittable(path: str) -> bool:
    """Whether a file may be cut at a byte offset: uncompressed JSONL (at line starts), Parquet (at row groups)."""
    kind = sources.file_format(path)
    return kind == "parquet" or (kind == "jsonl" and not path.endswith(".gz"))


def file_size(path: str) -> int:
    try:
        return int(storage.path(path).stat().length)
    except OSError as e:
        raise DataError(f"{path}: cannot stat ({e})") from None


def plan(files: Sequence[str], shards: int, what: str = "data.input") -> list[list[Span]]:
    """The spans of each of `shards` shards (a list per shard, in file order) of `files`, by their sizes.

    Raises ConfigError when a shard gets no bytes (fewer bytes than shards, or whole-unit files fewer or more
    unequal than the shards): `what` names the input in the message."""
    sizes = [file_size(f) for f in files]
    total = sum(sizes)
    cuts = [k * total // shards for k in range(shards + 1)]
    owned: list[list[Span]] = [[] for _ in range(shards)]
    offset = 0
    for path, size in zip(files, sizes, strict=True):
        if size == 0:
            continue
        if not splittable(path):
            owner = min(bisect.bisect_right(cuts, offset + size // 2) - 1, shards - 1)
            owned[owner].append(Span(path, 0, size, whole=True))
        else:
            first = bisect.bisect_right(cuts, offset) - 1
            for k in range(first, shards):
                a, b = max(cuts[k], offset), min(cuts[k + 1], offset + size)
                if a >= offset + size:
                    break
                if a < b:
                    owned[k].append(Span(path, a - offset, b - offset, whole=False))
        offset += size
    empty = [k for k, spans in enumerate(owned) if not spans]
    if empty:
        units = sum(not splittable(f) for f in files)
        raise ConfigError(
            f"data.shard_by='file': shard {empty[0]} of data.shards={shards} gets no part of {what} "
            f"({len(files)} files, {total} bytes, {units} of them .gz/ArrayRecord files that are not split); "
            f"use fewer shards, more or more equal files, or data.shard_by='record'"
        )
    return owned


def open_spans(spans: Sequence[Span], on_error: str) -> sources.Source:
    """The records of `spans` (indexing only their bytes), consecutive spans of one format sharing a source."""
    groups: list[tuple[str, list[Span]]] = []
    for span in spans:
        kind = sources.file_format(span.file)
        if groups and groups[-1][0] == kind:
            groups[-1][1].append(span)
        else:
            groups.append((kind, [span]))
    opened = []
    for kind, group in groups:
        files = [s.file for s in group]
        if kind in ("jsonl", "parquet"):
            ranges = [None if s.whole else (s.start, s.end) for s in group]
            opened.append(sources.FORMATS[kind](files, on_error, ranges=ranges))
        else:
            opened.append(sources.FORMATS[kind](files, on_error))
    return opened[0] if len(opened) == 1 else sources.ConcatSource(opened, on_error)
