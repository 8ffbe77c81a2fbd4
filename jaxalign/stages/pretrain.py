"""Causal-LM pretraining: next-token cross-entropy over packed documents, with an optional z-loss.

Batches come from `data.pipelines.lm_loader` (legend there): `inputs`, `targets`, `segment_ids`, `positions`,
`weights`, each [B, T]. Attention never crosses a document and RoPE positions restart per document, so a packed row
trains exactly as its documents would alone.
"""

from __future__ import annotations

import functools

import jax
from flax import nnx

from jaxalign import losses
from jaxalign.config import Config, OptimConfig
from jaxalign.data import pipelines
from jaxalign.models.logps import target_logps
from jaxalign.models.transformer import flops_per_token
from jaxalign.stages import common, model_init
from jaxalign.train import loop
from jaxalign.train import state as state_lib

BATCH_KEYS = common.LM_KEYS


def loss_fn(
    params: nnx.State,
    batch: dict[str, jax.Array],
    graphdef: nnx.GraphDef,
    z_loss: float,
    logits_chunk: int = 0,
):
    """(loss_sum, (token_count, metric_sums)) of one (micro)batch."""
    model = nnx.merge(graphdef, params)
    h_NxD = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"])
    logps_BxT, lse_BxT = target_logps(model, h_NxD, batch["targets"], chunk=logits_chunk)
    return losses_from_logps(logps_BxT, lse_BxT, batch["weights"], z_loss)


def losses_from_logps(logps_BxT, lse_BxT, weights_BxT, z_loss: float):
    loss, weight, metrics = losses.causal_lm_loss_from_logps(logps_BxT, lse_BxT, weights_BxT, z_loss)
    return loss, (weight, metrics)


def train_step(
    state: state_lib.TrainState,
    batch: dict[str, jax.Array],
    *,
    optim: OptimConfig,
    z_loss: float,
    microbatches: int,
    logits_chunk: int = 0,
) -> tuple[state_lib.TrainState, dict[str, jax.Array]]:
    loss = functools.partial(loss_fn, graphdef=state.graphdef, z_loss=z_loss, logits_chunk=logits_chunk)
    grads, mean_loss, metrics = state_lib.grad_step(
        loss, state.params, batch, microbatches, rng=jax.random.fold_in(state.rng, state.step)
    )
    state, update_metrics = state_lib.apply_gradients(state, grads, mean_loss, optim)
    return state, {"loss": mean_loss, **metrics, **update_metrics}


def run(config: Config) -> loop.Result:
    tcfg = config.train
    rules = common.setup(config)

    # Data.
    train_glob, eval_glob = common.inputs(config, "pretrain")
    tokenizer = common.tokenizer(config)
    loader_kwargs = dict(
        seq_len=tcfg.seq_len,
        global_batch_size=tcfg.batch_size,
        on_error=config.data.on_error,
        overlong=config.data.overlong,
        text_field=config.data.text_field,
        shards=config.data.shards,
    )
    loader = pipelines.lm_loader(train_glob, tokenizer, **common.loader_options(config), **loader_kwargs)
    batch_shardings = {k: rules.sharding(("batch", "length")) for k in BATCH_KEYS}

    # Model and train state, initialised directly into their shardings.
    graphdef, state, state_shardings, _ = model_init.train_state(config, rules, "pretrain")

    # The step.
    step_fn = functools.partial(
        train_step,
        optim=config.optim,
        z_loss=tcfg.z_loss,
        microbatches=tcfg.grad_accum,
        logits_chunk=tcfg.logits_chunk,
    )
    eval_fn = None
    if eval_glob and tcfg.eval_every:
        # In order and sharded by record: its small files need not split into data.shards spans.
        make_eval_loader = lambda: pipelines.lm_loader(
            eval_glob, tokenizer, seed=0, shuffle=False, num_workers=0, **loader_kwargs
        )
        eval_fn = common.lm_evaluator(config, rules, make_eval_loader, graphdef, state_shardings.params)

    return loop.train(
        stage="pretrain",
        config=config,
        state=state,
        state_shardings=state_shardings,
        step_fn=step_fn,
        loader=loader,
        batch_shardings=batch_shardings,
        tokens_per_step=tcfg.batch_size * tcfg.seq_len,
        flops_per_token=flops_per_token(config.model, tcfg.seq_len),
        eval_fn=eval_fn,
    )
