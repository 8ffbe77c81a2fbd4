"""PPO with a learned reward model on the synthetic world's RL prompts (TRL 1.16 PPOTrainer semantics).

    python -m jaxalign.main --config=configs/ppo.py --config.workdir=runs/ppo \\
        --config.model.init_from=ckpt:runs/sft/checkpoints/sft --config.ppo.reward_model=runs/reward/checkpoints/reward
      from the SFT policy (also the frozen reference) against the trained RM; the value model starts from the RM.
      100 steps of 16 prompts on the reference 8M-parameter model; not timed end to end yet on the 2-core CPU.
    python -m jaxalign.main --config=configs/ppo.py:smoke --config.workdir=runs/ppo_smoke
      from an empty workdir: trains a tiny SFT policy and RM first (ppo.bootstrap_steps=40 steps each), then 20 PPO
      steps; eval/score (the RM's mean score of greedy held-out completions) goes from -0.74 at step 0 to -0.14 at
      step 20 (objective/kl 1.2). Measured 2 min 18 s on the shared 2-core CPU at load average 8 (4 min 16 s at
      its slowest), most of it the first step of each of the three jobs (XLA compilation: ~80 s of it PPO's).

`train.batch_size` counts prompts (one completion each). Options: --config.ppo.value_init=reward|policy,
--config.ppo.kl_coef, --config.ppo.kl_estimator=k1|k3, --config.ppo.missing_eos_penalty, --config.ppo.num_ppo_epochs,
--config.ppo.num_mini_batches, --config.ppo.reward_tokenizer (an RM with its own tokenizer: completions are
decoded and re-encoded; the value model must then start from the policy).
"""

import ml_collections

from jaxalign.config import REFERENCE_MODEL, SMOKE_MODEL, defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = defaults()
    c.job = "ppo"
    c.model.update(REFERENCE_MODEL, attention="auto")
    c.mesh.update(data=1, fsdp=-1, tensor=1, stage=1)
    # train.seq_len is unused: a row is data.max_prompt_length + ppo.max_completion_length tokens.
    c.train.update(steps=100, batch_size=16, seq_len=80, log_every=5, eval_every=25, eval_batches=4)
    c.optim.update(lr=3e-6, warmup_steps=5, min_lr_ratio=0.1, weight_decay=0.0, clip_norm=1.0)
    c.data.update(chat_template="chatml", max_prompt_length=48)
    c.ppo.update(
        max_completion_length=32,
        temperature=0.7,
        kl_coef=0.05,
        missing_eos_penalty=1.0,
        num_ppo_epochs=4,
        num_mini_batches=1,
        value_init="reward",
    )
    c.checkpoint.update(every_steps=25, keep=2)
    if arg == "smoke":
        c.model.update(SMOKE_MODEL)
        c.train.update(steps=20, batch_size=8, seq_len=64, log_every=1, eval_every=10, eval_batches=2)
        c.optim.update(lr=1e-4, warmup_steps=2)
        c.data.update(synthetic_entities=100, max_prompt_length=48)
        c.ppo.update(max_completion_length=16, num_ppo_epochs=2, num_mini_batches=2, bootstrap_steps=40)
        c.checkpoint.every_steps = 10
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; accepted: 'smoke'")
    return c
