"""The local curation runner's stages (`curate.runner="local"`, driven by `curate.run`; the stages' order, reasons
and outputs are described in curate.py's docstring), and the shard bookkeeping they share.

  reading input    `read_records` / `timed_records`: one JSONL file's records, bad lines skipped or raised
  shards           `input_shards` (one per input file, with the fingerprint that decides a re-run), `Stats`,
                   atomic writes and the `.done` markers that let a re-run skip finished shards
  map              `process_record` (also the Beam runner's per-record function), `_map_shard` in a worker
  decide           `_decide`: global exact dedup, LSH banding + union-find, in the parent
  write            `_write_shard`: a shard's kept records, in a worker

Shapes: N records, K = num_bands * rows_per_band permutations (MinHash itself: curate_minhash.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import io
import json
import os
import re
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from jaxalign import storage
from jaxalign.config import Config, CurateConfig
from jaxalign.data import curate_filters as filters
from jaxalign.data import curate_minhash as mh
from jaxalign.data import decontam, sources
from jaxalign.data import substring_dedup as substr
from jaxalign.errors import DataError

# Bump when the map stage's output changes meaning: finished shards of older versions are then re-processed.
_FORMAT_VERSION = 1
SIG_BATCH_DOCS = 256  # documents per vectorised MinHash call


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


def read_records(path: str, on_error: str, bad: list[str]) -> Iterator[tuple[int, dict]]:
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


def timed_records(path: str, on_error: str, bad: list[str], stats: Stats) -> Iterator[tuple[int, dict]]:
    """`read_records`, its time and count added to `stats` as the "read" stage."""
    records = read_records(path, on_error, bad)
    while True:
        with stats.timed("read", 0):
            line_no, record = next(records, (0, None))
        if record is None:
            return
        stats.docs["read"] += 1
        yield line_no, record


# --- shard bookkeeping ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Shard:
    path: str
    name: str
    work: str  # W/curate_work/<name>, the prefix of the map stage's files
    fingerprint: str  # digest of the input file's identity and every setting the map stage reads


class Stats:
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

    def add(self, other: Stats) -> None:
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


def input_shards(config: Config, work_dir: str, extra: str = "") -> list[_Shard]:
    # The map stage reads every curate setting but these, which act later (in the parent) or choose only how it
    # runs. `extra`: the decontamination benchmarks' digest (a changed benchmark file re-maps every shard).
    later = (
        "num_workers",
        "exact_dedup",
        "near_threshold",
        "substring_dedup_tokens",
        "runner",
        "beam_options",
    )
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
        identity += [config.data.on_error, config.seed] + ([extra] if extra else [])
        fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        name = f"{i:05d}-" + re.sub(
            r"[^\w.-]", "_", re.sub(r"(\.jsonl?)?(\.gz)?$", "", os.path.basename(path))
        )
        shards.append(_Shard(path, name, storage.join(work_dir, name), fingerprint))
    return shards


# --- map: one shard in a worker --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Processed:
    """What the map stage derives from one parsed record (both runners call `process_record`)."""

    exact: bytes  # 16-byte blake2b of the normalised text: the exact-dedup key
    words: list[bytes] | None  # MinHash words (None without near dedup); signatures are computed in batches
    reason: str  # the first failing quality filter's reason, "" if the record passed
    line: str  # the kept record (scrubbed text) as its curated JSONL line, "" if a filter removed it
    pii: tuple[int, int, int]  # replacements per kind of filters.PII_KINDS in `line`
    hits: dict | None = None  # decontamination: {benchmark index: [item indices]} this record contains


def process_record(
    record: dict, cfg: CurateConfig, chain: list, stats: Stats, bench: decontam.Benchmarks | None = None
) -> Processed:
    """Exact hash, MinHash words, quality filters (`chain` = filters.enabled(cfg)), decontamination against
    `bench` (when given) and PII of one record."""
    text = record["text"]
    with stats.timed("exact_hash"):
        folded = text.casefold()
        exact = hashlib.blake2b(" ".join(folded.split()).encode(), digest_size=16).digest()
    doc_words = None
    if cfg.near_dedup:
        with stats.timed("minhash"):
            doc_words = mh.word_bytes(folded)
    reason = ""
    for name, fn in chain:
        with stats.timed(name):
            reason, text = fn(text)
        if reason:
            return Processed(exact, doc_words, reason, "", (0, 0, 0))
    hits = None
    if bench is not None:
        with stats.timed("decontam"):
            hits = bench.match(text) or None
        if hits and cfg.decontam == "drop":
            return Processed(
                exact, doc_words, f"decontam:{bench.names[next(iter(hits))]}", "", (0, 0, 0), hits
            )
    counts = (0, 0, 0)
    if cfg.pii:
        with stats.timed("pii"):
            text, counts = filters.scrub_pii(text)
    line = json.dumps({**record, "text": text}, ensure_ascii=False) + "\n"
    return Processed(exact, doc_words, "", line, counts, hits)


def _map_shard(
    shard: _Shard, cfg: CurateConfig, on_error: str, seed: int, bench: decontam.Benchmarks | None = None
) -> Stats:
    """Reads one shard; writes per-record hashes, signatures and filter reasons, and the scrubbed passing records."""
    stats, bad, chain = Stats(), [], filters.enabled(cfg)
    ids, lines, reasons, exact, has_words, kept_index, pii, sigs, pending = [], [], [], [], [], [], [], [], []
    contaminated = []  # [local index, benchmark indices, {benchmark index: item indices}] per contaminated record
    a_K, b_K = mh.permutations(cfg.num_bands * cfg.rows_per_band, seed)
    # Streamed: a local file, or an object uploaded as it is written (published by the rename below).
    with storage.path(shard.work + ".docs.jsonl.tmp").open("w", encoding="utf-8") as out:
        for line_no, record in timed_records(shard.path, on_error, bad, stats):
            ids.append(record["id"])
            lines.append(line_no)
            done = process_record(record, cfg, chain, stats, bench)
            if done.hits:
                contaminated.append(
                    [len(ids) - 1, list(done.hits), {str(b): i for b, i in done.hits.items()}]
                )
            exact.append(done.exact)
            if cfg.near_dedup:
                pending.append(done.words)
                has_words.append(len(done.words) > 0)
                if len(pending) == SIG_BATCH_DOCS:
                    with stats.timed("minhash", 0):
                        sigs.append(mh.signatures(pending, cfg, a_K, b_K))
                    pending = []
            reasons.append(done.reason)
            if done.reason:
                continue
            if cfg.pii:
                pii.append(done.pii)
            out.write(done.line)
            kept_index.append(len(ids) - 1)
        if pending:
            with stats.timed("minhash", 0):
                sigs.append(mh.signatures(pending, cfg, a_K, b_K))
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


def duplicate_id_message(record_id: Any, at: str, first_at: str) -> str:
    """The bad-record line of a repeated id ("file:line" of this record and of the id's first record)."""
    return f"{at}: duplicate id {record_id!r} (first at {first_at}); ids must be unique"


def _check_ids(ids: list, where: Callable[[int], str], on_error: str, bad: list[str]) -> np.ndarray:
    skipped = np.zeros(len(ids), bool)
    first_seen: dict[Any, int] = {}
    for k, record_id in enumerate(ids):
        first = first_seen.setdefault(record_id, k)
        if first != k:
            message = duplicate_id_message(record_id, where(k), where(first))
            if on_error == "error":
                raise DataError(message)
            bad.append(message)
            skipped[k] = True
    return skipped


def _decide(shards: list[_Shard], arrays: dict, cfg: CurateConfig, on_error: str, stats: Stats) -> _Decision:
    metas = []
    for shard in shards:
        metas.append(json.loads(storage.read_text(shard.work + ".meta.json")))
    ids = [i for m in metas for i in m["ids"]]
    offsets = np.cumsum([0] + [len(m["ids"]) for m in metas])
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
            pairs = mh.candidate_pairs(
                arrays["sig_NxK"][idx], cfg.num_bands, cfg.rows_per_band, cfg.near_threshold
            )
            label = mh.components(len(idx), pairs)
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
    key: str  # digest of the map fingerprint and `drop` (and `edits`): the marker goes stale when either changes
    edits: tuple = ()  # (local index, ((start, end), ...) UTF-8 byte spans to cut) from exact-substring dedup


def _write_shard(task: _Write) -> Stats:
    stats, drop = Stats(), set(task.drop)
    kept_index = _load_npz(task.work + ".npz")["kept_index"].tolist()
    edits = dict(task.edits)

    def copy(out):
        with storage.open_binary(task.work + ".docs.jsonl") as src:
            pairs = zip(kept_index, src, strict=True)
            out.writelines(substr.cut_line(line, edits.get(k)) for k, line in pairs if k not in drop)

    with stats.timed("write", len(kept_index)):
        _write_atomic(task.out, copy, binary=True)
        _mark_done(task.work + ".write.done", task.key, [task.out])
    return stats
