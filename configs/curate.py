# Run:   python -m jaxalign.main --config=configs/curate.py --config.data.input='data/raw/*.jsonl.gz' \
#            --config.workdir=runs/curate
# Smoke: python -m jaxalign.main --config=configs/curate.py:smoke --config.data.input='...' --config.workdir=/tmp/c
# Time on a 2-core CPU: 200-350 documents of ~2 KB per second per worker (measured by benchmarks/curate_bench.py,
# whose 3,900 documents / 8.9 MB take ~12 s), i.e. ~5 minutes per 100k documents with the default 2 workers.
# A re-run of the same command resumes: finished shards (input files) are not read again.
"""Data curation: exact + MinHash-LSH near dedup, Gopher/C4/FineWeb quality filters, PII scrubbing.

Writes workdir/curated/*.jsonl, workdir/removed.jsonl and workdir/curate_report.json (see jaxalign/data/curate.py).
"""

import ml_collections

from jaxalign.config import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = defaults()
    config.job = "curate"
    config.seed = 0  # MinHash permutations
    # A glob of JSONL(.gz) files with "id" and "text" per record; one shard per file.
    config.data.update({"input": "", "on_error": "error"})
    config.curate.update(
        {
            "exact_dedup": True,
            "near_dedup": True,
            # 14 bands x 8 rows = 112 permutations: LSH threshold (1/14)^(1/8) ~ 0.72, as datatrove's default.
            "ngram": 5,
            "num_bands": 14,
            "rows_per_band": 8,
            "near_threshold": 0.7,
            "gopher_quality": True,
            "gopher_repetition": True,
            "c4_filters": True,
            "c4_drop_lines": True,
            "fineweb_filters": True,
            "pii": True,
            "num_workers": 2,
            # "beam": the same stages on Apache Beam (pip install 'jaxalign[beam]'), e.g. on Dataflow with
            # beam_options="--runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp".
            "runner": "local",
            "beam_options": "",
            # Decontamination against the world's held-out questions / decontam_benchmarks (off, flag, drop).
            "decontam": "off",
            "decontam_n": 13,
            # CCNet perplexity filter: off unless perplexity_model or perplexity_reference is set.
            "perplexity_cuts": "33,67",
            "perplexity_keep": "head,middle",
        }
    )
    if arg == "smoke":  # one process, 32 permutations
        config.curate.num_workers = 1
        config.curate.num_bands = 8
        config.curate.rows_per_band = 4
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; use 'smoke' or nothing")
    return config
