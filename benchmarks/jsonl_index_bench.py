"""Peak memory of opening a large JSONL(.gz) corpus: indexing must cost O(records), not O(bytes).

    python benchmarks/jsonl_index_bench.py               # a 1 GB corpus, ~2 minutes on a 2-core CPU
    python benchmarks/jsonl_index_bench.py --mb=100      # quicker
    python benchmarks/jsonl_index_bench.py --mb=200 --processes=4   # also one process's share at P=4

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

`--processes=P` adds `data.shard_by="file"` rows: what one process of P opens when the plain file is split
into P byte ranges (`jaxalign.data.file_shards`, shard 0's span) next to P=1 (the whole file as one span), so
the per-process index time and index memory are about 1/P of the whole corpus's. Measured (--mb=1024
--processes=4, 951,155 records, a loaded 2-core CPU):
  process      records   index s   peak RSS MB   worker state MB
  P=1 share    951,155     10.86          52.8             21.77
  P=4 share    237,863      3.34          33.6              5.44
The index (worker state) is 1/4 and the index time ~1/3; peak RSS is a fixed ~28 MB working set (scanning 1 MiB
chunks) plus the index, so it falls by the index's 3/4. (The same run gave 52.7 MB for the plain file through
`open_source`: the index is no longer copied once more at its end, which the 1 GB rows above, measured before,
still include.)

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
from jaxalign.data import file_shards, sources
warm = os.path.join(tempfile.mkdtemp(), "warm.jsonl")
open(warm, "w").write('{"id": 0}\\n')
sources.open_source(warm)[0]  # the imports a first open makes are not the index's memory
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
processes = int(sys.argv[2])  # 0: open_source; P: shard 0 of P under shard_by="file"
t = time.perf_counter()
if processes:
    src = file_shards.open_spans(file_shards.plan([sys.argv[1]], processes)[0], "error")
else:
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


def probe(path: str, processes: int = 0) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, path, str(processes)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=1024, help="corpus size in MB (uncompressed)")
    parser.add_argument(
        "--processes", type=int, default=0, help="also index one process's share of P (shard_by='file')"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        plain, packed, records = write_corpus(tmp, args.mb)
        rows = {"jsonl": probe(plain), "jsonl.gz": probe(packed)}
        shares = {}
        if args.processes:
            shares = {f"P={p} share": probe(plain, p) for p in sorted({1, args.processes})}
    print(f"corpus: {args.mb} MB, {records:,} records")
    print(f"{'file':<10} {'index s':>8} {'records/s':>12} {'peak RSS MB':>12} {'worker state MB':>16}")
    for name, r in rows.items():
        assert r["records"] == records and r["last_id"] == records - 1, r
        print(
            f"{name:<10} {r['index_s']:>8.1f} {r['records'] / r['index_s']:>12,.0f} {r['peak_mb']:>12.1f} "
            f"{r['worker_state_mb']:>16.2f}"
        )
    if shares:
        print("\nshard_by='file', plain jsonl: what one process indexes")
        print(f"{'process':<12} {'records':>10} {'index s':>8} {'peak RSS MB':>12} {'worker state MB':>16}")
        for name, r in shares.items():
            print(
                f"{name:<12} {r['records']:>10,} {r['index_s']:>8.2f} {r['peak_mb']:>12.1f} "
                f"{r['worker_state_mb']:>16.2f}"
            )
        assert shares["P=1 share"]["records"] == records
    print(json.dumps({"corpus_mb": args.mb, "records": records, **rows, **shares}))


if __name__ == "__main__":
    main()
