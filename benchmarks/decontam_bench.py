"""Decontamination and perplexity-scoring throughput (documents/s) on the synthetic world's text.

    python benchmarks/decontam_bench.py            ~1 minute on a 2-core CPU
    python benchmarks/decontam_bench.py --quick    a few seconds

Decontamination: `Benchmarks.match` of every document against the world's held-out questions plus a synthetic
benchmark of long items (13-grams), at n = 13 and n = 8. Perplexity: `Scorer.score` of the same documents with a
small random-weight LM (the speed does not depend on the weights) at the default bucketed lengths, first call
(compiles included) and second call. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()

    from jaxalign.data import decontam, synthetic

    directory = tempfile.mkdtemp()
    paths = synthetic.write_world(directory, 100 if args.quick else 400, seed=0)
    docs = [json.loads(line)["text"] for line in open(paths["raw"])]
    docs += [json.loads(line)["text"] for line in open(paths["pretrain_train"])]
    rng = random.Random(0)
    vocab = sorted({w for d in docs for w in d.split()})
    long_items = [(f"x{k}", " ".join(rng.choice(vocab) for _ in range(30))) for k in range(1000)]
    rows, out = [], {"documents": len(docs), "words": sum(len(d.split()) for d in docs)}
    for n in (13, 8):
        bench = decontam.build(n, [("world_qa", decontam.world_items(directory)), ("long", long_items)])
        t = time.perf_counter()
        hits = sum(bool(bench.match(d)) for d in docs)
        seconds = time.perf_counter() - t
        rows.append((f"decontam n={n}", len(docs) / seconds, hits))
        out[f"decontam_n{n}_docs_per_s"] = round(len(docs) / seconds, 1)

    from flax import nnx

    from jaxalign.config import ModelConfig
    from jaxalign.data.perplexity_filter import Scorer
    from jaxalign.data.tokenizer import SentencePieceTokenizer, train_sentencepiece
    from jaxalign.models.transformer import Transformer

    train_sentencepiece(docs, f"{directory}/sp.model", 512)
    tok = SentencePieceTokenizer(f"{directory}/sp.model")
    cfg = ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=256)
    scorer = Scorer(Transformer(cfg, nnx.Rngs(0), None), tok, None, batch_size=16, max_tokens=512)
    for label in ("perplexity (1st: compiles)", "perplexity (2nd)"):
        t = time.perf_counter()
        nll, _ = scorer.score(docs)
        seconds = time.perf_counter() - t
        rows.append((label, len(docs) / seconds, int(np.isfinite(nll).sum())))
    out["perplexity_docs_per_s_first"] = round(rows[-2][1], 1)
    out["perplexity_docs_per_s"] = round(rows[-1][1], 1)
    out["perplexity_compiled_lengths"] = sorted(scorer.widths)
    print(f"{'stage':28s} {'docs/s':>10s} {'docs hit/scored':>16s}")
    for label, rate, count in rows:
        print(f"{label:28s} {rate:10.1f} {count:16d}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
