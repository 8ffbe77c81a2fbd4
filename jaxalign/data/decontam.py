"""Decontamination (`curate.decontam`): word n-gram overlap between training records and evaluation sets.

    bench = load(cfg, input_paths)                      the benchmarks' n-gram keys (small; read in the parent)
    hits = bench.match(text)                            {benchmark index: [item index, ...]} of one record
    content, section = summarise(bench, mode, decision)  W/contamination.json and the report's section

Words are as `curate.words`: `\\w+` runs of the casefolded text. An evaluation item's n-grams (`curate.decontam_n`,
13 as GPT-3, 8 as Llama 2) are looked up in every training record that passed the quality filters (the text a
training run would see, before PII scrubbing). An item with fewer than n words contributes its whole word sequence
as one gram, which matches where that sequence occurs contiguously (the world's questions are 5-8 words: with n=13
they are matched whole). As GPT-3 and Llama 2 report, an eval item is contaminated when any of its n-grams occurs in
the training corpus; a training record is contaminated when it holds an n-gram of any item.

Benchmarks:
  world_qa      the synthetic world's held-out fact questions (the first user question of each `fact` record of
                sft_eval.jsonl, what `eval` scores as qa_exact_match; id = the record's id), added when an input
                file lies in a world directory (next to world.json and sft_eval.jsonl), i.e. the world is the input.
  <name>        each `name=glob` of `curate.decontam_benchmarks`: JSONL records in the eval job's multiple-choice
                format (`question`, `choices`, `answer`: the question is the item's text) or with a `prompt`
                (a string or a chat message list: its contents) or `text` field. An item's id is its `id` field, else
                `item_id(text)` (a digest of the text), which the eval job computes the same way for `eval.mc_input`.

Keys are 64-bit hashes of word n-grams (`curate_filters.ngram_keys` over blake2b word ids); distinct n-grams collide
with probability ~2^-64 per pair. The benchmark key set stays in memory (items x words keys); the corpus is streamed
record by record in the map workers.

Shape legend: T words of a record, G benchmark grams (one per item n-gram), I items.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxalign import storage
from jaxalign.data import curate_filters as filters
from jaxalign.data import sources
from jaxalign.errors import ConfigError, DataError

_WORD_RE = re.compile(r"\w+")  # as curate.words
WORLD_QA = "world_qa"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


def words(text: str) -> list[str]:
    """`\\w+` runs of the casefolded text (curate.words)."""
    return _WORD_RE.findall(text.casefold())


def item_id(text: str) -> str:
    """The id of an evaluation item without an `id` field: a digest of its text ("sha:" + 16 hex digits)."""
    return "sha:" + hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


_word_id_cache: dict[str, int] = {}


def _word_ids(ws: Sequence[str]) -> np.ndarray:
    """64-bit ids [T] of words (blake2b of UTF-8), uint64; cached per process (a vocabulary is small)."""
    cache = _word_id_cache
    if len(cache) > 2_000_000:
        cache.clear()
    for w in set(ws).difference(cache):
        cache[w] = int.from_bytes(hashlib.blake2b(w.encode("utf-8", "surrogatepass"), digest_size=8).digest())
    return np.fromiter(map(cache.__getitem__, ws), np.uint64, len(ws))


def item_text(record: Any, where: str) -> str:
    """The text of one benchmark record: `question` (MC format), else `prompt` (string or messages), else `text`."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a benchmark record must be a JSON object, got {record!r:.60}")
    for key in ("question", "prompt", "text"):
        value = record.get(key)
        if isinstance(value, str) and value.strip():
            return value
        if key == "prompt" and isinstance(value, list) and value:
            if all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in value):
                return "\n".join(m["content"] for m in value)
    raise DataError(
        f"{where}: a benchmark record needs a non-empty 'question', 'prompt' (string or messages) or 'text' field; "
        f"got keys {sorted(record)}"
    )


@dataclasses.dataclass(frozen=True)
class Benchmarks:
    """Every benchmark's items and their gram keys, grouped by gram length (n, or a short item's length)."""

    n: int
    names: tuple[str, ...]
    item_ids: tuple[tuple[str, ...], ...]  # per benchmark, its items' ids
    # gram length k -> (key_G sorted, bench_G, item_G): every item gram of length k and its owner.
    grams: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]

    def match(self, text: str) -> dict[int, list[int]]:
        """{benchmark index: sorted item indices} of the items having a gram in `text` (empty if none)."""
        ws = words(text)
        if not ws:
            return {}
        ids_T = _word_ids(ws)
        found: dict[int, set[int]] = {}
        keys = filters.mix64(ids_T + np.uint64(1))  # 1-gram keys; the k-gram keys follow as in ngram_keys
        for k in range(1, min(len(ids_T), max(self.grams)) + 1):
            if k > 1:
                keys = filters.mix64(keys[:-1] ^ ids_T[k - 1 :])
            if k not in self.grams:
                continue
            key_G, bench_G, item_G = self.grams[k]
            at = np.minimum(np.searchsorted(key_G, keys), len(key_G) - 1)  # key_G is sorted
            for key in np.unique(keys[key_G[at] == keys]):
                lo, hi = np.searchsorted(key_G, key, "left"), np.searchsorted(key_G, key, "right")
                for b, i in zip(bench_G[lo:hi].tolist(), item_G[lo:hi].tolist(), strict=True):
                    found.setdefault(b, set()).add(i)
        return {b: sorted(items) for b, items in sorted(found.items())}

    def digest(self) -> str:
        """What the map stage's result depends on: every benchmark's name, ids and keys."""
        h = hashlib.sha256(json.dumps([self.n, self.names, self.item_ids]).encode())
        for k in sorted(self.grams):
            for a in self.grams[k]:
                h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()


def build(n: int, benchmarks: Sequence[tuple[str, Sequence[tuple[str, str]]]]) -> Benchmarks:
    """Benchmarks from (name, [(item id, item text), ...]); items without words are ignored (they match nothing)."""
    per_k: dict[int, list[tuple[np.ndarray, int, int]]] = {}
    for b, (_, items) in enumerate(benchmarks):
        for i, (_, text) in enumerate(items):
            ws = words(text)
            if not ws:
                continue
            k = min(n, len(ws))
            per_k.setdefault(k, []).append((np.unique(filters.ngram_keys(_word_ids(ws), k)), b, i))
    grams = {}
    for k, parts in per_k.items():
        key_G = np.concatenate([p[0] for p in parts])
        bench_G = np.concatenate([np.full(len(p[0]), p[1], np.int32) for p in parts])
        item_G = np.concatenate([np.full(len(p[0]), p[2], np.int32) for p in parts])
        order = np.argsort(key_G, kind="stable")
        grams[k] = (key_G[order], bench_G[order], item_G[order])
    names = tuple(name for name, _ in benchmarks)
    ids = tuple(tuple(i for i, _ in items) for _, items in benchmarks)
    return Benchmarks(n, names, ids, grams)


def parse_spec(spec: str) -> list[tuple[str, str]]:
    """[(name, glob)] of `curate.decontam_benchmarks` ("name=glob,name=glob")."""
    out = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        name, sep, pattern = part.partition("=")
        name, pattern = name.strip(), pattern.strip()
        if not sep or not _NAME_RE.match(name) or not pattern:
            raise ConfigError(
                f"curate.decontam_benchmarks={spec!r}: {part!r} is not name=glob (name of letters, digits, _.-)"
            )
        if name == WORLD_QA or name in {n for n, _ in out}:
            raise ConfigError(
                f"curate.decontam_benchmarks={spec!r}: benchmark name {name!r} is reserved or repeated"
            )
        out.append((name, pattern))
    return out


def read_benchmark(pattern: str) -> list[tuple[str, str]]:
    """[(item id, item text)] of every record of the JSONL files matching `pattern`; bad records name file:line."""
    items, seen = [], {}
    for path in sources.expand_glob(pattern):
        for n, line in enumerate(storage.read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            record = sources.parse_json_line(line.encode(), where)
            text = item_text(record, where)
            raw_id = record.get("id")
            iid = item_id(text) if raw_id is None else str(raw_id)
            if iid in seen and raw_id is not None:
                raise DataError(
                    f"{where}: duplicate id {raw_id!r} (first at {seen[iid]}); ids must be unique"
                )
            seen.setdefault(iid, where)
            items.append((iid, text))
    return items


def world_items(directory: str) -> list[tuple[str, str]]:
    """The world's held-out fact questions as the eval job asks them: (sft_eval record id, first user question)."""
    items = []
    for line in storage.read_text(storage.join(directory, "sft_eval.jsonl")).splitlines():
        if line.strip():
            record = json.loads(line)
            if record["task"] == "fact":
                first = next(m["content"] for m in record["messages"] if m["role"] == "user")
                items.append((record["id"], first))
    return items


def world_directory(input_paths: Sequence[str]) -> str:
    """The synthetic world directory an input file lies in ("" if none): the world is the curation input."""
    for path in input_paths:
        directory = str(storage.path(path).parent)
        if all(storage.exists(storage.join(directory, f)) for f in ("world.json", "sft_eval.jsonl")):
            return directory
    return ""


def load(mode: str, n: int, spec: str, input_paths: Sequence[str]) -> Benchmarks | None:
    """The benchmarks of `curate.decontam*` (None when decontamination is off)."""
    if mode == "off":
        return None
    benchmarks = []
    world = world_directory(input_paths)
    if world:
        benchmarks.append((WORLD_QA, world_items(world)))
    for name, pattern in parse_spec(spec):
        benchmarks.append((name, read_benchmark(pattern)))
    if not benchmarks:
        raise ConfigError(
            f"curate.decontam={mode!r} but there is nothing to check against: the input is not the synthetic world "
            "and curate.decontam_benchmarks is empty (give name=glob,...)"
        )
    return build(n, benchmarks)


def summarise(bench: Benchmarks, mode: str, decision: Any) -> tuple[dict, dict]:
    """(contamination.json content, the report's section) from curation's decision: `contaminated` records (global
    index, benchmark indices, {benchmark index: item indices}), `ids`, final `reasons` ("" = kept), `skipped`."""
    item_hits: list[set[int]] = [set() for _ in bench.names]
    records = []  # (id, benchmark indices, final reason) of every contaminated record
    for k, benches, items in decision.contaminated:
        for b, idx in items.items():
            item_hits[int(b)].update(idx)
        if not decision.skipped[k]:
            records.append((decision.ids[k], benches, decision.reasons[k]))
    report, files = {}, {}
    for b, name in enumerate(bench.names):
        total, hits = len(bench.item_ids[b]), sorted(item_hits[b])
        report[name] = {
            "items": total,
            "contaminated_items": len(hits),
            "contaminated_fraction": len(hits) / total if total else 0.0,
            "records_dropped": sum(1 for r in records if r[2] == f"decontam:{name}"),
            "records_flagged": sum(1 for r in records if b in r[1] and not r[2]) if mode == "flag" else 0,
        }
        files[name] = {
            "items": total,
            "contaminated_fraction": report[name]["contaminated_fraction"],
            "contaminated_ids": [bench.item_ids[b][i] for i in hits],
        }
    flagged = [{"id": r[0], "benchmarks": [bench.names[b] for b in r[1]]} for r in records if not r[2]]
    content = {
        "n": bench.n,
        "mode": mode,
        "benchmarks": files,
        "flagged_records": flagged if mode == "flag" else [],
    }
    return content, report


def contaminated_ids(path: str) -> dict[str, set[str]]:
    """{benchmark name: contaminated item ids} of a W/contamination.json (the eval job's `eval.contamination`)."""
    try:
        content = json.loads(storage.read_text(path))
        return {name: set(b["contaminated_ids"]) for name, b in content["benchmarks"].items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(
            f"eval.contamination={path!r}: not a contamination.json written by curation ({e})"
        ) from None
