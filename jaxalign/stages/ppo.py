"""PPO with a learned reward model, as TRL 1.16's PPOTrainer: a policy and a value model trained together against a
frozen reward model (RM), with a per-token KL penalty to the frozen reference (the initial policy).

One step (`loop.train` with this module's `prepare` and `train_step`):
1. `prepare(state, prompts, step)`, on the host (`Rollout`): one completion per prompt sampled with the CURRENT
   policy (key `fold_in(state.rng, step)`, so a resumed run samples the same completions); the RM scores
   prompt + completion (decoded and re-encoded with the RM's tokenizer when it differs from the policy's: TRL refuses
   that case); `ppo.missing_eos_penalty` is subtracted from the score of a completion without a stop token.
2. `train_step(state, batch, ref_params)`, jitted once by the loop: the log-probs of the sampled tokens under the
   policy and the reference, the value model's values, the rewards (`ppo_rewards`: the score at the completion's
   last real token plus `-kl_coef * KL` per token), GAE (`losses.gae`) and whitened advantages, then
   `num_ppo_epochs` passes, each over a fresh permutation of the batch cut into `num_mini_batches` minibatches: one
   optimizer update per minibatch (policy and value model together, loss = clipped policy loss + vf_coef * clipped
   value loss), each over `train.grad_accum` microbatches.

Where jaxalign departs from TRL 1.16 on purpose: TRL adds the score at `sequence_length + 1` (one position past the
last real token, i.e. on padding when the completion stopped early) and admits that padding position into the value
loss; here the score sits on the last real completion token (the stop token, or the last token when none was
emitted) and every per-token term uses the same mask. Loss means are exact token means over a minibatch under any
`train.grad_accum` (TRL averages per-microbatch means), and `policy/entropy_avg` and `policy/approxkl_avg` are means
over completion tokens (TRL's include padding). TRL 1.16 itself no longer ships PPOTrainer; the reference is its last
PPOTrainer (`tests/stages/test_ppo.py` transcribes its rewards, GAE and whitening).

Params are `{"policy": ..., "value": ...}` with one optimizer over both (TRL's PolicyAndValueWrapper); the state's
graphdef is the pair (policy graphdef, value graphdef). The value model is a `ScalarModel` (a per-token head on a
trunk), started from the RM (`ppo.value_init="reward"`) or from the policy's trunk (`"policy"`).

Shape legend: B rows (prompts; one completion each), W prompt width (at most data.max_prompt_length), C completion
width (at most ppo.max_completion_length; both trimmed of unused padding, `rollout.bucket_width`), M rows per
minibatch (B / num_mini_batches), E = num_ppo_epochs.

Device batch (`BATCH_KEYS`): prompt_ids, prompt_mask [B, W] int32 (left-padded); completion_ids, completion_mask
[B, C] int32 (mask 1 up to and including the stop token); scores [B] float32 (RM score minus the missing-EOS
penalty).

Logged per step (TRL's names): objective/kl, objective/entropy, objective/non_score_reward, objective/rlhf_reward,
objective/scores, policy/approxkl_avg, policy/clipfrac_avg, loss/policy_avg, loss/value_avg, val/clipfrac_avg,
policy/entropy_avg, val/num_eos_tokens, completions/*, time/generation_s, time/scoring_s, time/update_wait_s.
Held-out: eval/score (RM score of greedy completions) and eval/mean_length. The loop's `tokens_per_s` and `mfu` count
the configured widths (data.max_prompt_length + ppo.max_completion_length), not the trimmed ones.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign import config as config_lib
from jaxalign import losses, storage
from jaxalign.config import Config, ModelConfig, OptimConfig, PpoConfig
from jaxalign.data import prompt_pipelines
from jaxalign.errors import ConfigError
from jaxalign.models.heads import RewardScorer, ScalarModel
from jaxalign.models.transformer import Transformer, flops_per_token
from jaxalign.parallel.mesh import Rules
from jaxalign.rl import sampler
from jaxalign.stages import common, model_init, rollout
from jaxalign.train import checkpoint, loop
from jaxalign.train import state as state_lib

BATCH_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "scores")


# --- checks --------------------------------------------------------------------------------------------------------


def check_batch(config: Config, rules: Rules) -> None:
    """Minibatches split the batch evenly, microbatches split each minibatch, and each microbatch splits over the
    data-parallel devices; prompt + completion fits the model."""
    B, n_mb, n = config.train.batch_size, config.ppo.num_mini_batches, config.train.grad_accum
    if B % n_mb:
        raise ConfigError(
            f"ppo.num_mini_batches={n_mb} does not divide train.batch_size={B} (prompts per step)"
        )
    M = B // n_mb
    if M % n:
        raise ConfigError(
            f"train.grad_accum={n} does not divide the minibatch of {M} rows (train.batch_size={B} / "
            f"ppo.num_mini_batches={n_mb})"
        )
    common.check_batch(config, rules, rows=M)
    width = config.data.max_prompt_length + config.ppo.max_completion_length
    if width > config.model.max_seq_len:
        raise ConfigError(
            f"data.max_prompt_length={config.data.max_prompt_length} + ppo.max_completion_length="
            f"{config.ppo.max_completion_length} = {width} exceeds model.max_seq_len={config.model.max_seq_len}"
        )


# --- rewards -------------------------------------------------------------------------------------------------------


def ppo_rewards(
    scores_B: jax.Array,
    logps_BxC: jax.Array,
    ref_logps_BxC: jax.Array,
    mask_BxC: jax.Array,
    *,
    kl_coef: float,
    kl_estimator: str = "k1",
) -> tuple[jax.Array, jax.Array]:
    """(rewards_BxC, kl_BxC): per token `-kl_coef * KL` (k1 = logp - ref_logp, or k3), plus each row's score at its
    last real token (the last position where `mask_BxC` is 1). Both 0 outside the mask."""
    mask_BxC = mask_BxC.astype(jnp.float32)
    kl_fn = {"k1": losses.kl_k1, "k3": losses.kl_k3}[kl_estimator]
    kl_BxC = kl_fn(logps_BxC, ref_logps_BxC) * mask_BxC
    last_B = jnp.sum(mask_BxC, axis=1).astype(jnp.int32) - 1
    at_last_BxC = jnp.arange(mask_BxC.shape[1])[None, :] == last_B[:, None]
    rewards_BxC = -kl_coef * kl_BxC + jnp.where(at_last_BxC, scores_B[:, None].astype(jnp.float32), 0.0)
    return rewards_BxC * mask_BxC, kl_BxC


def advantages_and_returns(
    rewards_BxC: jax.Array, values_BxC: jax.Array, mask_BxC: jax.Array, cfg: PpoConfig
) -> tuple[jax.Array, jax.Array]:
    """TRL's step 5-6: optional reward whitening (without the mean shift), GAE, returns = A + V, then advantages
    whitened over the batch's valid tokens. Both [B, C], 0 outside the mask."""
    mask_BxC = mask_BxC.astype(jnp.float32)
    if cfg.whiten_rewards:
        rewards_BxC = losses.masked_whiten(rewards_BxC, mask_BxC, shift_mean=False) * mask_BxC
    adv_BxC, returns_BxC = losses.gae(rewards_BxC, values_BxC, mask_BxC, gamma=cfg.gamma, lam=cfg.lam)
    return losses.masked_whiten(adv_BxC, mask_BxC) * mask_BxC, returns_BxC


# --- forward passes ------------------------------------------------------------------------------------------------


def _sequence(batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """[prompt | completion] tokens, positions and segment ids [B, W + C] (as `sampler.completion_logps`)."""
    tokens = jnp.concatenate([batch["prompt_ids"], batch["completion_ids"]], axis=1).astype(jnp.int32)
    segments = jnp.concatenate([batch["prompt_mask"], jnp.ones_like(batch["completion_ids"])], axis=1).astype(
        jnp.int32
    )
    positions = jnp.maximum(jnp.cumsum(segments, axis=1) - 1, 0).astype(jnp.int32)
    return tokens, positions, segments


def completion_values(graphdef, params, batch: dict[str, jax.Array]) -> jax.Array:
    """The value model's V [B, C] of the state before each completion token (read at the position that predicts
    it, as TRL), 0 outside the completion mask."""
    model = nnx.merge(graphdef, params)
    W, C = batch["prompt_ids"].shape[1], batch["completion_ids"].shape[1]
    values_BxT = model.scores(*_sequence(batch))
    return values_BxT[:, W - 1 : W + C - 1] * batch["completion_mask"].astype(jnp.float32)


def policy_logps(graphdef, params, batch, cfg: PpoConfig, with_entropy: bool = False):
    """[B, C] log-probs of the completion tokens under the sampling distribution (and entropies)."""
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
        with_entropy=with_entropy,
    )


def loss_fn(params, batch, graphdefs, cfg: PpoConfig):
    """(loss_sum, (weight, metric_sums)) of one (micro)batch: clipped policy loss + vf_coef * clipped value loss,
    both token sums over the completion mask (weight = tokens)."""
    policy_gd, value_gd = graphdefs
    mask_BxC = batch["completion_mask"]
    logps_BxC, entropy_BxC = policy_logps(policy_gd, params["policy"], batch, cfg, with_entropy=True)
    values_BxC = completion_values(value_gd, params["value"], batch)
    pg_sum, weight, pg = losses.ppo_policy_loss(
        logps_BxC, batch["old_logps"], batch["advantages"], mask_BxC, cliprange=cfg.cliprange
    )
    vf_sum, _, vf = losses.ppo_value_loss(
        values_BxC, batch["old_values"], batch["returns"], mask_BxC, cliprange_value=cfg.cliprange_value
    )
    metrics = {
        "policy/approxkl_avg": pg["approxkl"],
        "policy/clipfrac_avg": pg["pg_clipfrac"],
        "val/clipfrac_avg": vf["vf_clipfrac"],
        "loss/policy_avg": jax.lax.stop_gradient(pg_sum),
        "loss/value_avg": jax.lax.stop_gradient(vf_sum),
        "policy/entropy_avg": jnp.sum(jax.lax.stop_gradient(entropy_BxC) * mask_BxC),
    }
    return pg_sum + cfg.vf_coef * vf_sum, (weight, metrics)


# --- the jitted step -----------------------------------------------------------------------------------------------


def rollout_values(state, batch, ref_params, cfg: PpoConfig) -> dict[str, jax.Array]:
    """The batch extended with what the updates read: old log-probs and values (the state before any update),
    advantages and returns; plus the rollout's per-token KL and log-probs (keys `kl`, `old_logps`)."""
    policy_gd, value_gd = state.graphdef
    mask_BxC = batch["completion_mask"]
    old_BxC = jax.lax.stop_gradient(policy_logps(policy_gd, state.params["policy"], batch, cfg))
    ref_BxC = jax.lax.stop_gradient(
        policy_logps(policy_gd, model_init.reference(ref_params, state.params["policy"]), batch, cfg)
    )
    values_BxC = jax.lax.stop_gradient(completion_values(value_gd, state.params["value"], batch))
    rewards_BxC, kl_BxC = ppo_rewards(
        batch["scores"], old_BxC, ref_BxC, mask_BxC, kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator
    )
    adv_BxC, returns_BxC = advantages_and_returns(rewards_BxC, values_BxC, mask_BxC, cfg)
    return {
        **batch,
        "old_logps": old_BxC,
        "old_values": values_BxC,
        "advantages": adv_BxC,
        "returns": returns_BxC,
        "kl": kl_BxC,
    }


def minibatch_update(state, minibatch, *, cfg: PpoConfig, optim: OptimConfig, microbatches: int):
    """One optimizer update of policy and value model on one minibatch [M, ...]: (state, metrics)."""
    loss = functools.partial(loss_fn, graphdefs=state.graphdef, cfg=cfg)
    grads, mean_loss, metrics = state_lib.grad_step(
        loss, state.params, minibatch, microbatches, rng=jax.random.fold_in(state.rng, state.step)
    )
    state, update_metrics = state_lib.apply_gradients(state, grads, mean_loss, optim)
    return state, {"loss": mean_loss, **metrics, **update_metrics}


# What each minibatch update reads (the rollout's per-token KL and the scores are not needed there).
UPDATE_KEYS = (
    *("prompt_ids", "prompt_mask", "completion_ids", "completion_mask"),
    *("old_logps", "old_values", "advantages", "returns"),
)


def train_step(
    state: state_lib.TrainState,
    batch: dict[str, jax.Array],
    ref_params: Any,
    *,
    cfg: PpoConfig,
    optim: OptimConfig,
    microbatches: int,
) -> tuple[state_lib.TrainState, dict[str, jax.Array]]:
    """Rollout values, then E x num_mini_batches updates (nested `lax.scan`s: compiled once). Metrics: the rollout's
    objective/*, and the mean over updates of the losses (`lr` of the first update, `skipped_total` of the last)."""
    data = rollout_values(state, batch, ref_params, cfg)
    mask_BxC = batch["completion_mask"].astype(jnp.float32)
    kl_B = jnp.sum(data["kl"], axis=1)
    non_score_B = -cfg.kl_coef * kl_B
    objective = {
        "objective/kl": jnp.mean(kl_B),
        "objective/entropy": jnp.mean(jnp.sum(-data["old_logps"] * mask_BxC, axis=1)),
        "objective/non_score_reward": jnp.mean(non_score_B),
        "objective/rlhf_reward": jnp.mean(batch["scores"] + non_score_B),
        "objective/scores": jnp.mean(batch["scores"]),
    }
    B, n_mb = batch["completion_ids"].shape[0], cfg.num_mini_batches
    update_data = {k: data[k] for k in UPDATE_KEYS}
    # A permutation per epoch, drawn from the state's key and step: a resumed run shuffles the same way.
    key = jax.random.fold_in(jax.random.fold_in(state.rng, 0x9E0), state.step)
    update = functools.partial(minibatch_update, cfg=cfg, optim=optim, microbatches=microbatches)

    def epoch(state, epoch_key):
        perm = jax.random.permutation(epoch_key, B)
        minibatches = jax.tree.map(lambda x: x[perm].reshape(n_mb, B // n_mb, *x.shape[1:]), update_data)
        return jax.lax.scan(update, state, minibatches)

    state, history = jax.lax.scan(epoch, state, jax.random.split(key, cfg.num_ppo_epochs))
    out = {k: jnp.mean(v.astype(jnp.float32)) for k, v in history.items()}
    out.update(lr=history["lr"].reshape(-1)[0], skipped_total=history["skipped_total"].reshape(-1)[-1])
    out.update(objective)
    return state, out


# --- the reward model on the host ----------------------------------------------------------------------------------


def _same_file(a: str, b: str) -> bool:
    """Two tokenizers are the same if their paths or their files' bytes are (a directory: its tokenizer.json)."""
    if a == b or (storage.is_local(a) and storage.is_local(b) and os.path.abspath(a) == os.path.abspath(b)):
        return True
    pa, pb = storage.path(a), storage.path(b)
    pa, pb = (p / "tokenizer.json" if p.is_dir() else p for p in (pa, pb))
    return pa.exists() and pb.exists() and pa.read_bytes() == pb.read_bytes()


def reward_tokenizer_path(config: Config) -> str:
    """`ppo.reward_tokenizer`, else the RM run's tokenizer (its saved data.tokenizer or workdir/tokenizer.model)."""
    if config.ppo.reward_tokenizer:
        return config.ppo.reward_tokenizer
    rm = config_lib.replace(
        config,
        model={"init_from": f"ckpt:{config.ppo.reward_model}"},
        data={"tokenizer": ""},
    )
    return common.tokenizer_path(rm)


class RewardInput:
    """The RM's token ids of a policy row `prompt_ids + completion_ids`: the same ids when both share a tokenizer;
    else the row decoded with the policy's tokenizer and encoded with the RM's (chat markers are pieces of both
    tokenizers and survive as text), BOS / EOS mapped to the RM's own when the row starts / ends with them."""

    def __init__(self, policy_tokenizer: Any, rm_tokenizer: Any, same: bool):
        self.policy, self.rm, self.same = policy_tokenizer, rm_tokenizer, same

    def __call__(self, prompt_ids: list[int], completion_ids: list[int]) -> list[int]:
        ids = [*prompt_ids, *completion_ids]
        if self.same:
            return ids
        pol, rm = self.policy, self.rm
        bos = bool(ids) and ids[0] == pol.bos_id
        eos = bool(ids) and ids[-1] == pol.eos_id
        text = pol.decode(ids[int(bos) : len(ids) - int(eos)])
        body = rm.encode(text)
        # SentencePiece prefixes the text with a lone "▁" when it starts with a chat marker; the RM's own rendering
        # (marker first) has none: drop a leading id that adds nothing to the text.
        if len(body) > 1 and rm.decode(body[1:]) == text:
            body = body[1:]
        return [rm.bos_id] * bos + body + [rm.eos_id] * eos


def load_reward(config: Config, policy_tokenizer: Any) -> tuple[RewardScorer, RewardInput]:
    """The frozen RM as a scorer of token-id rows, and the mapping of policy rows to its ids."""
    from jaxalign.stages import reward as reward_stage

    path = reward_tokenizer_path(config)
    rm_tokenizer = common.load_tokenizer(path)
    same = _same_file(path, common.tokenizer_path(config))
    if config.ppo.value_init == "reward" and not same:
        raise ConfigError(
            f"ppo.value_init='reward': the reward model's tokenizer ({path}) differs from the policy's, but the "
            "value model reads the policy's tokens; use ppo.value_init='policy'"
        )
    scorer = reward_stage.load_scorer(config.ppo.reward_model, rm_tokenizer)
    return scorer, RewardInput(policy_tokenizer, rm_tokenizer, same)


def penalized_scores(scores_B: np.ndarray, stopped_B: np.ndarray, missing_eos_penalty: float) -> np.ndarray:
    """RM scores [B] float32 minus `missing_eos_penalty` where a completion has no stop token (TRL's
    `missing_eos_penalty`)."""
    return (scores_B - np.float32(missing_eos_penalty) * ~stopped_B.astype(bool)).astype(np.float32)


def score_rows(scorer: RewardScorer, to_rm: RewardInput, sampled: rollout.Sampled) -> np.ndarray:
    """RM scores [B] float32 of each sampled row: its prompt (without padding) + completion up to and including the
    stop token."""
    rows = [
        to_rm(
            sampled.prompt_ids_BxW[i][sampled.prompt_mask_BxW[i] > 0].tolist(),
            sampled.tokens_BxC[i, : int(sampled.mask_BxC[i].sum())].tolist(),
        )
        for i in range(len(sampled.tokens_BxC))
    ]
    return scorer.score(rows).astype(np.float32)


class Rollout:
    """`prepare` for `loop.train`: generation and scoring of one step (module doc)."""

    def __init__(self, config: Config, rules: Rules, tokenizer, policy_graphdef, scorer, to_rm: RewardInput):
        cfg = self.cfg = config.ppo
        self.rules = rules
        self.generator = rollout.Generator(
            policy_graphdef,
            rules,
            tokenizer,
            config.data.chat_template,
            max_new_tokens=cfg.max_completion_length,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
        )
        self.scorer, self.to_rm = scorer, to_rm
        self.shardings = batch_shardings(rules)

    def __call__(self, state, prompts: dict[str, Any], step: int):
        t0 = time.perf_counter()
        jax.block_until_ready(state.params)  # the previous step's update
        t1 = time.perf_counter()
        sampled = self.generator(state.params["policy"], prompts, jax.random.fold_in(state.rng, step))
        t2 = time.perf_counter()
        _, stopped_B = self.generator.decode(sampled.tokens_BxC, sampled.mask_BxC)
        scores_B = score_rows(self.scorer, self.to_rm, sampled)
        scores_B = penalized_scores(scores_B, stopped_B, self.cfg.missing_eos_penalty)
        host = {
            "prompt_ids": sampled.prompt_ids_BxW,
            "prompt_mask": sampled.prompt_mask_BxW,
            "completion_ids": sampled.tokens_BxC,
            "completion_mask": sampled.mask_BxC,
            "scores": scores_B.astype(np.float32),
        }
        batch = loop.to_global(host, self.shardings)
        t3 = time.perf_counter()
        metrics = rollout.completion_metrics(sampled.mask_BxC.sum(axis=1), stopped_B)
        metrics.update(
            {
                "val/num_eos_tokens": float(stopped_B.sum()),
                "time/update_wait_s": t1 - t0,
                "time/generation_s": t2 - t1,
                "time/scoring_s": t3 - t2,
            }
        )
        return batch, metrics


def batch_shardings(rules: Rules) -> dict[str, Any]:
    out = {k: rules.sharding(("batch", "length")) for k in BATCH_KEYS}
    out["scores"] = rules.sharding(("batch",))
    return out


def score_evaluator(config, rules, tokenizer, policy_graphdef, scorer, to_rm, batches):
    """`eval_fn(state)`: greedy completions of the held-out prompts scored by the RM: `score` (mean) and
    `mean_length` (tokens)."""
    greedy = rollout.Generator(
        policy_graphdef,
        rules,
        tokenizer,
        config.data.chat_template,
        max_new_tokens=config.ppo.max_completion_length,
        temperature=0.0,
    )

    def eval_fn(state) -> dict[str, float]:
        scores, lengths = [], []
        for batch in batches:
            sampled = greedy(state.params["policy"], batch, state.rng)
            scores.append(score_rows(scorer, to_rm, sampled))
            lengths.append(sampled.mask_BxC.sum(axis=1))
        return {"score": float(np.mean(np.concatenate(scores))), "mean_length": float(np.mean(lengths))}

    return eval_fn


# --- state ---------------------------------------------------------------------------------------------------------


def value_model_config(config: Config) -> ModelConfig:
    """The value model: the RM's architecture and weights (`value_init="reward"`) or the policy's trunk; how it runs
    (max_seq_len, attention, remat, dtype, scan) follows the policy's config."""
    if config.ppo.value_init == "policy":
        return config.model
    saved = checkpoint.saved_config(checkpoint.find_step_dir(config.ppo.reward_model))["model"]
    run_fields = {k: getattr(config.model, k) for k in model_init._NOT_ARCHITECTURE if k != "init_from"}
    return ModelConfig(**{**saved, **run_fields, "init_from": f"ckpt:{config.ppo.reward_model}"})


def train_state(config: Config, rules: Rules, total_steps: int):
    """(graphdefs, state, state shardings, fresh), as `model_init.train_state` for the pair policy + value model."""
    vcfg = value_model_config(config)
    stage_dir = checkpoint.stage_directory(config, "ppo")
    make = lambda gd, p: state_lib.create(
        gd, p, config.optim, total_steps, config.seed, config.train.ema_decay
    )
    # With LoRA the base is read again and the loop restores the adapters over it (`model_init.train_state`).
    if config.checkpoint.enabled and checkpoint.has_committed_step(stage_dir) and config.lora.rank == 0:
        pg, pa = jax.eval_shape(lambda: nnx.split(Transformer(config.model, nnx.Rngs(config.seed), rules)))
        vg, va = jax.eval_shape(lambda: nnx.split(ScalarModel(vcfg, nnx.Rngs(config.seed), rules)))
        state = jax.eval_shape(functools.partial(make, (pg, vg)), {"policy": pa, "value": va})
        return (pg, vg), state, state_lib.state_shardings(state, rules), False
    pg, policy = model_init.init_params(config, rules)
    vg, value = model_init.init_params(config, rules, scalar=True, model_cfg=vcfg)
    state, shardings = state_lib.create_sharded(
        (pg, vg),
        {"policy": policy, "value": value},
        config.optim,
        total_steps,
        config.seed,
        rules,
        config.train.ema_decay,
    )
    return (pg, vg), state, shardings, True


# --- bootstrap (the smoke's prerequisites) -------------------------------------------------------------------------


def bootstrap(config: Config) -> Config:
    """With `ppo.bootstrap_steps` > 0: trains, in this workdir, the SFT policy (when model.init_from is empty) and
    the RM (when ppo.reward_model is empty) for that many steps each (a finished one is not redone), and returns the
    config pointing at them."""
    steps = config.ppo.bootstrap_steps
    if not steps:
        if not config.ppo.reward_model:
            raise ConfigError(
                "ppo.reward_model is empty: pass a trained reward model's checkpoints/reward directory "
                "(or ppo.bootstrap_steps > 0 to train one first)"
            )
        return config
    seq_len = config.data.max_prompt_length + config.ppo.max_completion_length
    sub = dict(
        train=dict(
            steps=steps, seq_len=seq_len - 1, eval_every=0, grad_accum=1, log_every=max(1, steps // 4)
        ),
        checkpoint=dict(every_steps=steps),
    )
    model, ppo = {}, {}
    if not config.model.init_from:
        from jaxalign.stages import sft

        sft.run(
            config_lib.replace(
                config,
                job="sft",
                **sub,
                optim={"lr": 3e-3, "warmup_steps": 5},
                data={"assistant_only_loss": True, "completion_only_loss": True, "packing": True},
            )
        )
        model["init_from"] = f"ckpt:{checkpoint.stage_directory(config, 'sft')}"
    if not config.ppo.reward_model:
        from jaxalign.stages import reward

        reward.run(config_lib.replace(config, job="reward", **sub, optim={"lr": 1e-3, "warmup_steps": 5}))
        ppo["reward_model"] = checkpoint.stage_directory(config, "reward")
    return config_lib.replace(config, model=model, ppo=ppo)


# --- run -----------------------------------------------------------------------------------------------------------


def run(config: Config) -> loop.Result:
    config = bootstrap(config)
    tcfg, dcfg, cfg = config.train, config.data, config.ppo
    rules = common.setup(config)
    check_batch(config, rules)
    train_glob, eval_glob = common.inputs(config, "rl")
    tokenizer = common.tokenizer(config)
    scorer, to_rm = load_reward(config, tokenizer)
    kwargs = dict(
        global_batch_size=tcfg.batch_size,
        max_prompt_length=dcfg.max_prompt_length,
        truncation_mode=dcfg.truncation_mode,
        chat_template=dcfg.chat_template,
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
    updates = cfg.num_ppo_epochs * cfg.num_mini_batches
    # Every step makes num_ppo_epochs * num_mini_batches optimizer updates: the schedule spans all of them.
    graphdefs, state, state_shardings, fresh = train_state(config, rules, tcfg.steps * updates)
    ref_shardings = state_shardings.params["policy"]
    if config.lora.rank > 0:  # the policy's base with its adapters off
        ref_params = ref_shardings = model_init.BaseReference()
    elif fresh:  # the frozen reference: the initial policy (a copy: the state's buffers are donated)
        copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=ref_shardings)
        ref_params = copy(state.params["policy"])
    else:
        ref_params = model_init.init_params(config, rules)[1]
    step_fn = functools.partial(train_step, cfg=cfg, optim=config.optim, microbatches=tcfg.grad_accum)
    prepare = Rollout(config, rules, tokenizer, graphdefs[0], scorer, to_rm)

    eval_fn = None
    if eval_glob and tcfg.eval_every:
        make = lambda: prompt_pipelines.rl_loader(eval_glob, tokenizer, seed=0, shuffle=False, **kwargs)
        batches = common.read_batches(make, tcfg.eval_batches)
        eval_fn = score_evaluator(config, rules, tokenizer, graphdefs[0], scorer, to_rm, batches)
    seq = dcfg.max_prompt_length + cfg.max_completion_length
    # Per update: policy and value forward + backward; per step also 3 forwards (old, reference, values).
    return loop.train(
        stage="ppo",
        config=config,
        state=state,
        state_shardings=state_shardings,
        step_fn=step_fn,
        loader=loader,
        batch_shardings=prepare.shardings,
        tokens_per_step=tcfg.batch_size * seq * updates,
        flops_per_token=2 * flops_per_token(config.model, seq) * (1 + 1 / (2 * updates)),
        eval_fn=eval_fn,
        frozen=ref_params,
        frozen_shardings=ref_shardings,
        prepare=prepare,
        eval_at_start=True,
    )


__all__ = [
    "BATCH_KEYS",
    "Rollout",
    "RewardInput",
    "advantages_and_returns",
    "check_batch",
    "completion_values",
    "ppo_rewards",
    "run",
    "train_step",
]
