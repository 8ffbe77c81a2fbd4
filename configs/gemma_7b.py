"""Continued pretraining of Gemma-7B from a local Hugging Face checkpoint.

    python -m jaxalign.main --config=configs/gemma_7b.py --config.workdir=runs/gemma_7b \
        --config.model.init_from=hf:/path/to/gemma-7b --config.data.input='/path/to/corpus/*.jsonl.gz'
      One host with 8 accelerators (>= 40 GB each; FSDP over all 8). Not run here: an estimate is ~11.5 hours on
      8 x H100 at 40% MFU (2.6B tokens: 5,000 steps of 128 x 4,096).
    python -m jaxalign.main --config=configs/gemma_7b.py:pod --config.workdir=gs://bucket/runs/gemma_7b ...
      A pod slice of 64 chips per slice (e.g. TPU v5p-128), FSDP within a slice and data parallel across slices.
      Not run here: an estimate is ~13 hours on one v5p-128 at 40% MFU (10.5B tokens: 2,500 steps of 1,024 x 4,096).

`model.init_from` must name the directory holding config.json and *.safetensors (a placeholder by default, so the
run stops at once with a message naming it). The model section must agree with that config.json on every shape
field; `hf.load_params` checks it and names the first key that differs. Shapes are those of
google/gemma-7b (8.54e9 parameters; (1 + w) norms, embeddings scaled by sqrt(d_model), gelu-tanh MLP, tied
embeddings). Sequences of 4,096 keep the 256k-vocabulary logits of one sequence per device at ~4 GB.

The corpus `data.input` has no default (the run stops at once naming it, rather than train on the synthetic
world); it must be tokenized with the checkpoint's own tokenizer (`data.tokenizer` = the checkpoint directory).
"""

import ml_collections

from jaxalign.config import continued_pretraining

CHECKPOINT = "/path/to/gemma-7b"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return continued_pretraining(
        CHECKPOINT,
        arg,
        model=dict(
            vocab_size=256000,
            d_model=3072,
            n_layers=28,
            n_heads=16,
            n_kv_heads=16,
            head_dim=256,
            d_ff=24576,
            max_seq_len=8192,
            rope_theta=10000.0,
            norm_eps=1e-06,
            norm_plus_one=True,
            tie_embeddings=True,
            scale_embeddings=True,
            activation="gelu_tanh",
        ),
        train=dict(batch_size=128, seq_len=4096, grad_accum=16),
        pod_train=dict(batch_size=1024),
    )
