"""Exact-substring dedup benchmark: time and peak memory of `substring_dedup.dedup` on a generated corpus.

    /work/venv/bin/python benchmarks/substring_dedup_bench.py [--mb 10,30,100] [--tokens 50]   (~2 min on 2 cores)

Corpus (per size, generated in a fresh subprocess, seed 0): documents of 200-600 words drawn from a Zipf-like
vocabulary of 20k random lowercase words, so chance repeats of >= 200 bytes do not happen; 10% of documents get a
copy of a 300-1500-byte piece of an earlier document inserted at a random word boundary (the planted bytes).

Each size runs in its own subprocess, which reports: generation time, `dedup` wall time, the peak resident memory
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`) before and after `dedup` (its growth is the memory dedup itself needs
above the corpus, as generation peaks lower), bytes removed against bytes planted (a planted piece is removed
whole, plus any bytes on either side that happen to equal the source's neighbours; nothing else should go).
The last printed line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def generate(total_bytes: int, seed: int) -> tuple[list[bytes], int]:
    """Documents totalling ~total_bytes and the number of planted (copied) bytes."""
    import numpy as np

    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", np.uint8)
    vocab = [bytes(letters[rng.integers(0, 26, rng.integers(2, 10))]) for _ in range(20_000)]
    cdf = np.cumsum(1.0 / np.arange(1, len(vocab) + 1))
    cdf /= cdf[-1]
    texts, planted, size = [], 0, 0
    while size < total_bytes:
        n = int(rng.integers(200, 600))
        ids = np.minimum(np.searchsorted(cdf, rng.random(n)), len(vocab) - 1)
        text = b" ".join([vocab[i] for i in ids.tolist()]) + b"."
        if texts and rng.random() < 0.1:
            src = texts[int(rng.integers(0, len(texts)))]
            length = int(rng.integers(300, 1500))
            start = int(rng.integers(0, max(1, len(src) - length)))
            piece = src[start : start + length]
            at = text.find(b" ", int(rng.integers(0, len(text))))
            at = len(text) if at < 0 else at
            text = text[:at] + b" " + piece + b" " + text[at:]
            planted += len(piece)
        texts.append(text)
        size += len(text)
    return texts, planted


def child(mb: int, tokens: int) -> None:
    from jaxalign.data import substring_dedup as substr

    t = time.perf_counter()
    texts, planted = generate(mb * 2**20, seed=0)
    gen_s = time.perf_counter() - t
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    result = substr.dedup(texts, tokens)
    dedup_s = time.perf_counter() - t
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "mb": mb,
                "docs": len(texts),
                "bytes": result.bytes_in,
                "generate_s": round(gen_s, 2),
                "dedup_s": round(dedup_s, 2),
                "mb_per_s": round(result.bytes_in / 2**20 / dedup_s, 2),
                "peak_rss_before_mb": round(rss_before / 2**20, 1),
                "peak_rss_after_mb": round(rss_after / 2**20, 1),
                "dedup_extra_bytes_per_byte": round((rss_after - rss_before) / result.bytes_in, 2),
                "planted_bytes": planted,
                "removed_bytes": result.bytes_removed,
                "spans": sum(map(len, result.spans)),
                "docs_dropped": int(result.dropped.sum()),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", default="10,30,100", help="corpus sizes in MiB, comma-separated")
    parser.add_argument("--tokens", type=int, default=50, help="curate.substring_dedup_tokens")
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.tokens)
        return
    rows = []
    for mb in map(int, args.mb.split(",")):
        cmd = [sys.executable, __file__, "--child", str(mb), "--tokens", str(args.tokens)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    cols = list(rows[0])
    print(" | ".join(f"{c:>12}" for c in cols))
    for row in rows:
        print(" | ".join(f"{row[c]!s:>12}" for c in cols))
    print(json.dumps({"benchmark": "substring_dedup", "tokens": args.tokens, "runs": rows}))


if __name__ == "__main__":
    main()
