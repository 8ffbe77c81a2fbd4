"""Data curation (`job="curate"`): dedup, quality filters and PII scrubbing of JSONL `{"id", "text", ...}` records.

Stages, in the order that decides a removed record's reason:
  1. exact dedup: blake2b of the normalised text (casefold, whitespace runs collapsed); the first record in input
     order stays, later copies are removed with `duplicate_of` naming it.
  2. near dedup: MinHash over word n-grams (words = `\\w+` runs of the casefolded text), LSH with
     `num_bands` x `rows_per_band`, candidate pairs verified by their signature agreement (the estimated Jaccard)
     >= `near_threshold`, union-find clusters over the whole input; each cluster keeps its first record.
     Dedup runs before the filters, so the record a `duplicate_of` names may itself fail a quality filter.
  3. quality filters (curate_filters.py): Gopher quality, Gopher repetition, C4, FineWeb, with datatrove's defaults;
     a record gets the first failing filter's reason. C4 also drops the lines its rules reject (`c4_drop_lines`).
  4. decontamination (decontam.py, `curate.decontam`): records holding an n-gram of an evaluation item are flagged
     or dropped (`decontam:<benchmark>`); W/contamination.json lists the contaminated eval items.
  5. PII scrubbing of the kept text (e-mails, public IPv4 addresses, phone numbers -> <EMAIL>, <IP>, <PHONE>).
  6. perplexity filter (perplexity_filter.py, parent process, after dedup): kept documents scored by a small LM
     and kept by percentile bucket (`perplexity:<bucket>`).

Execution. Each input file is a shard; files in `sources.expand_glob` order (comma-separated globs, each sorted) and
lines in file order make the global input order.
  map (worker processes): parse and check records, exact hash, MinHash signature, filters and PII per shard ->
      W/curate_work/<shard>.{meta.json,npz,docs.jsonl} and a `.map.done` marker.
  decide (parent): global exact dedup, LSH banding + union-find over all shards' signatures.
  write (worker processes): each shard's kept records -> W/curated/<shard>.jsonl and a `.write.done` marker that
      records which records the decision dropped.
Every file goes through `jaxalign.storage`, so the workdir and inputs may be on an object store (`gs://...`).
Markers are written last, atomically (`storage.write_atomic`), and name the input file's size and mtime, the config
and the output sizes; a re-run skips every shard whose marker still matches. Every step is a function of its shard
and the global decision only, so 1 and N workers write byte-identical files.

Outputs: W/curated/*.jsonl (kept records, all fields, scrubbed text), W/removed.jsonl (one
`{"id", "reason", "duplicate_of"?}` per removed record, input order), W/curate_report.json (counts per reason,
docs/s per stage, the decontamination and perplexity sections), W/contamination.json (with `curate.decontam`),
W/config.json.

Shapes: N records, K = num_bands * rows_per_band permutations, S shingles, P candidate pairs.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import gzip
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import re
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from absl import logging

from jaxalign import storage
from jaxalign.config import Config, CurateConfig
from jaxalign.data import curate_filters as filters
from jaxalign.data import decontam, sources
from jaxalign.errors import ConfigError, DataError

# Bump when the map stage's output changes meaning: finished shards of older versions are then re-processed.
_FORMAT_VERSION = 1
_WORD_RE = re.compile(r"\w+")
_SIG_BATCH_DOCS = 256  # documents per vectorised MinHash call
_SIG_CHUNK_ROWS = 4096  # shingles per [rows, K] block: 4096 x 112 x 8 B = 3.7 MB stays in cache
_MAX_BAD_LISTED = 100

# --- MinHash -------------------------------------------------------------------------------------------------------
_word_hash_cache: dict[bytes, int] = {}
# ASCII bytes -> itself for [A-Za-z0-9_] (what `\w` matches in ASCII), else a space: words by bytes.split().
_ASCII_WORDS = bytes(c if chr(c).isalnum() and c < 128 or c == ord("_") else 32 for c in range(256))


def words(text: str) -> list[str]:
    """The words MinHash and the benchmark's true Jaccard use: `\\w+` runs of the casefolded text."""
    return _WORD_RE.findall(text.casefold())


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Parameters (a_K odd, b_K) of K multiply-add-shift hashes h(x) = (a x + b mod 2^64) >> 32 of 32-bit x.

    Multiply-add-shift is strongly universal from 32 to 32 bits (Dietzfelbinger 1996), the standard stand-in for
    random permutations in MinHash, and needs only wrapping uint64 arithmetic.
    """
    rng = np.random.default_rng([seed, 0x6D696E68617368])
    a = rng.integers(0, 2**64, size=num_perm, dtype=np.uint64) | np.uint64(1)
    b = rng.integers(0, 2**64, size=num_perm, dtype=np.uint64)
    return a, b


def word_bytes(folded: str) -> list[bytes]:
    """`\\w+` words of casefolded text as UTF-8; ASCII text is split as bytes (8x faster than the regex, same words)."""
    if folded.isascii():
        return folded.encode().translate(_ASCII_WORDS).split()
    return [w.encode("utf-8", "surrogatepass") for w in _WORD_RE.findall(folded)]


def shingles(doc_words: list[list[bytes]], n: int) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes x_S (as uint64) of D documents' word n-grams and their document index doc_S, sorted by document.

    A document with fewer than n words has one shingle, of all its words; one without words has none. The n-gram keys
    of all documents are computed together on the concatenated words, and keys crossing a document end dropped.
    """
    cache = _word_hash_cache
    if len(cache) > 2_000_000:
        cache.clear()
    all_words = list(itertools.chain.from_iterable(doc_words))
    for w in set(all_words).difference(cache):
        cache[w] = int.from_bytes(hashlib.blake2b(w, digest_size=8).digest())
    ids_T = np.fromiter(map(cache.__getitem__, all_words), np.uint64, len(all_words))
    length_D = np.array([len(w) for w in doc_words], np.int64)
    start_D = np.cumsum(length_D) - length_D
    doc_T = np.repeat(np.arange(len(doc_words)), length_D)
    keys = filters.mix64(ids_T + np.uint64(1))  # k-gram keys at every position, k = 1 ... n (see ngram_keys)
    x, doc = [], []
    for k in range(1, n + 1):
        if k > 1:
            keys = filters.mix64(keys[:-1] ^ ids_T[k - 1 :])
        if k < n:
            short = np.flatnonzero(length_D == k)
            x.append(keys[start_D[short]])
            doc.append(short)
    d = doc_T[: len(keys)]
    inside = np.arange(len(keys)) - start_D[d] <= length_D[d] - n
    x.append(keys[inside])
    doc.append(d[inside])
    x_S, doc_S = np.concatenate(x), np.concatenate(doc)
    order = np.argsort(doc_S, kind="stable")
    return x_S[order] >> np.uint64(32), doc_S[order]


def minhash(
    x_S: np.ndarray, doc_S: np.ndarray, num_docs: int, a_K: np.ndarray, b_K: np.ndarray
) -> np.ndarray:
    """MinHash signatures [D, K] uint32 of shingles x_S grouped by (sorted) doc_S, hashed in [rows, K] blocks.

    A document without shingles keeps the all-ones signature (never used: it is not near-deduplicated).
    """
    sig_DxK = np.full((num_docs, len(a_K)), np.iinfo(np.uint32).max, np.uint64)
    for start in range(0, len(x_S), _SIG_CHUNK_ROWS):
        x, doc = x_S[start : start + _SIG_CHUNK_ROWS], doc_S[start : start + _SIG_CHUNK_ROWS]
        h_RxK = np.multiply.outer(x, a_K)
        h_RxK += b_K
        h_RxK >>= np.uint64(32)
        seg = np.flatnonzero(np.r_[True, doc[1:] != doc[:-1]])  # each document's run of rows in this block
        d = doc[seg]
        sig_DxK[d] = np.minimum(sig_DxK[d], np.minimum.reduceat(h_RxK, seg, axis=0))
    return sig_DxK.astype(np.uint32)


def candidate_pairs(sig_NxK: np.ndarray, num_bands: int, rows: int, threshold: float) -> np.ndarray:
    """Pairs [P, 2] (i < j) that share a band and whose signatures agree on >= `threshold` of the K hashes.

    Within a band's bucket (members in index order) every member is paired with the bucket's first member and its
    predecessor, so a bucket of m records costs < 2m pairs. Band keys are 64-bit hashes of the band's rows
    (colliding with probability ~N^2 / 2^64, and verification catches a collision anyway).
    """
    n = len(sig_NxK)
    pos = np.arange(n)
    found = []
    for band in range(num_bands):
        cols = sig_NxK[:, band * rows : (band + 1) * rows].astype(np.uint64)
        key = filters.mix64(cols[:, 0] + np.uint64(1))
        for c in range(1, rows):
            key = filters.mix64(key ^ cols[:, c])
        order = np.argsort(key, kind="stable")
        k = key[order]
        is_start = np.r_[True, k[1:] != k[:-1]]
        if is_start.all():
            continue
        first = order[np.maximum.accumulate(np.where(is_start, pos, 0))]
        member = np.flatnonzero(~is_start)
        found.append(np.stack([first[member], order[member]], 1))
        found.append(np.stack([order[member - 1], order[member]], 1))
    if not found:
        return np.zeros((0, 2), np.int64)
    pairs = np.unique(np.concatenate(found).astype(np.int64), axis=0)
    if threshold <= 0:
        return pairs
    keep = np.concatenate(
        [
            (sig_NxK[p[:, 0]] == sig_NxK[p[:, 1]]).mean(axis=1) >= threshold
            for p in np.array_split(pairs, max(1, len(pairs) // 65536))
        ]
    )
    return pairs[keep]


def components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected components [N] of the graph with edges `pairs`, each labelled by its smallest member.

    Vectorised union-find: every round hooks each edge's two roots to the smaller one, then pointer-jumps until every
    node points at its root. Labels only decrease, so no cycles form and the root is the component's minimum.
    """
    label = np.arange(n)
    i, j = pairs[:, 0], pairs[:, 1]
    while True:
        li, lj = label[i], label[j]
        if np.array_equal(li, lj):
            return label
        low = np.minimum(li, lj)
        np.minimum.at(label, li, low)
        np.minimum.at(label, lj, low)
        while not np.array_equal(label[label], label):
            label = label[label]


# --- reading input --------------------------------------------------------------------------------------------------
def _parse(raw: bytes, where: str) -> dict:
    record = sources.parse_json_line(raw, where)  # UTF-8, JSON, an object
    missing = [k for k in ("id", "text") if k not in record]
    if missing:
        raise DataError(
            f"{where}: missing field {' and '.join(map(repr, missing))}; records need 'id' and 'text'"
        )
    if not isinstance(record["text"], str):
        raise DataError(f"{where}: field 'text' must be a string, got {record['text']!r:.40}")
    if isinstance(record["id"], bool) or not isinstance(record["id"], (str, int)):
        raise DataError(f"{where}: field 'id' must be a string or an integer, got {record['id']!r:.40}")
    if b"\\u" in raw:  # an escape can encode a lone surrogate, which no UTF-8 output can hold
        try:
            json.dumps(record, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"{where}: a \\u escape encodes a lone surrogate, which is not text") from None
    return record


def _records(path: str, on_error: str, bad: list[str]) -> Iterator[tuple[int, dict]]:
    """Yields (line number, record) of one JSONL(.gz) file; bad lines raise DataError or, with "skip", go to `bad`."""
    line_no = 0
    try:
        with storage.open_binary(path) as raw, gzip.open(raw, "rb") if path.endswith(".gz") else raw as f:
            for line_no, raw in enumerate(f, 1):  # noqa: B007 (line_no is read below when the file is corrupt)
                if not raw.strip():
                    continue
                try:
                    record = _parse(raw, f"{path}:{line_no}")
                except DataError as e:
                    if on_error == "error":
                        raise
                    bad.append(str(e))
                    continue
                yield line_no, record
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}:{line_no + 1}: cannot read the file ({e})") from None


# --- shard bookkeeping ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Shard:
    path: str
    name: str
    work: str  # W/curate_work/<name>, the prefix of the map stage's files
    fingerprint: str  # digest of the input file's identity and every setting the map stage reads


class _Stats:
    """Documents and seconds per stage (a stage's seconds are summed over workers)."""

    def __init__(self):
        self.seconds: Counter[str] = Counter()
        self.docs: Counter[str] = Counter()

    @contextlib.contextmanager
    def timed(self, stage: str, docs: int = 1) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.seconds[stage] += time.perf_counter() - t
        self.docs[stage] += docs

    def add(self, other: _Stats) -> None:
        self.seconds.update(other.seconds)
        self.docs.update(other.docs)

    def table(self) -> dict:
        rate = lambda s: round(self.docs[s] / max(self.seconds[s], 1e-9), 1)
        return {
            s: {"docs": self.docs[s], "seconds": round(t, 4), "docs_per_s": rate(s)}
            for s, t in self.seconds.items()
        }


def _write_atomic(path: str, write: Callable[[Any], None], binary: bool = False) -> None:
    """`write(f)` into `path`, atomically: a local temporary file renamed, or on an object store one object written
    whole from memory (no rename there)."""
    if not storage.is_local(path):
        buffer = io.BytesIO() if binary else io.StringIO()
        write(buffer)
        storage.write_atomic(path, buffer.getvalue())
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") if binary else open(tmp, "w", encoding="utf-8") as f:
        write(f)
    os.replace(tmp, path)


def _size(path: str) -> int:
    return os.path.getsize(path) if storage.is_local(path) else storage.path(path).stat().length


def _mark_done(marker: str, key: str, files: list[str]) -> None:
    """Writes the marker last: `key` and the size of every file the step wrote (paths relative to the marker)."""
    directory = os.fspath(storage.path(marker).parent)
    sizes = {storage.relpath(p, directory): _size(p) for p in files}
    _write_atomic(marker, lambda f: json.dump({"key": key, "files": sizes}, f))


def _done(marker: str, key: str) -> bool:
    """True if `marker` was written for `key` and every file it lists still has its recorded size."""
    try:
        content = json.loads(storage.read_text(marker))
    except (OSError, ValueError):
        return False
    directory = os.fspath(storage.path(marker).parent)
    paths = {storage.resolve(directory, p): size for p, size in content["files"].items()}
    return content["key"] == key and all(
        storage.path(p).is_file() and _size(p) == s for p, s in paths.items()
    )


def _load_npz(path: str) -> dict[str, np.ndarray]:
    """Every array of a map stage's .npz (read whole: it is one shard's hashes and signatures)."""
    with np.load(io.BytesIO(storage.read_bytes(path))) as z:
        return {k: z[k] for k in z.files}


def _shards(config: Config, work_dir: str, extra: str = "") -> list[_Shard]:
    # The map stage reads every curate setting but these, which act later (the perplexity filter in the parent).
    later = ("num_workers", "exact_dedup", "near_threshold")
    later += tuple(k for k in dataclasses.asdict(config.curate) if k.startswith("perplexity_"))
    settings = {k: v for k, v in dataclasses.asdict(config.curate).items() if k not in later}
    shards = []
    for i, path in enumerate(sources.expand_glob(config.data.input)):
        if sources.file_format(path) != "jsonl":
            raise DataError(f"{path}: curation reads JSONL files (.jsonl, .json, optionally .gz) only")
        if storage.is_local(path):
            stat = os.stat(path)
            where, size, mtime = os.path.abspath(path), stat.st_size, stat.st_mtime_ns
        else:  # an object: its size and modification time (seconds) as the store reports them
            stat = storage.path(path).stat()
            where, size, mtime = path, stat.length, stat.mtime
        identity = [_FORMAT_VERSION, where, size, mtime, settings]
        # `extra`: the decontamination benchmarks' digest (a changed benchmark file re-maps every shard).
        identity += [config.data.on_error, config.seed, extra]
        fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        name = f"{i:05d}-" + re.sub(
            r"[^\w.-]", "_", re.sub(r"(\.jsonl?)?(\.gz)?$", "", os.path.basename(path))
        )
        shards.append(_Shard(path, name, storage.join(work_dir, name), fingerprint))
    return shards


# --- map: one shard in a worker --------------------------------------------------------------------------------------
def _map_shard(
    shard: _Shard, cfg: CurateConfig, on_error: str, seed: int, bench: decontam.Benchmarks | None = None
) -> _Stats:
    """Reads one shard; writes per-record hashes, signatures and filter reasons, and the scrubbed passing records."""
    stats, bad, chain = _Stats(), [], filters.enabled(cfg)
    ids, lines, reasons, exact, has_words, kept_index, pii, sigs, pending = [], [], [], [], [], [], [], [], []
    contaminated = []  # [local index, benchmark indices, {benchmark index: item indices}] per contaminated record
    a_K, b_K = permutations(cfg.num_bands * cfg.rows_per_band, seed)
    records = _records(shard.path, on_error, bad)
    # Streamed: a local file, or an object uploaded as it is written (published by the rename below).
    with storage.path(shard.work + ".docs.jsonl.tmp").open("w", encoding="utf-8") as out:
        while True:
            with stats.timed("read", 0):
                line_no, record = next(records, (0, None))
            if record is None:
                break
            stats.docs["read"] += 1
            ids.append(record["id"])
            lines.append(line_no)
            text = record["text"]
            with stats.timed("exact_hash"):
                folded = text.casefold()
                exact.append(hashlib.blake2b(" ".join(folded.split()).encode(), digest_size=16).digest())
            if cfg.near_dedup:
                with stats.timed("minhash"):
                    pending.append(word_bytes(folded))
                    has_words.append(len(pending[-1]) > 0)
                    if len(pending) == _SIG_BATCH_DOCS:
                        sigs.append(minhash(*shingles(pending, cfg.ngram), len(pending), a_K, b_K))
                        pending = []
            reason = ""
            for name, fn in chain:
                with stats.timed(name):
                    reason, text = fn(text)
                if reason:
                    break
            if bench is not None and not reason:
                with stats.timed("decontam"):
                    hits = bench.match(text)
                if hits:
                    contaminated.append([len(ids) - 1, list(hits), {str(b): i for b, i in hits.items()}])
                    if cfg.decontam == "drop":
                        reason = f"decontam:{bench.names[next(iter(hits))]}"
            reasons.append(reason)
            if reason:
                continue
            if cfg.pii:
                with stats.timed("pii"):
                    text, counts = filters.scrub_pii(text)
                pii.append(counts)
            record["text"] = text
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            kept_index.append(len(ids) - 1)
        if pending:
            with stats.timed("minhash", 0):
                sigs.append(minhash(*shingles(pending, cfg.ngram), len(pending), a_K, b_K))
    storage.path(shard.work + ".docs.jsonl.tmp").replace(shard.work + ".docs.jsonl")

    n, k = len(ids), cfg.num_bands * cfg.rows_per_band if cfg.near_dedup else 0
    arrays = {
        "exact_Nx16": np.frombuffer(b"".join(exact), np.uint8).reshape(n, 16),
        "sig_NxK": np.concatenate(sigs) if sigs else np.zeros((n, k), np.uint32),
        "has_words_N": np.array(has_words or [False] * n, bool),
        "kept_index": np.array(kept_index, np.int64),  # [M] records that passed the filters
        "pii_Mx3": np.array(pii or [(0, 0, 0)] * len(kept_index), np.int64).reshape(-1, 3),
    }
    _write_atomic(shard.work + ".npz", lambda f: np.savez(f, **arrays), binary=True)
    meta = {"ids": ids, "lines": lines, "reasons": reasons, "bad": bad, "contaminated": contaminated}
    _write_atomic(shard.work + ".meta.json", lambda f: json.dump(meta, f, ensure_ascii=False))
    files = [shard.work + suffix for suffix in (".npz", ".meta.json", ".docs.jsonl")]
    _mark_done(shard.work + ".map.done", shard.fingerprint, files)
    return stats


# --- decide: global dedup in the parent ----------------------------------------------------------------------------
@dataclasses.dataclass
class _Decision:
    ids: list  # [N] every parsed record's id, input order
    reasons: list[str]  # [N] "" for kept records
    duplicate_of: np.ndarray  # [N] global index of the kept representative, -1 if not a duplicate
    skipped: np.ndarray  # [N] bool: bad records the parent found (a repeated id, with on_error="skip")
    bad: list[str]  # "file:line: message" of every skipped record
    # (global index, benchmark indices, {benchmark index (str): item indices}) of contaminated records, input order
    contaminated: list


def _check_ids(ids: list, where: Callable[[int], str], on_error: str, bad: list[str]) -> np.ndarray:
    skipped = np.zeros(len(ids), bool)
    first_seen: dict[Any, int] = {}
    for k, record_id in enumerate(ids):
        first = first_seen.setdefault(record_id, k)
        if first != k:
            message = f"{where(k)}: duplicate id {record_id!r} (first at {where(first)}); ids must be unique"
            if on_error == "error":
                raise DataError(message)
            bad.append(message)
            skipped[k] = True
    return skipped


def _decide(shards: list[_Shard], arrays: dict, cfg: CurateConfig, on_error: str, stats: _Stats) -> _Decision:
    metas = []
    for shard in shards:
        metas.append(json.loads(storage.read_text(shard.work + ".meta.json")))
    ids = [i for m in metas for i in m["ids"]]
    offsets = np.cumsum([0] + [len(m["ids"]) for m in metas])
    # Contaminated records by global index: (index, benchmark indices, {benchmark index: item indices}).
    contaminated = [
        (int(o) + c[0], *c[1:]) for m, o in zip(metas, offsets, strict=False) for c in m["contaminated"]
    ]

    def where(k: int) -> str:  # "file:line" of global record k
        s = int(np.searchsorted(offsets, k, side="right")) - 1
        return f"{shards[s].path}:{metas[s]['lines'][k - offsets[s]]}"

    bad = [b for m in metas for b in m["bad"]]
    skipped = _check_ids(ids, where, on_error, bad)
    duplicate_of = np.full(len(ids), -1, np.int64)
    near = np.zeros(len(ids), bool)
    if cfg.exact_dedup:
        idx = np.flatnonzero(~skipped)
        with stats.timed("exact_dedup", len(idx)):
            keys = np.ascontiguousarray(arrays["exact_Nx16"][idx]).view(np.dtype((np.void, 16))).ravel()
            _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
            first_of = idx[first[inverse.ravel()]]  # np.unique returns first occurrences: input order
            dup = first_of != idx
            duplicate_of[idx[dup]] = first_of[dup]
    if cfg.near_dedup:
        idx = np.flatnonzero(~skipped & arrays["has_words_N"] & (duplicate_of < 0))
        with stats.timed("near_dedup", len(idx)):
            pairs = candidate_pairs(
                arrays["sig_NxK"][idx], cfg.num_bands, cfg.rows_per_band, cfg.near_threshold
            )
            label = components(len(idx), pairs)
            removed = label != np.arange(len(idx))
            duplicate_of[idx[removed]] = idx[label[removed]]
            near[idx[removed]] = True
            # Exact copies of a record that near dedup removed point at that record's representative instead.
            copies = np.flatnonzero((duplicate_of >= 0) & ~near)
            target = duplicate_of[copies]
            duplicate_of[copies] = np.where(near[target], duplicate_of[target], target)
    reasons = [r for m in metas for r in m["reasons"]]
    for k in np.flatnonzero(duplicate_of >= 0):
        reasons[k] = "near_duplicate" if near[k] else "exact_duplicate"
    return _Decision(ids, reasons, duplicate_of, skipped, bad, contaminated)


# --- write: one shard in a worker ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Write:
    work: str
    out: str  # W/curated/<name>.jsonl
    drop: tuple[int, ...]  # local indices of filter-passing records that dedup removed or the parent skipped
    key: str  # digest of the map fingerprint and `drop`: the marker goes stale when either changes


def _write_shard(task: _Write) -> _Stats:
    stats, drop = _Stats(), set(task.drop)
    kept_index = _load_npz(task.work + ".npz")["kept_index"].tolist()

    def copy(out):
        with storage.open_binary(task.work + ".docs.jsonl") as src:
            out.writelines(line for k, line in zip(kept_index, src, strict=True) if k not in drop)

    with stats.timed("write", len(kept_index)):
        _write_atomic(task.out, copy, binary=True)
        _mark_done(task.work + ".write.done", task.key, [task.out])
    return stats


# --- run -----------------------------------------------------------------------------------------------------------
class _Pool:
    """Worker processes, started on first use with more than one task. Spawned, not forked: JAX may be imported."""

    def __init__(self, workers: int):
        self.workers, self.pool = workers, None

    def run(self, fn: Callable, tasks: list, weights: list[int]) -> list:
        """fn over tasks, largest weight first; results in task order. One task or one worker runs in-process."""
        if self.workers <= 1 or len(tasks) <= 1:
            return [fn(task) for task in tasks]
        if self.pool is None:
            context = multiprocessing.get_context("spawn")
            self.pool = concurrent.futures.ProcessPoolExecutor(self.workers, mp_context=context)
        futures = {
            self.pool.submit(fn, tasks[k]): k for k in sorted(range(len(tasks)), key=lambda k: -weights[k])
        }
        results = [None] * len(tasks)
        for future in concurrent.futures.as_completed(futures):
            results[futures[future]] = future.result()
        return results

    def __enter__(self) -> _Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            # After an error queued shards are dropped; running ones finish and keep their markers for the re-run.
            self.pool.shutdown(wait=True, cancel_futures=True)


def run(config: Config) -> None:
    """Curates `config.data.input` into `config.workdir` (see the module docstring); resumes finished shards."""
    cfg, start = config.curate, time.perf_counter()
    if not config.data.input:
        raise ConfigError("data.input is empty: curation needs --config.data.input=GLOB of JSONL(.gz) files")
    work_dir, out_dir = storage.join(config.workdir, "curate_work"), storage.join(config.workdir, "curated")
    bench = decontam.load(
        cfg.decontam, cfg.decontam_n, cfg.decontam_benchmarks, sources.expand_glob(config.data.input)
    )
    shards = _shards(config, work_dir, bench.digest() if bench else "")
    storage.path(work_dir).mkdir(parents=True, exist_ok=True)
    storage.path(out_dir).mkdir(parents=True, exist_ok=True)
    _write_atomic(storage.join(config.workdir, "config.json"), lambda f: f.write(config.to_json()))
    sizes, stats = [_size(s.path) for s in shards], _Stats()
    with _Pool(cfg.num_workers) as pool:
        to_map = [k for k, s in enumerate(shards) if not _done(s.work + ".map.done", s.fingerprint)]
        logging.info("curate: %d shards, %d mapped before", len(shards), len(shards) - len(to_map))
        map_fn = functools.partial(
            _map_shard, cfg=cfg, on_error=config.data.on_error, seed=config.seed, bench=bench
        )
        for shard_stats in pool.run(map_fn, [shards[k] for k in to_map], [sizes[k] for k in to_map]):
            stats.add(shard_stats)

        per_shard = []
        for shard in shards:
            per_shard.append(_load_npz(shard.work + ".npz"))
        arrays = {
            k: np.concatenate([a[k] for a in per_shard]) for k in ("exact_Nx16", "sig_NxK", "has_words_N")
        }
        d = _decide(shards, arrays, cfg, config.data.on_error, stats)

        offsets = np.cumsum([0] + [len(a["exact_Nx16"]) for a in per_shard])
        drops = []  # per shard [M] bool: filter-passing records that a later stage removes
        for a, offset in zip(per_shard, offsets, strict=False):
            kept = a["kept_index"]
            drops.append((d.duplicate_of[offset + kept] >= 0) | d.skipped[offset + kept])
        perplexity = {}
        if cfg.perplexity_model or cfg.perplexity_reference:
            from jaxalign.data import perplexity_filter  # JAX, in the parent only

            docs = [(s.work + ".docs.jsonl", drop) for s, drop in zip(shards, drops, strict=True)]
            buckets, perplexity = perplexity_filter.run(config, docs, stats)
            for a, offset, drop, bucket in zip(per_shard, offsets, drops, buckets, strict=False):
                for j in np.flatnonzero(bucket != ""):
                    d.reasons[offset + a["kept_index"][j]] = f"perplexity:{bucket[j]}"
                drop |= bucket != ""

        writes, pii = [], np.zeros(3, np.int64)
        for shard, a, drop in zip(shards, per_shard, drops, strict=True):
            kept = a["kept_index"]
            pii += a["pii_Mx3"][~drop].sum(axis=0)
            key = hashlib.sha256(json.dumps([shard.fingerprint, kept[drop].tolist()]).encode()).hexdigest()
            out = storage.join(out_dir, shard.name + ".jsonl")
            writes.append(_Write(shard.work, out, tuple(kept[drop].tolist()), key))
        to_write = [k for k, w in enumerate(writes) if not _done(w.work + ".write.done", w.key)]
        for shard_stats in pool.run(
            _write_shard, [writes[k] for k in to_write], [sizes[k] for k in to_write]
        ):
            stats.add(shard_stats)
    listed = {p.name for p in storage.path(out_dir).iterdir()}
    for stale in listed - {s.name + ".jsonl" for s in shards}:  # inputs the glob lost
        storage.path(storage.join(out_dir, stale)).unlink()

    removed = [k for k, r in enumerate(d.reasons) if r and not d.skipped[k]]

    def removed_lines(f):
        for k in removed:
            entry = {"id": d.ids[k], "reason": d.reasons[k]}
            if d.duplicate_of[k] >= 0:
                entry["duplicate_of"] = d.ids[d.duplicate_of[k]]
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")

    _write_atomic(storage.join(config.workdir, "removed.jsonl"), removed_lines)
    by_reason = Counter(d.reasons[k] for k in removed)
    contamination_path = storage.join(config.workdir, "contamination.json")
    if bench is not None:
        content, contamination_report = decontam.summarise(bench, cfg.decontam, d)
        _write_atomic(contamination_path, lambda f: json.dump(content, f, indent=1))
    elif storage.exists(contamination_path):  # an earlier run's: the eval job must not read it as this one's
        storage.path(contamination_path).unlink()
    n_valid = len(d.ids) - int(d.skipped.sum())
    report = {
        "input": config.data.input,
        "shards": {"total": len(shards), "mapped": len(to_map), "written": len(to_write)},
        "records": {
            "input": n_valid + len(d.bad),
            "bad": len(d.bad),
            "kept": n_valid - len(removed),
            "removed": len(removed),
        },
        "removed_by_reason": {r: by_reason[r] for r in sorted(by_reason, key=_reason_order)},
        "pii_replacements": dict(zip(filters.PII_KINDS, pii.tolist(), strict=True)),
        **({"decontamination": contamination_report} if bench is not None else {}),
        **({"perplexity_filter": perplexity} if perplexity else {}),
        # This run's work only; a stage's seconds are summed over workers, so docs_per_s is a per-process rate.
        "stages": stats.table(),
        "wall_seconds": round(time.perf_counter() - start, 3),
        "bad_records": d.bad[:_MAX_BAD_LISTED],
    }
    _write_atomic(
        storage.join(config.workdir, "curate_report.json"), lambda f: json.dump(report, f, indent=2)
    )
    logging.info("curate: kept %d of %d records in %s", n_valid - len(removed), len(d.ids), config.workdir)


def _reason_order(reason: str) -> tuple[int, str]:
    families = ("exact_duplicate", "near_duplicate", "gopher_repetition", "gopher_quality", "c4", "fineweb")
    families += ("decontam", "perplexity")
    return families.index(reason.split(":")[0]), reason
