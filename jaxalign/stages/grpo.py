"""GRPO with verifiable rewards (DAPO, Dr. GRPO and GSPO through `grpo.*`): prompts -> G samples each -> rewards
-> group advantages -> `num_iterations` clipped updates.

One step (`loop.train` with this module's `prepare` and `train_step`):
1. `prepare(state, prompts, step)`, on the host: the loader's P = train.batch_size / G prompts are sampled G times
   each with the CURRENT policy (`rl.sampler.sample`, one jitted prefill + decode; the key is
   `fold_in(state.rng, step)`, so a resumed run samples the same completions), decoded, scored by the reward
   functions (`rl.rewards`), and turned into group advantages (`losses.grpo_advantages`). Groups whose rewards are
   ignored (a failing reward function under data.on_error="skip", or `grpo.filter_zero_std`) get a zero mask.
2. `train_step(state, batch[, ref_params])`, jitted once by the loop: the reference log-probs (beta > 0; the
   reference is the initial policy, a frozen argument) and the old log-probs (num_iterations > 1; else the detached
   policy log-probs, as TRL) over the whole batch, then `num_iterations` clipped updates (`losses.grpo_loss`), each
   over `train.grad_accum` microbatches.

Rows are prompt-major (rows p*G .. p*G+G-1 are prompt p's samples), then permuted so that each microbatch of
`state.grad_step` (which takes every n-th row) holds whole groups, and each device's share of it too (the
`check_groups` guard). Advantages are computed over the whole batch before any split, so they are the same under
any grad_accum or mesh.

Shape legend: P prompts, G generations per prompt, B = P * G rows, W prompt width (at most data.max_prompt_length),
C completion width (at most grpo.max_completion_length): the rollout trims padding columns no row uses
(`rollout.bucket_width`), so W and C change from step to step among a few powers of two (one compile each).

Device batch (`BATCH_KEYS`): prompt_ids, prompt_mask [B, W] int32 (left-padded); completion_ids,
completion_mask [B, C] int32 (mask 1 up to and including the stop token, 0 for ignored groups); advantages [B]
float32; sampler_logps [B, C] float32 (the sampler's log-probs of the tokens, checked against the trainer's:
`logps/sampler_abs_diff`).

Logged per step, besides the loop's: loss, `reward`, `reward_std`, `frac_reward_zero_std`, `rewards/<func>/mean`,
`kl` (beta > 0), `clip_ratio/*`, `completions/mean_length`, `completions/min_length`, `completions/max_length`,
`completions/clipped_ratio` (no stop token within grpo.max_completion_length), `reward_skipped_groups`, and the time split
`time/generation_s`, `time/scoring_s`, `time/update_wait_s` (host time spent waiting for the previous step's
update: the loop dispatches updates asynchronously). Held-out: `eval/answer` (greedy answer reward) and per task.
The loop's `tokens_per_s` and `mfu` count the configured widths (train.batch_size x (data.max_prompt_length +
grpo.max_completion_length) per iteration), not the trimmed ones: compare runs by `step_s`.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import losses
from jaxalign.config import Config, GrpoConfig, OptimConfig
from jaxalign.data import prompt_pipelines
from jaxalign.errors import ConfigError
from jaxalign.models.transformer import flops_per_token
from jaxalign.parallel.mesh import Rules
from jaxalign.rl import rewards as rewards_lib
from jaxalign.rl import sampler
from jaxalign.stages import common, model_init, rollout
from jaxalign.train import loop
from jaxalign.train import state as state_lib

BATCH_KEYS = (
    "prompt_ids",
    "prompt_mask",
    "completion_ids",
    "completion_mask",
    "advantages",
    "sampler_logps",
)


# --- checks --------------------------------------------------------------------------------------------------------


def check_groups(config: Config, rules: Rules) -> None:
    """Groups of G completions stay whole in every microbatch and on every device: G divides the rows each device
    holds per microbatch (train.batch_size / train.grad_accum / data-parallel size)."""
    B, G, n = config.train.batch_size, config.grpo.num_generations, config.train.grad_accum
    dp = rules.data_parallel_size
    if B % G:
        raise ConfigError(
            f"train.batch_size={B} (completions per step) is not divisible by grpo.num_generations={G}"
        )
    common.check_batch(config, rules)
    rows = B // n // dp
    if rows % G:
        raise ConfigError(
            f"grpo.num_generations={G} does not divide the {rows} completions each device holds per microbatch "
            f"(train.batch_size={B} / train.grad_accum={n} / data-parallel size {dp}): groups would be split; "
            f"use a train.batch_size that is a multiple of {G * n * dp}"
        )
    width = config.data.max_prompt_length + config.grpo.max_completion_length
    if width > config.model.max_seq_len:
        raise ConfigError(
            f"data.max_prompt_length={config.data.max_prompt_length} + grpo.max_completion_length="
            f"{config.grpo.max_completion_length} = {width} exceeds model.max_seq_len={config.model.max_seq_len} "
            "(the KV cache and the training forward hold prompt + completion)"
        )


def microbatch_order(rows: int, microbatches: int) -> np.ndarray:
    """Row permutation [rows]: `batch[perm]` puts prompt-major rows j * rows/n .. (j+1) * rows/n - 1 into
    microbatch j of `state.grad_step` (which takes rows j, j + n, j + 2n, ...), so whole groups stay together."""
    per = rows // microbatches
    perm = np.empty(rows, np.int64)
    for j in range(microbatches):
        for k in range(per):
            perm[k * microbatches + j] = j * per + k
    return perm


# --- the jitted step -----------------------------------------------------------------------------------------------


def policy_logps(params, graphdef, batch: dict[str, jax.Array], cfg: GrpoConfig) -> jax.Array:
    """[B, C] log-probs of the completion tokens under the sampling distribution of `params` (0 on padding)."""
    return sampler.completion_logps(
        graphdef,
        params,
        batch["prompt_ids"],
        batch["prompt_mask"],
        batch["completion_ids"],
        batch["completion_mask"],
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
    )


def loss_fn(params, batch, graphdef, cfg: GrpoConfig, measure: bool = False):
    """(loss_sum, (weight, metric_sums)) of one (micro)batch: `losses.grpo_loss` on the policy's log-probs."""
    logps_BxC = policy_logps(params, graphdef, batch, cfg)
    mask_BxC = batch["completion_mask"]
    loss, weight, metrics = losses.grpo_loss(
        logps_BxC,
        batch.get("old_logps"),
        batch.get("ref_logps"),
        batch["advantages"],
        mask_BxC,
        epsilon=cfg.epsilon,
        epsilon_high=cfg.epsilon_high or None,
        beta=cfg.beta,
        loss_type=cfg.loss_type,
        max_completion_length=cfg.max_completion_length,
        importance_sampling_level=cfg.importance_sampling_level,
    )
    if measure:  # before any update: the trainer's recomputation against what the sampler reported
        diff = jnp.abs(jax.lax.stop_gradient(logps_BxC) - batch["sampler_logps"]) * mask_BxC
        metrics["logps/sampler_abs_diff"] = losses.Mean(jnp.sum(diff), jnp.sum(mask_BxC).astype(jnp.float32))
        metrics["logps/sampler_max_abs_diff"] = losses.Max(jnp.max(diff))
    return loss, (weight, metrics)


def train_step(
    state: state_lib.TrainState,
    batch: dict[str, jax.Array],
    ref_params: Any = None,
    *,
    cfg: GrpoConfig,
    optim: OptimConfig,
    microbatches: int,
) -> tuple[state_lib.TrainState, dict[str, jax.Array]]:
    """`cfg.num_iterations` clipped updates on one generation batch (a `lax.scan`: compiled once). Metrics: the
    mean over iterations (`lr` of the first, `skipped_total` of the last)."""
    batch = dict(batch)
    measured = {}
    if cfg.beta:
        batch["ref_logps"] = jax.lax.stop_gradient(
            policy_logps(model_init.reference(ref_params, state.params), state.graphdef, batch, cfg)
        )
    if cfg.num_iterations > 1:
        old = jax.lax.stop_gradient(policy_logps(state.params, state.graphdef, batch, cfg))
        batch["old_logps"] = old
        diff = jnp.abs(old - batch["sampler_logps"]) * batch["completion_mask"]
        measured = {
            "logps/sampler_abs_diff": jnp.sum(diff) / jnp.maximum(jnp.sum(batch["completion_mask"]), 1),
            "logps/sampler_max_abs_diff": jnp.max(diff),
        }
    # A batch with no completion token left (every group ignored) must not move the weights: Adam's momentum
    # would update them even with zero gradients.
    trainable = jnp.sum(batch["completion_mask"]) > 0
    # With one iteration the sampler check rides on the loss's own forward (no extra pass).
    loss = functools.partial(loss_fn, graphdef=state.graphdef, cfg=cfg, measure=cfg.num_iterations == 1)

    def iteration(state, _):
        grads, mean_loss, metrics = state_lib.grad_step(
            loss, state.params, batch, microbatches, rng=jax.random.fold_in(state.rng, state.step)
        )
        new, update_metrics = state_lib.apply_gradients(state, grads, mean_loss, optim)
        keep = lambda n, o: jax.tree.map(lambda a, b: jnp.where(trainable, a, b), n, o)
        new = new.replace(
            params=keep(new.params, state.params), opt_state=keep(new.opt_state, state.opt_state)
        )
        return new, {"loss": mean_loss, **metrics, **update_metrics}

    state, history = jax.lax.scan(iteration, state, length=cfg.num_iterations)
    out = {k: jnp.mean(v.astype(jnp.float32)) for k, v in history.items()}
    out.update(lr=history["lr"][0], skipped_total=history["skipped_total"][-1], **measured)
    return state, out


# --- generation and scoring on the host --------------------------------------------------------------------------


class Rollout:
    """`prepare` for `loop.train`: generation, scoring and advantages of one step (module doc)."""

    def __init__(self, config: Config, rules: Rules, tokenizer, graphdef, reward_set: rewards_lib.RewardSet):
        self.cfg, self.config, self.rules = config.grpo, config, rules
        cfg = self.cfg
        self.generator = rollout.Generator(
            graphdef,
            rules,
            tokenizer,
            config.data.chat_template,
            max_new_tokens=cfg.max_completion_length,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            num_generations=cfg.num_generations,
        )
        self.reward_set = reward_set
        self.shardings = batch_shardings(rules)
        self.perm = microbatch_order(config.train.batch_size // jax.process_count(), config.train.grad_accum)

    def __call__(
        self, state, prompts: dict[str, Any], step: int
    ) -> tuple[dict[str, jax.Array], dict[str, float]]:
        cfg, G = self.cfg, self.cfg.num_generations
        t0 = time.perf_counter()
        jax.block_until_ready(state.params)  # the previous step's update
        t1 = time.perf_counter()
        tokens_BxC, cmask_BxC, logps_BxC, pids_BxW, pmask_BxW = self.generator(
            state.params, prompts, jax.random.fold_in(state.rng, step)
        )
        t2 = time.perf_counter()

        texts, stopped_B = self.generator.decode(tokens_BxC, cmask_BxC)
        B = len(tokens_BxC)
        extras = [
            {
                **prompts["extras"][i // G],
                "prompt_ids": pids_BxW[i][pmask_BxW[i] > 0].tolist(),
                "completion_ids": tokens_BxC[i, : int(cmask_BxC[i].sum())].tolist(),
                "stopped": bool(stopped_B[i]),
            }
            for i in range(B)
        ]
        total_B, per_func, valid_B = self.reward_set(texts, extras)
        lengths_B = cmask_BxC.sum(axis=1)
        if cfg.overlong_buffer:
            total_B = total_B + rewards_lib.overlong_penalty(
                lengths_B, cfg.max_completion_length, cfg.overlong_buffer, cfg.overlong_penalty
            )
        rewards_PxG = total_B.reshape(-1, G)
        valid_P = valid_B.reshape(-1, G).all(axis=1)
        rewards_PxG = np.where(valid_P[:, None], rewards_PxG, 0.0)
        advantages_PxG = np.asarray(losses.grpo_advantages(rewards_PxG, scale=cfg.scale_rewards))
        zero_std_P = np.ptp(rewards_PxG, axis=1) == 0
        keep_P = valid_P & ~zero_std_P if cfg.filter_zero_std else valid_P
        advantages_B = np.where(keep_P[:, None], advantages_PxG, 0.0).reshape(B).astype(np.float32)
        keep_B = np.repeat(keep_P, G)
        host = {
            "prompt_ids": pids_BxW,
            "prompt_mask": pmask_BxW,
            "completion_ids": tokens_BxC,
            "completion_mask": cmask_BxC * keep_B[:, None].astype(cmask_BxC.dtype),
            "advantages": advantages_B,
            "sampler_logps": logps_BxC,
        }
        host = {k: np.ascontiguousarray(v[self.perm]) for k, v in host.items()}
        batch = loop.to_global(host, self.shardings)
        t3 = time.perf_counter()

        valid = rewards_PxG[valid_P]
        reward_metrics = losses.grpo_reward_metrics(
            valid if len(valid) else np.zeros((1, G)), scale=cfg.scale_rewards
        )
        metrics = {k: float(v) for k, v in reward_metrics.items()}
        metrics.update({f"rewards/{name}/mean": float(np.mean(v[valid_B])) for name, v in per_func.items()})
        metrics.update(rollout.completion_metrics(lengths_B, stopped_B))
        metrics.update(
            {
                "reward_skipped_groups": float((~valid_P).sum()),
                "time/update_wait_s": t1 - t0,
                "time/generation_s": t2 - t1,
                "time/scoring_s": t3 - t2,
            }
        )
        return batch, metrics


def batch_shardings(rules: Rules) -> dict[str, Any]:
    out = {k: rules.sharding(("batch", "length")) for k in BATCH_KEYS}
    out["advantages"] = rules.sharding(("batch",))
    return out


def make_reward_set(config: Config, tokenizer, rules: Rules) -> rewards_lib.RewardSet:
    cfg = config.grpo
    funcs = {}
    for name in cfg.reward_funcs:
        if name == "reward_model":
            from jaxalign.stages import reward as reward_stage  # the RM's loader; read only when asked for

            funcs[name] = rewards_lib.reward_model_fn(reward_stage.load_scorer(cfg.reward_model, tokenizer))
        else:
            funcs[name] = rewards_lib.REWARD_FUNCS[name]
    return rewards_lib.RewardSet(funcs, cfg.reward_weights, on_error=config.data.on_error)


# --- held-out evaluation -------------------------------------------------------------------------------------------


def answer_evaluator(config: Config, rules: Rules, tokenizer, graphdef, batches: list[dict[str, Any]]):
    """`eval_fn(state)`: greedy completions of the held-out prompts scored by the answer reward: `answer` overall
    and `answer/<task>` per record task (e.g. `answer/arithmetic`)."""
    greedy = rollout.Generator(
        graphdef,
        rules,
        tokenizer,
        config.data.chat_template,
        max_new_tokens=config.grpo.max_completion_length,
        temperature=0.0,
    )

    def eval_fn(state) -> dict[str, float]:
        scores: dict[str, list[float]] = {}
        for batch in batches:
            out = greedy(state.params, batch, state.rng)
            texts, _ = greedy.decode(out.tokens_BxC, out.mask_BxC)
            for extra, value in zip(
                batch["extras"], rewards_lib.answer_reward(texts, batch["extras"]), strict=True
            ):
                scores.setdefault("answer", []).append(value)
                if "task" in extra:
                    scores.setdefault(f"answer/{extra['task']}", []).append(value)
        return {k: float(np.mean(v)) for k, v in scores.items()}

    return eval_fn


# --- run -----------------------------------------------------------------------------------------------------------


def run(config: Config) -> loop.Result:
    tcfg, dcfg, cfg = config.train, config.data, config.grpo
    rules = common.setup(config)
    check_groups(config, rules)
    train_glob, eval_glob = common.inputs(config, "rl")
    tokenizer = common.tokenizer(config)
    prompts_per_step = tcfg.batch_size // cfg.num_generations
    kwargs = dict(
        global_batch_size=prompts_per_step,
        max_prompt_length=dcfg.max_prompt_length,
        truncation_mode=dcfg.truncation_mode,
        chat_template=dcfg.chat_template,
        columns=("answer",) if "answer" in cfg.reward_funcs else (),
        on_error=dcfg.on_error,
        overlong=dcfg.overlong,
        shards=dcfg.shards,
    )
    loader = prompt_pipelines.rl_loader(
        train_glob,
        tokenizer,
        **common.loader_options(config),
        **kwargs,
    )

    # Every step makes num_iterations optimizer updates: the schedule spans all of them.
    graphdef, state, state_shardings, fresh = model_init.train_state(
        config, rules, "grpo", total_steps=tcfg.steps * cfg.num_iterations
    )
    ref_params = ref_shardings = None
    if cfg.beta:  # the frozen reference: the initial policy (a copy: the state's buffers are donated)
        ref_params = model_init.reference_params(config, rules, state, state_shardings, fresh)
        ref_shardings = model_init.reference_shardings(ref_params, state_shardings.params)
    step_fn = functools.partial(train_step, cfg=cfg, optim=config.optim, microbatches=tcfg.grad_accum)
    prepare = Rollout(config, rules, tokenizer, graphdef, make_reward_set(config, tokenizer, rules))

    eval_fn = None
    if eval_glob and tcfg.eval_every:
        make = lambda: prompt_pipelines.rl_loader(eval_glob, tokenizer, seed=0, shuffle=False, **kwargs)
        eval_fn = answer_evaluator(
            config, rules, tokenizer, graphdef, common.read_batches(make, tcfg.eval_batches)
        )
    seq = dcfg.max_prompt_length + cfg.max_completion_length
    return loop.train(
        stage="grpo",
        config=config,
        state=state,
        state_shardings=state_shardings,
        step_fn=step_fn,
        loader=loader,
        batch_shardings=prepare.shardings,
        tokens_per_step=tcfg.batch_size * seq * cfg.num_iterations,
        flops_per_token=flops_per_token(config.model, seq) * (1 + (1 / 3 if cfg.beta else 0)),
        eval_fn=eval_fn,
        frozen=ref_params,
        frozen_shardings=ref_shardings,
        prepare=prepare,
        eval_at_start=True,
    )
