"""The main job: raw text to an aligned model on the embedded synthetic world, end to end.

    python -m jaxalign.main --config=configs/quickstart.py --config.workdir=runs/quickstart
      curate -> pretrain -> SFT -> reward model -> DPO -> PPO -> GRPO -> evaluation -> report.md on a 1M-parameter
      model: 4.3 minutes on the idle 2-core CPU (README's run at 8edfe72). Re-running the command skips
      finished stages and resumes an interrupted one.
    python -m jaxalign.main --config=configs/quickstart.py:smoke --config.workdir=runs/quickstart_smoke
      every stage on a tiny model: 2.3 minutes on the idle machine, most of it compiling each stage.

Select stages with --config.pipeline.stages=sft,dpo (they read the checkpoints already in the workdir); set a stage's
length with --config.pipeline.dpo.steps=200 (also batch_size, seq_len, lr, warmup_steps, eval_every, every_steps).
"""

import ml_collections

from jaxalign.config import SMOKE_MODEL, defaults

QUICKSTART_MODEL = dict(
    vocab_size=2048, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, d_ff=512
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = defaults()
    c.job = "pipeline"
    # The smallest model that shows every stage's effect on the world (tests/stages/test_world_effects.py runs
    # this chain and asserts them): 2 layers of width 128, a 2,048-piece tokenizer, 100 people.
    c.model.update(QUICKSTART_MODEL, attention="auto")
    c.mesh.update(data=1, fsdp=-1, tensor=1, stage=1)
    c.train.update(batch_size=8, seq_len=128, log_every=50, eval_every=100, eval_batches=4)
    c.optim.update(lr=1e-3, warmup_steps=20, min_lr_ratio=0.1, weight_decay=0.1, clip_norm=1.0)
    c.data.update(synthetic_entities=100, chat_template="chatml", max_prompt_length=64)
    # Arithmetic on one-digit operands (300 distinct problems, each ~10 times in the pretraining text; 30 held-out RL
    # prompts score arith_accuracy, and no train split asks them): two-digit arithmetic is beyond this model, whose
    # every score was then 0. SFT asks ~90 arithmetic questions (one per person); with all 270 others
    # (data.synthetic_sft_arithmetic=300) GRPO straight from SFT raises held-out arithmetic most (0.033 -> 0.2,
    # tests/stages/test_world_effects.py), but in this chain SFT's fact exact match fell 0.2 -> 0.1, the reward model's
    # pair accuracy 0.93 -> 0.77 and DPO lowered the reward model's score.
    c.data.update(synthetic_arith_max=10, synthetic_arith_docs=750, synthetic_rl_arithmetic=300)
    # RL arithmetic prompts as SFT asks them, so answers show the work the GRPO restate reward checks.
    c.data.synthetic_rl_show_work = True
    # SFT's fact answers end with a chatty closer ("I hope this detailed explanation helps, ..."), a habit SFT
    # imitates (its answers run to the length limit) and DPO removes from preferences: what DPO can do here, since
    # preferences over held-out people add no knowledge.
    c.data.synthetic_sft_chatty = True
    c.checkpoint.update(every_steps=100, keep=2)
    c.pipeline.stages = "curate,pretrain,sft,reward,dpo,ppo,grpo,eval"
    # Evaluation: every policy stage on the world's held-out splits (greedy answers), against SFT.
    c.eval.update(max_examples=64, max_new_tokens=24, batch_size=32)
    c.pipeline.pretrain.update(steps=700, lr=3e-3)
    # SFT replays pretraining text as half of each batch: without it the held-out pretraining loss rises by ~2 nats.
    c.sft.replay_fraction = 0.5
    c.pipeline.sft.update(steps=150, lr=1e-3, eval_every=50)
    c.pipeline.reward.update(steps=60, lr=1e-3, eval_every=20)
    # DPO with TRL's RPO term (an SFT loss on the chosen answers), which keeps the SFT policy's facts.
    c.dpo.rpo_alpha = 1.0
    c.pipeline.dpo.update(steps=100, lr=1e-4, eval_every=50)
    # PPO against the reward model trained above: train.batch_size counts prompts (one completion each).
    c.ppo.update(
        max_completion_length=24, temperature=0.7, kl_coef=0.05, num_ppo_epochs=2, num_mini_batches=2
    )
    c.pipeline.ppo.update(steps=40, batch_size=8, lr=5e-5, eval_every=20)
    # GRPO: train.batch_size counts completions (grpo.num_generations per prompt). The answer reward alone is too
    # sparse here (the DPO policy gets one-digit problems right 1 time in 30, most groups have no reward variance);
    # the restate reward gives partial credit for restating the question's operands, the step this model gets wrong.
    # The KL penalty (beta, k3 to the stage's initial policy) keeps the sums pretraining taught: without it GRPO
    # from SFT (tests/stages/test_world_effects.py) drifted 4-8 nats from it, completed 41% of the plain-text sums
    # wrong that SFT completed right, and left held-out arithmetic at SFT's 0.1 after 500 and after 1,000 steps;
    # with beta 0.04 and 1,000 steps: 0.1 -> 0.53 and 0.067 -> 0.6 (seeds 0, 1).
    c.grpo.update(
        num_generations=8,
        temperature=0.7,
        max_completion_length=24,
        reward_funcs=("answer", "format", "restate"),
        beta=0.04,
    )
    c.pipeline.grpo.update(steps=1000, batch_size=32, seq_len=80, lr=2e-4, eval_every=200)
    if arg == "smoke":
        c.model.update(SMOKE_MODEL)
        c.train.update(batch_size=8, seq_len=128, log_every=5, eval_every=10, eval_batches=2)
        c.data.update(synthetic_entities=60, max_prompt_length=48)
        c.checkpoint.update(every_steps=10)
        c.pipeline.pretrain.update(steps=30, lr=3e-3)
        c.pipeline.sft.update(steps=20, lr=1e-3, eval_every=10)
        c.pipeline.reward.update(steps=10, seq_len=96, lr=1e-3, eval_every=10)
        c.pipeline.dpo.update(steps=10, seq_len=96, lr=1e-4, eval_every=10)
        c.pipeline.ppo.update(steps=4, batch_size=8, lr=1e-4, eval_every=4)
        c.ppo.update(max_completion_length=16)
        c.grpo.num_generations = 4
        c.pipeline.grpo.update(steps=4, batch_size=8, seq_len=64, lr=1e-4, eval_every=4)
        c.eval.update(max_examples=8, max_new_tokens=16, batch_size=8)
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; accepted: 'smoke'")
    return c
