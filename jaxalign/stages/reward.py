"""Reward model: a scalar head on the transformer trunk trained with the Bradley-Terry loss on preference pairs.

Batches come from `data.prompt_pipelines.preference_loader` (legend there): `chosen_*` and `rejected_*` rows [B, T] that share
the prompt (and `margin` [B] with `reward.margin_field`). A row's reward is the head's score at its last real token
(`models.heads`), computed over the whole sequence (prompt + completion + its end-of-turn), chosen and rejected in one
forward pass of 2B rows. Held-out metrics: `eval/accuracy` (pairwise: r_chosen > r_rejected) and `eval/loss`.

The trained model loads as a scorer for PPO, evaluation and best-of-n: `load_scorer(checkpoint_dir, tokenizer)`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign import losses
from jaxalign.config import Config, OptimConfig
from jaxalign.data import prompt_pipelines
from jaxalign.errors import ConfigError
from jaxalign.models import heads
from jaxalign.models.transformer import flops_per_token
from jaxalign.stages import common, model_init
from jaxalign.train import loop
from jaxalign.train import state as state_lib

SIDE_KEYS = ("inputs", "targets", "weights", "positions", "segment_ids")
BATCH_KEYS = tuple(f"{side}_{k}" for side in ("chosen", "rejected") for k in SIDE_KEYS)


def rewards(
    params: nnx.State, batch: dict[str, jax.Array], graphdef: nnx.GraphDef
) -> tuple[jax.Array, jax.Array]:
    """(r_chosen [B], r_rejected [B]) from one forward pass over the 2B sequences."""
    model = nnx.merge(graphdef, params)
    cat = {k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]]) for k in SIDE_KEYS}
    tokens, positions, segment_ids = heads.full_sequence(cat["inputs"], cat["targets"], cat["segment_ids"])
    r_2B = heads.last_scores(model.scores(tokens, positions, segment_ids), segment_ids)
    B = batch["chosen_inputs"].shape[0]
    return r_2B[:B], r_2B[B:]


def loss_fn(params, batch, graphdef, center_coef: float):
    r_chosen, r_rejected = rewards(params, batch, graphdef)
    loss, weight, metrics = losses.bradley_terry_loss(
        r_chosen, r_rejected, margin_B=batch.get("margin"), center_coef=center_coef
    )
    return loss, (weight, metrics)


def train_step(
    state: state_lib.TrainState,
    batch: dict[str, jax.Array],
    *,
    optim: OptimConfig,
    center_coef: float,
    microbatches: int,
) -> tuple[state_lib.TrainState, dict[str, jax.Array]]:
    loss = functools.partial(loss_fn, graphdef=state.graphdef, center_coef=center_coef)
    grads, mean_loss, metrics = state_lib.grad_step(
        loss, state.params, batch, microbatches, rng=jax.random.fold_in(state.rng, state.step)
    )
    state, update_metrics = state_lib.apply_gradients(state, grads, mean_loss, optim)
    return state, {"loss": mean_loss, **metrics, **update_metrics}


def pair_metrics(params, batch, graphdef):
    r_chosen, r_rejected = rewards(params, batch, graphdef)
    n = jnp.asarray(r_chosen.shape[0], jnp.float32)
    return {
        "accuracy": (jnp.sum((r_chosen > r_rejected).astype(jnp.float32)), n),
        "loss": (jnp.sum(-jax.nn.log_sigmoid(r_chosen - r_rejected)), n),
        "margin": (jnp.sum(r_chosen - r_rejected), n),
    }


def load_scorer(checkpoint_dir: str, tokenizer=None, rules=None, batch_size: int = 16) -> heads.RewardScorer:
    """A trained reward model (a `checkpoints/reward` directory or one of its steps) as a `RewardScorer`."""
    from jaxalign import config as config_lib
    from jaxalign.train import checkpoint

    saved = checkpoint.saved_config(checkpoint.find_step_dir(checkpoint_dir))
    model_cfg = config_lib.ModelConfig(**{**saved["model"], "init_from": f"ckpt:{checkpoint_dir}"})
    cfg = config_lib.Config(workdir=saved["workdir"], model=model_cfg)
    if rules is None:
        from jaxalign.parallel.mesh import Rules, make_mesh

        mesh_cfg = config_lib.MeshConfig(data=1, fsdp=1, tensor=1, stage=1)
        rules = Rules(make_mesh(mesh_cfg, jax.devices()[:1]), mesh_cfg.rules)
    graphdef, params = model_init.init_params(cfg, rules, scalar=True)
    return heads.RewardScorer(graphdef, params, tokenizer, batch_size)


def run(config: Config) -> loop.Result:
    tcfg, dcfg = config.train, config.data
    if tcfg.seq_len + 1 > config.model.max_seq_len:
        raise ConfigError(
            f"train.seq_len={tcfg.seq_len}: a reward model reads seq_len + 1 tokens, over model.max_seq_len="
            f"{config.model.max_seq_len}"
        )
    rules = common.setup(config)
    train_glob, eval_glob = common.inputs(config, "preference")
    tokenizer = common.tokenizer(config)
    kwargs = dict(
        seq_len=tcfg.seq_len,
        global_batch_size=tcfg.batch_size,
        max_prompt_length=dcfg.max_prompt_length,
        truncation_mode=dcfg.truncation_mode,
        chat_template=dcfg.chat_template,
        on_error=dcfg.on_error,
        overlong=dcfg.overlong,
        shards=dcfg.shards,
        margin_field=config.reward.margin_field,
    )
    loader = prompt_pipelines.preference_loader(
        train_glob,
        tokenizer,
        **common.loader_options(config),
        **kwargs,
    )
    batch_shardings = {k: rules.sharding(("batch", "length")) for k in BATCH_KEYS}
    if config.reward.margin_field:
        batch_shardings["margin"] = rules.sharding(("batch",))

    graphdef, state, state_shardings, _ = model_init.train_state(config, rules, "reward", scalar=True)
    step_fn = functools.partial(
        train_step, optim=config.optim, center_coef=config.reward.center_coef, microbatches=tcfg.grad_accum
    )
    eval_fn = None
    if eval_glob and tcfg.eval_every:
        make = lambda: prompt_pipelines.preference_loader(
            eval_glob, tokenizer, seed=0, shuffle=False, **kwargs
        )
        eval_fn = common.evaluator(
            functools.partial(pair_metrics, graphdef=graphdef),
            common.read_batches(make, tcfg.eval_batches),
            state_shardings.params,
            batch_shardings,
        )
    return loop.train(
        stage="reward",
        config=config,
        state=state,
        state_shardings=state_shardings,
        step_fn=step_fn,
        loader=loader,
        batch_shardings=batch_shardings,
        tokens_per_step=2 * tcfg.batch_size * tcfg.seq_len,
        flops_per_token=flops_per_token(config.model, tcfg.seq_len),
        eval_fn=eval_fn,
        eval_at_start=True,
    )
