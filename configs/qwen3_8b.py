"""Continued pretraining of Qwen3-8B from a local Hugging Face checkpoint.

    python -m jaxalign.main --config=configs/qwen3_8b.py --config.workdir=runs/qwen3_8b \
        --config.model.init_from=hf:/path/to/Qwen3-8B --config.data.input='/path/to/corpus/*.jsonl.gz'
      One host with 8 accelerators (>= 40 GB each; FSDP over all 8). Not run here: an estimate is ~11 hours on
      8 x H100 at 40% MFU (2.6B tokens: 5,000 steps of 64 x 8,192).
    python -m jaxalign.main --config=configs/qwen3_8b.py:pod --config.workdir=gs://bucket/runs/qwen3_8b ...
      A pod slice of 64 chips per slice (e.g. TPU v5p-128), FSDP within a slice and data parallel across slices.
      Not run here: an estimate is ~12.5 hours on one v5p-128 at 40% MFU (10.5B tokens: 2,500 steps of 512 x 8,192).

`model.init_from` must name the directory holding config.json and *.safetensors (a placeholder by default, so the
run stops at once with a message naming it). The model section must agree with that config.json on every shape
field; `hf.load_params` checks it and names the first key that differs. Shapes are those of
Qwen/Qwen3-8B (8.19e9 parameters; RMSNorm on q and k per head).

The corpus must be tokenized with the checkpoint's own tokenizer (`data.tokenizer` = the checkpoint directory).
"""

import ml_collections

from jaxalign.config import DEFAULT_RULES

CHECKPOINT = "/path/to/Qwen3-8B"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.job = "pretrain"
    c.workdir = ""
    c.seed = 0

    c.model = ml_collections.ConfigDict(
        dict(
            vocab_size=151936,
            d_model=4096,
            n_layers=36,
            n_heads=32,
            n_kv_heads=8,
            head_dim=128,
            d_ff=12288,
            max_seq_len=40960,
            rope_theta=1000000.0,
            norm_eps=1e-6,
            qk_norm=True,
            tie_embeddings=False,
            compute_dtype="bfloat16",
            remat="full",
            scan_layers=True,
            attention="auto",
            init_from=f"hf:{CHECKPOINT}",
        )
    )
    # One host, 8 accelerators: plain FSDP (parameters, gradients and Adam state split 8 ways: ~16 GB per device).
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=8, tensor=1, stage=1, rules=DEFAULT_RULES))
    c.train = ml_collections.ConfigDict(
        dict(
            steps=5000,
            batch_size=64,
            seq_len=8192,
            grad_accum=8,
            log_every=10,
            eval_every=500,
            eval_batches=8,
        )
    )
    # Continued pretraining: a short warmup to a small peak learning rate.
    c.optim = ml_collections.ConfigDict(
        dict(lr=1e-5, warmup_steps=100, min_lr_ratio=0.1, weight_decay=0.1, clip_norm=1.0, b2=0.95)
    )
    c.data = ml_collections.ConfigDict(dict(input="", eval_input="", tokenizer=CHECKPOINT))
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=2))

    if arg == "pod":
        # FSDP over the 64 chips of a slice; -1 puts every further slice on the data axis.
        c.mesh.update(data=-1, fsdp=64, tensor=1)
        c.train.update(steps=2500, batch_size=512, grad_accum=1)
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; accepted: 'pod'")
    return c
