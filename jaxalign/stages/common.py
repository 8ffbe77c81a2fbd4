"""What every stage's `run` shares, so that each stage is a short recipe of its own data, loss and step.

    rules = setup(config)                              mesh, rules, the batch check, the MFU peak
    train_glob, eval_glob = inputs(config, "sft")      `data.input`, or the synthetic world's split
    opts = loader_options(config)                      the training loader's seed, shuffle, num_workers, shard_by
    tok = tokenizer(config)                            `data.tokenizer`, the init checkpoint's, or trained once
    eval_fn = evaluator(metric_fn, batches, ...)       held-out batches read once, a jitted sum of metrics

The model and train state a stage starts from (`init_params`, `train_state`, the frozen reference) are built in
`stages.model_init`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign import storage
from jaxalign.config import Config
from jaxalign.data import mixture, seqio_source, synthetic
from jaxalign.data.tokenizer import SentencePieceTokenizer, Tokenizer, train_sentencepiece
from jaxalign.errors import CheckpointError, ConfigError
from jaxalign.models.logps import target_logps
from jaxalign.parallel.mesh import Rules
from jaxalign.train import checkpoint, loop, perf

# --- mesh ----------------------------------------------------------------------------------------------------------


def check_batch(config: Config, rules: Rules, rows: int | None = None) -> None:
    """The (micro)batch must split evenly over the data-parallel devices."""
    dp = rules.data_parallel_size
    rows = config.train.batch_size if rows is None else rows
    micro = rows // config.train.grad_accum
    if micro % dp:
        raise ConfigError(
            f"train.batch_size={config.train.batch_size} (microbatch {micro} with train.grad_accum="
            f"{config.train.grad_accum}) is not divisible by the data-parallel size {dp} "
            f"(mesh {dict(rules.mesh.shape)})"
        )
    stages = rules.mesh.shape["stage"]
    if stages > 1:
        # The pipeline splits each (accumulation) microbatch again, into pipeline.microbatches row groups that
        # each stay spread over the data-parallel devices.
        from jaxalign.config import check_pipeline

        check_pipeline(config.model, dataclasses.replace(config.mesh, stage=stages), config.pipeline)
        pipe = config.pipeline.microbatches or stages
        if micro % (pipe * dp):
            raise ConfigError(
                f"train.batch_size={config.train.batch_size}: {micro} rows per step (train.grad_accum="
                f"{config.train.grad_accum}) do not split into pipeline.microbatches={pipe} microbatches of a "
                f"multiple of the data-parallel size {dp} rows"
            )


def setup(config: Config) -> Rules:
    """The mesh and its rules; checks the batch; measures the matmul peak for MFU before any loader starts."""
    rules = Rules.from_config(config)
    check_batch(config, rules)
    if not config.train.peak_flops:
        perf.peak_flops()
    return rules


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# --- data ----------------------------------------------------------------------------------------------------------


def world(config: Config) -> dict[str, str]:
    """The synthetic world's files under workdir/data (process 0 writes them once; the others wait)."""
    directory = storage.join(config.workdir, "data")
    args = (directory, config.data.synthetic_entities, config.data.synthetic_seed)
    sizes = synthetic.WorldSizes(
        arith_operand_max=config.data.synthetic_arith_max,
        rl_arithmetic=config.data.synthetic_rl_arithmetic or None,
        sft_arithmetic=config.data.synthetic_sft_arithmetic or None,
        pretrain_arithmetic_docs=config.data.synthetic_arith_docs or None,
        rl_arith_show_work=config.data.synthetic_rl_show_work,
        sft_chatty=config.data.synthetic_sft_chatty,
        preference_per_person=config.data.synthetic_preference_per_person,
    )
    if jax.process_index() == 0:
        synthetic.write_world(*args, sizes)
    barrier("synthetic world")
    return synthetic.write_world(*args, sizes)


def inputs(config: Config, kind: str) -> tuple[Any, str]:
    """(train glob, eval glob): `data.input` (or the `Mixture` of `data.mixture`) and `data.eval_input`, or the
    world's `<kind>_train`/`<kind>_eval` files (kind: pretrain, sft, preference, rl) when neither is set."""
    if any(seqio_source.is_seqio(p) for p in _input_patterns(config)):
        seqio_source.register(config.data.seqio_module)
    if config.data.mixture:
        return mixture.check(config.data.mixture), config.data.eval_input
    if config.data.input:
        return config.data.input, config.data.eval_input
    paths = world(config)
    return paths[f"{kind}_train"], config.data.eval_input or paths[f"{kind}_eval"]


def loader_options(config: Config) -> dict[str, Any]:
    """The training loader's order and parallelism, the same for every stage: {seed: `config.seed`, shuffle,
    num_workers, shard_by: from `config.data`}. Held-out loaders read in order instead (seed=0, shuffle=False, and
    shard by record: their small files need not split into `data.shards` spans)."""
    d = config.data
    return dict(seed=config.seed, shuffle=d.shuffle, num_workers=d.num_workers, shard_by=d.shard_by)


def _input_patterns(config: Config) -> list[str]:
    return [config.data.input, config.data.eval_input, *(glob for glob, _ in config.data.mixture)]


def record_texts(record: Any) -> Iterator[str]:
    """Every string of a record (text, prompt, completion, message contents, ...), for tokenizer training."""
    if isinstance(record, str):
        yield record
    elif isinstance(record, list):
        for x in record:
            yield from record_texts(x)
    elif isinstance(record, dict):
        for key, value in record.items():
            if key not in ("id", "role", "_where", "task", "kind", "rejected_kind", "duplicate_of"):
                yield from record_texts(value)


def _training_texts(config: Config) -> Iterator[str]:
    from jaxalign.data.sources import open_source

    if config.data.input:
        patterns = [config.data.input]
    elif config.data.mixture:
        patterns = [glob for glob, _ in config.data.mixture]
    else:
        paths = world(config)
        patterns = [paths[n] for n in ("pretrain_train", "sft_train", "preference_train", "rl_train")]
    for pattern in patterns:
        source = open_source(pattern, on_error="skip")
        for i in range(len(source)):
            record = source[i]
            if record:
                yield from record_texts(record)


def tokenizer_path(config: Config) -> str:
    """`data.tokenizer`; else an `hf:` init's directory; else the tokenizer of a `ckpt:` init's run; else
    workdir/tokenizer.model (trained on the training data or the whole synthetic world when missing)."""
    if config.data.tokenizer:
        return config.data.tokenizer
    init_from = config.model.init_from
    if init_from.startswith("hf:"):
        return init_from[3:]
    if init_from.startswith("ckpt:"):
        step_dir = checkpoint.find_step_dir(init_from[5:])
        source_workdir = os.fspath(storage.path(step_dir).parent.parent.parent)
        if storage.exists(storage.join(source_workdir, "tokenizer.model")):
            return storage.join(source_workdir, "tokenizer.model")
        saved = checkpoint.saved_config(step_dir)
        if saved["data"]["tokenizer"]:
            return saved["data"]["tokenizer"]
        raise CheckpointError(
            f"model.init_from={init_from!r}: the checkpoint's run has no tokenizer at "
            f"{source_workdir}/tokenizer.model; set data.tokenizer"
        )
    return storage.join(config.workdir, "tokenizer.model")


def load_tokenizer(path: str) -> Tokenizer:
    """A Hugging Face directory or tokenizer.json through `tokenizers`, else a SentencePiece .model."""
    if storage.path(path).is_dir() or path.endswith(".json"):
        from jaxalign.data.hf_tokenizer import HFTokenizer

        return HFTokenizer(path)
    return SentencePieceTokenizer(path)


def tokenizer(config: Config) -> Tokenizer:
    """The run's tokenizer (see `tokenizer_path`); checks that the model's vocabulary holds it."""
    path = tokenizer_path(config)
    if path == storage.join(config.workdir, "tokenizer.model") and not storage.exists(path):
        if seqio := [p for p in _input_patterns(config) if seqio_source.is_seqio(p)]:
            raise ConfigError(
                f"the input {seqio[0]!r} is a seqio Task or Mixture: set data.tokenizer (a tokenizer is trained "
                "on files only)"
            )
        if jax.process_index() == 0:
            train_sentencepiece(_training_texts(config), path, config.model.vocab_size)
    barrier("tokenizer")
    tok = load_tokenizer(path)
    if tok.vocab_size > config.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's {tok.vocab_size} ({path})"
        )
    _check_tokenizer_record(config, path, tok)
    return tok


TOKENIZER_RECORD = "tokenizer_record.json"


def tokenizer_digest(tok: Tokenizer) -> str:
    """sha256 of what the tokenizer maps text with (the SentencePiece model proto, or the HF tokenizer.json)."""
    if isinstance(tok, SentencePieceTokenizer):
        data = tok.sp.serialized_model_proto()
    else:
        data = tok.tokenizer.to_str().encode()
    return hashlib.sha256(data).hexdigest()


def _check_tokenizer_record(config: Config, path: str, tok: Tokenizer) -> None:
    """The run directory records the tokenizer its checkpoints are trained with (`tokenizer_record.json`: path and
    digest). A run that resumes in a directory holding committed checkpoints must use a tokenizer with the same
    digest (a CheckpointError names both); otherwise process 0 (re)writes the record."""
    workdir = storage.path(config.workdir)
    record_path = workdir / TOKENIZER_RECORD
    current = {"path": path, "sha256": tokenizer_digest(tok)}
    checkpoints = storage.path(config.checkpoint.directory or workdir / "checkpoints")
    resuming = checkpoints.is_dir() and any(
        checkpoint.has_committed_step(str(d)) for d in checkpoints.iterdir() if d.is_dir()
    )
    if resuming and record_path.exists():
        saved = json.loads(record_path.read_text(encoding="utf-8"))
        if saved["sha256"] != current["sha256"]:
            raise CheckpointError(
                f"the checkpoints in {checkpoints} were trained with tokenizer {saved['path']} (sha256 "
                f"{saved['sha256'][:12]}), this run's tokenizer is {path} (sha256 {current['sha256'][:12]}); resume "
                "with the same data.tokenizer or start a new workdir"
            )
        return
    if jax.process_index() == 0:
        storage.write_atomic(record_path, json.dumps(current, indent=1) + "\n")


def host_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in order."""
    if jax.process_count() == 1:
        return np.asarray(x)
    seen, parts = set(), []
    for s in sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0):
        if (start := s.index[0].start or 0) not in seen:
            seen.add(start)
            parts.append(np.asarray(s.data))
    return np.concatenate(parts)


# --- evaluation ----------------------------------------------------------------------------------------------------

MetricFn = Callable[[nnx.State, dict[str, jax.Array]], dict[str, tuple[jax.Array, jax.Array]]]


def read_batches(make_loader: Callable[[], Any], count: int) -> list[dict[str, np.ndarray]]:
    """`count` host batches of a fresh loader, read once (held-out batches are the same at every evaluation)."""
    loader = make_loader()
    try:
        return [next(loader) for _ in range(count)]
    finally:
        loader.close()


def evaluator(
    metric_fn: MetricFn,
    batches: list[dict[str, np.ndarray]],
    params_shardings: Any,
    batch_shardings: Any,
    frozen: Any = None,
    frozen_shardings: Any = None,
) -> Callable[[Any], dict[str, float]]:
    """`eval_fn(state) -> {name: sum / count}` over `batches`; `metric_fn(params, batch[, frozen])` returns
    {name: (sum, count)} for one batch (jitted once; `frozen`, e.g. a reference model, is its third argument)."""
    extra = () if frozen is None else (frozen,)
    metric_jit = jax.jit(
        metric_fn,
        in_shardings=(params_shardings, batch_shardings) + (() if frozen is None else (frozen_shardings,)),
    )

    def eval_fn(state) -> dict[str, float]:
        totals: dict[str, list[float]] = {}
        for batch in batches:
            for name, (s, c) in metric_jit(
                state.params, loop.to_global(batch, batch_shardings), *extra
            ).items():
                t = totals.setdefault(name, [0.0, 0.0])
                t[0] += float(s)
                t[1] += float(c)
        return {name: s / max(c, 1e-9) for name, (s, c) in totals.items()}

    return eval_fn


LM_KEYS = ("inputs", "targets", "segment_ids", "positions", "weights")


def token_metrics(
    params: nnx.State,
    batch: dict[str, jax.Array],
    graphdef: nnx.GraphDef,
    logits_chunk: int = 0,
    exact_match: bool = False,
) -> dict[str, tuple[jax.Array, jax.Array]]:
    """Held-out metrics of an LM-style batch: {"loss": (summed NLL of weighted targets, their count)} and, with
    `exact_match`, {"exact_match": (rows whose every weighted target is the argmax, rows with any)}: with one example
    per row, the share of examples greedy decoding reproduces exactly (teacher forcing: if every target token is the
    argmax given the reference prefix, greedy decoding emits the reference)."""
    model = nnx.merge(graphdef, params)
    h_NxD = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"])
    weights_BxT = batch["weights"].astype(jnp.float32)
    logps_BxT, _ = target_logps(model, h_NxD, batch["targets"], chunk=logits_chunk)
    out = {"loss": (-jnp.sum(logps_BxT * weights_BxT), jnp.sum(weights_BxT))}
    if exact_match:
        B, T = batch["targets"].shape
        argmax_BxT = jnp.argmax(model.logits(h_NxD), axis=-1).reshape(B, T)
        wrong_B = jnp.sum((argmax_BxT != batch["targets"]) * (weights_BxT > 0), axis=1)
        has_B = jnp.any(weights_BxT > 0, axis=1)
        out["exact_match"] = (jnp.sum((wrong_B == 0) & has_B), jnp.sum(has_B))
    return out


def lm_evaluator(
    config: Config,
    rules: Rules,
    make_loader: Callable[[], Any],
    graphdef: nnx.GraphDef,
    params_shardings: Any,
    *,
    exact_match: bool = False,
    prefix: str = "",
) -> Callable[[Any], dict[str, float]]:
    """`token_metrics` over `train.eval_batches` held-out batches of `make_loader()` (read once); metric names get
    `prefix`."""
    import functools

    shardings = {k: rules.sharding(("batch", "length")) for k in LM_KEYS}
    metric = functools.partial(
        token_metrics, graphdef=graphdef, logits_chunk=config.train.logits_chunk, exact_match=exact_match
    )
    eval_fn = evaluator(
        metric, read_batches(make_loader, config.train.eval_batches), params_shardings, shardings
    )
    return lambda state: {prefix + k: v for k, v in eval_fn(state).items()}
