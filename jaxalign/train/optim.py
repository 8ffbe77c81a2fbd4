"""The optimizer: optax AdamW with warmup + cosine, global-norm clipping and a weight-decay mask, plus the guards
that decide whether a step's update is applied (non-finite loss or gradients; an optional loss-spike skip).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxalign.config import OptimConfig


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine decay to `lr * min_lr_ratio` at `decay_steps` (default: the end)."""
    decay_steps = cfg.decay_steps or total_steps
    warmup = min(cfg.warmup_steps, max(decay_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(decay_steps, warmup + 1),
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def decay_mask(params: nnx.State) -> nnx.State:
    """True where weight decay applies: weight matrices, not norms, biases or (stacked) vectors."""

    def decays(v: nnx.Variable) -> bool:
        axes = v.get_metadata()["axes"]
        return len([a for a in axes if a != "layers"]) >= 2 and "norm" not in axes

    return jax.tree.map(lambda v: v.replace(decays(v)), params, is_leaf=_is_var)


def make_optimizer(cfg: OptimConfig, total_steps: int, params: nnx.State) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm > 0 else optax.identity(),
        optax.adamw(
            schedule(cfg, total_steps),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask(params),
        ),
    )


def spike_window_init(window: int) -> dict[str, jax.Array]:
    """Rolling window of recent accepted losses (NaN = empty slot)."""
    return {"losses": jnp.full((window,), jnp.nan, jnp.float32), "index": jnp.zeros((), jnp.int32)}


def is_spike(window: dict[str, jax.Array], loss: jax.Array, sigma: float) -> jax.Array:
    """True when `loss` exceeds mean + sigma * std of the window (needs at least half the window filled)."""
    losses = window["losses"]
    filled = jnp.sum(~jnp.isnan(losses))
    mean = jnp.nanmean(losses)
    std = jnp.nanstd(losses)
    return (filled >= losses.shape[0] // 2) & (loss > mean + sigma * std + 1e-6)


def spike_window_push(window: dict[str, jax.Array], loss: jax.Array) -> dict[str, jax.Array]:
    size = window["losses"].shape[0]
    return {
        "losses": window["losses"].at[window["index"] % size].set(loss.astype(jnp.float32)),
        "index": window["index"] + 1,
    }


def tree_all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)
