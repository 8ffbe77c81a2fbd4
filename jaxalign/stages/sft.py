"""Supervised fine-tuning: NLL on completion / assistant tokens of chat or prompt-completion records, packed.

Batches come from `data.pipelines.sft_loader` (the LM keys, legend there): `weights` is each target token's loss
mask, so only assistant turns (`data.assistant_only_loss`) or completions (`data.completion_only_loss`) are trained
on; packed examples never attend across each other and their RoPE positions restart.

Replay (`sft.replay_fraction > 0`) mixes pretraining documents into the examples (every token trained on) to limit
forgetting; the held-out pretraining loss is evaluated before the first step and at every evaluation
(`eval/pretrain_loss`), so forgetting is measured. Held-out SFT metrics: `eval/loss` and `eval/exact_match` (share of
held-out examples whose every trained token is the argmax: greedy decoding reproduces them).
"""

from __future__ import annotations

import functools

import jax
from flax import nnx

from jaxalign import losses
from jaxalign.config import Config, OptimConfig
from jaxalign.data import pipelines
from jaxalign.errors import ConfigError
from jaxalign.models.logps import target_logps
from jaxalign.models.transformer import flops_per_token
from jaxalign.stages import common, model_init
from jaxalign.train import loop
from jaxalign.train import state as state_lib


def loss_fn(params: nnx.State, batch: dict[str, jax.Array], graphdef: nnx.GraphDef, logits_chunk: int = 0):
    """(loss_sum, (loss-token count, metric_sums)) of one (micro)batch."""
    model = nnx.merge(graphdef, params)
    h_NxD = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"])
    logps_BxT, _, entropy_BxT, top1_BxT = target_logps(
        model, h_NxD, batch["targets"], chunk=logits_chunk, stats=True, where_BxT=batch["weights"] != 0
    )
    loss, weight, metrics = losses.sft_loss(
        logps_BxT, batch["weights"], entropy_BxT=entropy_BxT, is_top1_BxT=top1_BxT
    )
    return loss, (weight, metrics)


def train_step(
    state: state_lib.TrainState,
    batch: dict[str, jax.Array],
    *,
    optim: OptimConfig,
    microbatches: int,
    logits_chunk: int = 0,
) -> tuple[state_lib.TrainState, dict[str, jax.Array]]:
    loss = functools.partial(loss_fn, graphdef=state.graphdef, logits_chunk=logits_chunk)
    grads, mean_loss, metrics = state_lib.grad_step(
        loss, state.params, batch, microbatches, rng=jax.random.fold_in(state.rng, state.step)
    )
    state, update_metrics = state_lib.apply_gradients(state, grads, mean_loss, optim)
    num_tokens = jax.numpy.sum(batch["weights"])
    return state, {"loss": mean_loss, "num_tokens": num_tokens, **metrics, **update_metrics}


def _replay_input(config: Config) -> str:
    if config.sft.replay_input:
        return config.sft.replay_input
    if config.data.input or config.data.mixture:
        raise ConfigError(
            f"sft.replay_fraction={config.sft.replay_fraction} needs sft.replay_input (a glob of pretraining text) "
            "when data.input or data.mixture is set"
        )
    return common.world(config)["pretrain_train"]


def _pretrain_eval_input(config: Config) -> str:
    if config.sft.pretrain_eval_input or config.data.input or config.data.mixture:
        return config.sft.pretrain_eval_input
    return common.world(config)["pretrain_eval"]


def run(config: Config) -> loop.Result:
    tcfg, dcfg = config.train, config.data
    rules = common.setup(config)

    # Data.
    train_glob, eval_glob = common.inputs(config, "sft")
    tokenizer = common.tokenizer(config)
    kwargs = dict(
        seq_len=tcfg.seq_len,
        global_batch_size=tcfg.batch_size,
        chat_template=dcfg.chat_template,
        completion_only_loss=dcfg.completion_only_loss,
        assistant_only_loss=dcfg.assistant_only_loss,
        on_error=dcfg.on_error,
        overlong=dcfg.overlong,
        shards=dcfg.shards,
        text_field=dcfg.text_field,
    )
    replay = (_replay_input(config), config.sft.replay_fraction) if config.sft.replay_fraction else None
    loader = pipelines.sft_loader(
        train_glob,
        tokenizer,
        packing=dcfg.packing,
        replay=replay,
        **common.loader_options(config),
        **kwargs,
    )
    batch_shardings = {k: rules.sharding(("batch", "length")) for k in common.LM_KEYS}

    # Model and train state.
    graphdef, state, state_shardings, _ = model_init.train_state(config, rules, "sft")
    step_fn = functools.partial(
        train_step, optim=config.optim, microbatches=tcfg.grad_accum, logits_chunk=tcfg.logits_chunk
    )

    # Held-out SFT loss and exact match (one example per row), and the pretraining loss (forgetting).
    eval_fn = None
    if tcfg.eval_every:
        evals = []
        if eval_glob:
            make = lambda: pipelines.sft_loader(
                eval_glob, tokenizer, seed=0, shuffle=False, packing=False, **kwargs
            )
            evals.append(
                common.lm_evaluator(config, rules, make, graphdef, state_shardings.params, exact_match=True)
            )
        if pretrain_glob := _pretrain_eval_input(config):
            make = lambda: pipelines.lm_loader(
                pretrain_glob,
                tokenizer,
                seq_len=tcfg.seq_len,
                global_batch_size=tcfg.batch_size,
                seed=0,
                shuffle=False,
                text_field=dcfg.text_field,
                shards=dcfg.shards,
            )
            evals.append(
                common.lm_evaluator(config, rules, make, graphdef, state_shardings.params, prefix="pretrain_")
            )
        if evals:
            eval_fn = lambda state: {k: v for e in evals for k, v in e(state).items()}

    return loop.train(
        stage="sft",
        config=config,
        state=state,
        state_shardings=state_shardings,
        step_fn=step_fn,
        loader=loader,
        batch_shardings=batch_shardings,
        tokens_per_step=tcfg.batch_size * tcfg.seq_len,
        flops_per_token=flops_per_token(config.model, tcfg.seq_len),
        eval_fn=eval_fn,
        eval_at_start=True,
    )
