"""Preference optimisation on pairs: DPO (every TRL loss type), SimPO and ORPO (KTO is `stages/kto.py`).

Batches come from `data.prompt_pipelines.preference_loader` (legend there): `chosen_*` and `rejected_*` rows [B, T] that
share the prompt. Per-sequence log-probs are sums over completion tokens (`weights`), computed for the 2B rows in one
forward pass through the chunked log-softmax of `models.logps` (`train.logits_chunk`), so the full [2B, T, V] float32
logits never exist at once.

The frozen reference (DPO, KTO) is either held in memory and run every step (`dpo.reference="live"`: its parameters
are a non-donated, non-checkpointed argument of the jitted step), or run once over the data before training
(`"precomputed"`): its log-probs are cached under workdir/reference_logps/ by record location and travel with each
row (`ref_chosen_logps`, `ref_rejected_logps` [B]), so a step holds one model. Both give the same losses.

Terms normalised over the whole batch's tokens (the RPO/CPO/ORPO NLL) use the token count of the full batch,
computed before the split into microbatches, so accumulation stays exact.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign import losses, storage
from jaxalign.config import Config, DpoConfig, OptimConfig
from jaxalign.data import mixture, prompt_pipelines, seqio_source
from jaxalign.data.sources import open_source
from jaxalign.errors import ConfigError, DataError
from jaxalign.models.logps import target_logps
from jaxalign.models.transformer import flops_per_token
from jaxalign.stages import common, model_init
from jaxalign.train import loop
from jaxalign.train import state as state_lib

SIDE_KEYS = ("inputs", "targets", "weights", "positions", "segment_ids")
BATCH_KEYS = tuple(f"{side}_{k}" for side in ("chosen", "rejected") for k in SIDE_KEYS)
REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


def sequence_logps(
    params: nnx.State,
    graphdef: nnx.GraphDef,
    batch: dict[str, jax.Array],
    logits_chunk: int = 0,
    prompt_too: bool = False,
):
    """Per-row sums over the 2B rows (chosen first): completion log-probs [2B], completion lengths [2B], and, with
    `prompt_too`, the log-probs and count of every real target [2B] (ORPO's NLL covers the prompt too; else None).
    Only the positions summed pay for the vocabulary projection."""
    model = nnx.merge(graphdef, params)
    cat = {k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]]) for k in SIDE_KEYS}
    h_NxD = model.hidden(cat["inputs"], cat["positions"], cat["segment_ids"])
    weights = cat["weights"].astype(jnp.float32)
    real = cat["segment_ids"] > 0
    where = real | (weights != 0) if prompt_too else weights != 0
    logps_2BxT, _ = target_logps(model, h_NxD, cat["targets"], chunk=logits_chunk, where_BxT=where)
    if not prompt_too:
        return jnp.sum(logps_2BxT * weights, axis=1), jnp.sum(weights, axis=1), None, None
    real = real.astype(jnp.float32)
    return (
        jnp.sum(logps_2BxT * weights, axis=1),
        jnp.sum(weights, axis=1),
        jnp.sum(logps_2BxT * real, axis=1),
        jnp.sum(real, axis=1),
    )


def _split(x_2B: jax.Array) -> tuple[jax.Array, jax.Array]:
    B = x_2B.shape[0] // 2
    return x_2B[:B], x_2B[B:]


def reference_logps(ref_params, batch, graphdef, logits_chunk: int = 0) -> tuple[jax.Array, jax.Array]:
    """(chosen [B], rejected [B]) completion log-probs under the frozen reference (no gradient)."""
    logps_2B, _, _, _ = sequence_logps(jax.lax.stop_gradient(ref_params), graphdef, batch, logits_chunk)
    return _split(logps_2B)


def loss_fn(params, batch, graphdef, cfg: DpoConfig, logits_chunk: int, tokens_per_pair, ref=None):
    """(loss_sum, (pairs, metric_sums)) of one (micro)batch. `ref` = reference (chosen, rejected) log-probs."""
    logps_2B, lengths_2B, all_logps_2B, all_count_2B = sequence_logps(
        params, graphdef, batch, logits_chunk, prompt_too=cfg.objective == "orpo"
    )
    (c, r), (lc, lr) = _split(logps_2B), _split(lengths_2B)
    if cfg.objective == "dpo":
        loss, weight, metrics = losses.dpo_loss(
            c,
            r,
            *ref,
            beta=cfg.beta,
            loss_type=cfg.loss_type,
            label_smoothing=cfg.label_smoothing,
            chosen_lengths_B=lc,
            rejected_lengths_B=lr,
        )
        if cfg.rpo_alpha:
            # TRL's rpo_alpha: the chosen completions' token-mean NLL over the whole batch.
            nll = -jnp.sum(c) / tokens_per_pair
            loss = loss + cfg.rpo_alpha * nll
            metrics["nll_loss"] = jax.lax.stop_gradient(nll)
    elif cfg.objective == "simpo":
        loss, weight, metrics = losses.simpo_loss(
            c,
            r,
            lc,
            lr,
            beta=cfg.beta,
            simpo_gamma=cfg.simpo_gamma,
            label_smoothing=cfg.label_smoothing,
            cpo_alpha=cfg.rpo_alpha,
            chosen_nll_B=-c,
            chosen_nll_tokens_B=lc,
            nll_tokens_per_pair=tokens_per_pair,
        )
    else:  # orpo: the NLL covers every real token of the chosen sequence
        loss, weight, metrics = losses.orpo_loss(
            c,
            r,
            lc,
            lr,
            -_split(all_logps_2B)[0],
            _split(all_count_2B)[0],
            beta=cfg.beta,
            nll_tokens_per_pair=tokens_per_pair,
        )
    return loss, (weight, metrics)


def train_step(
    state: state_lib.TrainState,
    batch: dict[str, jax.Array],
    ref_params: Any = None,
    *,
    cfg: DpoConfig,
    optim: OptimConfig,
    microbatches: int,
    logits_chunk: int = 0,
) -> tuple[state_lib.TrainState, dict[str, jax.Array]]:
    # Whole-batch normalisers, before the split into microbatches.
    pairs = batch["chosen_weights"].shape[0]
    if cfg.objective == "orpo":
        tokens_per_pair = jnp.sum(batch["chosen_segment_ids"] > 0) / pairs
    else:
        tokens_per_pair = jnp.sum(batch["chosen_weights"]) / pairs
    if cfg.objective == "dpo":
        if ref_params is not None:  # live reference: computed once over the whole batch
            ref = model_init.reference(ref_params, state.params)
            ref_c, ref_r = reference_logps(ref, batch, state.graphdef, logits_chunk)
        else:
            ref_c, ref_r = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        batch = {**batch, "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}

    def loss(params, micro):
        ref = (micro["ref_chosen_logps"], micro["ref_rejected_logps"]) if cfg.objective == "dpo" else None
        return loss_fn(params, micro, state.graphdef, cfg, logits_chunk, tokens_per_pair, ref)

    grads, mean_loss, metrics = state_lib.grad_step(
        loss, state.params, batch, microbatches, rng=jax.random.fold_in(state.rng, state.step)
    )
    state, update_metrics = state_lib.apply_gradients(state, grads, mean_loss, optim)
    return state, {"loss": mean_loss, **metrics, **update_metrics}


# --- the precomputed reference ---------------------------------------------------------------------------------------


def _cache_dir(config: Config) -> str:
    return storage.join(config.workdir, "reference_logps")


def precompute_reference(
    config: Config, rules, tokenizer, pattern: str, graphdef, ref_params, batch_shardings
) -> dict[str, tuple[float, float]]:
    """Runs the reference once over every record of `pattern`; returns {"file:line": (chosen, rejected)} and caches
    it under workdir/reference_logps/ (one JSONL file per process, read back by every process)."""
    import hashlib

    # One cache per input pattern (the train and eval splits each have theirs).
    key = hashlib.sha256(pattern.encode()).hexdigest()[:16]
    directory = storage.join(_cache_dir(config), key)
    pid, count = jax.process_index(), jax.process_count()
    done = storage.join(directory, "done.json")
    source = open_source(pattern, on_error=config.data.on_error)
    fingerprint = {"files": list(source.files), "records": len(source), "init_from": config.model.init_from}
    if not (storage.exists(done) and json.loads(storage.read_text(done)) == fingerprint):
        encode = prompt_pipelines.preference_encoder(
            tokenizer,
            seq_len=config.train.seq_len,
            max_prompt_length=config.data.max_prompt_length,
            truncation_mode=config.data.truncation_mode,
            chat_template=config.data.chat_template,
            overlong=config.data.overlong,
        )
        ref_jit = jax.jit(
            functools.partial(reference_logps, graphdef=graphdef, logits_chunk=config.train.logits_chunk),
            in_shardings=(None, {k: batch_shardings[k] for k in BATCH_KEYS}),
        )
        rows_per_process = config.train.batch_size // count
        mine = list(range(pid, len(source), count))
        # Every process runs the same number of (collective) steps; short batches are padded with row 0.
        steps = -(-len(range(0, len(source), count)) // rows_per_process)
        out_path = storage.join(directory, f"part-{pid:05d}-of-{count:05d}.jsonl")
        out: list[str] = []  # small (two floats a record), written whole: object stores have no append
        for s in range(steps):
            rows = []
            for i in mine[s * rows_per_process : (s + 1) * rows_per_process]:
                record = source.read(i)
                try:
                    (row,), _ = encode(record, record["_where"])
                except DataError:
                    if config.data.on_error != "skip":
                        raise
                    continue
                rows.append(row)
            wheres = [row.pop("where") for row in rows]
            template = rows[0] if rows else _empty_row(encode)
            rows = rows + [template] * (rows_per_process - len(rows))
            host = {k: np.stack([row[k] for row in rows]) for k in BATCH_KEYS}
            c, r = ref_jit(ref_params, loop.to_global(host, {k: batch_shardings[k] for k in BATCH_KEYS}))
            c, r = common.host_rows(c), common.host_rows(r)
            for j, where in enumerate(wheres):
                out.append(
                    json.dumps({"where": where, "chosen": float(c[j]), "rejected": float(r[j])}) + "\n"
                )
        storage.write_atomic(out_path, "".join(out))
        common.barrier("reference log-probs")
        if pid == 0:
            storage.write_atomic(done, json.dumps(fingerprint))
        common.barrier("reference log-probs written")
    cache: dict[str, tuple[float, float]] = {}
    for name in sorted(p.name for p in storage.path(directory).iterdir()):
        if name.startswith("part-") and name.endswith(f"-of-{count:05d}.jsonl"):
            for line in storage.read_text(storage.join(directory, name)).splitlines():
                r = json.loads(line)
                cache[r["where"]] = (r["chosen"], r["rejected"])
    return cache


def _empty_row(encode) -> dict[str, np.ndarray]:
    """A padding row (every target weight 0) for a process with no record left in the reference pass."""
    T = encode.seq_len
    row = {}
    for side in ("chosen", "rejected"):
        row.update(
            {
                f"{side}_inputs": np.zeros(T, np.int32),
                f"{side}_targets": np.zeros(T, np.int32),
                f"{side}_weights": np.zeros(T, np.float32),
                f"{side}_positions": np.zeros(T, np.int32),
                f"{side}_segment_ids": np.ones(T, np.int32),
            }
        )
    return row


# --- run -------------------------------------------------------------------------------------------------------------


def pair_metrics(params, batch, ref_params=None, *, graphdef, cfg: DpoConfig, logits_chunk: int):
    """Held-out preference metrics (policy log-ratio against the reference): rewards/accuracies, margins, loss."""
    (c, r) = _split(sequence_logps(params, graphdef, batch, logits_chunk)[0])
    if cfg.objective == "dpo":
        rc, rr = (
            reference_logps(model_init.reference(ref_params, params), batch, graphdef, logits_chunk)
            if ref_params is not None
            else (batch["ref_chosen_logps"], batch["ref_rejected_logps"])
        )
    else:  # reference-free objectives: the policy's own log-probs
        rc = rr = jnp.zeros_like(c)
    margin = cfg.beta * ((c - rc) - (r - rr))
    n = jnp.asarray(c.shape[0], jnp.float32)
    return {
        "rewards/accuracies": (jnp.sum((margin > 0).astype(jnp.float32)), n),
        "rewards/margins": (jnp.sum(margin), n),
        "logps/chosen": (jnp.sum(c), n),
        "logps/rejected": (jnp.sum(r), n),
    }


def run(config: Config) -> loop.Result:
    tcfg, dcfg, cfg = config.train, config.data, config.dpo
    rules = common.setup(config)
    train_glob, eval_glob = common.inputs(config, "preference")
    tokenizer = common.tokenizer(config)
    graphdef, state, state_shardings, fresh = model_init.train_state(config, rules, "dpo")
    batch_shardings = {k: rules.sharding(("batch", "length")) for k in BATCH_KEYS}

    # The frozen reference: the initial policy (a copy: the state's buffers are donated to the step).
    ref_params = ref_shardings = None
    reference = None
    if cfg.objective == "dpo":
        ref_params = model_init.reference_params(config, rules, state, state_shardings, fresh)
        ref_shardings = model_init.reference_shardings(ref_params, state_shardings.params)
        if cfg.reference == "precomputed":
            patterns = mixture.globs(train_glob) + ([eval_glob] if eval_glob else [])
            if seqio := [p for p in patterns if seqio_source.is_seqio(p)]:
                raise ConfigError(
                    f"dpo.reference='precomputed' reads every record of the input once, which a seqio input "
                    f"({seqio[0]!r}) cannot give: set dpo.reference='live'"
                )
            reference = {}
            for pattern in patterns:
                reference.update(
                    precompute_reference(
                        config,
                        rules,
                        tokenizer,
                        pattern,
                        graphdef,
                        model_init.reference(ref_params, state.params),
                        batch_shardings,
                    )
                )
            ref_params = ref_shardings = None  # freed: steps hold one model
            batch_shardings.update({k: rules.sharding(("batch",)) for k in REF_KEYS})

    kwargs = dict(
        seq_len=tcfg.seq_len,
        global_batch_size=tcfg.batch_size,
        max_prompt_length=dcfg.max_prompt_length,
        truncation_mode=dcfg.truncation_mode,
        chat_template=dcfg.chat_template,
        on_error=dcfg.on_error,
        overlong=dcfg.overlong,
        shards=dcfg.shards,
        reference=reference,
    )
    loader = prompt_pipelines.preference_loader(
        train_glob,
        tokenizer,
        **common.loader_options(config),
        **kwargs,
    )
    step_fn = functools.partial(
        train_step, cfg=cfg, optim=config.optim, microbatches=tcfg.grad_accum, logits_chunk=tcfg.logits_chunk
    )
    eval_fn = None
    if eval_glob and tcfg.eval_every:
        metric = functools.partial(pair_metrics, graphdef=graphdef, cfg=cfg, logits_chunk=tcfg.logits_chunk)
        make = lambda: prompt_pipelines.preference_loader(
            eval_glob, tokenizer, seed=0, shuffle=False, **kwargs
        )
        eval_fn = common.evaluator(
            metric,
            common.read_batches(make, tcfg.eval_batches),
            state_shardings.params,
            batch_shardings,
            frozen=ref_params,
            frozen_shardings=ref_shardings,
        )
    return loop.train(
        stage="dpo",
        config=config,
        state=state,
        state_shardings=state_shardings,
        step_fn=step_fn,
        loader=loader,
        batch_shardings=batch_shardings,
        tokens_per_step=2 * tcfg.batch_size * tcfg.seq_len,
        flops_per_token=flops_per_token(config.model, tcfg.seq_len)
        * (4 / 3 if ref_params is not None else 1),
        eval_fn=eval_fn,
        frozen=ref_params,
        frozen_shardings=ref_shardings,
        eval_at_start=True,
    )
