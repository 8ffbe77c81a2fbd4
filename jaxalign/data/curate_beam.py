"""Curation as an Apache Beam pipeline (`curate.runner="beam"`): the local runner's stages and outputs, distributed.

Runs on any Beam runner chosen by `curate.beam_options` (flags for `PipelineOptions`): "" is Beam's local default,
"--runner=DirectRunner --direct_num_workers=2 --direct_running_mode=multi_processing" uses local processes, and
Dataflow / Flink / Spark take their usual flags (see the README). Beam's DirectRunner first tries Prism, whose binary
it downloads from GitHub on first use (offline it falls back to the FnApiRunner after a few seconds);
"--runner=FnApiRunner" runs the same in-process engine directly. Every record goes through
`curate_stages.process_record`, the local runner's per-record function (parse checks, exact hash, MinHash
words, quality filters with C4 line drops, decontamination against `curate.decontam`'s benchmarks, PII), and
MinHash signatures through `mh.signatures`; LSH keys (`mh.band_keys`), pair verification (`mh.verified`) and
clustering (`mh.components`) are shared too, as are the perplexity scorer and bucketing (perplexity_filter.py)
and the exact-substring span cutting (`substring_dedup.cut`).

Pipeline (records are keyed by their global position pos = shard index << 32 | line number, so sorting positions
is the local runner's input order: files in `sources.expand_glob` order, lines in file order):
  map        one input file per task (files are the unit of parallelism, as in the local runner): per-record
             metadata (id, filter reason, exact hash, signature), the kept JSONL lines, bad lines, stage timings.
  ids        GroupByKey on the id: the first record of an id stays, later ones are bad records (skipped or fatal).
  exact      GroupByKey on the exact hash: the first record stays, later ones are `exact_duplicate` of it.
  near       each remaining record with words emits one (band, key) per LSH band -> GroupByKey -> each bucket, in
             input order, pairs every member with the bucket's first member and its predecessor (the local rule,
             so both runners verify the same pairs) -> pairs kept if their signatures agree on >= near_threshold.
  cluster    every verified pair goes to ONE worker, which runs union-find (`mh.components`) over them and
             emits (member, the cluster's first record) for every non-first member. Its memory is O(P) for P
             verified duplicate pairs (two positions and two ids per pair), not O(N) records: datatrove's
             MinhashDedupCluster does the same. No other step holds more than one file, one id, one exact hash or
             one LSH bucket (`check_ids` and `exact_groups` stream their group twice instead of holding it).
  resolve    CoGroupByKey of exact duplicates with the near decision of their representative: copies of a record
             near dedup removed point at that record's representative (as the local runner does).
  state      CoGroupByKey per file: its id-checked records, dedup decisions and kept lines (`shard_state`).
  perplexity (curate.perplexity_*) each file's records dedup kept scored by a DoFn holding the LM (loaded once per
             worker), one float per document gathered on one worker for the exact percentile cut points, which
             reach the write step as a side input (curate_beam_stages.py; the driver first trains the reference LM
             of `perplexity_reference`, as the local runner does).
  substring  (curate.substring_dedup_tokens) the records the perplexity filter kept: every window's digest ->
             GroupByKey -> occurrences after the first record flagged -> GroupByKey per record -> its file's write
             step cuts the spans with substring_dedup.cut (curate_beam_stages.py: shuffle cost, collisions).
  write      per file (CoGroupByKey of its state, scores and substring flags): its kept lines minus dropped
             records, spans cut -> W/curated/<shard>.jsonl, its removed entries -> a part of W/removed.jsonl,
             counts -> one combined summary.
  hits       (with `curate.decontam`) each contaminated record joined (CoGroupByKey on its position) with its dedup
             decision, the write step's later decision (perplexity, substring) and the id check -> its final
             reason; the few of them are gathered for the driver, which writes W/contamination.json with the local
             runner's code (`curate.write_contamination`).
The driver then concatenates the removed parts (W/curate_beam/<shard>.removed.jsonl, deleted after) in file order
into W/removed.jsonl, reads the summaries (W/curate_beam/{counts,bad,fatal,perplexity}.json) and writes
W/curate_report.json (the local runner's counts and stage sections, "runner": "beam"; timings are summed over
workers). Outputs are byte-identical to the local runner's. Bad input: with data.on_error="error" the first bad
record (in the local runner's order) is raised as the usual DataError and no curated file is written; with "skip"
bad records are counted and listed.

Unlike the local runner the Beam runner does not resume finished shards: a run recomputes everything (a Beam runner
retries failed work itself). Workers need jaxalign installed (on Dataflow: --setup_file or --extra_package).

A record's metadata flows as a tuple `meta` = (pos, id_json, filter reason ("" = passed), exact hash (16 bytes),
signature (K uint32 as bytes, b"" without words or near dedup), band keys (B ints, [] likewise)); id_json is the
id as JSON, which keeps 1 and "1" apart as the local runner does.

Shapes: K = num_bands * rows_per_band signature values (uint32), B = num_bands, P verified pairs.
"""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import time
import types
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np

from jaxalign import storage
from jaxalign.config import Config, CurateConfig
from jaxalign.data import curate, curate_stages, decontam, sources
from jaxalign.data import curate_filters as filters
from jaxalign.data import curate_minhash as mh
from jaxalign.data import substring_dedup as substr
from jaxalign.errors import ConfigError, DataError

_INSTALL = "pip install 'jaxalign[beam]'"
_LINE_BITS = 32  # pos = shard << 32 | line: files of up to 2^32 - 1 lines


def _import_beam():
    try:
        import apache_beam as beam
    except ImportError as e:
        raise ConfigError(
            f"curate.runner='beam' needs Apache Beam ({e}); install the extra: {_INSTALL}"
        ) from None
    return beam


def _options(flags: str):
    """`PipelineOptions` of curate.beam_options; a flag Beam cannot parse is a one-line ConfigError."""
    from apache_beam.options.pipeline_options import PipelineOptions

    stderr = io.StringIO()
    try:
        options = PipelineOptions(shlex.split(flags))
        with contextlib.redirect_stderr(stderr):  # argparse prints usage and exits on a bad value
            options.get_all_options()
    except (ValueError, SystemExit) as e:
        message = (stderr.getvalue().strip().splitlines() or [str(e)])[-1].split("error: ")[-1]
        raise ConfigError(f"curate.beam_options={flags!r}: {message}") from None
    return options


def _where(paths: list[str], pos: int) -> str:
    """The "file:line" of global position `pos`."""
    return f"{paths[pos >> _LINE_BITS]}:{pos & ((1 << _LINE_BITS) - 1)}"


# --- per-element steps (module-level so every runner can pickle them) -----------------------------------------------
def map_shard(
    task: tuple[int, str], cfg: CurateConfig, on_error: str, seed: int, bench: Any = None
) -> Iterator[tuple[str, Any]]:
    """One input file -> tagged elements: ("meta", meta) per record (see the module docstring), ("line", (shard,
    (line, JSONL line, pii counts))) per record the filters kept, ("bad", (sort key, message, fatal)) per bad line,
    ("hit", (pos, (id_json, benchmark indices, {benchmark index: item indices}, filter reason))) per record holding
    an n-gram of `bench`'s evaluation items (decontamination), and one ("counts", {stage: seconds or docs})."""
    index, path = task
    stats, bad, chain = curate_stages.Stats(), [], filters.enabled(cfg)
    a_K, b_K = mh.permutations(cfg.num_bands * cfg.rows_per_band, seed)
    pending: list[tuple[tuple, list[bytes]]] = []  # (meta without signature, words) awaiting a MinHash batch

    def flush() -> Iterator[tuple[str, Any]]:
        with stats.timed("minhash", 0):
            sig_DxK = mh.signatures([w for _, w in pending], cfg, a_K, b_K)
            key_DxB = mh.band_keys(sig_DxK, cfg.num_bands, cfg.rows_per_band)  # vectorised here, per batch
        for (meta, words), sig, keys in zip(pending, sig_DxK, key_DxB.tolist(), strict=True):
            yield "meta", (*meta, sig.tobytes() if words else b"", keys if words else [])
        pending.clear()

    try:
        for line_no, record in curate_stages.timed_records(path, "skip", bad, stats):
            pos = index << _LINE_BITS | line_no
            done = curate_stages.process_record(record, cfg, chain, stats, bench)
            meta = (pos, json.dumps(record["id"], ensure_ascii=False), done.reason, done.exact)
            if done.hits:
                yield (
                    "hit",
                    (pos, (meta[1], list(done.hits), {str(b): i for b, i in done.hits.items()}, done.reason)),
                )
            if done.line:
                yield "line", (index, (line_no, done.line, done.pii))
            if cfg.near_dedup:
                pending.append((meta, done.words))
                if len(pending) == curate_stages.SIG_BATCH_DOCS:
                    yield from flush()
            else:
                yield "meta", (*meta, b"", [])
    except DataError as e:  # an unreadable file fails the run whatever data.on_error says
        bad.append((str(e), True))
    if pending:
        yield from flush()
    for k, message in enumerate(bad):
        message, fatal = message if isinstance(message, tuple) else (message, on_error == "error")
        yield "bad", ((0, index, k), message, fatal)
    yield "counts", _stage_counts(stats)


def _stage_counts(stats: curate_stages.Stats) -> dict[str, float]:
    return {
        **{f"seconds:{s}": t for s, t in stats.seconds.items()},
        **{f"docs:{s}": d for s, d in stats.docs.items()},
    }


def _pos(element: tuple) -> int:
    return element[0]


def check_ids(group: tuple[str, list], paths: list[str], on_error: str) -> Iterator[tuple[str, Any]]:
    """Records sharing an id: the first stays ("meta"); later ones are bad records ("bad")."""
    id_json, metas = group
    first = min(metas, key=_pos)  # two passes over the (re-iterable) group: never all of it in memory
    yield "meta", first
    for meta in metas:
        if meta[0] != first[0]:
            message = curate_stages.duplicate_id_message(
                json.loads(id_json), _where(paths, meta[0]), _where(paths, first[0])
            )
            yield "bad", ((1, meta[0]), message, on_error == "error")


def exact_groups(group: tuple[bytes, list]) -> Iterator[tuple[str, Any]]:
    """Records with one exact hash: the first stays ("meta"); later ones -> ("dup", (first pos, (pos, first id)))."""
    first = min(group[1], key=_pos)  # two passes, as in check_ids
    yield "meta", first
    for meta in group[1]:
        if meta[0] != first[0]:
            yield "dup", (first[0], (meta[0], first[1]))


def band_entries(meta: tuple) -> Iterator[tuple[tuple[int, int], tuple]]:
    """((band, LSH key), (pos, id_json, signature)) for each band of a record with words."""
    for band, key in enumerate(meta[5]):
        yield (band, key), meta[:2] + meta[4:5]


def bucket_pairs(group: tuple[Any, list], threshold: float) -> Iterator[tuple[int, tuple]]:
    """Verified pairs of one LSH bucket: each member (input order) with the first member and its predecessor.

    Holds the bucket (its members' signatures, 4K bytes each): buckets are near-duplicate groups after exact dedup.
    """
    members = sorted(group[1], key=_pos)
    if len(members) < 2:
        return
    pairs = sorted({(a, b) for b in range(1, len(members)) for a in (0, b - 1)})
    sig_MxK = np.stack([np.frombuffer(m[2], np.uint32) for m in members])
    a, b = np.array(pairs).T
    for i, j in np.array(pairs)[mh.verified(sig_MxK[a], sig_MxK[b], threshold)].tolist():
        yield 0, (members[i][:2], members[j][:2])  # ((pos, id), (pos, id)), one key: see `cluster`


def cluster(group: tuple[int, list]) -> Iterator[tuple[int, tuple[int, str]]]:
    """Union-find over every verified pair (one worker, O(P) memory): (pos, (cluster's first pos, its id))."""
    ids, verified_pairs = {}, list(group[1])
    for (p, pid), (q, qid) in verified_pairs:
        ids[p], ids[q] = pid, qid
    nodes = np.array(sorted(ids), np.int64)
    pairs = np.searchsorted(nodes, np.array([(p, q) for (p, _), (q, _) in verified_pairs], np.int64))
    label = mh.components(len(nodes), pairs)
    for k in np.flatnonzero(label != np.arange(len(nodes))).tolist():
        first = int(nodes[label[k]])
        yield int(nodes[k]), (first, ids[first])


def resolve(group: tuple[int, dict]) -> Iterator[tuple[int, tuple[str, str]]]:
    """Dedup decisions (pos, (reason, duplicate_of id)) for record `pos`'s near entry and its exact copies."""
    pos, joined = group
    near = list(joined["near"])
    for _, rep_id in near:
        yield pos, ("near_duplicate", rep_id)
    for dup_pos, rep_id in joined["dup"]:
        yield dup_pos, ("exact_duplicate", near[0][1] if near else rep_id)


def hit_reason(group: tuple[int, dict]) -> Iterator[tuple]:
    """A contaminated record with its final reason (a dedup decision wins over its filter reason, and a later
    stage's reason applies to a record both kept, as in the local runner) and whether the id check skipped it:
    (pos, id_json, benchmark indices, items, reason, skipped)."""
    pos, joined = group
    dedup, later = list(joined["dedup"]), list(joined.get("later", []))
    skipped = not list(joined["valid"])
    for id_json, benches, items, reason in joined["hit"]:
        final = dedup[0][0] if dedup else later[0] if later else reason
        yield pos, id_json, benches, items, final, skipped


def shard_state(group: tuple[int, dict]) -> tuple[int, tuple[dict, dict, list]]:
    """One file's join -> (shard, (valid: line -> (id_json, filter reason) of records the id check kept, dedup:
    line -> (reason, duplicate_of id_json), lines: [(line, curated JSONL line, pii counts)] in line order))."""
    index, joined = group
    return index, (dict(joined["meta"]), dict(joined["dedup"]), sorted(joined["line"]))


def write_shard(
    group: tuple[int, dict],
    names: list[str],
    out_dir: str,
    part_dir: str,
    fatal: list,
    cfg: CurateConfig,
    cuts: dict | None = None,
) -> Iterator[tuple[str, Any]]:
    """One file's curated records and removed entries (each in line order) -> ("counts", its counts) and ("later",
    (pos, reason)) per record the perplexity filter or substring dedup removed. The perplexity
    filter's decisions (`cuts`: the global cut points) and exact-substring dedup's cuts (the flagged window starts
    of each record) apply to the records dedup kept, in the local runner's order."""
    from jaxalign.data import curate_beam_stages as stages  # imports Beam

    index, joined = group
    if fatal:  # the run fails with the first fatal bad record: write nothing
        return
    t = time.perf_counter()
    valid, dedup, _ = state = next(iter(joined["state"]))
    later = stages.perplexity_reasons(next(iter(joined.get("scores", [])), None), cuts, cfg)
    flags = dict(joined.get("flags", []))  # line -> flagged window starts (exact-substring dedup)
    kept, pii, counts = [], np.zeros(3, np.int64), Counter()
    k = substr.min_bytes(cfg.substring_dedup_tokens)
    for line_no, line, n_pii in stages.alive_lines(state):
        if line_no not in later and cfg.substring_dedup_tokens:
            t_cut = time.perf_counter()
            reason, line = stages.cut_record(line, flags.get(line_no), k, counts)
            counts["seconds:substring_dedup"] += time.perf_counter() - t_cut
            if reason:
                later[line_no] = reason
        if line_no not in later:
            kept.append(line)
            pii += n_pii
    removed = []
    counts.update(valid=len(valid), kept=len(kept))
    for line_no in sorted(valid):
        id_json, reason = valid[line_no]
        reason, duplicate_of = dedup.get(line_no, (later.get(line_no, reason), "null"))  # ids are never null
        if reason:
            removed.append(curate.removed_line(json.loads(id_json), reason, json.loads(duplicate_of)))
            counts[f"reason:{reason}"] += 1
    storage.write_atomic(storage.join(out_dir, names[index] + ".jsonl"), "".join(kept))
    storage.write_atomic(storage.join(part_dir, names[index] + ".removed.jsonl"), "".join(removed))
    counts.update({f"pii:{kind}": int(n) for kind, n in zip(filters.PII_KINDS, pii, strict=True)})
    counts.update({"seconds:write": time.perf_counter() - t, "docs:write": len(kept)})
    yield "counts", dict(counts)
    for line_no, reason in later.items():  # for the decontamination summary: final reasons given after dedup
        yield "later", (index << _LINE_BITS | line_no, reason)


def _sum_counts(dicts) -> dict[str, float]:
    total: Counter = Counter()
    for d in dicts:
        total.update(d)
    return dict(total)


def _meta_by_shard(meta: tuple) -> tuple[int, tuple[int, tuple[str, str]]]:
    return meta[0] >> _LINE_BITS, (meta[0] & ((1 << _LINE_BITS) - 1), (meta[1], meta[2]))


def _decision_by_shard(decision: tuple) -> tuple[int, tuple[int, tuple[str, str]]]:
    pos, value = decision
    return pos >> _LINE_BITS, (pos & ((1 << _LINE_BITS) - 1), value)


def _split(beam, pcoll, name: str, fn, tags: tuple[str, ...], **kwargs) -> dict:
    """ParDo of a function yielding (tag, element) -> one PCollection per tag."""

    def tagged(element, **kw):
        for tag, value in fn(element, **kw):
            yield beam.pvalue.TaggedOutput(tag, value)

    out = pcoll | name >> beam.FlatMap(tagged, **kwargs).with_outputs(*tags)
    return {tag: out[tag] for tag in tags}


def _build(beam, p, config: Config, shards: list, out_dir: str, part_dir: str, bench: Any) -> None:
    from jaxalign.data import curate_beam_stages as stages  # imports Beam

    cfg, on_error = config.curate, config.data.on_error
    paths, names = [s.path for s in shards], [s.name for s in shards]
    tasks = p | "files" >> beam.Create(list(enumerate(paths))) | "spread" >> beam.Reshuffle()
    mapped = _split(
        beam,
        tasks,
        "map",
        map_shard,
        ("meta", "line", "bad", "counts", "hit"),
        cfg=cfg,
        on_error=on_error,
        seed=config.seed,
        bench=bench,
    )
    by_id = mapped["meta"] | "by id" >> beam.Map(lambda m: (m[1], m)) | "group ids" >> beam.GroupByKey()
    ids = _split(beam, by_id, "ids", check_ids, ("meta", "bad"), paths=paths, on_error=on_error)
    valid, reps, dups = ids["meta"], ids["meta"], None
    if cfg.exact_dedup:
        by_hash = valid | "by hash" >> beam.Map(lambda m: (m[3], m)) | "group hashes" >> beam.GroupByKey()
        exact = _split(beam, by_hash, "exact", exact_groups, ("meta", "dup"))
        reps, dups = exact["meta"], exact["dup"]
    decisions = []
    if cfg.near_dedup:
        near = (
            reps
            | "with words" >> beam.Filter(lambda m: len(m[4]) > 0)
            | "bands" >> beam.FlatMap(band_entries)
            | "group buckets" >> beam.GroupByKey()
            | "pairs" >> beam.FlatMap(bucket_pairs, threshold=cfg.near_threshold)
            | "gather pairs" >> beam.GroupByKey()
            | "cluster" >> beam.FlatMap(cluster)
        )
        joined = {"near": near, "dup": dups if dups is not None else p | "no dups" >> beam.Create([])}
        decisions.append(joined | "join" >> beam.CoGroupByKey() | "resolve" >> beam.FlatMap(resolve))
    elif dups is not None:
        decisions.append(dups | "exact only" >> beam.Map(lambda d: (d[1][0], ("exact_duplicate", d[1][1]))))
    if not decisions:
        decisions.append(p | "no dedup" >> beam.Create([]))

    bad = (mapped["bad"], ids["bad"]) | "all bad" >> beam.Flatten()
    fatal = bad | "fatal" >> beam.Filter(lambda b: b[2]) | "first fatal" >> beam.combiners.Top.Smallest(1)
    per_shard = {
        "shard": p | "shards" >> beam.Create([(k, None) for k in range(len(shards))]),
        "meta": valid | "meta by shard" >> beam.Map(_meta_by_shard),
        "line": mapped["line"],
        "dedup": decisions[0] | "decisions by shard" >> beam.Map(_decision_by_shard),
    }
    states = per_shard | "group shards" >> beam.CoGroupByKey() | "shard states" >> beam.Map(shard_state)
    per_file, cuts, extra_counts = {"state": states}, None, []
    if cfg.perplexity_model:  # the driver turned a perplexity_reference into the model it trained
        per_file["scores"] = states | "score" >> beam.ParDo(stages.ScoreShard(config))
        cut_points = (
            per_file["scores"]
            | "gather scores" >> beam.combiners.ToList()
            | "cut points" >> beam.Map(stages.cut_points, spec=cfg.perplexity_model, cfg=cfg)
        )
        cuts = beam.pvalue.AsSingleton(cut_points)
    if cfg.substring_dedup_tokens:
        windows = _split(
            beam,
            dict(per_file) | "group for windows" >> beam.CoGroupByKey(),
            "windows",
            stages.shard_windows,
            ("window", "counts"),
            cuts=cuts,
            cfg=cfg,
        )
        per_file["flags"] = stages.substring_flags(beam, windows["window"])
        extra_counts.append(windows["counts"])
    written = _split(
        beam,
        per_file | "join shards" >> beam.CoGroupByKey(),
        "write",
        write_shard,
        ("counts", "later"),
        names=names,
        out_dir=out_dir,
        part_dir=part_dir,
        fatal=beam.pvalue.AsSingleton(fatal),
        cfg=cfg,
        cuts=cuts,
    )
    counts = (
        (
            written["counts"],
            mapped["counts"],
            bad | "count bad" >> beam.Map(lambda b: {"bad": 1}),
            *extra_counts,
        )
        | "all counts" >> beam.Flatten()
        | "sum counts" >> beam.CombineGlobally(_sum_counts)
    )
    summaries = {
        "counts": counts,
        "bad": bad | "first bad" >> beam.combiners.Top.Smallest(curate.MAX_BAD_LISTED),
        "fatal": fatal,
    }
    if cuts is not None:
        summaries["perplexity"] = cut_points | "perplexity section" >> beam.Map(lambda c: c["report"])
    if bench is not None:  # contaminated records only (few): their final reasons, gathered for the driver
        summaries["hits"] = (
            {
                "hit": mapped["hit"],
                "valid": valid | "valid positions" >> beam.Map(lambda m: (m[0], None)),
                "dedup": decisions[0],
                "later": written["later"],
            }
            | "join hits" >> beam.CoGroupByKey()
            | "hit reasons" >> beam.FlatMap(hit_reason)
            | "all hits" >> beam.combiners.ToList()
        )
    for name, pcoll in summaries.items():
        target = storage.join(part_dir, f"{name}.json")
        pcoll | f"save {name}" >> beam.Map(
            lambda v, target=target: storage.write_atomic(target, json.dumps(v))
        )


def run(config: Config) -> None:
    """Curates `config.data.input` into `config.workdir` on Beam (see the module docstring); no resume."""
    cfg, start = config.curate, time.perf_counter()
    beam, options = _import_beam(), _options(cfg.beam_options)
    work_dir, out_dir = storage.join(config.workdir, "curate_work"), storage.join(config.workdir, "curated")
    part_dir = storage.join(config.workdir, "curate_beam")
    bench = decontam.load(
        cfg.decontam, cfg.decontam_n, cfg.decontam_benchmarks, sources.expand_glob(config.data.input)
    )
    shards = curate_stages.input_shards(config, work_dir)
    storage.path(out_dir).mkdir(parents=True, exist_ok=True)
    storage.path(part_dir).mkdir(parents=True, exist_ok=True)
    storage.write_atomic(storage.join(config.workdir, "config.json"), config.to_json())
    try:
        pipeline = beam.Pipeline(options=options)
    except ValueError as e:  # e.g. an unknown --runner
        raise ConfigError(f"curate.beam_options={cfg.beam_options!r}: {e}".splitlines()[0]) from None
    reference_seconds, workers_config = 0.0, config
    if cfg.perplexity_reference:  # trained (or reused) before the pipeline, as the local runner does
        from jaxalign import config as config_lib
        from jaxalign.data import perplexity_filter  # JAX, in the driver

        t = time.perf_counter()
        spec = perplexity_filter.reference_lm(config)
        reference_seconds = time.perf_counter() - t
        workers_config = config_lib.replace(
            config, curate={"perplexity_model": spec, "perplexity_reference": ""}
        )
    with pipeline as p:
        _build(beam, p, workers_config, shards, out_dir, part_dir, bench)
    fatal = json.loads(storage.read_text(storage.join(part_dir, "fatal.json")))
    if fatal:
        raise DataError(fatal[0][1])
    counts = Counter(json.loads(storage.read_text(storage.join(part_dir, "counts.json"))))
    bad = [message for _, message, _ in json.loads(storage.read_text(storage.join(part_dir, "bad.json")))]

    parts = [storage.join(part_dir, s.name + ".removed.jsonl") for s in shards]
    with storage.path(storage.join(config.workdir, "removed.jsonl.tmp")).open("wb") as out:
        for part in parts:  # streamed in file order: the driver never holds all removed entries
            with storage.open_binary(part) as f:
                while chunk := f.read(1 << 20):
                    out.write(chunk)
    storage.path(storage.join(config.workdir, "removed.jsonl.tmp")).replace(
        storage.join(config.workdir, "removed.jsonl")
    )
    for part in parts:
        storage.path(part).unlink()
    curate.remove_stale_outputs(out_dir, shards)

    reasons = Counter({k.split(":", 1)[1]: int(v) for k, v in counts.items() if k.startswith("reason:")})
    stats = curate_stages.Stats()
    for key, value in counts.items():
        kind, _, stage = key.partition(":")
        if kind in ("seconds", "docs"):
            getattr(stats, kind)[stage] += value
    shard_counts = {"total": len(shards), "mapped": len(shards), "written": len(shards)}
    totals = {k: int(counts[k]) for k in ("valid", "bad", "kept")}
    pii = [int(counts[f"pii:{kind}"]) for kind in filters.PII_KINDS]
    hits = []
    if bench is not None:
        hits = sorted(json.loads(storage.read_text(storage.join(part_dir, "hits.json"))))
    decision = types.SimpleNamespace(  # the local runner's decision, for the contaminated records alone
        contaminated=[(k, benches, items) for k, (_, _, benches, items, _, _) in enumerate(hits)],
        ids=[json.loads(h[1]) for h in hits],
        reasons=[h[4] for h in hits],
        skipped=[h[5] for h in hits],
    )
    extra = curate.write_contamination(config, bench, decision)
    if workers_config.curate.perplexity_model:
        section = json.loads(storage.read_text(storage.join(part_dir, "perplexity.json")))
        section["setup_seconds"] = round(section["setup_seconds"] + reference_seconds, 3)
        stats.seconds["perplexity"] += section["seconds"]
        stats.docs["perplexity"] += section["documents"]
        extra["perplexity_filter"] = section
    if cfg.substring_dedup_tokens:
        from jaxalign.data import curate_beam_stages as stages

        extra["substring_dedup"] = stages.substring_report(cfg, counts)
        stats.docs["substring_dedup"] += extra["substring_dedup"]["docs_in"]
    curate.write_report(config, "beam", shard_counts, totals, reasons, pii, stats, start, bad, extra)
