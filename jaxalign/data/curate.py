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
  7. exact-substring dedup (substring_dedup.py, `substring_dedup_tokens` > 0): spans of >= 4 x tokens bytes that
     occur in an earlier kept record are cut from later ones; records left (nearly) empty get reason
     `substring_dup`. It needs every kept text at once, so it runs in the parent after the global dedup decision,
     on the texts the map stage wrote: after the filters (a record a filter drops holds no first occurrence) and
     after PII (the spans are cut from the text actually written, and templates that differ only in a scrubbed
     address count as the repeats they are). The write stage cuts the spans.

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

The local runner's stages (reading input, map, decide, write) and the shard bookkeeping they share are in
curate_stages.py; this module drives them (`run`) and writes W/removed.jsonl, the report and the contamination file.

`curate.runner="beam"` runs every stage, through the same per-record function (`process_record`) and the same
perplexity scorer and span-cutting code, as an Apache Beam pipeline with byte-identical outputs (curate_beam.py,
curate_beam_stages.py; no per-shard resume there): exact-substring dedup by hashed windows instead of a suffix
array, the perplexity cut points from one float per document gathered on one worker.

Outputs: W/curated/*.jsonl (kept records, all fields, scrubbed text), W/removed.jsonl (one
`{"id", "reason", "duplicate_of"?}` per removed record, input order), W/curate_report.json (counts per reason,
docs/s per stage, the decontamination, perplexity and substring sections), W/contamination.json (with
`curate.decontam`), W/config.json.

Shapes: N records, K = num_bands * rows_per_band permutations (MinHash itself: curate_minhash.py).
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import json
import multiprocessing
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
from absl import logging

from jaxalign import storage
from jaxalign.config import Config
from jaxalign.data import curate_filters as filters
from jaxalign.data import decontam, sources
from jaxalign.data import substring_dedup as substr
from jaxalign.data.curate_stages import (
    Stats,
    _decide,
    _done,
    _load_npz,
    _map_shard,
    _Shard,
    _size,
    _Write,
    _write_atomic,
    _write_shard,
    input_shards,
)
from jaxalign.errors import ConfigError

MAX_BAD_LISTED = 100


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
    if cfg.runner == "beam":  # the same stages as an Apache Beam pipeline (the `beam` extra)
        from jaxalign.data import curate_beam

        return curate_beam.run(config)
    work_dir, out_dir = storage.join(config.workdir, "curate_work"), storage.join(config.workdir, "curated")
    bench = decontam.load(
        cfg.decontam, cfg.decontam_n, cfg.decontam_benchmarks, sources.expand_glob(config.data.input)
    )
    shards = input_shards(config, work_dir, bench.digest() if bench else "")
    storage.path(work_dir).mkdir(parents=True, exist_ok=True)
    storage.path(out_dir).mkdir(parents=True, exist_ok=True)
    _write_atomic(storage.join(config.workdir, "config.json"), lambda f: f.write(config.to_json()))
    sizes, stats = [_size(s.path) for s in shards], Stats()
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
        perplexity = {}
        if cfg.perplexity_model or cfg.perplexity_reference:
            from jaxalign.data import perplexity_filter  # JAX, in the parent only

            docs = []  # per shard: its docs.jsonl and which of its filter-passing records dedup removed
            for shard, a, offset in zip(shards, per_shard, offsets, strict=False):
                kept = a["kept_index"]
                docs.append(
                    (
                        shard.work + ".docs.jsonl",
                        (d.duplicate_of[offset + kept] >= 0) | d.skipped[offset + kept],
                    )
                )
            buckets, perplexity = perplexity_filter.run(config, docs, stats)
            for a, offset, bucket in zip(per_shard, offsets, buckets, strict=False):
                for j in np.flatnonzero(bucket != ""):
                    d.reasons[offset + a["kept_index"][j]] = f"perplexity:{bucket[j]}"
        # Of the filter-passing records, those substring dedup sees (after dedup and the perplexity filter).
        alive_N = (d.duplicate_of < 0) & ~d.skipped
        alive_N &= np.array([not r.startswith("perplexity:") for r in d.reasons], bool)
        paths = [shard.work + ".docs.jsonl" for shard in shards]
        edits, substr_report = substr.curate_stage(paths, per_shard, offsets, alive_N, d.reasons, cfg)
        if substr_report:
            stats.seconds["substring_dedup"] += substr_report["seconds"]
            stats.docs["substring_dedup"] += substr_report["docs_in"]

        writes, pii = [], np.zeros(3, np.int64)
        for shard, a, offset, shard_edits in zip(shards, per_shard, offsets[:-1], edits, strict=True):
            kept = a["kept_index"]
            drop = (d.duplicate_of[offset + kept] >= 0) | d.skipped[offset + kept]
            parent = (substr.REASON, "perplexity")  # reasons the parent gave filter-passing records
            drop |= np.array([d.reasons[offset + k].startswith(parent) for k in kept.tolist()], bool)
            pii += a["pii_Mx3"][~drop].sum(axis=0)
            identity = [shard.fingerprint, kept[drop].tolist()] + ([shard_edits] if shard_edits else [])
            key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()
            out = storage.join(out_dir, shard.name + ".jsonl")
            writes.append(_Write(shard.work, out, tuple(kept[drop].tolist()), key, shard_edits))
        to_write = [k for k, w in enumerate(writes) if not _done(w.work + ".write.done", w.key)]
        for shard_stats in pool.run(
            _write_shard, [writes[k] for k in to_write], [sizes[k] for k in to_write]
        ):
            stats.add(shard_stats)
    remove_stale_outputs(out_dir, shards)

    removed = [k for k, r in enumerate(d.reasons) if r and not d.skipped[k]]

    def removed_lines(f):
        for k in removed:
            dup = d.ids[d.duplicate_of[k]] if d.duplicate_of[k] >= 0 else None
            f.write(removed_line(d.ids[k], d.reasons[k], dup))

    _write_atomic(storage.join(config.workdir, "removed.jsonl"), removed_lines)
    n_valid = len(d.ids) - int(d.skipped.sum())
    counts = {"valid": n_valid, "bad": len(d.bad), "kept": n_valid - len(removed)}
    shard_counts = {"total": len(shards), "mapped": len(to_map), "written": len(to_write)}
    reasons = Counter(d.reasons[k] for k in removed)
    extra = write_contamination(config, bench, d)
    if perplexity:
        extra["perplexity_filter"] = perplexity
    if substr_report:
        extra["substring_dedup"] = substr_report
    write_report(config, "local", shard_counts, counts, reasons, pii.tolist(), stats, start, d.bad, extra)


def write_contamination(config: Config, bench: decontam.Benchmarks | None, decision: Any) -> dict:
    """W/contamination.json from the decision's contaminated records (`decontam.summarise`; an earlier run's file is
    removed when decontamination is off, so the eval job never reads it as this run's); -> the report's section."""
    path = storage.join(config.workdir, "contamination.json")
    if bench is None:
        if storage.exists(path):
            storage.path(path).unlink()
        return {}
    content, report = decontam.summarise(bench, config.curate.decontam, decision)
    _write_atomic(path, lambda f: json.dump(content, f, indent=1))
    return {"decontamination": report}


def removed_line(record_id: Any, reason: str, duplicate_of: Any = None) -> str:
    """One line of W/removed.jsonl: `{"id", "reason", "duplicate_of"?}` (duplicate_of: the kept record's id)."""
    entry = {"id": record_id, "reason": reason}
    if duplicate_of is not None:
        entry["duplicate_of"] = duplicate_of
    return json.dumps(entry, ensure_ascii=False) + "\n"


def remove_stale_outputs(out_dir: str, shards: list[_Shard]) -> None:
    """Deletes curated files of inputs the glob no longer matches."""
    listed = {p.name for p in storage.path(out_dir).iterdir()}
    for stale in listed - {s.name + ".jsonl" for s in shards}:
        storage.path(storage.join(out_dir, stale)).unlink()


def write_report(
    config: Config,
    runner: str,
    shards: dict[str, int],
    counts: dict[str, int],
    reasons: Counter,
    pii: list[int],
    stats: Stats,
    start: float,
    bad: list[str],
    extra: dict | None = None,
) -> None:
    """W/curate_report.json. counts: "valid" (parsed, unique-id records), "bad", "kept"; reasons: removed records
    per reason; pii: replacements per filters.PII_KINDS; bad: the first bad-record messages; start: perf_counter;
    extra: sections of the stages that ran (e.g. "substring_dedup")."""
    report = {
        "input": config.data.input,
        "runner": runner,
        "shards": shards,
        "records": {
            "input": counts["valid"] + counts["bad"],
            "bad": counts["bad"],
            "kept": counts["kept"],
            "removed": counts["valid"] - counts["kept"],
        },
        "removed_by_reason": {r: reasons[r] for r in sorted(reasons, key=reason_order)},
        "pii_replacements": dict(zip(filters.PII_KINDS, pii, strict=True)),
        **(extra or {}),
        # This run's work only; a stage's seconds are summed over workers, so docs_per_s is a per-process rate.
        "stages": stats.table(),
        "wall_seconds": round(time.perf_counter() - start, 3),
        "bad_records": bad[:MAX_BAD_LISTED],
    }
    _write_atomic(
        storage.join(config.workdir, "curate_report.json"), lambda f: json.dump(report, f, indent=2)
    )
    logging.info(
        "curate (%s): kept %d of %d records in %s", runner, counts["kept"], counts["valid"], config.workdir
    )


def reason_order(reason: str) -> tuple[int, str]:
    families = ("exact_duplicate", "near_duplicate", "gopher_repetition", "gopher_quality", "c4", "fineweb")
    families += ("decontam", "perplexity", substr.REASON)
    return families.index(reason.split(":")[0]), reason
