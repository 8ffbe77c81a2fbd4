"""Continued pretraining of Qwen2.5-7B from a local Hugging Face checkpoint.

    python -m jaxalign.main --config=configs/qwen25_7b.py --config.workdir=runs/qwen25_7b \
        --config.model.init_from=hf:/path/to/Qwen2.5-7B --config.data.input='/path/to/corpus/*.jsonl.gz'
      One host with 8 accelerators (>= 40 GB each; FSDP over all 8). Not run here: an estimate is ~10.5 hours on
      8 x H100 at 40% MFU (2.6B tokens: 5,000 steps of 64 x 8,192).
    python -m jaxalign.main --config=configs/qwen25_7b.py:pod --config.workdir=gs://bucket/runs/qwen25_7b ...
      A pod slice of 64 chips per slice (e.g. TPU v5p-128), FSDP within a slice and data parallel across slices.
      Not run here: an estimate is ~11.5 hours on one v5p-128 at 40% MFU (10.5B tokens: 2,500 steps of 512 x 8,192).

`model.init_from` must name the directory holding config.json and *.safetensors (a placeholder by default, so the
run stops at once with a message naming it). The model section must agree with that config.json on every shape
field; `hf.load_params` checks it and names the first key that differs. Shapes are those of
Qwen/Qwen2.5-7B (7.62e9 parameters; q/k/v biases).

The corpus `data.input` has no default (the run stops at once naming it, rather than train on the synthetic
world); it must be tokenized with the checkpoint's own tokenizer (`data.tokenizer` = the checkpoint directory).
"""

import ml_collections

from jaxalign.config import continued_pretraining

CHECKPOINT = "/path/to/Qwen2.5-7B"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return continued_pretraining(
        CHECKPOINT,
        arg,
        model=dict(
            vocab_size=152064,
            d_model=3584,
            n_layers=28,
            n_heads=28,
            n_kv_heads=4,
            head_dim=128,
            d_ff=18944,
            max_seq_len=131072,
            rope_theta=1000000.0,
            norm_eps=1e-06,
            qkv_bias=True,
            tie_embeddings=False,
        ),
    )
