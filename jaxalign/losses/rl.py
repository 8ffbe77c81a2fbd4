"""Reinforcement learning: KL estimators, GRPO family (DAPO, Dr. GRPO, GSPO), PPO pieces. Package doc: `jaxalign.losses`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxalign.errors import ConfigError
from jaxalign.losses.core import LossOut, Max, Mean, Metrics, Min, _choice, _f32


def kl_k1(logps_BxT: jax.Array, ref_logps_BxT: jax.Array) -> jax.Array:
    """Schulman's k1 = log(pi / pi_ref) per token: unbiased for KL(pi || pi_ref) on tokens sampled from pi."""
    return logps_BxT - ref_logps_BxT


def kl_k2(logps_BxT: jax.Array, ref_logps_BxT: jax.Array) -> jax.Array:
    """Schulman's k2 = 0.5 * log(pi / pi_ref)^2 per token: >= 0, low variance, biased."""
    return 0.5 * jnp.square(logps_BxT - ref_logps_BxT)


def kl_k3(logps_BxT: jax.Array, ref_logps_BxT: jax.Array) -> jax.Array:
    """Schulman's k3 = r - 1 - log r with r = pi_ref / pi, per token: >= 0 and unbiased for KL(pi || pi_ref)
    (GRPO's per-token KL)."""
    d = ref_logps_BxT - logps_BxT
    return jnp.exp(d) - d - 1


GRPO_SCALES = ("group", "batch", "none")


def grpo_advantages(rewards_PxG: jax.Array, *, scale: str = "group") -> jax.Array:
    """TRL 1.16 GRPOTrainer advantages (`multi_objective_aggregation="sum_then_normalize"`), [P, G]: reward minus its
    group mean, divided by `std + 1e-4` with Bessel-corrected std over the group (`"group"`) or over all P * G
    rewards (`"batch"`); `"none"` only centres (Dr. GRPO). A std over a single value is taken as 0, as in TRL."""
    _choice("scale_rewards", scale, GRPO_SCALES)
    rewards_PxG = _f32(rewards_PxG)
    centred_PxG = rewards_PxG - jnp.mean(rewards_PxG, axis=1, keepdims=True)
    if scale == "none":
        return centred_PxG
    if scale == "group":
        std = jnp.std(rewards_PxG, axis=1, keepdims=True, ddof=1) if rewards_PxG.shape[1] > 1 else 0.0
    else:
        std = jnp.std(rewards_PxG, ddof=1) if rewards_PxG.size > 1 else 0.0
    return centred_PxG / (std + 1e-4)


def grpo_reward_metrics(rewards_PxG: jax.Array, *, scale: str = "group") -> dict[str, jax.Array]:
    """TRL GRPOTrainer's logged `reward`, `reward_std` (Bessel) and `frac_reward_zero_std` (the fraction of
    completions whose scaling std, group or batch as `scale`, is 0) for one generation batch (final values)."""
    _choice("scale_rewards", scale, GRPO_SCALES)
    rewards_PxG = _f32(rewards_PxG)
    P, G = rewards_PxG.shape
    if scale == "batch":
        std_P = jnp.full((P,), jnp.std(rewards_PxG, ddof=1) if rewards_PxG.size > 1 else 0.0)
    else:
        std_P = jnp.std(rewards_PxG, axis=1, ddof=1) if G > 1 else jnp.zeros((P,))
    return {
        "reward": jnp.mean(rewards_PxG),
        "reward_std": jnp.std(rewards_PxG, ddof=1),
        # TRL counts a std as zero with torch.isclose(std, 0): |std| <= 1e-8.
        "frac_reward_zero_std": jnp.mean((jnp.abs(std_P) <= 1e-8).astype(jnp.float32)),
    }


GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IS_LEVELS = ("token", "sequence")


def grpo_loss(
    logps_BxT: jax.Array,
    old_logps_BxT: jax.Array | None,
    ref_logps_BxT: jax.Array | None,
    advantages_B: jax.Array,
    mask_BxT: jax.Array,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    loss_type: str = "dapo",
    max_completion_length: int | None = None,
    importance_sampling_level: str = "token",
    entropy_BxT: jax.Array | None = None,
) -> LossOut:
    """TRL 1.16 GRPOTrainer clipped surrogate: per token `-min(w * A, clip(w, 1 - eps, 1 + eps_high) * A)` plus
    `beta * k3(policy || ref)`, where `w = exp(logp - old_logp)` per token, or (`importance_sampling_level=
    "sequence"`, GSPO) the exp of the sequence's mean log-ratio. `old_logps_BxT=None` means on-policy (the detached
    policy log-probs, as TRL when `num_iterations == 1`).

    Aggregation and weight by `loss_type`: `grpo` each sequence's token mean, averaged over sequences (weight = B);
    `bnpo` and `dapo` token mean over the batch (weight = tokens; TRL's bnpo averages per-microbatch means under
    accumulation, jaxalign gives the exact batch mean); `dr_grpo` token sum over `B * max_completion_length`
    (default T). Metrics: `kl` (beta > 0), `entropy` (if per-token entropies are given), `clip_ratio/low_mean`,
    `clip_ratio/high_mean`, `clip_ratio/region_mean` (`Mean` over tokens, or over sequences for GSPO),
    `clip_ratio/low_min` and `clip_ratio/high_max` (`Min`/`Max` over sequences of their per-sequence mean)."""
    _choice("loss_type", loss_type, GRPO_LOSS_TYPES)
    _choice("importance_sampling_level", importance_sampling_level, IS_LEVELS)
    if beta and ref_logps_BxT is None:
        raise ConfigError(f"beta={beta} needs ref_logps_BxT (reference log-probs), or beta=0")
    eps_low, eps_high = epsilon, epsilon if epsilon_high is None else epsilon_high
    mask_BxT = _f32(mask_BxT)
    tokens_B = jnp.sum(mask_BxT, axis=1)
    if old_logps_BxT is None:
        old_logps_BxT = jax.lax.stop_gradient(logps_BxT)
    log_ratio_BxT = logps_BxT - old_logps_BxT
    if importance_sampling_level == "token":
        log_w = log_ratio_BxT
    else:  # [B, 1]: one weight per sequence
        log_w = (jnp.sum(log_ratio_BxT * mask_BxT, axis=1) / jnp.maximum(tokens_B, 1.0))[:, None]
    w = jnp.exp(log_w)
    A = _f32(advantages_B)[:, None]
    per_token = -jnp.minimum(w * A, jnp.clip(w, 1 - eps_low, 1 + eps_high) * A)
    metrics: Metrics = {}
    if beta:
        kl_BxT = kl_k3(logps_BxT, ref_logps_BxT)
        per_token = per_token + beta * kl_BxT
        metrics["kl"] = Mean(jnp.sum(jax.lax.stop_gradient(kl_BxT) * mask_BxT), jnp.sum(mask_BxT))
    per_token_BxT = jnp.broadcast_to(per_token, mask_BxT.shape) * mask_BxT
    if loss_type == "grpo":
        loss_sum = jnp.sum(jnp.sum(per_token_BxT, axis=1) / jnp.maximum(tokens_B, 1.0))
        weight = jnp.float32(mask_BxT.shape[0])
    elif loss_type == "dr_grpo":
        length = mask_BxT.shape[1] if max_completion_length is None else max_completion_length
        loss_sum, weight = jnp.sum(per_token_BxT), jnp.float32(mask_BxT.shape[0] * length)
    else:
        loss_sum, weight = jnp.sum(per_token_BxT), jnp.sum(mask_BxT)
    if entropy_BxT is not None:
        metrics["entropy"] = Mean(jnp.sum(jax.lax.stop_gradient(entropy_BxT) * mask_BxT), jnp.sum(mask_BxT))
    w = jax.lax.stop_gradient(w)
    low = ((w < 1 - eps_low) & (A < 0)).astype(jnp.float32)
    high = ((w > 1 + eps_high) & (A > 0)).astype(jnp.float32)
    region = jnp.maximum(low, high)
    if importance_sampling_level == "token":
        # An empty row gives NaN, skipped below as TRL's nanmin / nanmax skip it.
        seq_low_B = jnp.sum(low * mask_BxT, axis=1) / tokens_B
        seq_high_B = jnp.sum(high * mask_BxT, axis=1) / tokens_B

        def ratio(x):
            return Mean(jnp.sum(x * mask_BxT), jnp.sum(mask_BxT))
    else:
        seq_low_B, seq_high_B = low[:, 0], high[:, 0]

        def ratio(x):
            return Mean(jnp.sum(x), jnp.float32(x.shape[0]))

    metrics["clip_ratio/low_mean"] = ratio(low)
    metrics["clip_ratio/high_mean"] = ratio(high)
    metrics["clip_ratio/region_mean"] = ratio(region)
    metrics["clip_ratio/low_min"] = Min(jnp.min(jnp.where(jnp.isnan(seq_low_B), jnp.inf, seq_low_B)))
    metrics["clip_ratio/high_max"] = Max(jnp.max(jnp.where(jnp.isnan(seq_high_B), -jnp.inf, seq_high_B)))
    return loss_sum, weight, metrics


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of `x` over positions where `mask` is 1."""
    mask = _f32(mask)
    return jnp.sum(x * mask) / jnp.sum(mask)


def masked_whiten(values_BxT: jax.Array, mask_BxT: jax.Array, *, shift_mean: bool = True) -> jax.Array:
    """TRL's (PPOTrainer) advantage whitening: `(x - mean) / sqrt(var + 1e-8)` with the masked mean and the
    Bessel-corrected masked variance over the whole batch; `shift_mean=False` adds the mean back."""
    mask_BxT = _f32(mask_BxT)
    mean = masked_mean(values_BxT, mask_BxT)
    count = jnp.sum(mask_BxT)
    var = masked_mean(jnp.square(values_BxT - mean), mask_BxT) * count / (count - 1)
    whitened = (values_BxT - mean) * jax.lax.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def gae(
    rewards_BxT: jax.Array,
    values_BxT: jax.Array,
    mask_BxT: jax.Array,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over completion tokens (a backward `lax.scan`), as TRL's PPOTrainer:
    `delta_t = r_t + gamma * V_{t+1} - V_t`, `A_t = delta_t + gamma * lam * A_{t+1}`, returns = A + V. Rewards and
    values outside the mask are zeroed first, so the episode ends at the last valid token (V after it is 0).
    Returns (advantages_BxT, returns_BxT), both 0 outside the mask."""
    mask_BxT = _f32(mask_BxT)
    r_TxB = (_f32(rewards_BxT) * mask_BxT).T
    v_TxB = (_f32(values_BxT) * mask_BxT).T
    next_v_TxB = jnp.concatenate([v_TxB[1:], jnp.zeros_like(v_TxB[:1])], axis=0)
    delta_TxB = r_TxB + gamma * next_v_TxB - v_TxB

    def step(last_B, delta_B):
        adv_B = delta_B + gamma * lam * last_B
        return adv_B, adv_B

    _, adv_TxB = jax.lax.scan(step, jnp.zeros_like(delta_TxB[0]), delta_TxB, reverse=True)
    adv_BxT = adv_TxB.T * mask_BxT
    return adv_BxT, (adv_BxT + v_TxB.T) * mask_BxT


def ppo_policy_loss(
    logps_BxT: jax.Array,
    old_logps_BxT: jax.Array,
    advantages_BxT: jax.Array,
    mask_BxT: jax.Array,
    *,
    cliprange: float = 0.2,
) -> LossOut:
    """PPO clipped surrogate (TRL PPOTrainer): per token `max(-A * ratio, -A * clip(ratio, 1 +- cliprange))`,
    token mean (weight = tokens). Metrics `pg_clipfrac` (fraction of tokens where the clipped term is larger) and
    `approxkl` (`0.5 * (logp - old_logp)^2`, a token mean over valid tokens; TRL averaged over padding too)."""
    mask_BxT = _f32(mask_BxT)
    diff_BxT = logps_BxT - old_logps_BxT
    ratio_BxT = jnp.exp(diff_BxT)
    pg1_BxT = -advantages_BxT * ratio_BxT
    pg2_BxT = -advantages_BxT * jnp.clip(ratio_BxT, 1 - cliprange, 1 + cliprange)
    sg_diff = jax.lax.stop_gradient(diff_BxT)
    metrics: Metrics = {
        "pg_clipfrac": jnp.sum(jax.lax.stop_gradient(pg2_BxT > pg1_BxT).astype(jnp.float32) * mask_BxT),
        "approxkl": 0.5 * jnp.sum(jnp.square(sg_diff) * mask_BxT),
    }
    return jnp.sum(jnp.maximum(pg1_BxT, pg2_BxT) * mask_BxT), jnp.sum(mask_BxT), metrics


def ppo_value_loss(
    values_BxT: jax.Array,
    old_values_BxT: jax.Array,
    returns_BxT: jax.Array,
    mask_BxT: jax.Array,
    *,
    cliprange_value: float = 0.2,
) -> LossOut:
    """Clipped value loss (TRL PPOTrainer): `0.5 * max((V - R)^2, (clip(V, V_old +- cliprange_value) - R)^2)`,
    token mean (weight = tokens); metric `vf_clipfrac`, the fraction of tokens where the clipped term is larger."""
    mask_BxT = _f32(mask_BxT)
    clipped_BxT = jnp.clip(values_BxT, old_values_BxT - cliprange_value, old_values_BxT + cliprange_value)
    l1_BxT = jnp.square(values_BxT - returns_BxT)
    l2_BxT = jnp.square(clipped_BxT - returns_BxT)
    metrics: Metrics = {
        "vf_clipfrac": jnp.sum(jax.lax.stop_gradient(l2_BxT > l1_BxT).astype(jnp.float32) * mask_BxT)
    }
    return 0.5 * jnp.sum(jnp.maximum(l1_BxT, l2_BxT) * mask_BxT), jnp.sum(mask_BxT), metrics
