"""KTO (Kahneman-Tversky optimisation) on unpaired desirable / undesirable examples, with a frozen reference.

Batches come from `data.prompt_pipelines.kto_loader`: one example per row (`inputs`, `targets`, `weights`, `positions`,
`segment_ids` [B, T], `desirable` [B]) and its KL row (`kl_*` [B, T]: the same prompt with another record's
completion). As TRL's KTOTrainer: the reference point `kl` is the mean policy/reference log-ratio of the KL rows over
the whole batch, clamped at 0 and detached, computed once before the split into microbatches; each example then loses
`desirable_weight * (1 - sigmoid(beta * (r - kl)))` or `undesirable_weight * (1 - sigmoid(beta * (kl - r)))` with
`r` its policy/reference log-ratio. The reference lives in memory (a frozen argument of the step). Settings come from
the `dpo` section (beta, desirable_weight, undesirable_weight).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign import losses
from jaxalign.config import Config, DpoConfig, OptimConfig
from jaxalign.data import prompt_pipelines
from jaxalign.errors import ConfigError
from jaxalign.models.logps import target_logps
from jaxalign.models.transformer import flops_per_token
from jaxalign.stages import common, model_init
from jaxalign.train import loop
from jaxalign.train import state as state_lib

ROW_KEYS = ("inputs", "targets", "weights", "positions", "segment_ids")
BATCH_KEYS = ROW_KEYS + tuple(f"kl_{k}" for k in ROW_KEYS)


def completion_logps(
    params: nnx.State, graphdef: nnx.GraphDef, rows: dict[str, jax.Array], logits_chunk: int = 0
):
    """Completion log-prob sums [B] of LM-style rows (only completion positions pay for the projection)."""
    model = nnx.merge(graphdef, params)
    h_NxD = model.hidden(rows["inputs"], rows["positions"], rows["segment_ids"])
    weights = rows["weights"].astype(jnp.float32)
    logps_BxT, _ = target_logps(model, h_NxD, rows["targets"], chunk=logits_chunk, where_BxT=weights != 0)
    return jnp.sum(logps_BxT * weights, axis=1)


def _kl_rows(batch):
    return {k: batch[f"kl_{k}"] for k in ROW_KEYS}


def train_step(
    state: state_lib.TrainState,
    batch: dict[str, jax.Array],
    ref_params: nnx.State,
    *,
    cfg: DpoConfig,
    optim: OptimConfig,
    microbatches: int,
    logits_chunk: int = 0,
) -> tuple[state_lib.TrainState, dict[str, jax.Array]]:
    graphdef = state.graphdef
    ref_params = jax.lax.stop_gradient(model_init.reference(ref_params, state.params))
    # The reference point over the whole batch (no gradient), and the reference log-probs of the examples.
    kl_logps = completion_logps(jax.lax.stop_gradient(state.params), graphdef, _kl_rows(batch), logits_chunk)
    ref_kl_logps = completion_logps(ref_params, graphdef, _kl_rows(batch), logits_chunk)
    kl = losses.kto_kl(kl_logps, ref_kl_logps)
    batch = {**batch, "ref_logps": completion_logps(ref_params, graphdef, batch, logits_chunk)}

    def loss(params, micro):
        logps = completion_logps(params, graphdef, micro, logits_chunk)
        out, weight, metrics = losses.kto_loss(
            logps,
            micro["ref_logps"],
            micro["desirable"],
            kl,
            beta=cfg.beta,
            desirable_weight=cfg.desirable_weight,
            undesirable_weight=cfg.undesirable_weight,
        )
        return out, (weight, metrics)

    grads, mean_loss, metrics = state_lib.grad_step(
        loss, state.params, batch, microbatches, rng=jax.random.fold_in(state.rng, state.step)
    )
    state, update_metrics = state_lib.apply_gradients(state, grads, mean_loss, optim)
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return state, {"loss": mean_loss, **metrics, **update_metrics}


def example_metrics(params, batch, ref_params, *, graphdef, beta: float, logits_chunk: int):
    """Held-out: the mean implicit reward beta * (log-ratio) of desirable and undesirable examples."""
    r = beta * (
        completion_logps(params, graphdef, batch, logits_chunk)
        - completion_logps(model_init.reference(ref_params, params), graphdef, batch, logits_chunk)
    )
    d = batch["desirable"]
    return {
        "rewards/chosen": (jnp.sum(r * d), jnp.sum(d)),
        "rewards/rejected": (jnp.sum(r * (1 - d)), jnp.sum(1 - d)),
    }


def run(config: Config) -> loop.Result:
    tcfg, dcfg, cfg = config.train, config.data, config.dpo
    if cfg.reference != "live":
        raise ConfigError(
            f"dpo.reference={cfg.reference!r}: KTO's reference point depends on each batch's mismatched pairs, so "
            "its reference runs live (set dpo.reference='live')"
        )
    rules = common.setup(config)
    train_glob, eval_glob = common.inputs(config, "preference")
    tokenizer = common.tokenizer(config)
    graphdef, state, state_shardings, fresh = model_init.train_state(config, rules, "kto")
    ref_params = model_init.reference_params(config, rules, state, state_shardings, fresh)
    ref_shardings = model_init.reference_shardings(ref_params, state_shardings.params)
    kwargs = dict(
        seq_len=tcfg.seq_len,
        global_batch_size=tcfg.batch_size,
        max_prompt_length=dcfg.max_prompt_length,
        truncation_mode=dcfg.truncation_mode,
        chat_template=dcfg.chat_template,
        on_error=dcfg.on_error,
        overlong=dcfg.overlong,
        shards=dcfg.shards,
    )
    loader = prompt_pipelines.kto_loader(
        train_glob,
        tokenizer,
        **common.loader_options(config),
        **kwargs,
    )
    batch_shardings = {k: rules.sharding(("batch", "length")) for k in BATCH_KEYS}
    batch_shardings["desirable"] = rules.sharding(("batch",))
    step_fn = functools.partial(
        train_step, cfg=cfg, optim=config.optim, microbatches=tcfg.grad_accum, logits_chunk=tcfg.logits_chunk
    )
    eval_fn = None
    if eval_glob and tcfg.eval_every:
        make = lambda: prompt_pipelines.kto_loader(eval_glob, tokenizer, seed=0, shuffle=False, **kwargs)
        eval_fn = common.evaluator(
            functools.partial(
                example_metrics, graphdef=graphdef, beta=cfg.beta, logits_chunk=tcfg.logits_chunk
            ),
            common.read_batches(make, tcfg.eval_batches),
            state_shardings.params,
            batch_shardings,
            frozen=ref_params,
            frozen_shardings=ref_shardings,
        )
    return loop.train(
        stage="kto",
        config=config,
        state=state,
        state_shardings=state_shardings,
        step_fn=step_fn,
        loader=loader,
        batch_shardings=batch_shardings,
        tokens_per_step=2 * tcfg.batch_size * tcfg.seq_len,
        flops_per_token=flops_per_token(config.model, tcfg.seq_len),
        eval_fn=eval_fn,
        frozen=ref_params,
        frozen_shardings=ref_shardings,
        eval_at_start=True,
    )
