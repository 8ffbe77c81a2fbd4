"""Causal-LM pretraining: next-token cross-entropy over packed documents, with an optional z-loss.

Batches come from `data.pipelines.lm_loader` (legend there): `inputs`, `targets`, `segment_ids`, `positions`,
`weights`, each [B, T]. Attention never crosses a document and RoPE positions restart per document, so a packed row
trains exactly as its documents would alone.
"""

from __future__ import annotations

import functools
import os

import jax
from flax import nnx

from jaxalign import losses
from jaxalign.config import Config, OptimConfig
from jaxalign.data import pipelines, synthetic
from jaxalign.data.tokenizer import SentencePieceTokenizer, Tokenizer, train_sentencepiece
from jaxalign.errors import ConfigError
from jaxalign.models.transformer import flops_per_token, init_model
from jaxalign.parallel.mesh import Rules, make_mesh
from jaxalign.train import loop, perf
from jaxalign.train import state as state_lib

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "weights")


def loss_fn(params: nnx.State, batch: dict[str, jax.Array], graphdef: nnx.GraphDef, z_loss: float):
    """(loss_sum, (token_count, metric_sums)) of one (micro)batch."""
    model = nnx.merge(graphdef, params)
    h_NxD = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"])
    logits_NxV = model.logits(h_NxD)
    loss, weight, metrics = losses.causal_lm_loss(
        logits_NxV, batch["targets"].reshape(-1), batch["weights"].reshape(-1), z_loss
    )
    return loss, (weight, metrics)


def train_step(
    state: state_lib.TrainState,
    batch: dict[str, jax.Array],
    *,
    optim: OptimConfig,
    z_loss: float,
    microbatches: int,
) -> tuple[state_lib.TrainState, dict[str, jax.Array]]:
    loss = functools.partial(loss_fn, graphdef=state.graphdef, z_loss=z_loss)
    grads, mean_loss, metrics = state_lib.grad_step(loss, state.params, batch, microbatches)
    state, update_metrics = state_lib.apply_gradients(state, grads, mean_loss, optim)
    return state, {"loss": mean_loss, **metrics, **update_metrics}


def eval_loss(
    params: nnx.State, batch: dict[str, jax.Array], graphdef: nnx.GraphDef
) -> tuple[jax.Array, jax.Array]:
    loss, (weight, _) = loss_fn(params, batch, graphdef, 0.0)
    return loss, weight


def check_batch(config: Config, rules: Rules) -> None:
    """The (micro)batch must split evenly over the data-parallel devices."""
    dp = rules.data_parallel_size
    micro = config.train.batch_size // config.train.grad_accum
    if micro % dp:
        raise ConfigError(
            f"train.batch_size={config.train.batch_size} (microbatch {micro} with train.grad_accum="
            f"{config.train.grad_accum}) is not divisible by the data-parallel size {dp} "
            f"(mesh {dict(rules.mesh.shape)})"
        )


def prepare_data(config: Config) -> tuple[str, str, Tokenizer]:
    """(train glob, eval glob, tokenizer): the synthetic world and a freshly trained tokenizer when not given."""
    train_glob, eval_glob = config.data.input, config.data.eval_input
    if not train_glob:
        data_dir = os.path.join(config.workdir, "data")
        if jax.process_index() == 0:
            synthetic.write_pretraining(data_dir, config.data.synthetic_entities, config.data.synthetic_seed)
        _barrier("synthetic data")
        paths = synthetic.write_pretraining(
            data_dir, config.data.synthetic_entities, config.data.synthetic_seed
        )
        train_glob, eval_glob = paths["train"], eval_glob or paths["eval"]
    tokenizer_path = config.data.tokenizer or os.path.join(config.workdir, "tokenizer.model")
    if not config.data.tokenizer and not os.path.exists(tokenizer_path) and jax.process_index() == 0:
        from jaxalign.data.sources import open_source

        source = open_source(train_glob, on_error="skip")
        texts = (r.get(config.data.text_field, "") for r in (source[i] for i in range(len(source))) if r)
        train_sentencepiece(texts, tokenizer_path, config.model.vocab_size)
    _barrier("tokenizer")
    tokenizer = load_tokenizer(tokenizer_path)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} "
            f"({tokenizer_path})"
        )
    return train_glob, eval_glob, tokenizer


def load_tokenizer(path: str) -> Tokenizer:
    """A Hugging Face directory or tokenizer.json through `tokenizers`, else a SentencePiece .model."""
    if os.path.isdir(path) or path.endswith(".json"):
        from jaxalign.data.hf_tokenizer import HFTokenizer

        return HFTokenizer(path)
    return SentencePieceTokenizer(path)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def run(config: Config) -> loop.Result:
    tcfg = config.train
    # Mesh and rules.
    mesh = make_mesh(config.mesh)
    rules = Rules(mesh, config.mesh.rules)
    check_batch(config, rules)
    if not tcfg.peak_flops:
        # Measure the matmul peak for MFU now, before the data loader's background thread competes for the cores.
        perf.peak_flops()

    # Data.
    train_glob, eval_glob, tokenizer = prepare_data(config)
    loader_kwargs = dict(
        tokenizer=tokenizer,
        seq_len=tcfg.seq_len,
        global_batch_size=tcfg.batch_size,
        num_workers=config.data.num_workers,
        on_error=config.data.on_error,
        overlong=config.data.overlong,
        text_field=config.data.text_field,
        shards=config.data.shards,
    )
    loader = pipelines.lm_loader(train_glob, seed=config.seed, shuffle=config.data.shuffle, **loader_kwargs)
    batch_shardings = {k: rules.sharding(("batch", "length")) for k in BATCH_KEYS}

    # Model and train state, initialised directly into their shardings.
    if config.model.init_from:
        from jaxalign.models import hf

        graphdef, params = hf.load_params(config.model, rules)
    else:
        graphdef, params = init_model(config.model, rules, config.seed)
    state, state_shardings = state_lib.create_sharded(
        graphdef, params, config.optim, tcfg.steps, config.seed, rules
    )

    # The step.
    step_fn = functools.partial(
        train_step, optim=config.optim, z_loss=tcfg.z_loss, microbatches=tcfg.grad_accum
    )

    eval_fn = None
    if eval_glob and tcfg.eval_every:
        eval_jit = jax.jit(
            functools.partial(eval_loss, graphdef=graphdef),
            in_shardings=(state_shardings.params, batch_shardings),
        )
        # The held-out batches are the same at every evaluation: read and tokenize them once.
        eval_loader = pipelines.lm_loader(eval_glob, seed=0, shuffle=False, **loader_kwargs)
        eval_batches = [next(eval_loader) for _ in range(tcfg.eval_batches)]
        eval_loader.close()

        def eval_fn(state):
            total, count = 0.0, 0.0
            for batch in eval_batches:
                loss, weight = eval_jit(state.params, loop.to_global(batch, batch_shardings))
                total, count = total + float(loss), count + float(weight)
            return {"loss": total / max(count, 1.0)}

    result = loop.train(
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
    return result
