"""Supervised fine-tuning (masked SFT) on the embedded synthetic world's conversations, or on your records.

    python -m jaxalign.main --config=configs/sft.py --config.workdir=runs/sft \\
        --config.model.init_from=ckpt:runs/pretrain/checkpoints/pretrain
      ~3 minutes on a 2-core CPU (200 steps of 8 x 256 tokens on the reference 8M-parameter model), starting from
      the policy configs/pretrain.py trained (its tokenizer comes along).
    python -m jaxalign.main --config=configs/sft.py:smoke --config.workdir=runs/sft_smoke
      ~1 minute on a 2-core CPU, from an empty workdir (a tiny model from random weights).

Records: TRL's `messages` (conversational) or `prompt`/`completion` (plain strings or message lists) JSONL/Parquet,
`--config.data.input='sft/*.jsonl' --config.data.eval_input='sft_eval.jsonl'`. Loss only on assistant turns /
completions (data.assistant_only_loss, data.completion_only_loss); examples are packed (data.packing). Replay against
forgetting: --config.sft.replay_fraction=0.2 [--config.sft.replay_input='pretrain/*.jsonl'].
Start from a Hugging Face model with --config.model.init_from=hf:/path (and data.chat_template='tokenizer').
"""

import ml_collections

from jaxalign.config import REFERENCE_MODEL, SMOKE_MODEL, defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = defaults()
    c.job = "sft"
    # The reference model of configs/pretrain.py, so its checkpoints load as they are.
    c.model.update(REFERENCE_MODEL, attention="auto")
    c.mesh.update(data=1, fsdp=-1, tensor=1, stage=1)
    c.train.update(steps=200, batch_size=8, seq_len=256, log_every=10, eval_every=50, eval_batches=4)
    c.optim.update(lr=3e-4, warmup_steps=20, min_lr_ratio=0.1, weight_decay=0.0, clip_norm=1.0)
    c.data.update(chat_template="chatml", assistant_only_loss=True, completion_only_loss=True, packing=True)
    c.sft.update(replay_fraction=0.0)
    c.checkpoint.update(every_steps=100, keep=2)
    if arg == "smoke":
        c.model.update(SMOKE_MODEL)
        c.train.update(steps=40, batch_size=8, seq_len=128, log_every=5, eval_every=20, eval_batches=2)
        c.optim.update(lr=3e-3, warmup_steps=5)
        c.data.synthetic_entities = 100
        c.checkpoint.every_steps = 20
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; accepted: 'smoke'")
    return c
