"""Continued pretraining of Llama-3.1-8B from a local Hugging Face checkpoint.

    python -m jaxalign.main --config=configs/llama3_8b.py --config.workdir=runs/llama3_8b \
        --config.model.init_from=hf:/path/to/Llama-3.1-8B --config.data.input='/path/to/corpus/*.jsonl.gz'
      One host with 8 accelerators (>= 40 GB each; FSDP over all 8). Not run here: an estimate is ~11 hours on
      8 x H100 at 40% MFU (2.6B tokens: 5,000 steps of 64 x 8,192).
    python -m jaxalign.main --config=configs/llama3_8b.py:pod --config.workdir=gs://bucket/runs/llama3_8b ...
      A pod slice of 64 chips per slice (e.g. TPU v5p-128), FSDP within a slice and data parallel across slices.
      Not run here: an estimate is ~12 hours on one v5p-128 at 40% MFU (10.5B tokens: 2,500 steps of 512 x 8,192).

`model.init_from` must name the directory holding config.json and *.safetensors (a placeholder by default, so the
run stops at once with a message naming it). The model section must agree with that config.json on every shape
field; `hf.load_params` checks it and names the first key that differs. Shapes are those of meta-llama/Llama-3.1-8B
(8.03e9 parameters). For Llama-3-8B (no RoPE scaling) add --config.model.rope_scaling='' --config.model.max_seq_len=8192.

The corpus `data.input` has no default (the run stops at once naming it, rather than train on the synthetic
world); it must be tokenized with the checkpoint's own tokenizer (`data.tokenizer` = the checkpoint directory).
"""

import ml_collections

from jaxalign.config import continued_pretraining

CHECKPOINT = "/path/to/Llama-3.1-8B"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return continued_pretraining(
        CHECKPOINT,
        arg,
        model=dict(
            vocab_size=128256,
            d_model=4096,
            n_layers=32,
            n_heads=32,
            n_kv_heads=8,
            head_dim=128,
            d_ff=14336,
            max_seq_len=131072,
            rope_theta=500000.0,
            rope_scaling="llama3",
            rope_factor=8.0,
            rope_low_freq_factor=1.0,
            rope_high_freq_factor=4.0,
            rope_original_max_len=8192,
            norm_eps=1e-05,
            tie_embeddings=False,
        ),
    )
