"""Causal-LM pretraining on the embedded synthetic world.

    python -m jaxalign.main --config=configs/pretrain.py --config.workdir=runs/pretrain
      ~8 minutes on a 2-core CPU (300 steps of 8 x 256 tokens on the reference 8M-parameter model).
    python -m jaxalign.main --config=configs/pretrain.py:smoke --config.workdir=runs/pretrain_smoke
      ~1 minute on a 2-core CPU.

Override any key: --config.train.steps=1000 --config.mesh.fsdp=8 --config.data.input='corpus/*.jsonl.gz'.
"""

import ml_collections

from jaxalign.config import SMOKE_MODEL, defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = defaults()
    c.job = "pretrain"

    # The reference workload of benchmarks/train_throughput.py.
    c.model.update(
        dict(
            vocab_size=8192,
            d_model=256,
            n_layers=4,
            n_heads=4,
            n_kv_heads=2,
            head_dim=64,
            d_ff=1024,
            max_seq_len=2048,
            rope_theta=10000.0,
            tie_embeddings=False,
            compute_dtype="float32",
            remat="none",
            scan_layers=False,
            attention="auto",
            init_from="",
        )
    )
    # One -1 takes the remaining devices: plain FSDP by default.
    c.mesh.update(data=1, fsdp=-1, tensor=1, stage=1)
    c.train.update(
        steps=300,
        batch_size=8,
        seq_len=256,
        grad_accum=1,
        log_every=10,
        eval_every=100,
        eval_batches=4,
        z_loss=0.0,
    )
    c.optim.update(lr=1e-3, warmup_steps=30, min_lr_ratio=0.1, weight_decay=0.1, clip_norm=1.0, b2=0.95)
    c.data.update(input="", eval_input="", tokenizer="", synthetic_entities=400)
    c.checkpoint.update(every_steps=100, keep=3)

    if arg == "smoke":
        c.model.update(SMOKE_MODEL)
        c.train.update(steps=60, batch_size=8, seq_len=128, log_every=5, eval_every=30, eval_batches=2)
        c.optim.update(lr=3e-3, warmup_steps=10)
        c.data.synthetic_entities = 200
        c.checkpoint.every_steps = 30
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; accepted: 'smoke'")
    return c
