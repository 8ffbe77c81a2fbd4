"""Every training objective as a pure function: the audited core.

Shape suffixes: B rows (sequences, pairs or examples), T completion tokens, N = B * T tokens, V vocabulary,
P prompts, G generations per prompt.

Convention: an objective returns `(loss_sum, weight, metric_sums)`, sums over the rows or tokens of this (micro)batch
and the weight to divide by, so that summing all three over any split of a batch and dividing once gives the
full-batch value exactly (gradient accumulation and data parallelism are exact); `train.state.grad_step` divides.
`loss_sum / weight` is the loss TRL 1.16 reports for the same inputs and each metric is TRL's logged metric of the
same name. A metric value is one of:
- an array `s`: a sum whose mean is `s / weight`;
- `Mean(sum, count)`: a sum with its own denominator (e.g. a token-level ratio under a per-sequence loss);
- `Min(value)` / `Max(value)`: an extremum over rows (TRL's `clip_ratio/low_min`, `min_reward`, ...).
`merge_metrics` (from `metrics_identity`, e.g. as a scan carry) combines microbatches and `finalize_metrics` divides;
a plain `tree.map(add)` from zeros would get `Min`/`Max` wrong. Batch-level constants (KTO's `kto_kl`, the NLL's
`nll_tokens_per_pair` of CPO/ORPO) are computed once over the full batch and passed to every microbatch.

Sequence log-probs (`chosen_logps_B`, ...) are float32 sums of per-token log-probs over completion tokens; lengths
are completion-token counts; masks are 0/1 (float or bool).
"""

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


# ----------------------------------------------------------------------------------------------------------------
# Preference optimisation: DPO family, CPO / SimPO, ORPO, KTO
# ----------------------------------------------------------------------------------------------------------------

DPO_LOSS_TYPES = tuple(
    "sigmoid hinge ipo exo_pair nca_pair robust bco_pair sppo_hard apo_zero apo_down discopop sigmoid_norm".split()
)
_USES_LABEL_SMOOTHING = ("robust", "exo_pair")
_USES_LENGTHS = ("ipo", "sigmoid_norm")


def _preference_metrics(chosen_rewards_B, rejected_rewards_B, chosen_logps_B, rejected_logps_B) -> Metrics:
    c, r = jax.lax.stop_gradient(chosen_rewards_B), jax.lax.stop_gradient(rejected_rewards_B)
    return {
        "rewards/chosen": jnp.sum(c),
        "rewards/rejected": jnp.sum(r),
        "rewards/accuracies": jnp.sum((c > r).astype(jnp.float32)),
        "rewards/margins": jnp.sum(c - r),
        "logps/chosen": jnp.sum(jax.lax.stop_gradient(chosen_logps_B)),
        "logps/rejected": jnp.sum(jax.lax.stop_gradient(rejected_logps_B)),
    }


def dpo_loss(
    chosen_logps_B: jax.Array,
    rejected_logps_B: jax.Array,
    ref_chosen_logps_B: jax.Array,
    ref_rejected_logps_B: jax.Array,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths_B: jax.Array | None = None,
    rejected_lengths_B: jax.Array | None = None,
    discopop_tau: float = 0.05,
) -> LossOut:
    """TRL 1.16 DPOTrainer (`f_divergence_type="reverse_kl"`, one loss type, no WPO weighting); weight = pairs.

    `ipo` and `sigmoid_norm` divide each log-ratio by its completion length (clamped to >= 1), as TRL 1.16 does, so
    they need the lengths. TRL 1.16 reads `label_smoothing` only in `robust` and `exo_pair` (which requires it > 0);
    passing it to another type is an error here rather than silently ignored.
    """
    _choice("loss_type", loss_type, DPO_LOSS_TYPES)
    if label_smoothing and loss_type not in _USES_LABEL_SMOOTHING:
        raise ConfigError(
            f"label_smoothing={label_smoothing} has no effect with loss_type={loss_type!r} in TRL 1.16; "
            f"it is used by {', '.join(_USES_LABEL_SMOOTHING)} only (set it to 0.0)"
        )
    if loss_type == "exo_pair" and not 0.0 < label_smoothing < 1.0:
        raise ConfigError(
            f"loss_type='exo_pair' needs 0 < label_smoothing < 1 (EXO uses 1e-3), got {label_smoothing}"
        )
    if loss_type in _USES_LENGTHS and (chosen_lengths_B is None or rejected_lengths_B is None):
        raise ConfigError(
            f"loss_type={loss_type!r} is length-normalised: pass chosen_lengths_B and rejected_lengths_B"
        )

    chosen_lr_B = chosen_logps_B - ref_chosen_logps_B
    rejected_lr_B = rejected_logps_B - ref_rejected_logps_B
    delta_B = chosen_lr_B - rejected_lr_B
    logsig = jax.nn.log_sigmoid
    ls = label_smoothing
    if loss_type == "sigmoid":
        per_pair_B = -logsig(beta * delta_B)
    elif loss_type == "hinge":
        per_pair_B = jax.nn.relu(1 - beta * delta_B)
    elif loss_type in _USES_LENGTHS:
        # TRL 1.16 divides by the completion length clamped at 1.
        chosen_len_B = jnp.maximum(_f32(chosen_lengths_B), 1.0)
        rejected_len_B = jnp.maximum(_f32(rejected_lengths_B), 1.0)
        norm_delta_B = chosen_lr_B / chosen_len_B - rejected_lr_B / rejected_len_B
        if loss_type == "ipo":  # Eq. 17 of the IPO paper with tau = beta
            per_pair_B = jnp.square(norm_delta_B - 1 / (2 * beta))
        else:
            per_pair_B = -logsig(beta * norm_delta_B)
    elif loss_type == "exo_pair":  # KL(softmax over {chosen, rejected} || [1 - eps, eps])
        z_B = beta * delta_B
        p_chosen_B, p_rejected_B = jax.nn.sigmoid(z_B), jax.nn.sigmoid(-z_B)
        per_pair_B = p_chosen_B * (logsig(z_B) - jnp.log1p(-ls)) + p_rejected_B * (logsig(-z_B) - jnp.log(ls))
    elif loss_type == "nca_pair":
        per_pair_B = (
            -logsig(beta * chosen_lr_B)
            - 0.5 * logsig(-beta * chosen_lr_B)
            - 0.5 * logsig(-beta * rejected_lr_B)
        )
    elif loss_type == "robust":
        per_pair_B = (-(1 - ls) * logsig(beta * delta_B) + ls * logsig(-beta * delta_B)) / (1 - 2 * ls)
    elif loss_type == "bco_pair":
        per_pair_B = -logsig(beta * chosen_lr_B) - logsig(-beta * rejected_lr_B)
    elif loss_type == "sppo_hard":
        per_pair_B = jnp.square(chosen_lr_B - 0.5 / beta) + jnp.square(rejected_lr_B + 0.5 / beta)
    elif loss_type == "apo_zero":
        per_pair_B = 1 - jax.nn.sigmoid(beta * chosen_lr_B) + jax.nn.sigmoid(beta * rejected_lr_B)
    elif loss_type == "apo_down":
        per_pair_B = jax.nn.sigmoid(beta * chosen_lr_B) + 1 - jax.nn.sigmoid(beta * delta_B)
    else:  # discopop: logistic/exponential blend modulated by the log-ratio
        z_B = beta * delta_B
        mix_B = jax.nn.sigmoid(z_B / discopop_tau)
        per_pair_B = -logsig(z_B) * (1 - mix_B) + jnp.exp(-z_B) * mix_B
    metrics = _preference_metrics(beta * chosen_lr_B, beta * rejected_lr_B, chosen_logps_B, rejected_logps_B)
    return jnp.sum(per_pair_B), jnp.float32(per_pair_B.shape[0]), metrics


def _nll_term(chosen_nll_B, chosen_nll_tokens_B, nll_tokens_per_pair):
    """Sum over pairs of the chosen NLL scaled so that `/ pairs` gives TRL's token-mean NLL of the whole batch.

    TRL averages the NLL over the tokens of the batch; with `nll_tokens_per_pair` = (tokens / pairs) of the FULL
    batch (computed once by the stage before splitting into microbatches), the split sums stay exact. `None` uses
    this batch's own ratio (exact when the batch is not split)."""
    if nll_tokens_per_pair is None:
        nll_tokens_per_pair = jnp.sum(_f32(chosen_nll_tokens_B)) / chosen_nll_B.shape[0]
    return jnp.sum(chosen_nll_B) / jnp.maximum(nll_tokens_per_pair, 1e-9)


CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")


def cpo_loss(
    chosen_logps_B: jax.Array,
    rejected_logps_B: jax.Array,
    chosen_lengths_B: jax.Array,
    rejected_lengths_B: jax.Array,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    simpo_gamma: float = 0.5,
    label_smoothing: float = 0.0,
    cpo_alpha: float = 1.0,
    chosen_nll_B: jax.Array | None = None,
    chosen_nll_tokens_B: jax.Array | None = None,
    nll_tokens_per_pair: jax.Array | float | None = None,
) -> LossOut:
    """TRL 1.16 CPOTrainer (`trl.experimental.cpo`, `alpha=0`): reference-free preference loss on the policy's
    log-probs; `simpo` and `ipo` use the per-token mean log-prob (sum / length), and `simpo` subtracts the margin
    `simpo_gamma / beta`. Plus `cpo_alpha` times the chosen completions' token-mean NLL, from per-pair sums
    `chosen_nll_B` over `chosen_nll_tokens_B` tokens (see `_nll_term`). Weight = pairs. `logps/*` are the
    (length-normalised for simpo/ipo) log-probs the loss uses; `rewards/*` are beta times them."""
    _choice("loss_type", loss_type, CPO_LOSS_TYPES)
    if loss_type in ("simpo", "ipo"):
        chosen_logps_B = chosen_logps_B / _f32(chosen_lengths_B)
        rejected_logps_B = rejected_logps_B / _f32(rejected_lengths_B)
    logits_B = chosen_logps_B - rejected_logps_B
    ls = label_smoothing
    if loss_type in ("sigmoid", "simpo"):
        if loss_type == "simpo":
            logits_B = logits_B - simpo_gamma / beta
        per_pair_B = (
            -jax.nn.log_sigmoid(beta * logits_B) * (1 - ls) - jax.nn.log_sigmoid(-beta * logits_B) * ls
        )
    elif loss_type == "hinge":
        per_pair_B = jax.nn.relu(1 - beta * logits_B)
    else:
        per_pair_B = jnp.square(logits_B - 1 / (2 * beta))
    loss_sum = jnp.sum(per_pair_B)
    metrics = _preference_metrics(
        beta * chosen_logps_B, beta * rejected_logps_B, chosen_logps_B, rejected_logps_B
    )
    if cpo_alpha:
        if chosen_nll_B is None or chosen_nll_tokens_B is None:
            raise ConfigError(
                f"cpo_alpha={cpo_alpha} needs chosen_nll_B and chosen_nll_tokens_B (or cpo_alpha=0)"
            )
        nll = _nll_term(chosen_nll_B, chosen_nll_tokens_B, nll_tokens_per_pair)
        loss_sum = loss_sum + cpo_alpha * nll
        metrics["nll_loss"] = jax.lax.stop_gradient(nll)
    else:
        metrics["nll_loss"] = jnp.float32(0.0)
    return loss_sum, jnp.float32(per_pair_B.shape[0]), metrics


def simpo_loss(
    chosen_logps_B: jax.Array,
    rejected_logps_B: jax.Array,
    chosen_lengths_B: jax.Array,
    rejected_lengths_B: jax.Array,
    *,
    beta: float = 0.1,
    simpo_gamma: float = 0.5,
    cpo_alpha: float = 0.0,
    **cpo_kwargs,
) -> LossOut:
    """SimPO as TRL 1.16 runs it (CPOTrainer, `loss_type="simpo"`): `-logsigmoid(beta * (mean logp_c - mean logp_r)
    - simpo_gamma)`, reference-free; `cpo_alpha > 0` adds the chosen NLL (CPO-SimPO; TRL's CPOConfig defaults it to
    1.0, pure SimPO is 0). Defaults are TRL's (the SimPO paper uses beta 2.0-2.5). `cpo_kwargs`: `cpo_loss`'s
    `label_smoothing` and NLL inputs."""
    return cpo_loss(
        chosen_logps_B, rejected_logps_B, chosen_lengths_B, rejected_lengths_B, loss_type="simpo", beta=beta,
        simpo_gamma=simpo_gamma, cpo_alpha=cpo_alpha, **cpo_kwargs,
    )  # fmt: skip


def _log1mexp(x: jax.Array) -> jax.Array:
    """log(1 - exp(x)) for x < 0, branching at -ln 2 to avoid cancellation (as TRL's ORPO does)."""
    return jnp.where(x < -0.6931471805599453, jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def orpo_loss(
    chosen_logps_B: jax.Array,
    rejected_logps_B: jax.Array,
    chosen_lengths_B: jax.Array,
    rejected_lengths_B: jax.Array,
    chosen_nll_B: jax.Array,
    chosen_nll_tokens_B: jax.Array,
    *,
    beta: float = 0.1,
    nll_tokens_per_pair: jax.Array | float | None = None,
) -> LossOut:
    """TRL 1.16 ORPOTrainer (`trl.experimental.orpo`): NLL of the chosen sequences minus `beta * logsigmoid(log odds
    ratio)` of the per-token mean completion log-probs. TRL's NLL covers prompt AND completion tokens of the chosen
    sequence: `chosen_nll_B` is its per-pair sum over `chosen_nll_tokens_B` tokens (see `_nll_term`). Weight = pairs.
    Metrics as TRL: rewards/*, logps/* (mean per token), `nll_loss`, `log_odds_ratio`, `log_odds_chosen`."""
    mean_c_B = chosen_logps_B / _f32(chosen_lengths_B)
    mean_r_B = rejected_logps_B / _f32(rejected_lengths_B)
    log_odds_B = (mean_c_B - mean_r_B) - (_log1mexp(mean_c_B) - _log1mexp(mean_r_B))
    ratio_B = jax.nn.log_sigmoid(log_odds_B)
    nll = _nll_term(chosen_nll_B, chosen_nll_tokens_B, nll_tokens_per_pair)
    metrics = _preference_metrics(beta * mean_c_B, beta * mean_r_B, mean_c_B, mean_r_B)
    metrics["nll_loss"] = jax.lax.stop_gradient(nll)
    metrics["log_odds_ratio"] = jax.lax.stop_gradient(jnp.sum(ratio_B))
    metrics["log_odds_chosen"] = jax.lax.stop_gradient(jnp.sum(log_odds_B))
    return nll - beta * jnp.sum(ratio_B), jnp.float32(ratio_B.shape[0]), metrics


def kto_kl(kl_logps_B: jax.Array, ref_kl_logps_B: jax.Array) -> jax.Array:
    """KTO's reference point z0: the mean policy/reference log-ratio of mismatched (prompt, completion) pairs, clamped
    at 0 and detached (TRL KTOTrainer). Compute it once over the full batch and pass it to every microbatch's
    `kto_loss`. The mismatched pairs pair prompt i with completion i - 1 (a rotation by one within the batch)."""
    return jax.lax.stop_gradient(jnp.maximum(jnp.mean(kl_logps_B - ref_kl_logps_B), 0.0))


KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def kto_loss(
    logps_B: jax.Array,
    ref_logps_B: jax.Array,
    desirable_B: jax.Array,
    kl: jax.Array | float,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
) -> LossOut:
    """TRL 1.16 KTOTrainer on unpaired examples (`desirable_B` true for desirable ones): desirable rows lose
    `w_d * (1 - sigmoid(beta * (r - kl)))`, undesirable ones `w_u * (1 - sigmoid(beta * (kl - r)))` with
    `r = logp - ref_logp` and `kl = kto_kl(...)` (`apo_zero_unpaired` ignores kl). Weight = examples.
    `rewards/*` and `logps/*` are means over the desirable (chosen) or undesirable (rejected) rows (0 for a batch
    without such rows, where TRL logs nothing); TRL's
    `rewards/margins` is `rewards/chosen - rewards/rejected` of the finalized values; `kl` is the reference point."""
    _choice("loss_type", loss_type, KTO_LOSS_TYPES)
    des_B = jnp.asarray(desirable_B).astype(bool)
    lr_B = logps_B - ref_logps_B
    if loss_type == "kto":
        chosen_B = 1 - jax.nn.sigmoid(beta * (lr_B - kl))
        rejected_B = 1 - jax.nn.sigmoid(beta * (kl - lr_B))
    else:
        chosen_B = 1 - jax.nn.sigmoid(beta * lr_B)
        rejected_B = jax.nn.sigmoid(beta * lr_B)
    per_row_B = jnp.where(des_B, desirable_weight * chosen_B, undesirable_weight * rejected_B)
    d, u = des_B.astype(jnp.float32), (~des_B).astype(jnp.float32)
    rewards_B = jax.lax.stop_gradient(beta * lr_B)
    sg_logps_B = jax.lax.stop_gradient(logps_B)
    n = jnp.float32(per_row_B.shape[0])
    metrics: Metrics = {
        "rewards/chosen": Mean(jnp.sum(rewards_B * d), jnp.sum(d)),
        "rewards/rejected": Mean(jnp.sum(rewards_B * u), jnp.sum(u)),
        "logps/chosen": Mean(jnp.sum(sg_logps_B * d), jnp.sum(d)),
        "logps/rejected": Mean(jnp.sum(sg_logps_B * u), jnp.sum(u)),
        "kl": (jnp.asarray(kl, jnp.float32) if loss_type == "kto" else jnp.float32(0.0)) * n,
    }
    return jnp.sum(per_row_B), n, metrics


# ----------------------------------------------------------------------------------------------------------------
# Reinforcement learning: KL estimators, GRPO family (DAPO, Dr. GRPO, GSPO), PPO pieces
# ----------------------------------------------------------------------------------------------------------------


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
