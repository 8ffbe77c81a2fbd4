"""The loss convention (`Mean`, `Min`, `Max`, merging and finalising metrics), token log-probs, causal-LM, SFT and
Bradley-Terry losses. Package doc: `jaxalign.losses`."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxalign.errors import ConfigError

Metrics = dict[str, object]
LossOut = tuple[jax.Array, jax.Array, Metrics]


class Mean(NamedTuple):
    """A metric `sum / count` whose denominator is not the loss weight; both parts add over microbatches."""

    sum: jax.Array
    count: jax.Array


class Min(NamedTuple):
    """A metric reduced with `min` over microbatches (never divided)."""

    value: jax.Array


class Max(NamedTuple):
    """A metric reduced with `max` over microbatches (never divided)."""

    value: jax.Array


def merge_metrics(a: Metrics, b: Metrics) -> Metrics:
    """Combines the metric sums of two microbatches: sums add, `Min`/`Max` take the extremum."""

    def merge(x, y):
        if isinstance(x, Min):
            return Min(jnp.minimum(x.value, y.value))
        if isinstance(x, Max):
            return Max(jnp.maximum(x.value, y.value))
        return jax.tree.map(jnp.add, x, y)

    return {k: merge(a[k], b[k]) for k in a}


def metrics_identity(m: Metrics) -> Metrics:
    """The neutral element of `merge_metrics` with the structure of `m` (a scan carry's initial value)."""

    def ident(x):
        if isinstance(x, Min):
            return Min(jnp.full_like(x.value, jnp.inf))
        if isinstance(x, Max):
            return Max(jnp.full_like(x.value, -jnp.inf))
        return jax.tree.map(jnp.zeros_like, x)

    return {k: ident(v) for k, v in m.items()}


def finalize_metrics(m: Metrics, weight: jax.Array) -> dict[str, jax.Array]:
    """Turns merged metric sums into TRL's logged values: `s / weight`, `sum / max(count, 1)`, or the extremum."""

    def final(x):
        if isinstance(x, Mean):
            return x.sum / jnp.maximum(x.count, 1.0)
        if isinstance(x, Min | Max):
            return x.value
        return x / jnp.maximum(weight, 1e-9)

    return {k: final(v) for k, v in m.items()}


def token_logps(logits_NxV: jax.Array, targets_N: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Log-probabilities of `targets_N` under `logits_NxV` (float32) and the log-partition `lse_N`."""
    logits_NxV = logits_NxV.astype(jnp.float32)
    lse_N = jax.nn.logsumexp(logits_NxV, axis=-1)
    target_logit_N = jnp.take_along_axis(logits_NxV, targets_N[:, None], axis=-1)[:, 0]
    return target_logit_N - lse_N, lse_N


def causal_lm_loss(
    logits_NxV: jax.Array, targets_N: jax.Array, weights_N: jax.Array, z_loss: float = 0.0
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Summed next-token cross-entropy over tokens with nonzero weight, plus an optional z-loss
    `z_loss * lse^2` (PaLM) that keeps the softmax normaliser near 1.

    Returns (loss_sum, weight_sum, metric_sums) with `metric_sums["nll"]` the cross-entropy part alone.
    """
    logp_N, lse_N = token_logps(logits_NxV, targets_N)
    return causal_lm_loss_from_logps(logp_N, lse_N, weights_N, z_loss)


def causal_lm_loss_from_logps(
    logps: jax.Array, lse: jax.Array, weights: jax.Array, z_loss: float = 0.0
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """`causal_lm_loss` from per-token target log-probs and log-partitions (any shape, e.g. [B, T] from the
    chunked `models.logps.target_logps`)."""
    weights = weights.astype(jnp.float32)
    nll = -jnp.sum(logps * weights)
    loss = nll
    metrics = {"nll": nll}
    if z_loss:
        z = z_loss * jnp.sum(jnp.square(lse) * weights)
        loss = loss + z
        metrics["z_loss"] = z
    return loss, jnp.sum(weights), metrics


def _f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _choice(name: str, value: str, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ConfigError(f"{name}={value!r} is not supported; accepted: {', '.join(accepted)}")


# ----------------------------------------------------------------------------------------------------------------
# Supervised fine-tuning and reward modelling
# ----------------------------------------------------------------------------------------------------------------


def sft_loss(
    logps_BxT: jax.Array,
    mask_BxT: jax.Array,
    *,
    entropy_BxT: jax.Array | None = None,
    is_top1_BxT: jax.Array | None = None,
) -> LossOut:
    """TRL SFTTrainer: NLL summed over loss tokens; weight = loss-token count (TRL's `num_items_in_batch`), so the
    accumulated loss is the token mean over the whole batch. Optional per-token entropies (nats) and top-1 hits give
    TRL's `entropy` and `mean_token_accuracy` (token means)."""
    mask_BxT = _f32(mask_BxT)
    metrics: Metrics = {}
    if entropy_BxT is not None:
        metrics["entropy"] = jnp.sum(jax.lax.stop_gradient(entropy_BxT) * mask_BxT)
    if is_top1_BxT is not None:
        metrics["mean_token_accuracy"] = jnp.sum(_f32(is_top1_BxT) * mask_BxT)
    return -jnp.sum(logps_BxT * mask_BxT), jnp.sum(mask_BxT), metrics


def bradley_terry_loss(
    rewards_chosen_B: jax.Array,
    rewards_rejected_B: jax.Array,
    *,
    margin_B: jax.Array | None = None,
    center_coef: float = 0.0,
) -> LossOut:
    """TRL RewardTrainer: `-logsigmoid(r_c - r_r - margin) + center_coef * (r_c + r_r)^2` per pair; weight = pairs.
    Metrics `accuracy`, `margin`, `mean_reward` (over chosen and rejected), `min_reward`, `max_reward`."""
    r_c, r_r = _f32(rewards_chosen_B), _f32(rewards_rejected_B)
    diff_B = r_c - r_r if margin_B is None else r_c - r_r - margin_B
    per_pair_B = -jax.nn.log_sigmoid(diff_B)
    if center_coef:
        per_pair_B = per_pair_B + center_coef * jnp.square(r_c + r_r)
    sg_c, sg_r = jax.lax.stop_gradient(r_c), jax.lax.stop_gradient(r_r)
    metrics: Metrics = {
        "accuracy": jnp.sum((sg_c > sg_r).astype(jnp.float32)),
        "margin": jnp.sum(sg_c - sg_r),
        "mean_reward": jnp.sum(sg_c + sg_r) / 2,  # a mean over 2B rewards with weight B
        "min_reward": Min(jnp.minimum(jnp.min(sg_c), jnp.min(sg_r))),
        "max_reward": Max(jnp.maximum(jnp.max(sg_c), jnp.max(sg_r))),
    }
    return jnp.sum(per_pair_B), jnp.float32(r_c.shape[0]), metrics
