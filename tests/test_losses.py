"""jaxalign.losses against TRL 1.16 (fixtures made by TRL's own trainer code), plus invariants: microbatch splits
give the full-batch loss, metrics and gradient; GAE equals a plain loop; KL estimators against the exact KL;
closed-form DPO values.

Tolerances: float32 throughout (TRL's torch and jaxalign's JAX), rtol 1e-5 / atol 1e-6.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from jaxalign import losses
from jaxalign.errors import ConfigError

FIXTURES = epath.Path(__file__).parent / "fixtures"
RTOL, ATOL = 1e-5, 1e-6
# These tiny programs spend seconds in XLA's CPU compiler and microseconds running: compile them with the backend
# optimisations and fusion emitters off (the same float32 arithmetic; about a third of the compile CPU time).
fast_jit = functools.partial(
    jax.jit,
    compiler_options={
        "xla_backend_optimization_level": 0,
        "xla_llvm_disable_expensive_passes": True,
        "xla_cpu_use_fusion_emitters": False,
    },
)
# TRL metrics the stage computes, not the loss: those that need the logits, and KTO's `rewards/margins` (the
# difference of the finalized `rewards/chosen` and `rewards/rejected`, checked as such below).
STAGE_METRICS = {"entropy", "mean_token_accuracy", "logits/chosen", "logits/rejected", "rewards/margins"}


@functools.cache
def trl() -> dict:
    return json.loads((FIXTURES / "trl_losses.json").read_text())


def a(x) -> jax.Array:
    return jnp.asarray(np.asarray(x, np.float32))


def close(actual, expected, what: str = ""):
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), np.asarray(expected, np.float64), RTOL, ATOL, err_msg=what
    )


def run_cases(cases: list[dict], mean_loss, x_key: str) -> list:
    """[((loss, metrics), d loss / d x)] of `mean_loss(case, x) -> (loss, metrics)` at `x = case[x_key]` for every
    case, in ONE jitted program: per-case compiles (or eager op-by-op compiles per shape) would dominate the time."""
    fns = [functools.partial(mean_loss, c) for c in cases]

    @fast_jit
    def run(xs):
        return [jax.value_and_grad(f, has_aux=True)(x) for f, x in zip(fns, xs, strict=True)]

    return run([a(c[x_key]) for c in cases])


def finalize(out):
    loss_sum, weight, sums = out
    return loss_sum / weight, losses.finalize_metrics(sums, weight)


def check_metrics(ours: dict, theirs: dict, what: str, stage_only: set[str] = STAGE_METRICS):
    """Every metric we return matches TRL's metric of the same name; TRL's others are the stage's to compute."""
    assert set(ours) <= set(theirs), f"{what}: metrics not logged by TRL: {set(ours) - set(theirs)}"
    assert set(theirs) - set(ours) <= stage_only, (
        f"{what}: TRL metrics missing: {set(theirs) - set(ours) - stage_only}"
    )
    for k, v in ours.items():
        close(v, theirs[k], f"{what}: {k}")


def pick(pytree, rows):
    return jax.tree.map(lambda x: x[rows], pytree)


SPLITS = ((0, 1), (1, 3), (3, None))


def check_split(fns: dict, batch: dict, policy_keys: tuple[str, ...], splits=SPLITS):
    """For every objective `fn(batch) -> (loss_sum, weight, metrics)` in `fns`: summing the three over row splits
    (merging metrics) and dividing once == the full batch, for the loss, every metric and the gradient w.r.t.
    `batch[k]` for k in `policy_keys`. All objectives run in one jitted program (compiling dominates the time)."""

    def full(fn, x):
        loss_sum, weight, metrics = fn({**batch, **x})
        return loss_sum / weight, losses.finalize_metrics(metrics, weight)

    def split(fn, x):
        parts = [fn(pick({**batch, **x}, slice(lo, hi))) for lo, hi in splits]
        merged = losses.metrics_identity(parts[0][2])
        for p in parts:
            merged = losses.merge_metrics(merged, p[2])
        weight = sum(p[1] for p in parts)
        return sum(p[0] for p in parts) / weight, losses.finalize_metrics(merged, weight)

    @fast_jit
    def run(x):
        vg = functools.partial(jax.value_and_grad, has_aux=True)
        return {
            name: (vg(functools.partial(full, fn))(x), vg(functools.partial(split, fn))(x))
            for name, fn in fns.items()
        }

    for name, (((loss, metrics), grad), ((s_loss, s_metrics), s_grad)) in run(
        {k: batch[k] for k in policy_keys}
    ).items():
        close(s_loss, loss, f"{name}: split loss")
        for k in policy_keys:
            assert np.any(np.asarray(grad[k]) != 0), f"{name}: no gradient w.r.t. {k}"
            close(s_grad[k], grad[k], f"{name}: split grad w.r.t. {k}")
        assert s_metrics.keys() == metrics.keys()
        for k in metrics:
            close(s_metrics[k], metrics[k], f"{name}: split metric {k}")


# ----------------------------------------------------------------------------------------------------------------
# Oracle values from TRL 1.16
# ----------------------------------------------------------------------------------------------------------------


def test_fixtures_from_trl_1_16():
    assert trl()["trl_version"].startswith("1.16")


def test_sft_matches_trl():
    def mean_loss(c, logps):
        out = losses.sft_loss(
            logps, a(c["token_mask"]), entropy_BxT=a(c["entropy"]), is_top1_BxT=a(c["is_top1"])
        )
        return finalize(out)

    cases = trl()["sft"]
    for i, (c, ((loss, metrics), grad)) in enumerate(
        zip(cases, run_cases(cases, mean_loss, "token_logps"), strict=True)
    ):
        close(loss, c["loss"], f"sft {i}")
        check_metrics(metrics, c["metrics"], f"sft {i}", set())
        close(grad, c["grad_token_logps"], f"sft {i} grad")


def test_reward_matches_trl():
    def mean_loss(c, r):
        n = r.shape[0] // 2
        margin = None if c["margin"] is None else a(c["margin"])
        return finalize(
            losses.bradley_terry_loss(r[:n], r[n:], margin_B=margin, center_coef=c["center_coef"])
        )

    cases = trl()["reward"]
    for i, (c, ((loss, metrics), grad)) in enumerate(
        zip(cases, run_cases(cases, mean_loss, "rewards"), strict=True)
    ):
        close(loss, c["loss"], f"reward {i}")
        check_metrics(metrics, c["metrics"], f"reward {i}", set())
        close(grad, c["grad_rewards"], f"reward {i} grad")


def test_dpo_every_loss_type_matches_trl():
    def mean_loss(c, token_logps):
        mask, ref = a(c["token_mask"]), a(c["ref_logps"])
        n = mask.shape[0] // 2
        logps, lengths = jnp.sum(token_logps * mask, axis=1), jnp.sum(mask, axis=1)
        out = losses.dpo_loss(
            logps[:n], logps[n:], ref[:n], ref[n:], beta=c["beta"], loss_type=c["loss_type"],
            label_smoothing=c["label_smoothing"], chosen_lengths_B=lengths[:n], rejected_lengths_B=lengths[n:],
        )  # fmt: skip
        return finalize(out)

    cases = trl()["dpo"]
    assert {c["loss_type"] for c in cases} == set(losses.DPO_LOSS_TYPES)
    assert {c["label_smoothing"] for c in cases if c["loss_type"] in ("robust", "exo_pair")} >= {
        0.2,
        0.1,
        1e-3,
    }
    for c, ((loss, metrics), grad) in zip(cases, run_cases(cases, mean_loss, "token_logps"), strict=True):
        what = f"dpo {c['loss_type']} beta={c['beta']} ls={c['label_smoothing']}"
        close(loss, c["loss"], what)
        check_metrics(metrics, c["metrics"], what, STAGE_METRICS - {"rewards/margins"})
        close(grad, c["grad_token_logps"], what + " grad")


def _pair_logps(batch: dict, logits_2BxLxV: jax.Array):
    """Per-token log-probs of the concatenated chosen + rejected sequences (what a stage computes), the completion
    mask (labels != -100) and the attention mask, all shifted to next-token positions."""
    ids = jnp.concatenate([a(batch["chosen_input_ids"]), a(batch["rejected_input_ids"])]).astype(jnp.int32)
    labels = jnp.concatenate([a(batch["chosen_labels"]), a(batch["rejected_labels"])])
    attn = jnp.concatenate([a(batch["chosen_attention_mask"]), a(batch["rejected_attention_mask"])])
    R, L, V = logits_2BxLxV.shape
    logps, _ = losses.token_logps(logits_2BxLxV[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    return logps.reshape(R, L - 1), (labels[:, 1:] != -100).astype(jnp.float32), attn[:, 1:]


def test_cpo_and_simpo_match_trl():
    def mean_loss(c, logits):
        tok, cmask, _ = _pair_logps(c["batch"], logits)
        n = tok.shape[0] // 2
        logps, lengths = jnp.sum(tok * cmask, axis=1), jnp.sum(cmask, axis=1)
        # CPO's NLL is the token mean over the chosen completion tokens.
        kw = dict(beta=c["beta"], simpo_gamma=c["simpo_gamma"], label_smoothing=c["label_smoothing"])
        kw.update(cpo_alpha=c["cpo_alpha"], chosen_nll_B=-logps[:n], chosen_nll_tokens_B=lengths[:n])
        if c["loss_type"] == "simpo":
            return finalize(losses.simpo_loss(logps[:n], logps[n:], lengths[:n], lengths[n:], **kw))
        return finalize(
            losses.cpo_loss(logps[:n], logps[n:], lengths[:n], lengths[n:], loss_type=c["loss_type"], **kw)
        )

    cases = trl()["cpo"]
    for c, ((loss, metrics), grad) in zip(cases, run_cases(cases, mean_loss, "logits"), strict=True):
        what = f"cpo {c['loss_type']} beta={c['beta']} alpha={c['cpo_alpha']}"
        close(loss, c["loss"], what)
        check_metrics(metrics, c["metrics"], what, set())
        close(grad, c["grad_logits"], what + " grad")


def test_orpo_matches_trl():
    def mean_loss(c, logits):
        tok, cmask, attn = _pair_logps(c["batch"], logits)
        n = tok.shape[0] // 2
        logps, lengths = jnp.sum(tok * cmask, axis=1), jnp.sum(cmask, axis=1)
        # ORPO's NLL is the token mean over the chosen prompt AND completion tokens.
        nll_B, nll_tokens_B = -jnp.sum(tok[:n] * attn[:n], axis=1), jnp.sum(attn[:n], axis=1)
        loss, metrics = finalize(
            losses.orpo_loss(
                logps[:n], logps[n:], lengths[:n], lengths[n:], nll_B, nll_tokens_B, beta=c["beta"]
            )
        )
        return loss, {**metrics, "mean_logps": logps / lengths}

    cases = trl()["orpo"]
    means = []
    for c, ((loss, metrics), grad) in zip(cases, run_cases(cases, mean_loss, "logits"), strict=True):
        means += list(np.asarray(metrics.pop("mean_logps")))
        close(loss, c["loss"], f"orpo beta={c['beta']}")
        check_metrics(metrics, c["metrics"], f"orpo beta={c['beta']}", set())
        close(grad, c["grad_logits"], f"orpo beta={c['beta']} grad")
    assert min(means) < -np.log(2) < max(means), "the fixtures should exercise both branches of log1mexp"


def test_kto_matches_trl():
    def mean_loss(c, token_logps):
        kl = losses.kto_kl(
            jnp.sum(a(c["kl_token_logps"]) * a(c["kl_token_mask"]), axis=1), a(c["ref_kl_logps"])
        )
        out = losses.kto_loss(
            jnp.sum(token_logps * a(c["token_mask"]), axis=1), a(c["ref_logps"]), a(c["desirable"]), kl,
            beta=c["beta"], desirable_weight=c["desirable_weight"], undesirable_weight=c["undesirable_weight"],
            loss_type=c["loss_type"],
        )  # fmt: skip
        return finalize(out)

    cases = trl()["kto"]
    assert any(c["metrics"]["kl"] == 0.0 for c in cases if c["loss_type"] == "kto"), (
        "no case clamps the KL at 0"
    )
    for c, ((loss, metrics), grad) in zip(cases, run_cases(cases, mean_loss, "token_logps"), strict=True):
        what = f"kto {c['loss_type']} beta={c['beta']}"
        close(loss, c["loss"], what)
        check_metrics(metrics, c["metrics"], what)
        close(metrics["rewards/chosen"] - metrics["rewards/rejected"], c["metrics"]["rewards/margins"], what)
        close(grad, c["grad_token_logps"], what + " grad")


def _opt(x):
    return None if x is None else a(x)


def test_grpo_matches_trl():
    def mean_loss(c, logps):
        out = losses.grpo_loss(
            logps, _opt(c["old_logps"]), _opt(c["ref_logps"]), a(c["advantages"]), a(c["mask"]), epsilon=0.2,
            epsilon_high=c["epsilon_high"], beta=c["beta"], loss_type=c["loss_type"],
            max_completion_length=c["max_completion_length"], importance_sampling_level=c["importance_sampling_level"],
            entropy_BxT=a(c["entropy"]),
        )  # fmt: skip
        return finalize(out)

    cases = trl()["grpo"]
    assert {(c["loss_type"], c["importance_sampling_level"]) for c in cases} == {
        (t, lvl) for t in losses.GRPO_LOSS_TYPES for lvl in losses.IS_LEVELS
    }
    assert sum(c["metrics"]["clip_ratio/low_mean"] > 0 for c in cases) > 3
    assert sum(c["metrics"]["clip_ratio/high_mean"] > 0 for c in cases) > 3
    for c, ((loss, metrics), grad) in zip(cases, run_cases(cases, mean_loss, "logps"), strict=True):
        what = f"grpo {c['loss_type']} {c['importance_sampling_level']} beta={c['beta']} eps_high={c['epsilon_high']}"
        close(loss, c["loss"], what)
        check_metrics(metrics, c["metrics"], what, set())
        close(grad, c["grad_logps"], what + " grad")


def test_grpo_advantages_match_trl():
    cases = trl()["grpo_advantages"]
    assert {c["scale"] for c in cases} == set(losses.GRPO_SCALES)

    @fast_jit
    def run(rewards):
        return [
            (losses.grpo_advantages(r, scale=c["scale"]), losses.grpo_reward_metrics(r, scale=c["scale"]))
            for c, r in zip(cases, rewards, strict=True)
        ]

    for c, (advantages, metrics) in zip(cases, run([a(c["rewards"]) for c in cases]), strict=True):
        close(advantages, c["advantages"], f"advantages {c['scale']}")
        check_metrics(metrics, c["metrics"], c["scale"], set())


# ----------------------------------------------------------------------------------------------------------------
# Invariants: any microbatch split gives the full-batch loss, metrics and gradient
# ----------------------------------------------------------------------------------------------------------------


def _rng_batch(seed=0, rows=5, length=6):
    rng = np.random.default_rng(seed)
    mask = np.zeros((rows, length), np.float32)
    for r in range(rows):
        mask[r, : rng.integers(1, length + 1)] = 1
    return rng, a(mask), a(-rng.uniform(0.05, 3.0, (rows, length)))


def test_sft_and_reward_split_invariance():
    rng, mask, logps = _rng_batch(1)
    check_split(
        {"sft": lambda b: losses.sft_loss(b["logps"], b["mask"])}, {"logps": logps, "mask": mask}, ("logps",)
    )
    batch = {"c": a(rng.normal(0, 2, 5)), "r": a(rng.normal(0, 2, 5)), "m": a(rng.normal(0, 1, 5))}
    bt = lambda b: losses.bradley_terry_loss(b["c"], b["r"], margin_B=b["m"], center_coef=0.01)
    check_split({"bt": bt}, batch, ("c", "r"))


def test_dpo_split_invariance():
    rng = np.random.default_rng(2)
    batch = {k: a(rng.normal(-8, 3, 5)) for k in ("c", "r", "rc", "rr")}
    batch.update(lc=a(rng.integers(1, 9, 5)), lr=a(rng.integers(1, 9, 5)))

    def dpo(loss_type, b):
        return losses.dpo_loss(
            b["c"], b["r"], b["rc"], b["rr"], beta=0.3, loss_type=loss_type,
            label_smoothing=0.1 if loss_type in ("robust", "exo_pair") else 0.0,
            chosen_lengths_B=b["lc"], rejected_lengths_B=b["lr"],
        )  # fmt: skip

    fns = {t: functools.partial(dpo, t) for t in losses.DPO_LOSS_TYPES}
    check_split(fns, batch, ("c", "r"))


def test_cpo_orpo_kto_split_invariance():
    rng = np.random.default_rng(3)
    batch = {k: a(-rng.uniform(1, 10, 6)) for k in ("c", "r")}
    batch.update(nll=a(rng.uniform(1, 20, 6)), nt=a(rng.integers(3, 12, 6)))
    batch.update(lc=a(rng.integers(1, 9, 6)), lr=a(rng.integers(1, 9, 6)))
    # The NLL is a token mean over the full batch: the stage computes tokens per pair once, before splitting.
    tpp = float(jnp.sum(batch["nt"]) / 6)

    def cpo(loss_type, b):
        return losses.cpo_loss(
            b["c"], b["r"], b["lc"], b["lr"], loss_type=loss_type, cpo_alpha=0.7, chosen_nll_B=b["nll"],
            chosen_nll_tokens_B=b["nt"], nll_tokens_per_pair=tpp,
        )  # fmt: skip

    def orpo(b):
        return losses.orpo_loss(
            b["c"], b["r"], b["lc"], b["lr"], b["nll"], b["nt"], beta=0.2, nll_tokens_per_pair=tpp
        )

    fns = {t: functools.partial(cpo, t) for t in losses.CPO_LOSS_TYPES}
    check_split({**fns, "orpo": orpo}, batch, ("c", "r", "nll"))
    # Unsplit, the default (this batch's own tokens per pair) is the same number.
    unsplit = losses.orpo_loss(*(batch[k] for k in ("c", "r", "lc", "lr", "nll", "nt")), beta=0.2)
    close(finalize(unsplit)[0], finalize(orpo(batch))[0])

    kto_batch = {"l": batch["c"], "ref": a(-rng.uniform(1, 10, 6)), "d": a([1, 0, 0, 1, 1, 0])}
    kl = losses.kto_kl(a(-rng.uniform(1, 10, 6)), a(-rng.uniform(1, 10, 6)))

    def kto(loss_type, b):
        return losses.kto_loss(
            b["l"], b["ref"], b["d"], kl, beta=0.2, desirable_weight=1.3, loss_type=loss_type
        )

    check_split({t: functools.partial(kto, t) for t in losses.KTO_LOSS_TYPES}, kto_batch, ("l",))


def test_grpo_split_invariance():
    rng, mask, logps = _rng_batch(4, rows=6, length=5)
    batch = {
        "logps": logps,
        "old": logps + a(rng.normal(0, 0.3, logps.shape)),
        "ref": logps + a(rng.normal(0, 0.5, logps.shape)),
        "adv": a(rng.normal(0, 1, 6)),
        "mask": mask,
        "ent": a(rng.uniform(0, 2, logps.shape)),
    }

    def grpo(loss_type, level, b):
        return losses.grpo_loss(
            b["logps"], b["old"], b["ref"], b["adv"], b["mask"], epsilon_high=0.28, beta=0.04, loss_type=loss_type,
            max_completion_length=8, importance_sampling_level=level, entropy_BxT=b["ent"],
        )  # fmt: skip

    # Whole sequences per split: the `grpo` aggregation is per sequence; dr_grpo's denominator is B * max length.
    fns = {
        f"{t}/{lvl}": functools.partial(grpo, t, lvl)
        for t in losses.GRPO_LOSS_TYPES
        for lvl in losses.IS_LEVELS
    }
    check_split(fns, batch, ("logps",))


def test_ppo_split_invariance():
    rng, mask, logps = _rng_batch(5)
    shape = logps.shape
    batch = {
        "lp": logps,
        "old": logps + a(rng.normal(0, 0.3, shape)),
        "adv": a(rng.normal(0, 1, shape)),
        "mask": mask,
    }
    batch.update(v=a(rng.normal(0, 1, shape)), ov=a(rng.normal(0, 1, shape)), ret=a(rng.normal(0, 1, shape)))
    check_split(
        {"policy": lambda b: losses.ppo_policy_loss(b["lp"], b["old"], b["adv"], b["mask"])}, batch, ("lp",)
    )
    value = lambda b: losses.ppo_value_loss(b["v"], b["ov"], b["ret"], b["mask"], cliprange_value=0.3)
    check_split({"value": value}, batch, ("v",))


# ----------------------------------------------------------------------------------------------------------------
# GAE, whitening, PPO, KL estimators, closed forms
# ----------------------------------------------------------------------------------------------------------------


def _gae_loop(rewards, values, mask, gamma, lam):
    """The textbook loop, per row over its valid tokens only (the episode ends at the last valid token)."""
    adv = np.zeros_like(rewards, dtype=np.float64)
    for b in range(rewards.shape[0]):
        n = int(mask[b].sum())
        last = 0.0
        for t in reversed(range(n)):
            next_v = values[b, t + 1] if t + 1 < n else 0.0
            delta = rewards[b, t] + gamma * next_v - values[b, t]
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv, (adv + values) * mask


GAE_PARAMS = [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0)]


def test_gae_equals_python_loop():
    rng, mask, _ = _rng_batch(6, rows=4, length=9)
    rewards, values = rng.normal(0, 1, (4, 9)), rng.normal(0, 1, (4, 9))
    run = fast_jit(lambda r, v, m: [losses.gae(r, v, m, gamma=g, lam=lam) for g, lam in GAE_PARAMS])
    for (gamma, lam), (adv, ret) in zip(GAE_PARAMS, run(a(rewards), a(values), mask), strict=True):
        exp_adv, exp_ret = _gae_loop(np.float32(rewards), np.float32(values), np.asarray(mask), gamma, lam)
        close(adv, exp_adv, f"gamma={gamma} lam={lam}")
        close(ret, exp_ret, f"gamma={gamma} lam={lam}")


def test_masked_whiten_matches_numpy():
    rng, mask, _ = _rng_batch(7, rows=4, length=9)
    x = rng.normal(3, 2, (4, 9))
    valid = np.float32(x)[np.asarray(mask) > 0].astype(np.float64)
    expected = (np.float32(x) - valid.mean()) / np.sqrt(valid.var(ddof=1) + 1e-8)
    run = fast_jit(
        lambda x, m: (losses.masked_whiten(x, m) * m, losses.masked_whiten(x, m, shift_mean=False) * m)
    )
    whitened, unshifted = run(a(x), mask)
    close(whitened, expected * np.asarray(mask))
    close(unshifted, (expected + valid.mean()) * np.asarray(mask))


def test_ppo_losses_hand_values():
    @fast_jit
    def run():
        # ratio e^0.5 > 1.2 with A = 1: clipped (loss -1.2, clipfrac 1); ratio e^-0.5 with A = 1: unclipped.
        lp, old, adv, mask = a([[0.5, -0.5, 3.0]]), a([[0.0, 0.0, 0.0]]), a([[1.0, 1.0, 5.0]]), a([[1, 1, 0]])
        policy = finalize(losses.ppo_policy_loss(lp, old, adv, mask))
        # V = 2, V_old = 0, R = 1: clipped V = 0.2 -> 0.5 * max(1, 0.64), not clipped; R = 3: max(1, 7.84), clipped.
        value = finalize(
            losses.ppo_value_loss(a([[2.0, 2.0]]), a([[0.0, 0.0]]), a([[1.0, 3.0]]), a([[1, 1]]))
        )
        return policy, value

    (loss, m), (v_loss, v_m) = run()
    close(loss, (-1.2 - np.exp(-0.5)) / 2)
    close(m["pg_clipfrac"], 0.5)
    close(m["approxkl"], 0.5 * 0.25)
    close(v_loss, 0.5 * (1.0 + 2.8**2) / 2)
    close(v_m["vf_clipfrac"], 0.5)


def test_kl_estimators_against_exact_kl():
    rng = np.random.default_rng(8)

    @fast_jit
    def run(p_logits, q_logits):
        p, q = jax.nn.log_softmax(p_logits), jax.nn.log_softmax(q_logits)
        weights = jnp.exp(p)  # expectation over tokens sampled from the policy, enumerated exactly
        ks = (losses.kl_k1, losses.kl_k2, losses.kl_k3)
        return {
            "exact": jnp.sum(weights * (p - q)),
            "expected": [jnp.sum(weights * k(p, q)) for k in ks],
            "per_token": [k(p, q) for k in ks],
            "at_equal": [k(p, p) for k in ks],
            "half_sq": 0.5 * jnp.sum(weights * jnp.square(p - q)),
        }

    out = run(a(rng.normal(0, 1.5, 7)), a(rng.normal(0, 1.5, 7)))
    assert out["exact"] > 0.05
    k1, k2, k3 = out["expected"]
    close(k1, out["exact"], "E[k1] = KL")
    close(k3, out["exact"], "E[k3] = KL")
    close(k2, out["half_sq"], "E[k2] = E[(log ratio)^2] / 2")
    assert np.all(np.asarray(out["per_token"][1]) >= 0) and np.all(np.asarray(out["per_token"][2]) >= 0)
    for k in out["at_equal"]:
        assert np.all(np.asarray(k) == 0.0)


# Equal policy and reference log-ratios (beta = 0.1): delta = 0 and both rewards are 0.
DPO_AT_EQUAL_LOGPS = {
    "sigmoid": np.log(2),
    "hinge": 1.0,
    "ipo": (1 / (2 * 0.1)) ** 2,
    "robust": np.log(2),  # (-(1-e) + e) log(1/2) / (1 - 2e) = log 2
    "exo_pair": 0.5 * (np.log(0.5) - np.log1p(-0.1)) + 0.5 * (np.log(0.5) - np.log(0.1)),
    "nca_pair": 2 * np.log(2),
    "bco_pair": 2 * np.log(2),
    "sppo_hard": 2 * (0.5 / 0.1) ** 2,
    "apo_zero": 1.0,
    "apo_down": 1.0,
    "discopop": 0.5 * np.log(2) + 0.5,
    "sigmoid_norm": np.log(2),
}


def test_dpo_closed_form_at_equal_logps():
    assert DPO_AT_EQUAL_LOGPS.keys() == set(losses.DPO_LOSS_TYPES)

    @fast_jit
    def run(logps):
        return {
            t: finalize(
                losses.dpo_loss(
                    logps,
                    logps + 1,
                    logps,
                    logps + 1,
                    beta=0.1,
                    loss_type=t,
                    label_smoothing=0.1 if t in ("robust", "exo_pair") else 0.0,
                    chosen_lengths_B=a([3, 4]),
                    rejected_lengths_B=a([5, 6]),
                )  # fmt: skip
            )
            for t in DPO_AT_EQUAL_LOGPS
        }

    for loss_type, (loss, metrics) in run(a([-3.0, -7.5])).items():
        close(loss, DPO_AT_EQUAL_LOGPS[loss_type], loss_type)
        close(metrics["rewards/margins"], 0.0, loss_type)


def test_simpo_closed_form():
    # Mean log-probs -1 and -2 (sums over 3 and 2 tokens): -logsigmoid(2 * (1 - 0.5 / 2)) = -logsigmoid(1.5).
    run = fast_jit(lambda c, r: finalize(losses.simpo_loss(c, r, a([3]), a([2]), beta=2.0, simpo_gamma=0.5)))
    loss, m = run(a([-3.0]), a([-4.0]))
    close(loss, np.log1p(np.exp(-1.5)))
    close(m["logps/chosen"], -1.0)


def test_bad_options_raise_config_errors():
    x = a([-1.0])
    with pytest.raises(ConfigError, match="loss_type='dpo'"):
        losses.dpo_loss(x, x, x, x, loss_type="dpo")
    with pytest.raises(ConfigError, match="label_smoothing=0.1"):
        losses.dpo_loss(x, x, x, x, loss_type="sigmoid", label_smoothing=0.1)
    with pytest.raises(ConfigError, match="exo_pair"):
        losses.dpo_loss(x, x, x, x, loss_type="exo_pair")
    with pytest.raises(ConfigError, match="lengths"):
        losses.dpo_loss(x, x, x, x, loss_type="ipo")
    with pytest.raises(ConfigError, match="scale_rewards='std'"):
        losses.grpo_advantages(a([[1.0, 2.0]]), scale="std")
    with pytest.raises(ConfigError, match="ref_logps"):
        losses.grpo_loss(x[None], None, None, x, x[None], beta=0.1)


# ----------------------------------------------------------------------------------------------------------------
# Live oracle: re-run the fixture script with TRL and compare to the committed JSON
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.oracle
def test_fixture_script_reproduces_committed_json(monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("trl")
    import importlib.util

    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    spec = importlib.util.spec_from_file_location("make_trl_fixtures", FIXTURES / "make_trl_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    live, committed = json.loads(json.dumps(module.build())), trl()
    assert live.keys() == committed.keys()

    def compare(x, y, path):
        if isinstance(x, dict):
            assert x.keys() == y.keys(), path
            for k in x:
                compare(x[k], y[k], f"{path}.{k}")
        elif isinstance(x, list) and x and isinstance(x[0], dict):
            assert len(x) == len(y), path
            for i, (u, v) in enumerate(zip(x, y, strict=True)):
                compare(u, v, f"{path}[{i}]")
        elif isinstance(x, str) or x is None:
            assert x == y, path
        else:
            close(x, y, path)

    versions = ("trl_version", "torch_version")
    compare(
        {k: v for k, v in live.items() if k not in versions},
        {k: v for k, v in committed.items() if k not in versions},
        "",
    )
