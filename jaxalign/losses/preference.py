"""Preference optimisation: DPO family, CPO / SimPO, ORPO, KTO. Package doc: `jaxalign.losses`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxalign.errors import ConfigError
from jaxalign.losses.core import LossOut, Mean, Metrics, _choice, _f32

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
