"""LoRA adapters on the NNX `Transformer`, used functionally like the rest of the model (graphdef + params).

`attach(graphdef, params, cfg, rules, seed)` adds, for every weight matrix whose module path matches `lora.targets`,
a `Lora` module next to it (attribute `<name>_lora`: `blocks/attn/wq` gets `blocks/attn/wq_lora/{a,b,seed}`) and, with
`lora.quantize="nf4"`, replaces the matched weight by an `nf4.Nf4Weight`. The projections in
`models/transformer.py` go through `dense`, which adds the adapter's term when the module has one:

    y_NxO = x_NxI @ W_IxO + scale * dropout(x_NxI) @ a_RxI.T @ b_OxR.T,   scale = alpha / rank

a is drawn like PEFT's (kaiming-uniform, bound 1/sqrt(I)); b starts at zero, so a fresh adapter leaves the logits
exactly unchanged. a's input axis carries the base weight's input logical axis and b's output axis its output axis;
the rank axis is unsharded (None), so the base's rules shard the adapters. Stacked (scanned) layers give the adapters
a leading `layers` axis like every other block parameter.

Training: once a model has adapters, only `LoraParam` leaves are trainable (`trainable_filter`): `train/state.py`
differentiates and optimises only those, so the frozen base has neither gradients nor optimizer state, and
checkpoints (`train/checkpoint.py`) hold only them. Dropout is active only while `training(key)` is entered (the
gradient pass of `state.grad_step`); sampling, reference and evaluation passes never enter it.

Shape legend: N tokens, I input features, O output features, R rank, L layers.
"""

from __future__ import annotations

import contextlib
import math
import re
import zlib
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign.config import LoraConfig
from jaxalign.errors import ConfigError
from jaxalign.parallel.mesh import Rules
from jaxalign.peft import nf4

# The projection weights an adapter can attach to (module attribute names).
PROJECTIONS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


class LoraParam(nnx.Param):
    """An adapter weight: the only trainable leaves of a model that has adapters."""


class LoraSeed(nnx.Variable):
    """A per-adapter (per-layer) integer folded into the dropout key, so that every adapter draws its own mask."""


class Lora(nnx.Module):
    """a (..., R, I) and b (..., O, R) of one weight matrix, PEFT's layout (lora_A.weight, lora_B.weight)."""

    def __init__(
        self,
        key: jax.Array,
        lead: tuple[int, ...],
        shape_IxO: tuple[int, int],
        axes: tuple,
        rank: int,
        alpha: float,
        dropout: float,
        seed: int,
    ):
        n_in, n_out = shape_IxO
        lead_axes, in_axis, out_axis = tuple(axes[:-2]), axes[-2], axes[-1]
        bound = 1.0 / math.sqrt(n_in)
        self.a = LoraParam(
            jax.random.uniform(key, (*lead, rank, n_in), jnp.float32, -bound, bound),
            axes=(*lead_axes, None, in_axis),
        )
        self.b = LoraParam(jnp.zeros((*lead, n_out, rank), jnp.float32), axes=(*lead_axes, out_axis, None))
        n = math.prod(lead)
        self.seed = LoraSeed((seed * 1000 + jnp.arange(n, dtype=jnp.int32)).reshape(lead), axes=lead_axes)
        self.scale = alpha / rank
        self.dropout = dropout

    def __call__(self, x_NxI: jax.Array) -> jax.Array:
        key = _TRAINING[-1] if _TRAINING else None
        if self.dropout > 0 and key is not None:
            keep = 1.0 - self.dropout
            mask = jax.random.bernoulli(jax.random.fold_in(key, self.seed[...]), keep, x_NxI.shape)
            x_NxI = jnp.where(mask, x_NxI / keep, 0).astype(x_NxI.dtype)
        dtype = x_NxI.dtype
        h_NxR = x_NxI @ self.a[...].T.astype(dtype)
        return (h_NxR @ self.b[...].T.astype(dtype)) * jnp.asarray(self.scale, dtype)

    def delta(self) -> jax.Array:
        """scale * a.T @ b.T: the (..., I, O) update the adapter adds to its weight."""
        return self.scale * jnp.einsum("...ri,...or->...io", self.a[...], self.b[...])


# Dropout keys of the gradient passes being traced (a stack: `training` nests).
_TRAINING: list[jax.Array] = []


@contextlib.contextmanager
def training(key: jax.Array | None) -> Iterator[None]:
    """Adapters traced inside apply dropout with `key` (None: no dropout)."""
    if key is None:
        yield
        return
    _TRAINING.append(key)
    try:
        yield
    finally:
        _TRAINING.pop()


def dense(module: nnx.Module, name: str, x_NxI: jax.Array) -> jax.Array:
    """x @ module.<name> (a float or NF4 weight), plus its adapter's term when the module has one."""
    w = getattr(module, name)
    y = nf4.matmul(x_NxI, w) if isinstance(w, nf4.Nf4Weight) else x_NxI @ w[...].astype(x_NxI.dtype)
    adapter = getattr(module, name + "_lora", None)
    return y if adapter is None else y + adapter(x_NxI)


def has_adapters(module: nnx.Module, names: tuple[str, ...] = PROJECTIONS) -> bool:
    """Whether any of `names` on `module` has an adapter or is quantised (then the fused decode path is off)."""
    return any(
        hasattr(module, n + "_lora") or isinstance(getattr(module, n, None), nf4.Nf4Weight) for n in names
    )


# --- attaching, merging ----------------------------------------------------------------------------------------------


def _path(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def weight_paths(model: nnx.Module) -> list[str]:
    """Module paths of every projection weight an adapter can attach to (what `lora.targets` is matched against)."""
    return [
        _path(path)
        for path, node in nnx.iter_graph(model)
        if path and path[-1] in PROJECTIONS and isinstance(node, (nnx.Param, nf4.Nf4Weight))
    ]


def targets(model: nnx.Module, cfg: LoraConfig) -> list[str]:
    """The weight paths `cfg` adapts; a ConfigError (one line) when the regex matches none (listing the available
    paths) or an NF4 target's shape does not split into blocks."""
    pattern = re.compile(cfg.targets)
    available = weight_paths(model)
    chosen = [p for p in available if pattern.search(p)]
    if not chosen:
        shown = ", ".join(available[:12]) + (" ..." if len(available) > 12 else "")
        raise ConfigError(f"lora.targets={cfg.targets!r} matches no weight; module paths are: {shown}")
    if cfg.quantize == "nf4":
        shapes = {
            _path(path): tuple(node.shape)
            for path, node in nnx.iter_graph(model)
            if isinstance(node, nnx.Param)
        }
        for p in chosen:
            nf4.check_shape(p, shapes[p])
    return chosen


def add_adapters(model: nnx.Module, cfg: LoraConfig, seed: int) -> list[str]:
    """Mutates `model`: adapters on every projection matching `cfg.targets` (NF4 base with `cfg.quantize`).
    Returns the adapted paths (see `targets` for the errors)."""
    chosen = targets(model, cfg)
    parents = {_path(path): node for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Module)}
    key = jax.random.key(seed)
    for i, p in enumerate(chosen):
        parent_path, _, name = p.rpartition("/")
        parent = parents[parent_path]
        var = getattr(parent, name)
        axes = var.get_metadata()["axes"]
        lead = tuple(var.shape[:-2])
        if cfg.quantize == "nf4":
            setattr(parent, name, nf4.Nf4Weight(var[...], axes))
        digest = zlib.crc32(p.encode())
        adapter = Lora(
            jax.random.fold_in(key, digest),
            lead,
            tuple(var.shape[-2:]),
            axes,
            cfg.rank,
            cfg.alpha,
            cfg.dropout,
            seed=i + 1,
        )
        setattr(parent, name + "_lora", adapter)
    # A scalar model's head (models/heads.py) is new for the task: it trains in full (PEFT's `modules_to_save`).
    for name in ("head", "head_bias"):
        var = getattr(model, name, None)
        if isinstance(var, nnx.Param):
            setattr(model, name, LoraParam(var[...], axes=var.get_metadata()["axes"]))
    return chosen


def attach(
    graphdef: nnx.GraphDef, params: nnx.State, cfg: LoraConfig, rules: Rules, seed: int
) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params) of the model with adapters (module doc), built in one jitted call straight into the rules'
    shardings; `params` are donated (the frozen base is reused or replaced by its NF4 storage)."""

    targets(nnx.merge(graphdef, params), cfg)  # config errors raised here, outside any trace, stay one line

    def build(p):
        model = nnx.merge(graphdef, p)
        add_adapters(model, cfg, seed)
        return nnx.split(model)

    from jaxalign.models.transformer import param_shardings

    new_graphdef, abstract = jax.eval_shape(build, params)
    shardings = param_shardings(abstract, rules)
    # Donated: unquantised base weights are passed through in place (NF4 ones are replaced, not reused).
    donate = (0,) if cfg.quantize == "none" else ()
    new_params = jax.jit(lambda p: build(p)[1], out_shardings=shardings, donate_argnums=donate)(params)
    return new_graphdef, new_params


def merge(model: nnx.Module) -> nnx.Module:
    """Folds every adapter into its weight (NF4 weights are dequantised) and removes the adapters, in place: the
    result is a plain model with the same outputs and no adapter overhead. Returns `model`."""
    for _, node in list(nnx.iter_graph(model)):
        if not isinstance(node, nnx.Module) or isinstance(node, (Lora, nf4.Nf4Weight)):
            continue
        for name in PROJECTIONS:
            w = getattr(node, name, None)
            if w is None:
                continue
            adapter = getattr(node, name + "_lora", None)
            if isinstance(w, nf4.Nf4Weight):
                axes = w.codes.get_metadata()["axes"]
                value = w.dequantize()
            else:
                axes, value = w.get_metadata()["axes"], w[...]
            if adapter is not None:
                value = value + adapter.delta()
                delattr(node, name + "_lora")
            setattr(node, name, nnx.Param(value, axes=axes))
    return model


def unmerge(model: nnx.Module, adapters: dict[str, Lora]) -> nnx.Module:
    """Undoes `merge` of float weights: subtracts each adapter's update again and puts the adapter back.
    `adapters` maps module path -> the `Lora` that `merge` folded in (see `adapters`)."""
    parents = {_path(path): node for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Module)}
    for p, adapter in adapters.items():
        parent_path, _, name = p.rpartition("/")
        parent = parents[parent_path]
        w = getattr(parent, name)
        w.set_value(w[...] - adapter.delta())
        setattr(parent, name + "_lora", adapter)
    return model


def adapters(model: nnx.Module) -> dict[str, Lora]:
    """Module path of the adapted weight -> its `Lora` module."""
    return {
        _path(path)[: -len("_lora")]: node
        for path, node in nnx.iter_graph(model)
        if isinstance(node, Lora) and str(path[-1]).endswith("_lora")
    }


# --- the trainable part ---------------------------------------------------------------------------------------------


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def is_adapted(params: Any) -> bool:
    """Whether a params state (or a tree holding one) has adapter leaves."""
    return any(isinstance(v, LoraParam) for v in jax.tree.leaves(params, is_leaf=_is_var))


def split_trainable(params: Any) -> tuple[Any, Any]:
    """(trainable, frozen) parts of a params state with adapters (or of a dict of them, PPO's policy and value);
    `merge_trainable` puts them back together."""
    if isinstance(params, dict) and not isinstance(params, nnx.State):
        parts = {k: split_trainable(v) for k, v in params.items()}
        return {k: p[0] for k, p in parts.items()}, {k: p[1] for k, p in parts.items()}
    return nnx.split_state(params, LoraParam, ...)


def merge_trainable(trainable: Any, frozen: Any) -> Any:
    """The inverse of `split_trainable`."""
    if isinstance(trainable, dict) and not isinstance(trainable, nnx.State):
        return {k: merge_trainable(v, frozen[k]) for k, v in trainable.items()}
    return nnx.merge_state(trainable, frozen)


def disabled(params: nnx.State) -> nnx.State:
    """The params with every adapter's b set to zero: exactly the base model's outputs (the reference of
    DPO/KTO/PPO/GRPO), sharing the base's arrays (no copy of the weights)."""
    flat = [
        (
            path,
            var.replace(jnp.zeros_like(var[...])) if isinstance(var, LoraParam) and path[-1] == "b" else var,
        )
        for path, var in nnx.to_flat_state(params)
    ]
    return nnx.from_flat_state(flat)
