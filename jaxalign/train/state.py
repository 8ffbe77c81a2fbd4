"""The train state (a pytree) and the parts of a train step every objective shares.

`TrainState` holds everything a resumed run needs besides the data iterator: the step, params, optimizer state,
the RNG key and the update guard (rolling loss window, skipped-step count). The graphdef and the optax
transformation are static fields.

Objectives write `loss_fn(params, batch) -> (loss_sum, (weight, metric_sums))`; `grad_step` splits the batch into
microbatches, sums, and divides by the total weight, so accumulation gives the same update as one big batch. Metrics
follow the convention of `jaxalign.losses` (sums by the weight, `Mean(sum, count)`, `Min`, `Max`).

EMA (`train.ema_decay` = d > 0): `ema` holds an exponential moving average of the params, updated in the jitted step
right after the optimizer update, `ema_t = d * ema_{t-1} + (1 - d) * params_t`, with `ema_0` = the initial params
(so no debiasing is needed: the average starts at a real point, not at zero). It is computed in float32 whatever
the params' dtype, is sharded like the params, checkpointed with them and restored bitwise. A skipped step (non-finite
loss or gradients, a loss spike) leaves it unchanged, as it leaves the params. With d = 0 `ema` is None (nothing is
stored). LoRA runs are refused (`Config` check): their EMA would be an average of adapters, which is not the
average of the merged weights.

Params with LoRA adapters (`jaxalign.peft.lora`): only the adapter leaves are differentiated, sit in the optimizer
(its state is shaped like them alone) and are updated; the frozen base passes through unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxalign import losses
from jaxalign.config import OptimConfig
from jaxalign.models.transformer import param_shardings
from jaxalign.parallel import pipeline
from jaxalign.parallel.mesh import Rules, replicated
from jaxalign.peft import lora
from jaxalign.train import optim

Batch = dict[str, jax.Array]
LossFn = Callable[[nnx.State, Batch], tuple[jax.Array, tuple[jax.Array, dict[str, jax.Array]]]]


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState
    rng: jax.Array
    guard: dict[str, jax.Array]
    graphdef: nnx.GraphDef = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
    schedule: optax.Schedule = flax.struct.field(pytree_node=False)
    # The EMA of the params (module doc; None when off) and its decay d (static: part of the compiled step).
    ema: nnx.State | None = None
    ema_decay: float = flax.struct.field(pytree_node=False, default=0.0)

    @property
    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.params)


def create(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    cfg: OptimConfig,
    total_steps: int,
    seed: int,
    ema_decay: float = 0.0,
) -> TrainState:
    """A fresh state around already-sharded `params`; optimizer moments (and the EMA, a float32 copy of `params`
    when `ema_decay` > 0) inherit the params' shardings."""
    trainable = lora.split_trainable(params)[0] if lora.is_adapted(params) else params
    tx = optim.make_optimizer(cfg, total_steps, trainable)
    guard = optim.spike_window_init(cfg.spike_window)
    guard["skipped"] = jnp.zeros((), jnp.int32)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(trainable),
        rng=jax.random.PRNGKey(seed),
        guard=guard,
        graphdef=graphdef,
        tx=tx,
        schedule=optim.schedule(cfg, total_steps),
        ema=jax.tree.map(lambda p: p.astype(jnp.float32), params) if ema_decay > 0 else None,
        ema_decay=ema_decay,
    )


def create_sharded(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    cfg: OptimConfig,
    total_steps: int,
    seed: int,
    rules: Rules,
    ema_decay: float = 0.0,
) -> tuple[TrainState, Any]:
    """Creates the state in one jitted call with explicit output shardings; returns (state, its shardings)."""
    make = lambda p: create(graphdef, p, cfg, total_steps, seed, ema_decay)
    shardings = state_shardings(jax.eval_shape(make, params), rules)
    state = jax.jit(make, out_shardings=shardings)(params)
    return state, shardings


def state_shardings(state: TrainState, rules: Rules) -> Any:
    """Params and everything shaped like them (Adam moments) follow the params' logical axes; the rest is
    replicated."""

    def leaf_sharding(x):
        if isinstance(x, nnx.Variable):
            return param_shardings(x, rules)
        return replicated(rules.mesh)

    return jax.tree.map(leaf_sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def grad_step(
    loss_fn: LossFn, params: nnx.State, batch: Batch, microbatches: int, rng: jax.Array | None = None
):
    """Mean gradient, mean loss and mean metrics over `batch`, accumulated over `microbatches` splits.

    Returns (grads, loss, metrics) where each is the weight-normalised mean over the whole batch; metrics follow
    `losses.finalize_metrics` (sums by the weight, `Mean` by its own count, `Min`/`Max` as extrema). With adapters,
    `grads` holds only the adapter leaves (module doc), and `rng` (a key for this step) drives LoRA dropout.
    """
    if lora.is_adapted(params):
        trainable, frozen = lora.split_trainable(params)
        full_loss = loss_fn

        def loss_fn(t, b):
            # Each microbatch draws its own dropout masks: its index rides along as a per-row batch entry.
            key = None if rng is None else jax.random.fold_in(rng, b["_micro"][0])
            b = {k: v for k, v in b.items() if k != "_micro"}
            with lora.training(key):
                return full_loss(lora.merge_trainable(t, frozen), b)

        params = trainable
        if rng is not None:
            rows = jax.tree.leaves(batch)[0].shape[0]
            # Row r lands in microbatch r % microbatches (the split below).
            batch = {
                **batch,
                "_micro": jnp.tile(jnp.arange(microbatches, dtype=jnp.int32), rows // microbatches),
            }
    value_and_grad = pipeline.value_and_grad(loss_fn)
    if microbatches == 1:
        (loss_sum, (weight, sums)), grads = value_and_grad(params, batch)
    else:
        # Microbatch j takes rows j, j + n, j + 2n, ...: each microbatch stays spread over the data-parallel devices.
        split = jax.tree.map(
            lambda x: x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1), batch
        )

        def body(carry, micro):
            (loss, (w, s)), g = value_and_grad(params, micro)
            c_g, c_loss, c_w, c_s = carry
            return (jax.tree.map(jnp.add, c_g, g), c_loss + loss, c_w + w, losses.merge_metrics(c_s, s)), None

        g0, l0, w0, s0 = jax.eval_shape(lambda: _first(value_and_grad, params, split))
        zeros = lambda t: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), t)
        s_init = losses.metrics_identity(zeros(s0))
        (grads, loss_sum, weight, sums), _ = jax.lax.scan(
            body, (zeros(g0), zeros(l0), zeros(w0), s_init), split
        )
    weight = jnp.maximum(weight, 1e-9)
    grads = jax.tree.map(lambda g: g / weight, grads)
    return grads, loss_sum / weight, losses.finalize_metrics(sums, weight)


def _first(value_and_grad, params, split):
    (loss, (w, s)), g = value_and_grad(params, jax.tree.map(lambda x: x[0], split))
    return g, loss, w, s


def update_ema(ema: nnx.State, params: nnx.State, decay: float) -> nnx.State:
    """One EMA step (module doc): `decay * ema + (1 - decay) * params`, in float32."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p.astype(jnp.float32), ema, params)


def apply_gradients(
    state: TrainState, grads: nnx.State, loss: jax.Array, cfg: OptimConfig
) -> tuple[TrainState, dict[str, jax.Array]]:
    """Applies the optimizer update unless the loss or gradients are non-finite or (optionally) the loss spikes;
    a skipped step keeps params and optimizer state and is counted. The step always advances."""
    finite = jnp.isfinite(loss) & optim.tree_all_finite(grads)
    spike = optim.is_spike(state.guard, loss, cfg.spike_sigma) if cfg.spike_skip else jnp.array(False)
    skip = ~finite | spike
    if lora.is_adapted(state.params):
        trainable, frozen = lora.split_trainable(state.params)
        updates, opt_state = state.tx.update(grads, state.opt_state, trainable)
        params = lora.merge_trainable(optax.apply_updates(trainable, updates), frozen)
    else:
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(skip, o, n), new, old)
    window = optim.spike_window_push(state.guard, loss)
    guard = {
        "losses": jnp.where(skip, state.guard["losses"], window["losses"]),
        "index": jnp.where(skip, state.guard["index"], window["index"]),
        "skipped": state.guard["skipped"] + skip.astype(jnp.int32),
    }
    new_params = keep(params, state.params)
    new_state = state.replace(
        step=state.step + 1,
        params=new_params,
        opt_state=keep(opt_state, state.opt_state),
        guard=guard,
        ema=None
        if state.ema is None
        else keep(update_ema(state.ema, new_params, state.ema_decay), state.ema),
    )
    metrics = {
        "grad_norm": optax.tree.norm(grads),
        # The learning rate this step's update was computed with: optax's count advances only when an update is
        # applied (a skipped step keeps the optimizer state).
        "lr": state.schedule(state.step - state.guard["skipped"]),
        "nonfinite": (~finite).astype(jnp.int32),
        "skipped": skip.astype(jnp.int32),
        "skipped_total": guard["skipped"],
    }
    return new_state, metrics
