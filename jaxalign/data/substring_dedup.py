"""Exact-substring dedup (Lee et al. 2021, "Deduplicating Training Data Makes Language Models Better", ExactSubstr).

The kept documents' UTF-8 texts, in global input order, are joined into one byte stream with a 0xFF byte after each
(0xFF never occurs in UTF-8, so it is a separator no text contains). A suffix array (pydivsufsort's libdivsufsort)
and its LCP array (Kasai) group every stream position by its first `min_bytes` bytes: adjacent suffixes with an LCP
>= min_bytes start with the same window. A window containing a separator would cross a document end; such windows
only share a group with windows holding the separator at the same offset, and none of them is ever flagged.

Which occurrence survives: a window is removed from every document after the first (in global input order) that
contains it, so each repeated span keeps its first occurrence and later documents lose theirs; repeats inside the
first document stay (the Gopher repetition filter judges those). A document loses the union of its flagged windows,
`[p, p + min_bytes)`, which is exactly the union of its maximal spans of >= min_bytes bytes that also occur in an
earlier document; nothing shorter is removed. Span ends are moved inwards to UTF-8 character boundaries, so a span
splitting a multi-byte character keeps that character and the text stays valid. The remaining bytes are joined as
they are (Lee et al. do the same). A document that lost bytes and keeps fewer than `min_bytes` non-whitespace bytes
is dropped with reason `substring_dup`. Caveat: a piece shorter than `min_bytes` that sits between two removed spans
(e.g. where two copied paragraphs meet) is removed with them, as in Lee et al.'s implementation.

Tokens to bytes: `curate.substring_dedup_tokens` counts tokens of `BYTES_PER_TOKEN` = 4 bytes, the mean length of a
GPT-2 BPE token on English text, so Lee et al.'s 50 tokens (100 bytes of their 2-byte token-id stream) is 200
bytes of text here. A byte threshold needs no tokenizer and makes the suffix array one pass over raw bytes.

Cost, in the curate parent: the texts and the stream (1 B per byte each), the suffix array and LCP (int32, 4 B each
per byte below 2 GiB, int64 above), Kasai's rank array and masks; benchmarks/substring_dedup_bench.py measures the
peak at 13 B per byte of kept text above the texts (1.3 GB for 100 MiB). libdivsufsort and Kasai's LCP dominate the
time (O(n log n) and O(n)). Corpora beyond one machine's memory would need Lee et al.'s sharded suffix arrays.

Shapes: n stream bytes, D documents, F flagged window starts, R removed spans.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator

import numpy as np
import pydivsufsort

from jaxalign import storage
from jaxalign.config import CurateConfig

BYTES_PER_TOKEN = 4
REASON = "substring_dup"  # removed.jsonl's reason for a record left (nearly) empty
SEPARATOR = 0xFF  # never a byte of UTF-8 text


@dataclasses.dataclass(frozen=True)
class Result:
    """Spans to remove and documents to drop, over the D input documents."""

    spans: list[list[tuple[int, int]]]  # [D] byte ranges [start, end) of each document's UTF-8 text, sorted
    dropped: np.ndarray  # [D] bool: the document is left (nearly) empty
    bytes_in: int  # text bytes of all documents (separators not counted)
    bytes_removed: int  # bytes in the spans of documents that were kept, plus all bytes of dropped documents


def min_bytes(tokens: int) -> int:
    """The span threshold in bytes for `curate.substring_dedup_tokens` = tokens."""
    return tokens * BYTES_PER_TOKEN


def join(texts: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """The stream [n] uint8 (each text followed by SEPARATOR) and each document's start offset start_D."""
    lengths = np.array([len(t) for t in texts], np.int64)
    start_D = np.cumsum(lengths + 1) - (lengths + 1)
    stream = bytearray()
    for t in texts:
        stream += t
        stream.append(SEPARATOR)
    return np.frombuffer(stream, np.uint8), start_D


def flagged_starts(stream: np.ndarray, start_D: np.ndarray, k: int) -> np.ndarray:
    """Sorted stream positions p [F] whose window stream[p:p+k] lies inside a document and occurs in an earlier one."""
    if len(stream) == 0:
        return np.zeros(0, np.int64)
    if (
        not stream.flags.writeable
    ):  # pydivsufsort takes a ctypes pointer, which numpy gives writeable arrays only
        stream = stream.copy()
    sa_n = pydivsufsort.divsufsort(stream)
    lcp_n = pydivsufsort.kasai(stream, sa_n)  # lcp_n[i] = LCP(suffix sa_n[i], suffix sa_n[i + 1]); last is 0
    same_next = lcp_n >= k
    del lcp_n
    # Suffix-array ranks in a group of >= 2 suffixes sharing their first k bytes; singletons cannot repeat.
    in_group = same_next.copy()
    in_group[1:] |= same_next[:-1]
    rank_G = np.flatnonzero(in_group)
    pos_G = sa_n[rank_G].astype(np.int64)
    del sa_n, in_group
    group_G = np.cumsum(~same_next[np.maximum(rank_G - 1, 0)] | (rank_G == 0)) - 1  # new group unless joined
    doc_G = np.searchsorted(start_D, pos_G, side="right") - 1
    ends_D = np.r_[start_D[1:] - 1, len(stream) - 1]  # each document's separator position
    inside = pos_G + k <= ends_D[doc_G]
    if not len(group_G):
        return np.zeros(0, np.int64)
    first = np.flatnonzero(np.r_[True, group_G[1:] != group_G[:-1]])
    first_doc = np.minimum.reduceat(doc_G, first)[group_G]
    return np.sort(pos_G[inside & (doc_G > first_doc)])


def _merge(starts_F: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The union of windows [p, p + k) of sorted starts as disjoint sorted spans (start_R, end_R)."""
    if not len(starts_F):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    reach = np.maximum.accumulate(starts_F + k)
    new = np.r_[True, starts_F[1:] > reach[:-1]]
    start_R = starts_F[new]
    end_R = reach[np.r_[np.flatnonzero(new)[1:] - 1, len(starts_F) - 1]]
    return start_R, end_R


def _snap(stream: np.ndarray, pos: np.ndarray, limit: np.ndarray, step: int) -> np.ndarray:
    """Moves positions by `step` (+1 / -1) past UTF-8 continuation bytes (0b10xxxxxx), never beyond `limit`."""
    pos = pos.copy()
    for _ in range(3):  # a UTF-8 character has at most 3 continuation bytes
        move = (pos != limit) & ((stream[np.minimum(pos, len(stream) - 1)] & 0xC0) == 0x80)
        pos[move] += step
    return pos


def dedup(texts: list[bytes], tokens: int) -> Result:
    """Exact-substring dedup of documents `texts` (UTF-8, global input order) at spans of >= min_bytes(tokens)."""
    k = min_bytes(tokens)
    stream, start_D = join(texts)
    starts_F = flagged_starts(stream, start_D, k)
    doc_F = np.searchsorted(start_D, starts_F, side="right") - 1
    spans: list[list[tuple[int, int]]] = [[] for _ in texts]
    dropped = np.zeros(len(texts), bool)
    removed = 0
    bounds = np.flatnonzero(np.r_[True, doc_F[1:] != doc_F[:-1], True]) if len(doc_F) else []
    for a, b in zip(bounds[:-1], bounds[1:], strict=False):  # each document's flagged starts
        d = int(doc_F[a])
        spans[d], dropped[d], n = cut(texts[d], starts_F[a:b] - start_D[d], k)
        removed += n
    return Result(spans, dropped, int(sum(map(len, texts))), removed)


def cut(text: bytes, starts_F: np.ndarray, k: int) -> tuple[list[tuple[int, int]], bool, int]:
    """One document's decision from its flagged window starts (sorted byte offsets into `text`, each window
    [p, p + k) inside it): (spans to remove, whether the document is dropped, bytes removed). Both runners' exact-
    substring stages (the suffix array here, the hashed windows of curate_beam_stages.py) end in this function."""
    stream = np.frombuffer(text + bytes([SEPARATOR]), np.uint8)  # the separator: a boundary, as in the stream
    start_R, end_R = _merge(np.asarray(starts_F, np.int64), k)
    # Shrink each span to whole characters: start forward to a character start, end back to one (the end is the
    # first kept byte; a separator or a character start is a boundary).
    start_R = _snap(stream, start_R, end_R, +1)
    end_R = _snap(stream, end_R, start_R, -1)
    keep = end_R > start_R
    spans = list(zip(start_R[keep].tolist(), end_R[keep].tolist(), strict=True))
    if not spans:
        return [], False, 0
    rest = remove(text, spans)
    if len(rest.translate(None, b" \t\n\r\x0b\x0c")) < k:
        return spans, True, len(text)
    return spans, False, len(text) - len(rest)


def window_keys(text: bytes, k: int) -> Iterator[bytes]:
    """The 16-byte blake2b digest of each window text[p : p + k] that lies inside the document, p = 0, 1, ...
    (the Beam runner's shuffle key: see curate_beam_stages.py for the collision argument)."""
    view = memoryview(text)
    for p in range(len(text) - k + 1):
        yield hashlib.blake2b(view[p : p + k], digest_size=16).digest()


def flag_group(occurrences: Iterable[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """The occurrences (document position, byte offset) of one window that lie in a document after the first
    document holding it (repeats inside that first document stay, as in `flagged_starts`). `occurrences` is read
    twice (a re-iterable Beam group), never held."""
    first = min(d for d, _ in occurrences)
    for d, p in occurrences:
        if d > first:
            yield d, p


def hashed_flags(texts: list[bytes], k: int) -> list[np.ndarray]:
    """Per document, the sorted flagged window starts found by hashing windows (`window_keys` -> group by digest ->
    `flag_group`), a dict standing in for Beam's GroupByKey: the Beam stage's steps composed in one process."""
    groups: dict[bytes, list[tuple[int, int]]] = defaultdict(list)
    for d, text in enumerate(texts):
        for p, key in enumerate(window_keys(text, k)):
            groups[key].append((d, p))
    flags: list[list[int]] = [[] for _ in texts]
    for occurrences in groups.values():
        for d, p in flag_group(occurrences):
            flags[d].append(p)
    return [np.sort(np.array(f, np.int64)) for f in flags]


def hashed_dedup(texts: list[bytes], tokens: int) -> Result:
    """`dedup` by hashed windows instead of the suffix array (`hashed_flags`, then the same `cut`)."""
    k = min_bytes(tokens)
    decisions = [
        cut(t, f, k) if len(f) else ([], False, 0) for t, f in zip(texts, hashed_flags(texts, k), strict=True)
    ]
    spans = [s for s, _, _ in decisions]
    dropped = np.array([d for _, d, _ in decisions], bool)
    return Result(spans, dropped, int(sum(map(len, texts))), sum(n for _, _, n in decisions))


def report_section(tokens: int, counts: dict[str, int], seconds: float) -> dict:
    """curate_report.json's "substring_dedup" section (both runners). counts: docs_in, docs_edited, docs_dropped,
    spans_removed (in kept records), bytes_in, bytes_removed (a dropped record counts whole)."""
    return {
        "min_bytes": min_bytes(tokens),
        **{key: int(counts.get(key, 0)) for key in SECTION_COUNTS},
        "fraction_removed": round(counts.get("bytes_removed", 0) / max(counts.get("bytes_in", 0), 1), 6),
        "seconds": round(seconds, 3),
    }


SECTION_COUNTS = ("docs_in", "docs_edited", "docs_dropped", "spans_removed", "bytes_in", "bytes_removed")


def remove(text: bytes, spans: list[tuple[int, int]] | tuple) -> bytes:
    """`text` without the sorted, disjoint byte ranges `spans`."""
    parts, at = [], 0
    for s, e in spans:
        parts.append(text[at:s])
        at = e
    parts.append(text[at:])
    return b"".join(parts)


def cut_line(line: bytes, spans: tuple | None) -> bytes:
    """A curated JSONL line with `spans` cut from its text (serialised as the map stage does); as is without spans."""
    if not spans:
        return line
    record = json.loads(line)
    record["text"] = remove(record["text"].encode(), spans).decode()
    return (json.dumps(record, ensure_ascii=False) + "\n").encode()


def curate_stage(
    docs_paths: list[str],
    per_shard: list[dict],
    offsets: np.ndarray,
    alive_N: np.ndarray,
    reasons: list[str],
    cfg: CurateConfig,
) -> tuple[list[tuple], dict]:
    """The curate job's stage: dedups the records that passed the filters and `alive_N` (not deduplicated or skipped).

    `docs_paths[s]` holds shard s's filter-passing records (local indices `per_shard[s]["kept_index"]`, global index
    offsets[s] + local). Sets `reasons[g] = REASON` for dropped records; returns, per shard, the edits
    ((local index, spans), ...) for its write task, and the report section (empty when the stage is off).
    """
    if not cfg.substring_dedup_tokens:
        return [() for _ in docs_paths], {}
    t, where, texts = time.perf_counter(), [], []
    for s, (path, arrays) in enumerate(zip(docs_paths, per_shard, strict=True)):
        with storage.open_binary(path) as src:
            for k, line in zip(arrays["kept_index"].tolist(), src, strict=True):
                if alive_N[offsets[s] + k]:
                    where.append((s, k))
                    texts.append(json.loads(line)["text"].encode())
    result = dedup(texts, cfg.substring_dedup_tokens)
    edits: list[list] = [[] for _ in docs_paths]
    for (s, k), spans, dropped in zip(where, result.spans, result.dropped.tolist(), strict=True):
        if dropped:
            reasons[offsets[s] + k] = REASON
        elif spans:
            edits[s].append((k, tuple(spans)))
    kept_spans = [len(sp) for sp, dropped in zip(result.spans, result.dropped, strict=True) if not dropped]
    counts = {
        "docs_in": len(texts),
        "docs_edited": sum(1 for n in kept_spans if n),
        "docs_dropped": int(result.dropped.sum()),
        "spans_removed": sum(kept_spans),
        "bytes_in": result.bytes_in,
        "bytes_removed": result.bytes_removed,
    }
    report = report_section(cfg.substring_dedup_tokens, counts, time.perf_counter() - t)  # reading included
    return [tuple(e) for e in edits], report
