"""Preference optimisation: DPO (and IPO, hinge, robust, ... via dpo.loss_type), SimPO, ORPO.

    python -m jaxalign.main --config=configs/dpo.py --config.workdir=runs/dpo \\
        --config.model.init_from=ckpt:runs/sft/checkpoints/sft
      ~4 minutes on a 2-core CPU (150 steps of 8 pairs on the reference 8M-parameter model), from the SFT policy,
      which is also the frozen reference.
    python -m jaxalign.main --config=configs/dpo.py:smoke --config.workdir=runs/dpo_smoke
      under 2 minutes on a 2-core CPU from an empty workdir: a tiny model from random weights (use the quickstart for
      the full chain pretrain -> SFT -> DPO).

Records: TRL's preference type, `prompt`/`chosen`/`rejected`. Objectives: --config.dpo.objective=dpo|simpo|orpo;
DPO variants: --config.dpo.loss_type=sigmoid|hinge|ipo|robust|exo_pair|nca_pair|sppo_hard|apo_zero|apo_down.
Reference: --config.dpo.reference=live (in memory) | precomputed (one pass, cached; the step holds one model).
"""

import ml_collections

from jaxalign.config import REFERENCE_MODEL, SMOKE_MODEL, defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = defaults()
    c.job = "dpo"
    c.model.update(REFERENCE_MODEL, attention="auto")
    c.mesh.update(data=1, fsdp=-1, tensor=1, stage=1)
    c.train.update(steps=150, batch_size=8, seq_len=128, log_every=10, eval_every=50, eval_batches=8)
    c.optim.update(lr=5e-5, warmup_steps=15, min_lr_ratio=0.1, weight_decay=0.0, clip_norm=1.0)
    c.data.update(chat_template="chatml", max_prompt_length=64)
    c.dpo.update(objective="dpo", loss_type="sigmoid", beta=0.1, reference="live")
    c.checkpoint.update(every_steps=50, keep=2)
    if arg == "smoke":
        c.model.update(SMOKE_MODEL)
        c.train.update(steps=30, batch_size=8, seq_len=96, log_every=5, eval_every=15, eval_batches=4)
        c.optim.update(lr=1e-3, warmup_steps=5)
        c.data.update(synthetic_entities=100, max_prompt_length=48)
        c.checkpoint.every_steps = 15
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; accepted: 'smoke'")
    return c
