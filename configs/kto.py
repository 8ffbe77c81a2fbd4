"""KTO: unpaired desirable / undesirable examples with a frozen reference (TRL's KTOTrainer).

    python -m jaxalign.main --config=configs/kto.py --config.workdir=runs/kto \\
        --config.model.init_from=ckpt:runs/sft/checkpoints/sft
      ~5 minutes on a 2-core CPU (150 steps of 8 examples on the reference 8M-parameter model).
    python -m jaxalign.main --config=configs/kto.py:smoke --config.workdir=runs/kto_smoke
      under 2 minutes on a 2-core CPU from an empty workdir (a tiny model from random weights).

Records: TRL's unpaired preference type `prompt`/`completion`/`label`, or paired `prompt`/`chosen`/`rejected`
(each pair becomes a desirable and an undesirable example). --config.dpo.beta, --config.dpo.desirable_weight,
--config.dpo.undesirable_weight.
"""

import ml_collections

from jaxalign.config import REFERENCE_MODEL, SMOKE_MODEL, defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = defaults()
    c.job = "kto"
    c.model.update(REFERENCE_MODEL, attention="auto")
    c.mesh.update(data=1, fsdp=-1, tensor=1, stage=1)
    c.train.update(steps=150, batch_size=8, seq_len=128, log_every=10, eval_every=50, eval_batches=8)
    c.optim.update(lr=5e-5, warmup_steps=15, min_lr_ratio=0.1, weight_decay=0.0, clip_norm=1.0)
    c.data.update(chat_template="chatml", max_prompt_length=64)
    c.dpo.update(beta=0.1, desirable_weight=1.0, undesirable_weight=1.0, reference="live")
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
