"""Curation benchmark on real text with planted duplicates: dedup recall/precision and docs/s per stage.

    /work/venv/bin/python benchmarks/curate_bench.py [--base_docs 3000] [--planted 900]   (~1 min on 2 CPU cores)

Corpus: the Python standard library's sources (`.py` files under sysconfig's stdlib path, without site-packages and
test suites) cut into 60-line documents, plus every pydoc topic (`pydoc_data.topics.topics`). Planted variants of
randomly chosen originals: exact copies, case and whitespace variants (removed by exact dedup) and word edits
(substitute, delete or insert a word with probability 1-30%, each variant with its own seed). Everything is shuffled
into 8 shards (half gzipped), so duplicates cross shards.

Figures, with the true Jaccard computed exactly on word 5-gram sets (words as in curate_minhash.words):
- recall: planted variants with Jaccard >= 0.8 to their original that end in the original's cluster (one of the
  two removed as a duplicate of the other, or both of the same representative);
- precision: records removed as duplicates whose Jaccard to the record named by `duplicate_of` is >= 0.7 (natural
  near-duplicates in the standard library count when they pass this bar);
- docs/s per stage from curate_report.json (per-process rate; the count of docs that reached the stage in brackets)
  and input docs/s over wall time, for 1 and 2 workers; outputs of the two runs must be byte-identical;
- each filter alone on 600 documents (in the pipeline, Gopher quality rejects most of this code-heavy corpus first),
  and MinHash signature speed against datasketch and rensa when they are importable (not dependencies).
The last printed line is one JSON object with these figures.
"""

from __future__ import annotations

import argparse
import collections
import filecmp
import glob
import gzip
import json
import os
import pydoc_data.topics
import random
import re
import sys
import sysconfig
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jaxalign import config as config_lib  # noqa: E402
from jaxalign.data import curate, curate_minhash  # noqa: E402
from jaxalign.data import curate_filters as filters  # noqa: E402

EDIT_RATES = (0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3)
LINES_PER_DOC = 60
NUM_SHARDS = 8


def base_documents(num_docs: int, seed: int) -> list[str]:
    """`num_docs` documents: all pydoc topics plus 60-line pieces of standard-library modules, sampled with `seed`."""
    stdlib = sysconfig.get_paths()["stdlib"]
    paths = sorted(glob.glob(os.path.join(stdlib, "**", "*.py"), recursive=True))
    paths = [p for p in paths if not re.search(r"site-packages|/tests?/|/idle_test/", p)]
    pieces = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
        for start in range(0, len(lines), LINES_PER_DOC):
            piece = "\n".join(lines[start : start + LINES_PER_DOC])
            if len(curate_minhash.words(piece)) >= 50:
                pieces.append(piece)
    topics = [text for _, text in sorted(pydoc_data.topics.topics.items())]
    rng = random.Random(seed)
    return topics + rng.sample(pieces, max(0, num_docs - len(topics)))


def edit_words(text: str, rate: float, seed: int, vocab: list[str]) -> str:
    """Each word is, with probability `rate`, substituted, deleted or followed by an inserted word."""
    rng = random.Random(seed)
    parts = re.split(r"(\s+)", text)  # words at even positions, whitespace kept as is
    for i in range(0, len(parts), 2):
        if parts[i] and rng.random() < rate:
            op = rng.randrange(3)
            parts[i] = rng.choice(vocab) if op == 0 else "" if op == 1 else f"{parts[i]} {rng.choice(vocab)}"
    return "".join(parts)


def plant(base: list[str], num_planted: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Records of the base documents plus planted variants, and one {"variant", "original", "kind"} per plant."""
    rng = random.Random(seed)
    vocab = sorted({w for doc in base[:500] for w in doc.split() if w.isalpha()})
    records = [{"id": f"base-{i}", "text": text, "source": "stdlib"} for i, text in enumerate(base)]
    plants = []
    kinds = ["exact", "case", "whitespace"] + [f"edit{r:.2f}" for r in EDIT_RATES] * 3
    for k in range(num_planted):
        original = rng.randrange(len(base))
        kind = kinds[k % len(kinds)]
        text = base[original]
        if kind == "case":
            text = text.upper() if k % 2 else text.swapcase()
        elif kind == "whitespace":
            text = re.sub(r"[ \t]+", lambda m: rng.choice(["  ", "\t", " \n "]), text)
        elif kind.startswith("edit"):
            text = edit_words(text, float(kind[4:]), seed * 100_003 + k, vocab)
        records.append({"id": f"plant-{k}", "text": text, "source": kind})
        plants.append({"variant": f"plant-{k}", "original": f"base-{original}", "kind": kind})
    rng.shuffle(records)
    return records, plants


def grams(text: str, n: int = 5) -> frozenset:
    w = curate_minhash.words(text)
    return frozenset(tuple(w[i : i + n]) for i in range(max(1, len(w) - n + 1)))


def jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / max(1, len(a | b))


def write_shards(records: list[dict], directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    for s in range(NUM_SHARDS):
        path = os.path.join(directory, f"part-{s}.jsonl" + (".gz" if s % 2 else ""))
        with (gzip.open if s % 2 else open)(path, "wt", encoding="utf-8") as f:
            for record in records[s::NUM_SHARDS]:
                f.write(json.dumps(record) + "\n")


def run_curation(input_glob: str, workdir: str, workers: int, **curate_overrides) -> dict:
    values = {
        "job": "curate",
        "workdir": workdir,
        "data": {"input": input_glob},
        "curate": {"num_workers": workers, **curate_overrides},
    }
    curate.run(config_lib.from_config_dict(values))
    with open(os.path.join(workdir, "curate_report.json")) as f:
        return json.load(f)


def evaluate(records: list[dict], plants: list[dict], workdir: str) -> dict:
    text = {r["id"]: r["text"] for r in records}
    removed = {}
    with open(os.path.join(workdir, "removed.jsonl")) as f:
        for line in f:
            entry = json.loads(line)
            removed[entry["id"]] = entry
    cluster = lambda i: removed[i].get("duplicate_of", i) if i in removed else i
    cache: dict[str, frozenset] = {}
    g = lambda i: cache[i] if i in cache else cache.setdefault(i, grams(text[i]))

    by_kind = collections.defaultdict(lambda: [0, 0])  # kind -> [detected, planted with J >= 0.8]
    for p in plants:
        if jaccard(g(p["variant"]), g(p["original"])) >= 0.8:
            kind = p["kind"] if not p["kind"].startswith("edit") else "near"
            by_kind[kind][1] += 1
            by_kind[kind][0] += cluster(p["variant"]) == cluster(p["original"])
    dups = [(i, e) for i, e in removed.items() if "duplicate_of" in e]
    correct = {i: jaccard(g(i), g(e["duplicate_of"])) >= 0.7 for i, e in dups}
    near = [i for i, e in dups if e["reason"] == "near_duplicate"]
    total = [sum(v[0] for v in by_kind.values()), sum(v[1] for v in by_kind.values())]
    return {
        "recall_j08": total[0] / max(1, total[1]),
        "near_recall_j08": by_kind["near"][0] / max(1, by_kind["near"][1]),
        "planted_j08": total[1],
        "recall_by_kind": {k: f"{v[0]}/{v[1]}" for k, v in sorted(by_kind.items())},
        "precision_j07": sum(correct.values()) / max(1, len(correct)),
        "near_precision_j07": sum(correct[i] for i in near) / max(1, len(near)),
        "removed_as_duplicate": len(dups),
        "removed_as_near_duplicate": len(near),
    }


def filter_speed(texts: list[str]) -> dict[str, float]:
    """Docs/s of each quality filter and PII scrubbing run alone on every text (in the pipeline a filter only sees
    what the filters before it kept: on this code-heavy corpus Gopher quality rejects most documents)."""
    config = config_lib.CurateConfig()
    rates = {}
    for name, fn in [*filters.enabled(config), ("pii", filters.scrub_pii)]:
        t = time.perf_counter()
        for text in texts:
            filters.tokenize.cache_clear()  # no help from the previous filter's tokens
            fn(text)
        rates[name] = len(texts) / (time.perf_counter() - t)
    return rates


def signature_speed(texts: list[str], num_perm: int = 112) -> dict[str, float]:
    """Docs/s of word 5-gram MinHash signatures (words to signature, one process): ours, and datasketch and rensa
    when importable (they are not dependencies: `pip install --target DIR datasketch rensa`, then PYTHONPATH=DIR)."""
    rates = {}
    a_K, b_K = curate_minhash.permutations(num_perm, seed=0)
    t = time.perf_counter()
    for i in range(0, len(texts), 256):
        batch = [curate_minhash.word_bytes(text.casefold()) for text in texts[i : i + 256]]
        curate_minhash.minhash(*curate_minhash.shingles(batch, 5), len(batch), a_K, b_K)
    rates["jaxalign (numpy)"] = len(texts) / (time.perf_counter() - t)
    grams = lambda text: [
        " ".join(w[i : i + 5]) for w in [curate_minhash.words(text)] for i in range(max(1, len(w) - 4))
    ]
    try:
        import datasketch

        t = time.perf_counter()
        datasketch.MinHash.bulk([[g.encode() for g in grams(text)] for text in texts], num_perm=num_perm)
        rates["datasketch"] = len(texts) / (time.perf_counter() - t)
    except ImportError:
        pass
    try:
        import rensa

        t = time.perf_counter()
        for text in texts:
            rensa.RMinHash(num_perm=num_perm, seed=0).update(grams(text))
        rates["rensa (RMinHash)"] = len(texts) / (time.perf_counter() - t)
    except ImportError:
        pass
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base_docs", type=int, default=3000)
    parser.add_argument("--planted", type=int, default=900)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="")
    # Also curate on Apache Beam with these pipeline flags (needs the `beam` extra), e.g. "--runner=FnApiRunner
    # --direct_num_workers=2 --direct_running_mode=multi_processing": its wall docs/s and byte-identity to 1 worker.
    parser.add_argument("--beam_options", default="")
    args = parser.parse_args()
    root = args.workdir or tempfile.mkdtemp(prefix="curate_bench_")
    t = time.perf_counter()
    records, plants = plant(base_documents(args.base_docs, args.seed), args.planted, args.seed)
    write_shards(records, os.path.join(root, "input"))
    print(
        f"corpus: {len(records)} docs ({sum(len(r['text']) for r in records) / 1e6:.1f} MB) in {NUM_SHARDS} shards, "
        f"{len(plants)} planted, built in {time.perf_counter() - t:.1f}s; workdir {root}"
    )

    results = {}
    for workers in (1, 2):
        workdir = os.path.join(root, f"w{workers}")
        report = run_curation(os.path.join(root, "input", "part-*"), workdir, workers)
        results[workers] = {"report": report, **evaluate(records, plants, workdir)}
    outputs = ["removed.jsonl"] + [
        os.path.join("curated", f) for f in sorted(os.listdir(os.path.join(root, "w1", "curated")))
    ]
    same = lambda other: all(
        filecmp.cmp(os.path.join(root, "w1", f), os.path.join(root, other, f), shallow=False) for f in outputs
    )
    identical = same("w2")
    beam = {}
    if args.beam_options:
        report = run_curation(
            os.path.join(root, "input", "part-*"),
            os.path.join(root, "beam"),
            1,
            runner="beam",
            beam_options=args.beam_options,
        )
        beam = {
            "identical_beam_vs_local": same("beam")
            and len(os.listdir(os.path.join(root, "beam", "curated"))) == len(outputs) - 1,
            "docs_per_s_wall_beam": round(report["records"]["input"] / report["wall_seconds"], 1),
        }

    one = results[1]
    print(f"\nplanted with J>=0.8: {one['planted_j08']} ({one['recall_by_kind']} detected by kind)")
    print(f"removed: {one['report']['removed_by_reason']}")
    stages = list(one["report"]["stages"])
    print(
        f"\n{'(docs/s: docs in the stage)':28s}"
        + "".join(f"{w} worker{'s' if w > 1 else '':1s}".rjust(14) for w in results)
    )
    rows = [
        ("recall (J>=0.8)", "recall_j08", "{:.3f}"),
        ("  near-dup recall (J>=0.8)", "near_recall_j08", "{:.3f}"),
        ("precision (J>=0.7)", "precision_j07", "{:.3f}"),
        ("  near-dup precision", "near_precision_j07", "{:.3f}"),
        ("removed as duplicate", "removed_as_duplicate", "{}"),
    ]
    for label, key, fmt in rows:
        print(f"{label:28s}" + "".join(fmt.format(r[key]).rjust(14) for r in results.values()))
    for stage in stages:
        rates = [r["report"]["stages"].get(stage, {}).get("docs_per_s", 0.0) for r in results.values()]
        label = f"docs/s {stage} ({one['report']['stages'][stage]['docs']})"
        print(f"{label:28s}" + "".join(f"{x:14.0f}" for x in rates))
    walls = [r["report"]["records"]["input"] / r["report"]["wall_seconds"] for r in results.values()]
    print(f"{'docs/s overall (wall)':28s}" + "".join(f"{x:14.0f}" for x in walls))
    print(f"{'wall seconds':28s}" + "".join(f"{r['report']['wall_seconds']:14.1f}" for r in results.values()))
    print(f"1 and 2 workers byte-identical outputs: {identical}")
    if beam:
        print(
            f"Beam ({args.beam_options}): {beam['docs_per_s_wall_beam']:.0f} docs/s (wall), byte-identical "
            f"to 1 worker: {beam['identical_beam_vs_local']}"
        )
    alone = filter_speed([r["text"] for r in records[:600]])
    print("alone on 600 docs, docs/s (1 process): " + ", ".join(f"{k} {v:.0f}" for k, v in alone.items()))
    speed = signature_speed([r["text"] for r in records[:1000]])
    print(
        "MinHash signature docs/s (words -> signature, 1 process): "
        + ", ".join(f"{k} {v:.0f}" for k, v in speed.items())
    )

    summary = {
        "docs": len(records),
        "planted_j08": one["planted_j08"],
        "recall_j08": round(one["recall_j08"], 4),
        "near_recall_j08": round(one["near_recall_j08"], 4),
        "precision_j07": round(one["precision_j07"], 4),
        "near_precision_j07": round(one["near_precision_j07"], 4),
        "identical_1_vs_2_workers": identical,
        **beam,
        "signature_docs_per_s": {k: round(v, 1) for k, v in speed.items()},
        "filter_alone_docs_per_s": {k: round(v, 1) for k, v in alone.items()},
    }
    for workers, r in results.items():
        summary[f"docs_per_s_wall_{workers}w"] = round(
            r["report"]["records"]["input"] / r["report"]["wall_seconds"], 1
        )
        summary[f"stage_docs_per_s_{workers}w"] = {
            s: v["docs_per_s"] for s, v in r["report"]["stages"].items()
        }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
