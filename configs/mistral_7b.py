"""Continued pretraining of Mistral-7B-v0.3 from a local Hugging Face checkpoint.

    python -m jaxalign.main --config=configs/mistral_7b.py --config.workdir=runs/mistral_7b \
        --config.model.init_from=hf:/path/to/Mistral-7B-v0.3 --config.data.input='/path/to/corpus/*.jsonl.gz'
      One host with 8 accelerators (>= 40 GB each; FSDP over all 8). Not run here: an estimate is ~10 hours on
      8 x H100 at 40% MFU (2.6B tokens: 5,000 steps of 64 x 8,192).
    python -m jaxalign.main --config=configs/mistral_7b.py:pod --config.workdir=gs://bucket/runs/mistral_7b ...
      A pod slice of 64 chips per slice (e.g. TPU v5p-128), FSDP within a slice and data parallel across slices.
      Not run here: an estimate is ~11 hours on one v5p-128 at 40% MFU (10.5B tokens: 2,500 steps of 512 x 8,192).

`model.init_from` must name the directory holding config.json and *.safetensors (a placeholder by default, so the
run stops at once with a message naming it). The model section must agree with that config.json on every shape
field; `hf.load_params` checks it and names the first key that differs. Shapes are those of
mistralai/Mistral-7B-v0.3 (7.25e9 parameters; no sliding window). Mistral-7B-v0.1 differs (vocab_size=32000,
rope_theta=10000.0, sliding_window=4096, so max_seq_len=4096).

The corpus `data.input` has no default (the run stops at once naming it, rather than train on the synthetic
world); it must be tokenized with the checkpoint's own tokenizer (`data.tokenizer` = the checkpoint directory).
"""

import ml_collections

from jaxalign.config import continued_pretraining

CHECKPOINT = "/path/to/Mistral-7B-v0.3"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return continued_pretraining(
        CHECKPOINT,
        arg,
        model=dict(
            vocab_size=32768,
            d_model=4096,
            n_layers=32,
            n_heads=32,
            n_kv_heads=8,
            head_dim=128,
            d_ff=14336,
            max_seq_len=32768,
            rope_theta=1000000.0,
            norm_eps=1e-05,
            tie_embeddings=False,
        ),
    )
