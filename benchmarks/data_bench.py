"""Input-pipeline throughput: can the data pipelines feed the reference training workload?

    python benchmarks/data_bench.py                 # ~1 minute on a 2-core CPU
    python benchmarks/data_bench.py --seconds=2     # quicker, noisier

Measures, on the synthetic world's pretraining corpus (400 people) and a SentencePiece BPE model of the reference
vocabulary (8192):
  - raw SentencePiece encode speed (one call per document, and one batched call);
  - the LM pipeline (read JSONL, tokenize, chunk, pack into 8 x 256 rows) with 0 and 2 worker processes;
  - the SFT pipeline (chat template, loss mask, pack) on the world's SFT conversations.
"batch tokens/s" counts every slot of the [8, 256] batches (what a train step consumes); "real tokens/s" counts the
slots holding data (packing leaves a little padding). The reference train step takes `--step_seconds` (0.75 s on this
machine for 8 x 256 = 2048 tokens, ~2,700 tokens/s); the pipeline should feed it at least 10x faster than it consumes.

Prints a table; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

BATCH, SEQ = 8, 256


def _measure(loader, seconds: float) -> tuple[float, float]:
    """(batch tokens/s, real tokens/s) over `seconds` after one warm-up batch (worker start-up excluded)."""
    next(loader)
    batches = real = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch = next(loader)
        batches += 1
        real += int((batch["segment_ids"] > 0).sum())
    elapsed = time.perf_counter() - start
    return batches * BATCH * SEQ / elapsed, real / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="measuring time per row of the table")
    parser.add_argument(
        "--step_seconds", type=float, default=0.75, help="reference train step time (8 x 256)"
    )
    parser.add_argument("--people", type=int, default=400)
    args = parser.parse_args()

    from jaxalign.data import pipelines, synthetic
    from jaxalign.data.sources import open_source
    from jaxalign.data.tokenizer import train_sentencepiece

    with tempfile.TemporaryDirectory() as tmp:
        paths = synthetic.write_world(os.path.join(tmp, "data"), args.people, seed=0)
        source = open_source(paths["pretrain_train"])
        texts = [source[i]["text"] for i in range(len(source))]
        tok = train_sentencepiece(texts, os.path.join(tmp, "sp.model"), 8192)

        rows = []
        # Raw SentencePiece: repeat the corpus until `seconds` have passed.
        for name, encode in (
            ("sentencepiece encode, per document", lambda: [tok.encode(t) for t in texts]),
            ("sentencepiece encode, one batched call", lambda: tok.encode_batch(texts)),
        ):
            tokens, start = 0, time.perf_counter()
            while time.perf_counter() - start < args.seconds:
                tokens += sum(map(len, encode()))
            rate = tokens / (time.perf_counter() - start)
            rows.append((name, rate, rate))

        lm = dict(seq_len=SEQ, global_batch_size=BATCH, seed=0)
        for workers in (0, 2):
            loader = pipelines.lm_loader(paths["pretrain_train"], tok, num_workers=workers, **lm)
            rows.append((f"LM pipeline, {workers} workers", *_measure(loader, args.seconds)))
            loader.close()
        loader = pipelines.sft_loader(paths["sft_train"], tok, **lm)
        rows.append(("SFT pipeline, 0 workers", *_measure(loader, args.seconds)))
        loader.close()

    step_rate = BATCH * SEQ / args.step_seconds
    print(f"\n{'':40s} {'batch tokens/s':>15s} {'real tokens/s':>14s} {'x train step':>13s}")
    for name, batch_rate, real_rate in rows:
        print(f"{name:40s} {batch_rate:15,.0f} {real_rate:14,.0f} {batch_rate / step_rate:12.1f}x")
    print(f"{'reference train step (8 x 256)':40s} {step_rate:15,.0f} {'':14s} {1:12.1f}x")
    lm_rate = max(r[1] for r in rows if r[0].startswith("LM"))
    lm0 = next(r[1] for r in rows if r[0] == "LM pipeline, 0 workers")
    summary = {
        "sentencepiece_tokens_per_s": round(rows[0][1]),
        "sentencepiece_batched_tokens_per_s": round(rows[1][1]),
        "lm_pipeline_tokens_per_s": round(lm0),
        "lm_pipeline_2_workers_tokens_per_s": round(rows[3][1]),
        "sft_pipeline_tokens_per_s": round(rows[4][1]),
        "train_step_tokens_per_s": round(step_rate),
        "feed_ratio": round(lm_rate / step_rate, 1),
        "feeds_10x": bool(lm0 >= 10 * step_rate),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
