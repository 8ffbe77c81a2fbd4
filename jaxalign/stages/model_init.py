"""The model and train state a stage starts from, and the frozen reference of the preference and RL stages.

    graphdef, params = init_params(config, rules)      random, `hf:` or `ckpt:` weights, placed in their shardings
                                                       (+ LoRA adapters / an NF4 base when `lora.rank > 0`)
    graphdef, state, shardings, fresh = train_state(config, rules, "sft")
                                                       a fresh state, or an abstract one a checkpoint restores onto
    ref = reference_params(config, rules, state, shardings, fresh)
                                                       the initial policy (a `BaseReference` with LoRA)

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

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign.config import Config, ModelConfig
from jaxalign.errors import CheckpointError
from jaxalign.models.heads import ScalarModel
from jaxalign.models.transformer import Transformer, param_shardings
from jaxalign.parallel.mesh import Rules
from jaxalign.train import checkpoint

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
