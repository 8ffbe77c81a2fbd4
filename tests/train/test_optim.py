"""Optimizer, schedule, gradient accumulation and the update guards."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.config import OptimConfig
from jaxalign.models.transformer import init_model
from jaxalign.stages import pretrain
from jaxalign.train import optim
from jaxalign.train import state as state_lib
from tests.helpers import lm_batch, rules_for, tiny


@pytest.fixture(scope="module")
def setup():
    rules = rules_for(devices=1)
    cfg = tiny(qkv_bias=True)
    graphdef, params = init_model(cfg, rules, seed=0)
    return cfg, graphdef, params


def test_schedule_warms_up_linearly_then_decays_to_the_floor():
    cfg = OptimConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    lr = optim.schedule(cfg, total_steps=100)
    assert float(lr(0)) == 0.0
    assert float(lr(5)) == pytest.approx(5e-4)
    assert float(lr(10)) == pytest.approx(1e-3)
    assert float(lr(55)) == pytest.approx(1e-4 + 0.5 * 0.9e-3, rel=1e-5)  # cosine midpoint
    assert float(lr(100)) == pytest.approx(1e-4)
    values = [float(lr(s)) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_weight_decay_only_on_matrices(setup):
    _, _, params = setup
    mask = optim.decay_mask(params)
    block = mask["blocks"][0]
    assert block["mlp"]["w_gate"].get_value() is True and mask["embed"].get_value() is True
    assert block["attn_norm"]["scale"].get_value() is False and block["attn"]["bq"].get_value() is False
    assert mask["final_norm"]["scale"].get_value() is False
    # And the update really applies it: zero gradients shrink matrices only.
    cfg = OptimConfig(lr=0.1, warmup_steps=0, weight_decay=0.5, clip_norm=0.0)
    tx = optim.make_optimizer(cfg, 10, params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    assert float(jnp.abs(updates["blocks"][0]["mlp"]["w_up"][...]).max()) > 0
    assert float(jnp.abs(updates["blocks"][0]["attn"]["bq"][...]).max()) == 0
    assert float(jnp.abs(updates["final_norm"]["scale"][...]).max()) == 0


def test_scanned_norms_are_not_decayed():
    _, params = init_model(tiny(scan_layers=True), rules_for(devices=1), seed=0)
    mask = optim.decay_mask(params)
    assert mask["blocks"]["attn_norm"]["scale"].get_value() is False
    assert mask["blocks"]["mlp"]["w_down"].get_value() is True


def test_gradient_accumulation_equals_one_big_batch(setup):
    cfg, graphdef, params = setup
    # Packed rows with different token counts: accumulation must weight by tokens, not by microbatch.
    batch = {k: jnp.asarray(v) for k, v in lm_batch(np.random.default_rng(0), 8, 16, cfg.vocab_size).items()}
    batch["weights"] = batch["weights"].at[:2, 4:].set(0.0)
    loss = functools.partial(pretrain.loss_fn, graphdef=graphdef, z_loss=1e-3)
    step = jax.jit(state_lib.grad_step, static_argnums=(0, 3))
    g1, l1, m1 = step(loss, params, batch, 1)
    g4, l4, m4 = step(loss, params, batch, 4)
    np.testing.assert_allclose(l4, l1, rtol=1e-6)
    np.testing.assert_allclose(m4["nll"], m1["nll"], rtol=1e-6)
    # Summation order differs between the two, so compare at fp32 precision relative to each tensor's scale.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max()), g1, g4
    )


def _state(params, graphdef, **cfg):
    cfg = OptimConfig(**{"lr": 1e-2, "warmup_steps": 0, **cfg})
    return state_lib.create(graphdef, params, cfg, 100, seed=0), cfg


def test_non_finite_gradients_skip_the_update_and_are_counted(setup):
    _, graphdef, params = setup
    state, cfg = _state(params, graphdef)
    grads = jax.tree.map(jnp.ones_like, params)
    bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads)
    new, metrics = state_lib.apply_gradients(state, bad, jnp.asarray(2.0), cfg)
    assert int(metrics["skipped"]) == 1 and int(new.guard["skipped"]) == 1 and int(new.step) == 1
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), new.params, state.params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), new.opt_state, state.opt_state)
    # A NaN loss with finite gradients is skipped too; a good step is applied.
    new, metrics = state_lib.apply_gradients(new, grads, jnp.asarray(jnp.nan), cfg)
    assert int(new.guard["skipped"]) == 2
    new, metrics = state_lib.apply_gradients(new, grads, jnp.asarray(2.0), cfg)
    assert int(metrics["skipped"]) == 0 and int(new.guard["skipped"]) == 2 and int(new.step) == 3
    assert not np.array_equal(new.params["embed"][...], state.params["embed"][...])


def test_loss_spike_is_skipped_only_when_enabled(setup):
    _, graphdef, params = setup
    grads = jax.tree.map(jnp.ones_like, params)
    rng = np.random.default_rng(0)
    for enabled in (True, False):
        state, cfg = _state(params, graphdef, spike_skip=enabled, spike_window=8, spike_sigma=4.0)
        apply = jax.jit(functools.partial(state_lib.apply_gradients, cfg=cfg))
        for _ in range(8):
            state, metrics = apply(state, grads, jnp.asarray(2.0 + 0.01 * rng.standard_normal(), jnp.float32))
            assert int(metrics["skipped"]) == 0
        state, metrics = apply(state, grads, jnp.asarray(5.0, jnp.float32))
        assert int(metrics["skipped"]) == int(enabled)
        state, metrics = apply(state, grads, jnp.asarray(2.0, jnp.float32))
        assert int(metrics["skipped"]) == 0


def test_logged_lr_is_the_one_the_applied_update_used(setup):
    """After a skipped step optax's count has not advanced: the logged lr is schedule(applied updates), and the
    first Adam update moves each weight by that lr (|g / sqrt(g^2)| = 1, no decay, no clipping)."""
    _, graphdef, params = setup
    cfg = OptimConfig(lr=1e-2, warmup_steps=0, min_lr_ratio=0.1, weight_decay=0.0, clip_norm=0.0, eps=1e-12)
    state = state_lib.create(graphdef, params, cfg, total_steps=2, seed=0)
    grads = jax.tree.map(jnp.ones_like, params)
    state, metrics = state_lib.apply_gradients(state, grads, jnp.asarray(jnp.nan), cfg)
    assert int(metrics["skipped"]) == 1 and int(metrics["nonfinite"]) == 1
    before = state.params["embed"][...]
    state, metrics = state_lib.apply_gradients(state, grads, jnp.asarray(1.0), cfg)
    assert int(metrics["nonfinite"]) == 0
    applied = float(jnp.max(jnp.abs(state.params["embed"][...] - before)))
    assert float(metrics["lr"]) == pytest.approx(1e-2) == pytest.approx(applied, rel=1e-4)
    assert float(state.schedule(1)) < 0.6e-2  # what the step count alone would have logged
