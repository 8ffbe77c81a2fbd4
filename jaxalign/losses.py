"""Every training objective as a pure function: the audited core.

Shape suffixes: B batch, T length, N = B * T tokens, V vocabulary. Losses return sums and the weight to divide them
by (token or example counts), so gradient accumulation over microbatches is exact; `train.state.grad_step` divides.
Names and semantics follow TRL where TRL has the same objective.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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


def sft_loss(logps_BxT: jax.Array, mask_BxT: jax.Array) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Supervised fine-tuning: NLL summed over loss tokens; weight = the loss-token count of the (micro)batch, so
    accumulation and data parallelism give the gradient of one big batch (TRL's `num_items_in_batch`)."""
    mask_BxT = mask_BxT.astype(jnp.float32)
    return -jnp.sum(logps_BxT * mask_BxT), jnp.sum(mask_BxT), {}


def bradley_terry_loss(
    rewards_chosen_B: jax.Array,
    rewards_rejected_B: jax.Array,
    *,
    margin_B: jax.Array | None = None,
    center_coef: float = 0.0,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Reward modelling (TRL RewardTrainer): `-logsigmoid(r_c - r_r - margin)` per pair plus
    `center_coef * (r_c + r_r)^2`; weight = the number of pairs."""
    diff_B = rewards_chosen_B - rewards_rejected_B
    if margin_B is not None:
        diff_B = diff_B - margin_B
    loss_B = -jax.nn.log_sigmoid(diff_B)
    if center_coef:
        loss_B = loss_B + center_coef * jnp.square(rewards_chosen_B + rewards_rejected_B)
    metrics = {
        "accuracy": jnp.sum((rewards_chosen_B > rewards_rejected_B).astype(jnp.float32)),
        "margin": jnp.sum(rewards_chosen_B - rewards_rejected_B),
        "rewards/chosen": jnp.sum(rewards_chosen_B),
        "rewards/rejected": jnp.sum(rewards_rejected_B),
    }
    return jnp.sum(loss_B), jnp.asarray(rewards_chosen_B.shape[0], jnp.float32), metrics
