"""Peak memory of opening a large JSONL(.gz) corpus: indexing must cost O(records), not O(bytes).

    python benchmarks/jsonl_index_bench.py               # a 1 GB corpus, ~2 minutes on a 2-core CPU
    python benchmarks/jsonl_index_bench.py --mb=100      # quicker

Writes a corpus of `--mb` megabytes of JSONL records (`{"id", "text"}`, ~1 KB each) under a temporary directory,
plain and gzip-compressed, then opens each with `sources.open_source` in a fresh process and reports that
process's peak resident memory (ru_maxrss) above the interpreter's baseline, the records/s of indexing, the
index bytes a Grain worker receives (the pickled source), and a read of the last record. Before the streaming
index the whole file was read into memory and scanned with a byte-wide cumulative sum (about 10x the file size in
peak memory, and the decompressed bytes of a .gz went to every worker).

Measured on the 2-core CPU (peak RSS above the interpreter's; worker state is the pickled source):
  corpus          file      before (whole-file scan)        streaming index
  200 MB, 186k    jsonl     3,605 MB, 18.3 s, 4.3 MB state   33.5 MB, 1.8 s, 4.3 MB state
  200 MB, 186k    jsonl.gz  3,605 MB, 12.8 s, 204 MB state   33.7 MB, 3.3 s, 4.3 MB state
  1 GB, 951k      jsonl     (not run: ~18 GB)                58.1 MB, 16.8 s, 21.8 MB state
  1 GB, 951k      jsonl.gz                                   59.0 MB, 25.0 s, 21.8 MB state
The rest is the index itself, 24 bytes per record (start, end, line number).

Prints a table; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile

_PROBE = """
import json, os, pickle, resource, sys, tempfile, time
from jaxalign.data import sources
warm = os.path.join(tempfile.mkdtemp(), "warm.jsonl")
open(warm, "w").write('{"id": 0}\\n')
sources.open_source(warm)[0]  # the imports a first open makes are not the index's memory
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
src = sources.open_source(sys.argv[1])
seconds = time.perf_counter() - t
last = src[len(src) - 1]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"records": len(src), "index_s": seconds, "peak_mb": (peak - base) / 1024,
                  "worker_state_mb": len(pickle.dumps(src)) / 2**20, "last_id": last["id"]}))
"""


def write_corpus(directory: str, megabytes: int) -> tuple[str, str, int]:
    """(plain path, gzip path, records) of a corpus of about `megabytes` MB."""
    plain, packed = os.path.join(directory, "corpus.jsonl"), os.path.join(directory, "corpus.jsonl.gz")
    words = [f"word{i}" for i in range(1000)]
    text = " ".join(words[(7 * i) % 1000] for i in range(140))  # ~1 KB per record
    records, written = 0, 0
    with (
        open(plain, "w", encoding="utf-8") as f,
        gzip.open(packed, "wt", encoding="utf-8", compresslevel=1) as g,
    ):
        while written < megabytes * 2**20:
            line = json.dumps({"id": records, "text": text}) + "\n"
            f.write(line)
            g.write(line)
            written += len(line)
            records += 1
    return plain, packed, records


def probe(path: str) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, path], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=1024, help="corpus size in MB (uncompressed)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        plain, packed, records = write_corpus(tmp, args.mb)
        rows = {"jsonl": probe(plain), "jsonl.gz": probe(packed)}
    print(f"corpus: {args.mb} MB, {records:,} records")
    print(f"{'file':<10} {'index s':>8} {'records/s':>12} {'peak RSS MB':>12} {'worker state MB':>16}")
    for name, r in rows.items():
        assert r["records"] == records and r["last_id"] == records - 1, r
        print(
            f"{name:<10} {r['index_s']:>8.1f} {r['records'] / r['index_s']:>12,.0f} {r['peak_mb']:>12.1f} "
            f"{r['worker_state_mb']:>16.2f}"
        )
    print(json.dumps({"corpus_mb": args.mb, "records": records, **{k: v for k, v in rows.items()}}))


if __name__ == "__main__":
    main()
