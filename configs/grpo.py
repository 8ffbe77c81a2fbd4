"""GRPO with verifiable rewards on the synthetic world's RL prompts (arithmetic and facts with exact answers).

    python -m jaxalign.main --config=configs/grpo.py --config.workdir=runs/grpo \\
        --config.model.init_from=ckpt:runs/sft/checkpoints/sft
      from the SFT policy (also the frozen reference when grpo.beta > 0); 100 steps of 8 prompts x 4 completions
      on the reference 8M-parameter model. Not timed end to end yet on the 2-core CPU (see benchmarks/grpo_bench.py
      for the time per step).
    python -m jaxalign.main --config=configs/grpo.py:smoke --config.workdir=runs/grpo_smoke
      under 2 minutes on a 2-core CPU from an empty workdir: a tiny model from random weights (it learns the format
      reward, not the answers).

`train.batch_size` counts completions: train.batch_size / grpo.num_generations prompts per step. Variants:
--config.grpo.loss_type=dapo|grpo|bnpo|dr_grpo, --config.grpo.importance_sampling_level=sequence (GSPO),
--config.grpo.scale_rewards=none (Dr. GRPO), --config.grpo.epsilon_high=0.28 (clip-higher),
--config.grpo.filter_zero_std=True and --config.grpo.overlong_buffer=8 (DAPO). Rewards:
--config.grpo.reward_funcs='("answer","format","reward_model")' --config.grpo.reward_weights='(1.0,0.1,0.5)'
--config.grpo.reward_model=runs/reward/checkpoints/reward.
"""

import ml_collections

from jaxalign.config import REFERENCE_MODEL, SMOKE_MODEL, defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = defaults()
    c.job = "grpo"
    c.model.update(REFERENCE_MODEL, attention="auto")
    c.mesh.update(data=1, fsdp=-1, tensor=1, stage=1)
    # train.seq_len is unused: a row is data.max_prompt_length + grpo.max_completion_length tokens.
    c.train.update(steps=100, batch_size=32, seq_len=80, log_every=5, eval_every=25, eval_batches=4)
    c.optim.update(lr=1e-5, warmup_steps=5, min_lr_ratio=0.1, weight_decay=0.0, clip_norm=1.0)
    c.data.update(chat_template="chatml", max_prompt_length=48)
    c.grpo.update(
        num_generations=4,
        max_completion_length=32,
        temperature=1.0,
        num_iterations=1,
        beta=0.0,
        loss_type="dapo",
        reward_funcs=("answer", "format"),
        reward_weights=(1.0, 0.1),
    )
    c.checkpoint.update(every_steps=25, keep=2)
    if arg == "smoke":
        c.model.update(SMOKE_MODEL)
        c.train.update(steps=10, batch_size=8, seq_len=64, log_every=1, eval_every=5, eval_batches=1)
        c.optim.update(lr=1e-3, warmup_steps=2)
        c.data.update(synthetic_entities=100, max_prompt_length=48)
        c.grpo.update(max_completion_length=16, beta=0.04)
        c.checkpoint.every_steps = 5
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; accepted: 'smoke'")
    return c
