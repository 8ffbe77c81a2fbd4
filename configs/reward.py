"""Reward model (Bradley-Terry) on the synthetic world's preference pairs, or on your records.

    python -m jaxalign.main --config=configs/reward.py --config.workdir=runs/reward \\
        --config.model.init_from=ckpt:runs/sft/checkpoints/sft
      ~3 minutes on a 2-core CPU (150 steps of 8 pairs of 256 tokens on the reference 8M-parameter model), with the
      trunk starting from the SFT policy (the head starts at random).
    python -m jaxalign.main --config=configs/reward.py:smoke --config.workdir=runs/reward_smoke
      ~1 minute on a 2-core CPU, from an empty workdir (a tiny model from random weights).

Records: TRL's preference type, `prompt`/`chosen`/`rejected` (strings, or message lists rendered with
data.chat_template). Optional margin column: --config.reward.margin_field=margin. Centering (TRL's
center_rewards_coefficient): --config.reward.center_coef=0.01. Prints held-out pairwise accuracy (eval/accuracy).
"""

import ml_collections

from jaxalign.config import REFERENCE_MODEL, SMOKE_MODEL, defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = defaults()
    c.job = "reward"
    c.model.update(REFERENCE_MODEL, attention="auto")
    c.mesh.update(data=1, fsdp=-1, tensor=1, stage=1)
    c.train.update(steps=150, batch_size=8, seq_len=128, log_every=10, eval_every=50, eval_batches=8)
    c.optim.update(lr=1e-4, warmup_steps=15, min_lr_ratio=0.1, weight_decay=0.0, clip_norm=1.0)
    c.data.update(chat_template="chatml", max_prompt_length=64)
    c.checkpoint.update(every_steps=50, keep=2)
    if arg == "smoke":
        c.model.update(SMOKE_MODEL)
        c.train.update(steps=40, batch_size=8, seq_len=96, log_every=5, eval_every=20, eval_batches=4)
        c.optim.update(lr=1e-3, warmup_steps=5)
        c.data.update(synthetic_entities=100, max_prompt_length=48)
        c.checkpoint.every_steps = 20
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; accepted: 'smoke'")
    return c
