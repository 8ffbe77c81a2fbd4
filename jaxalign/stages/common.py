"""What every stage's `run` shares, so that each stage is a short recipe of its own data, loss and step.

    rules = setup(config)                              mesh, rules, the batch check, the MFU peak
    train_glob, eval_glob = inputs(config, "sft")      `data.input`, or the synthetic world's split
    opts = loader_options(config)                      the training loader's seed, shuffle, num_workers, shard_by
    tok = tokenizer(config)                            `data.tokenizer`, the init checkpoint's, or trained once
    graphdef, params = init_params(config, rules)      random, `hf:` or `ckpt:` weights, placed in their shardings
                                                       (+ LoRA adapters / an NF4 base when `lora.rank > 0`)
    eval_fn = evaluator(metric_fn, batches, ...)       held-out batches read once, a jitted sum of metrics

Model initialisation (`model.init_from`): "" initialises at random; "hf:DIR" reads a Hugging Face checkpoint;
"ckpt:PATH" reads another jaxalign run's checkpoint (a step, a stage's checkpoint directory, or a run directory);
"ckpt:PATH#ema" its EMA of the params instead (`train.ema_decay`).
Weights are matched by path (a PPO checkpoint's policy), so a reward model (`models.heads.ScalarModel`, a trunk + head) starts from a policy's
checkpoint (its trunk) and a value model from a reward model's (trunk and head); a checkpoint saved with
`model.scan_layers` either way fits a model with either. Only the arrays the new model needs are read, each device
reading its own shards; weights the checkpoint lacks (a new head) start at random. The architecture must match
(a one-line CheckpointError names the differing fields).
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
from jaxalign.config import Config, ModelConfig
from jaxalign.data import mixture, seqio_source, synthetic
from jaxalign.data.tokenizer import SentencePieceTokenizer, Tokenizer, train_sentencepiece
from jaxalign.errors import CheckpointError, ConfigError
from jaxalign.models.heads import ScalarModel
from jaxalign.models.logps import target_logps
from jaxalign.models.transformer import Transformer, param_shardings
from jaxalign.parallel.mesh import Rules
from jaxalign.train import checkpoint, loop, perf

# ModelConfig fields that do not change the parameters (how the model runs, not what it is).
_NOT_ARCHITECTURE = {
    "remat",
    "scan_layers",
    "attention",
    "compute_dtype",
    "init_from",
    "max_seq_len",
    "init_std",
}

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
        pretrain_arithmetic_docs=config.data.synthetic_arith_docs or None,
        rl_arith_show_work=config.data.synthetic_rl_show_work,
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


# --- model ---------------------------------------------------------------------------------------------------------


def _flat(state: nnx.State) -> list[tuple[tuple, Any]]:
    return list(nnx.to_flat_state(state))


def init_params(
    config: Config,
    rules: Rules,
    *,
    scalar: bool = False,
    model_cfg: ModelConfig | None = None,
    adapters: bool = True,
) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params) of a policy (`Transformer`) or, with `scalar`, a trunk + scalar head (`ScalarModel`),
    from `model.init_from`, placed directly in the rules' shardings (full unsharded weights never exist).
    With `lora.rank > 0` (and `adapters`), LoRA adapters are attached (`peft.lora.attach`): the base is frozen."""
    graphdef, params = _init_base(config, rules, scalar=scalar, model_cfg=model_cfg)
    if adapters and config.lora.rank > 0:
        from jaxalign.peft import lora

        graphdef, params = lora.attach(graphdef, params, config.lora, rules, config.seed)
    return graphdef, params


def _init_base(
    config: Config, rules: Rules, *, scalar: bool = False, model_cfg: ModelConfig | None = None
) -> tuple[nnx.GraphDef, nnx.State]:
    cfg = model_cfg or config.model
    cls = ScalarModel if scalar else Transformer
    create = lambda: nnx.split(cls(cfg, nnx.Rngs(config.seed), rules))
    graphdef, abstract = jax.eval_shape(create)
    shardings = param_shardings(abstract, rules)
    if cfg.init_from.startswith("hf:") and not scalar:
        from jaxalign.models import hf

        return hf.load_params(cfg, rules)
    loaded: dict[tuple, jax.Array] = {}
    if cfg.init_from.startswith("hf:"):
        from jaxalign.models import hf

        _, trunk = hf.load_params(cfg, rules)
        loaded = {("trunk", *path): var.get_value() for path, var in _flat(trunk) if path != ("lm_head",)}
    elif cfg.init_from.startswith("ckpt:"):
        loaded = _from_checkpoint(cfg, cfg.init_from[5:], abstract, rules)
    flat = _flat(abstract)
    missing = [path for path, _ in flat if path not in loaded]
    if missing:
        wanted = set(missing)
        fresh_shardings = [var.get_value() for path, var in _flat(shardings) if path in wanted]
        # Only the missing leaves are outputs, so XLA drops the rest of the random initialisation.
        fresh = jax.jit(
            lambda: [var.get_value() for path, var in _flat(create()[1]) if path in wanted],
            out_shardings=fresh_shardings,
        )()
        loaded.update(zip(missing, fresh, strict=True))
    return graphdef, nnx.from_flat_state([(path, var.replace(loaded[path])) for path, var in flat])


def train_state(
    config: Config, rules: Rules, stage: str, *, scalar: bool = False, total_steps: int | None = None
):
    """(graphdef, state, state shardings, fresh) of `stage`'s train state.

    When the stage has a committed checkpoint to resume from, `state` is abstract (its leaves are
    `jax.ShapeDtypeStruct`s, from `jax.eval_shape`) and no initial weights are read, `hf:` and `ckpt:` inits
    included: the loop restores the checkpoint onto it, after checking the checkpoint's config, so a resumed run never
    holds a second full state. Otherwise `state` is initialised from `model.init_from` (`fresh` is True).
    `total_steps` (the schedule's length in optimizer updates) defaults to `train.steps`."""
    from jaxalign.train import state as state_lib

    steps = config.train.steps if total_steps is None else total_steps
    stage_dir = checkpoint.stage_directory(config, stage)
    # With LoRA the checkpoint holds only the adapters and their optimizer state: the frozen base is always read
    # from `model.init_from`, and the loop restores the trainable part over the fresh state.
    lora_resume = config.lora.rank > 0
    if config.checkpoint.enabled and checkpoint.has_committed_step(stage_dir) and not lora_resume:
        cls = ScalarModel if scalar else Transformer
        graphdef, abstract = jax.eval_shape(
            lambda: nnx.split(cls(config.model, nnx.Rngs(config.seed), rules))
        )
        make = lambda p: state_lib.create(
            graphdef, p, config.optim, steps, config.seed, config.train.ema_decay
        )
        state = jax.eval_shape(make, abstract)
        return graphdef, state, state_lib.state_shardings(state, rules), False
    graphdef, params = init_params(config, rules, scalar=scalar)
    state, shardings = state_lib.create_sharded(
        graphdef, params, config.optim, steps, config.seed, rules, config.train.ema_decay
    )
    return graphdef, state, shardings, True


class BaseReference:
    """The reference of a LoRA run: the policy's own params with its adapters disabled (`reference(...)` resolves
    it inside the step), so no second copy of the weights exists. An empty pytree: the loop passes it as `frozen`."""


jax.tree_util.register_pytree_node(BaseReference, lambda r: ((), None), lambda _, __: BaseReference())


def reference(ref_params: Any, params: nnx.State) -> nnx.State:
    """The reference params a step uses: `ref_params`, or `params` with adapters disabled for a `BaseReference`."""
    if isinstance(ref_params, BaseReference):
        from jaxalign.peft import lora

        return jax.lax.stop_gradient(lora.disabled(params))
    return ref_params


def reference_shardings(ref_params: Any, params_shardings: Any) -> Any:
    """The shardings of `reference_params`' result: the params' shardings, or the empty `BaseReference`."""
    return ref_params if isinstance(ref_params, BaseReference) else params_shardings


def reference_params(config: Config, rules: Rules, state: Any, state_shardings: Any, fresh: bool) -> Any:
    """A frozen reference: the initial policy. A copy of a fresh state's params (its buffers are donated to the
    step), or read again from `model.init_from` when the state will be restored from a checkpoint. With LoRA, a
    `BaseReference` (the base with adapters off; its shardings are itself)."""
    if config.lora.rank > 0:
        return BaseReference()
    if fresh:
        return jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=state_shardings.params)(
            state.params
        )
    return init_params(config, rules)[1]


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


def _check_architecture(cfg: ModelConfig, saved: dict, where: str) -> None:
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r}, config {v!r}"
        for k, v in json.loads(json.dumps(cfg.__dict__)).items()
        if k not in _NOT_ARCHITECTURE and k in saved and saved[k] != v
    ]
    if diffs:
        raise CheckpointError(f"model.init_from: {where} has another architecture: " + "; ".join(diffs))


def _source_path(tpath: tuple, source_scalar: bool) -> tuple[str, ...]:
    """A target parameter's path in a source checkpoint: a policy's leaves sit under `trunk` in a scalar model
    (reward / value), whose `head` and `head_bias` are its own."""
    spath = tuple(str(k) for k in tpath)
    if spath[0] == "trunk" and not source_scalar:
        return spath[1:]
    if spath[0] != "trunk" and source_scalar and spath[0] not in ("head", "head_bias"):
        return ("trunk", *spath)
    return spath


def _from_lora_checkpoint(
    cfg: ModelConfig, step_dir: str, saved: dict, abstract: nnx.State, rules: Rules
) -> dict[tuple, jax.Array]:
    """The merged weights of a LoRA run's checkpoint, which holds its adapters (and trainable head) only: that run's
    model is rebuilt from its saved config (its base from its own `model.init_from`, which may itself be a LoRA run's
    checkpoint), its adapters restored over it, and folded into the weights (`lora.merge`; NF4 dequantised)."""
    from jaxalign.config import from_config_dict
    from jaxalign.peft import lora

    meta = checkpoint.saved_params_metadata(step_dir)
    if {"policy", "value"} <= set(meta):
        raise CheckpointError(
            f"model.init_from: {step_dir} is a LoRA PPO run's checkpoint; export its policy merged "
            "(hf.save(model, dir, merge_lora=True)) and start from 'hf:dir'"
        )
    source = from_config_dict(saved)
    if source.model.scan_layers != cfg.scan_layers:
        raise CheckpointError(
            f"model.init_from: {step_dir} is a LoRA run's checkpoint with model.scan_layers="
            f"{source.model.scan_layers}; start from it with the same model.scan_layers (got {cfg.scan_layers})"
        )
    source_scalar = "trunk" in meta
    graphdef, params = init_params(source, rules, scalar=source_scalar)
    trainable, frozen = lora.split_trainable(params)
    target: dict = {}
    for path, var in _flat(trainable):
        node = target
        for part in path:
            node = node.setdefault(str(part), {})
        value = var.get_value()
        node["value"] = jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=value.sharding)
    restored = checkpoint.restore_params(step_dir, target)

    def get(tree: dict, keys: tuple) -> Any:
        for k in keys:
            tree = tree[str(k)]
        return tree["value"]

    trainable = nnx.from_flat_state([(p, v.replace(get(restored, p))) for p, v in _flat(trainable)])
    merged = nnx.state(lora.merge(nnx.merge(graphdef, lora.merge_trainable(trainable, frozen))), nnx.Param)
    weights = {tuple(str(k) for k in p): v.get_value() for p, v in _flat(merged)}
    out = {}
    for tpath, var in _flat(abstract):
        spath = _source_path(tpath, source_scalar)
        if spath in weights:
            if weights[spath].shape != var.shape:
                raise CheckpointError(
                    f"model.init_from: {step_dir}: parameter {'/'.join(spath)} has shape {weights[spath].shape}, "
                    f"the model needs {var.shape}"
                )
            out[tpath] = weights[spath]
    return out


def _from_checkpoint(
    cfg: ModelConfig, path: str, abstract: nnx.State, rules: Rules
) -> dict[tuple, jax.Array]:
    """Target path -> array for every target parameter the checkpoint has (module doc)."""
    step_dir = checkpoint.find_step_dir(path)
    item = checkpoint.split_selector(path)[1]
    saved = checkpoint.saved_config(step_dir)
    _check_architecture(cfg, saved["model"], step_dir)
    if saved.get("lora", {}).get("rank", 0) and item == "params":
        return _from_lora_checkpoint(cfg, step_dir, saved, abstract, rules)
    meta = checkpoint.saved_params_metadata(step_dir, item)
    # A PPO checkpoint holds {"policy": ..., "value": ...}: its policy is what later stages start from.
    prefix: tuple[str, ...] = ("policy",) if {"policy", "value"} <= set(meta) else ()
    meta = meta["policy"] if prefix else meta
    source_scalar = "trunk" in meta
    trunk_meta = meta["trunk"] if source_scalar else meta
    source_stacked = not any(k.isdigit() for k in trunk_meta.get("blocks", {}))

    def get(tree: dict, keys: tuple[str, ...]):
        for k in keys:
            if not isinstance(tree, dict) or k not in tree:
                return None
            tree = tree[k]
        return tree

    # For every target leaf: the source keys of its pieces (several when per-layer leaves are stacked), or None.
    plan: list[tuple[tuple, Any, list[tuple[str, ...]], str]] = []
    target_stacked = cfg.scan_layers
    for tpath, var in _flat(abstract):
        spath = _source_path(tpath, source_scalar)
        how = "same"
        if "blocks" in spath and source_stacked != target_stacked:
            b = spath.index("blocks")
            if target_stacked:  # per-layer source leaves -> one stacked leaf
                keys = [(*spath[: b + 1], str(i), *spath[b + 1 :]) for i in range(cfg.n_layers)]
                how = "stack"
            else:  # a stacked source leaf -> this layer's slice
                keys = [(*spath[: b + 1], *spath[b + 2 :])]
                how = f"index:{spath[b + 1]}"
        else:
            keys = [spath]
        if all(get(meta, (*k, "value")) is not None for k in keys):
            plan.append((tpath, var, keys, how))

    target: dict = {}
    for _, var, keys, how in plan:
        axes = var.get_metadata()["axes"]
        if how == "stack":
            shape, names = var.shape[1:], axes[1:]
        elif how.startswith("index"):
            shape, names = (cfg.n_layers, *var.shape), ("layers", *axes)
        else:
            shape, names = var.shape, axes
        for k in keys:
            saved_shape = tuple(get(meta, (*k, "value")).shape)
            if saved_shape != tuple(shape):
                raise CheckpointError(
                    f"model.init_from: {step_dir}: parameter {'/'.join(k)} has shape {saved_shape}, the model "
                    f"needs {tuple(shape)}"
                )
            node = target
            for part in (*prefix, *k):
                node = node.setdefault(part, {})
            node["value"] = jax.ShapeDtypeStruct(shape, np.float32, sharding=rules.sharding(names, shape))
    restored = checkpoint.restore_params(step_dir, target, item)
    out: dict[tuple, jax.Array] = {}
    for tpath, var, keys, how in plan:
        pieces = [get(restored, (*prefix, *k, "value")) for k in keys]
        if how == "stack":
            sharding = rules.sharding(var.get_metadata()["axes"], var.shape)
            out[tpath] = jax.jit(lambda *xs: jax.numpy.stack(xs), out_shardings=sharding)(*pieces)
        elif how.startswith("index"):
            i = int(how.split(":")[1])
            sharding = rules.sharding(var.get_metadata()["axes"], var.shape)
            out[tpath] = jax.jit(lambda x, i=i: x[i], out_shardings=sharding)(pieces[0])
        else:
            out[tpath] = pieces[0]
    return out


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
