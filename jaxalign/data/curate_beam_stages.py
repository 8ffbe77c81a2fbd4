"""The perplexity filter and exact-substring dedup on the Beam runner (curate_beam.py builds them into its pipeline).

Both act, as in the local runner, on the records that passed the filters and dedup ("alive": in the id check's kept
set, with a curated line, without a dedup decision), the perplexity filter first; substring dedup then sees the
records the perplexity filter kept. Each shard's alive records come from one per-file join (`state`, the shard's
curated lines and decisions), the unit curate_beam.py's write step already holds.

Perplexity filter (perplexity_filter.py's model, tokenizer, `Scorer` and bucketing):
  score    `ScoreShard`, a DoFn that loads the scoring LM once per worker (`setup`) and scores one shard's alive
           documents per element with `Scorer.perplexities`, the call the local runner makes per shard. Same
           documents in the same order give the same length-sorted batches and paddings, hence the same bits
           (the local runner scores shard by shard too), whatever the Beam runner's own bundling; the scorer
           needs the same device count on every worker as in the local run (the batch is sharded over devices).
  cut      EXACT global percentiles: every alive document's perplexity (one float64 and one token count per
           document) is gathered to ONE worker (`cut_points`), which computes the cut points with the local
           runner's `perplexity_filter.summarise`, so its memory is O(D) floats for D scored documents (8 bytes
           each: 80 MB for ten million documents). Percentiles do not depend on the order of the values.
  decide   the cut points go to the per-shard steps as a side input; `perplexity_filter.bucket_names` buckets each
           document by one comparison, as locally, so a document exactly on a cut point lands the same way.
With `curate.perplexity_reference` the driver trains (or reuses) the reference LM before the pipeline, as the local
runner does, and the workers load that checkpoint (`curate.perplexity_model="ckpt:..."`).

Exact-substring dedup without a global suffix array (no worker holds the corpus):
  windows  every window text[p : p + k] (k = min_bytes) inside each alive document -> (16-byte blake2b of the
           window, (pos, p)), pos the record's global position (input order).
  group    GroupByKey on the digest: all occurrences of one window meet; `substring_dedup.flag_group` flags those in
           a document after the group's first document (the suffix array's rule, tested equal on random corpora).
  collect  GroupByKey on pos: each document's sorted flagged starts -> its shard's write step, which cuts with the
           same `substring_dedup.cut` (span merge, UTF-8 snapping, the drop rule) as the suffix-array version.
Shuffle cost: one record per window, i.e. about one per byte of alive text (16-byte key + two ints, ~40 bytes of
shuffle per text byte before the runner's compression), plus one per flagged window; this is the usual shape of
exact-substring dedup on a distributed engine when a global suffix array does not fit one machine. The alternative
is Lee et al.'s (2021) own scale-out: suffix arrays of corpus shards built separately and merged/queried across
shards, far fewer shuffle bytes but a custom merge step. Collisions: two different windows share a digest with
probability 2^-128 per pair, so about n^2 / 2^129 for n windows: 1.5e-15 for a terabyte (n = 10^12); a collision
could only cut a span wrongly, never corrupt text. Windows are hashed in Python: 2.2 us per 200-byte window on one
(shared) core of the dev machine, i.e. ~2.3 s per MiB of text before the runner's per-element cost, which is larger.

Shapes: D scored documents, k window bytes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import numpy as np

from jaxalign.config import Config, CurateConfig
from jaxalign.data import perplexity_filter
from jaxalign.data import substring_dedup as substr

LINE_BITS = 32  # curate_beam's pos = shard << 32 | line


def alive_lines(state: tuple[dict, dict, list]) -> list[tuple[int, str, Any]]:
    """A shard's (line, curated JSONL line, pii counts) of records the id check kept and dedup did not remove."""
    valid, dedup, lines = state
    return [entry for entry in lines if entry[0] in valid and entry[0] not in dedup]


# --- perplexity filter -----------------------------------------------------------------------------------------------
class ScoreShard(beam.DoFn):
    """(shard, state) -> (shard, (lines [M], perplexities [M], token counts [M], compiled widths, scoring seconds,
    loading seconds)) for the shard's M alive records; the LM is loaded once per worker."""

    def __init__(self, config: Config):
        self.config = config
        self.scorer, self.setup_seconds = None, 0.0

    def setup(self) -> None:
        start = time.perf_counter()
        cfg = self.config.curate
        model, tokenizer, rules, _ = perplexity_filter.load_model(self.config)
        self.scorer = perplexity_filter.Scorer(
            model, tokenizer, rules, cfg.perplexity_batch_size, cfg.perplexity_max_tokens
        )
        self.setup_seconds = time.perf_counter() - start

    def process(self, element: tuple[int, tuple]) -> Iterator[tuple[int, tuple]]:
        index, state = element
        docs = alive_lines(state)
        t = time.perf_counter()
        ppl_M, count_M = self.scorer.perplexities([json.loads(line)["text"] for _, line, _ in docs])
        lines = [line_no for line_no, _, _ in docs]
        setup, self.setup_seconds = self.setup_seconds, 0.0  # counted once per worker
        widths = sorted(self.scorer.widths)
        yield index, (lines, ppl_M.tolist(), count_M.tolist(), widths, time.perf_counter() - t, setup)


def cut_points(scores: list[tuple[int, tuple]], spec: str, cfg: CurateConfig) -> dict:
    """Every shard's scores (gathered on one worker: O(D) floats) -> {"values": the cut points [2], "report":
    the report section}, both by perplexity_filter.summarise as in the local runner."""
    ppl_N = np.array([p for _, s in sorted(scores, key=lambda x: x[0]) for p in s[1]], np.float64)
    tokens_N = np.array([n for _, s in scores for n in s[2]], np.int64)
    widths = [w for _, s in scores for w in s[3]]
    seconds, setup = sum(s[4] for _, s in scores), sum(s[5] for _, s in scores)
    _, values, report = perplexity_filter.summarise(spec, ppl_N, tokens_N, cfg, seconds, setup, widths)
    return {"values": values.tolist(), "report": report}


def perplexity_reasons(scores: tuple | None, cuts: dict | None, cfg: CurateConfig) -> dict[int, str]:
    """line -> "perplexity:<bucket>" for a shard's records in buckets `curate.perplexity_keep` does not keep."""
    if scores is None:
        return {}
    lines, ppl = scores[0], np.array(scores[1], np.float64)
    _, keep = perplexity_filter.parse_cuts(cfg)
    buckets = perplexity_filter.bucket_names(ppl, np.array(cuts["values"], np.float64))
    return {line: f"perplexity:{b}" for line, b in zip(lines, buckets.tolist(), strict=True) if b not in keep}


# --- exact-substring dedup ---------------------------------------------------------------------------------------
def shard_windows(group: tuple[int, dict], cuts: dict | None, cfg: CurateConfig) -> Iterator[tuple[str, Any]]:
    """One shard's alive records the perplexity filter kept -> ("window", (digest, (pos, offset))) per window, and
    one ("counts", {...}) with the time spent."""
    index, joined = group
    t, k = time.perf_counter(), substr.min_bytes(cfg.substring_dedup_tokens)
    state = next(iter(joined["state"]))
    dropped = perplexity_reasons(next(iter(joined.get("scores", [])), None), cuts, cfg)
    for line_no, line, _ in alive_lines(state):
        if line_no not in dropped:
            pos = index << LINE_BITS | line_no
            for p, key in enumerate(substr.window_keys(json.loads(line)["text"].encode(), k)):
                yield "window", (key, (pos, p))
    yield "counts", {"seconds:substring_dedup": time.perf_counter() - t}


def flags_by_shard(group: tuple[int, Any]) -> tuple[int, tuple[int, np.ndarray]]:
    """(pos, flagged offsets) -> (shard, (line, sorted offsets [F]))."""
    pos, offsets = group
    return pos >> LINE_BITS, (pos & ((1 << LINE_BITS) - 1), np.sort(np.fromiter(offsets, np.int64)))


def substring_flags(beam_module: Any, windows: Any) -> Any:
    """Windows -> per shard, each document's flagged window starts (module docstring: group, collect)."""
    return (
        windows
        | "group windows" >> beam_module.GroupByKey()
        | "flag windows" >> beam_module.FlatMap(lambda g: substr.flag_group(g[1]))
        | "group flags" >> beam_module.GroupByKey()
        | "flags by shard" >> beam_module.Map(flags_by_shard)
    )


def cut_record(line: str, starts: np.ndarray | None, k: int, counts: dict) -> tuple[str, str]:
    """(reason: "" or substring_dup, the line with the spans cut) of one alive record given its flagged starts;
    adds the report's counts ("substr:docs_in", ...) to `counts`."""
    text = json.loads(line)["text"].encode()
    counts["substr:docs_in"] += 1
    counts["substr:bytes_in"] += len(text)
    if starts is None:
        return "", line
    spans, dropped, removed = substr.cut(text, starts, k)
    counts["substr:bytes_removed"] += removed
    if dropped:
        counts["substr:docs_dropped"] += 1
        return substr.REASON, line
    if spans:
        counts["substr:docs_edited"] += 1
        counts["substr:spans_removed"] += len(spans)
        line = substr.cut_line(line.encode(), tuple(spans)).decode()
    return "", line


def substring_report(cfg: CurateConfig, counts: dict) -> dict:
    """The report's "substring_dedup" section from the summed counts."""
    section = {key: counts.get(f"substr:{key}", 0) for key in substr.SECTION_COUNTS}
    return substr.report_section(
        cfg.substring_dedup_tokens, section, counts.get("seconds:substring_dedup", 0.0)
    )
