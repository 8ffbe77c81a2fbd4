"""The main job: raw text to an aligned model on the embedded synthetic world, end to end.

    python -m jaxalign.main --config=configs/quickstart.py --config.workdir=runs/quickstart
      curate -> pretrain -> SFT -> reward model -> DPO -> GRPO -> evaluation on the reference 8M-parameter model, ~12 minutes on a 2-core
      CPU. Re-running the command skips finished stages and resumes an interrupted one.
    python -m jaxalign.main --config=configs/quickstart.py:smoke --config.workdir=runs/quickstart_smoke
      every stage on a tiny model, ~2 minutes on a 2-core CPU.

Select stages with --config.pipeline.stages=sft,dpo (they read the checkpoints already in the workdir); set a stage's
length with --config.pipeline.dpo.steps=200 (also batch_size, seq_len, lr, warmup_steps, eval_every, every_steps).
"""

import ml_collections

from jaxalign.config import REFERENCE_MODEL, SMOKE_MODEL, defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = defaults()
    c.job = "pipeline"
    c.model.update(REFERENCE_MODEL, attention="auto")
    c.mesh.update(data=1, fsdp=-1, tensor=1, stage=1)
    c.train.update(batch_size=8, seq_len=256, log_every=10, eval_every=100, eval_batches=4)
    c.optim.update(lr=1e-3, warmup_steps=20, min_lr_ratio=0.1, weight_decay=0.1, clip_norm=1.0)
    c.data.update(synthetic_entities=400, chat_template="chatml", max_prompt_length=64)
    c.checkpoint.update(every_steps=100, keep=2)
    c.pipeline.stages = "curate,pretrain,sft,reward,dpo,grpo,eval"
    # Evaluation: every policy stage on the world's held-out splits (greedy answers), against SFT.
    c.eval.update(max_examples=64, max_new_tokens=32, batch_size=16)
    c.pipeline.pretrain.update(steps=300, lr=1e-3)
    c.pipeline.sft.update(steps=150, lr=3e-4, eval_every=50)
    c.pipeline.reward.update(steps=100, seq_len=128, lr=1e-4, eval_every=50)
    c.pipeline.dpo.update(steps=100, seq_len=128, lr=5e-5, eval_every=50)
    # GRPO: train.batch_size counts completions (grpo.num_generations per prompt).
    c.grpo.update(num_generations=4, max_completion_length=24, reward_funcs=("answer", "format"))
    c.pipeline.grpo.update(steps=60, batch_size=16, seq_len=80, lr=1e-5, eval_every=30)
    if arg == "smoke":
        c.model.update(SMOKE_MODEL)
        c.train.update(batch_size=8, seq_len=128, log_every=5, eval_every=10, eval_batches=2)
        c.data.update(synthetic_entities=60, max_prompt_length=48)
        c.checkpoint.update(every_steps=10)
        c.pipeline.pretrain.update(steps=30, lr=3e-3)
        c.pipeline.sft.update(steps=20, lr=1e-3, eval_every=10)
        c.pipeline.reward.update(steps=10, seq_len=96, lr=1e-3, eval_every=10)
        c.pipeline.dpo.update(steps=10, seq_len=96, lr=1e-4, eval_every=10)
        c.pipeline.grpo.update(steps=4, batch_size=8, seq_len=64, lr=1e-4, eval_every=4)
        c.eval.update(max_examples=8, max_new_tokens=16, batch_size=8)
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; accepted: 'smoke'")
    return c
