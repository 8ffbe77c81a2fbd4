"""Chunked target log-probs (`models/logps.py`) equal the unchunked computation, value and gradient, also sharded
over a mesh with the vocabulary split over `tensor`; the chunked pass never holds the full [B, T, V] logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign.models.logps import target_logps
from jaxalign.models.transformer import Transformer, init_model
from tests.helpers import rules_for, tiny


def _loss(params, graphdef, tokens, targets, weights, chunk, where=False):
    model = nnx.merge(graphdef, params)
    logps, lse = target_logps(
        model, model.hidden(tokens), targets, chunk=chunk, where_BxT=weights > 0 if where else None
    )
    return -jnp.sum(logps * weights) + 1e-3 * jnp.sum(jnp.square(lse) * weights)


@pytest.mark.parametrize("mesh", [dict(fsdp=1, devices=1), dict(data=2, fsdp=2, tensor=2)])
def test_chunked_equals_unchunked_value_and_gradient(mesh):
    devices = mesh.pop("devices", None)
    rules = rules_for(devices, **mesh)
    cfg = tiny(vocab_size=512)
    graphdef, params = init_model(cfg, rules, seed=0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 512, (4, 48)).astype(np.int32)
    targets = rng.integers(0, 512, (4, 48)).astype(np.int32)
    weights = (rng.random((4, 48)) < 0.7).astype(np.float32)
    grad = jax.jit(jax.value_and_grad(_loss), static_argnums=(1, 5))
    ref_value, ref_grads = grad(params, graphdef, tokens, targets, weights, 0)
    for chunk in (16, 20, 47):  # a divisor of T, and two that leave a padded last chunk
        value, grads = grad(params, graphdef, tokens, targets, weights, chunk)
        np.testing.assert_allclose(value, ref_value, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize("mesh", [dict(fsdp=1, devices=1), dict(data=2, fsdp=2, tensor=2)])
def test_only_where_selected_equals_every_position_value_and_gradient(mesh):
    """`where_BxT` (the loss positions): the same loss and gradient as projecting every position, with rows that
    select different amounts (a whole row, half, a scattered few, none), so some pieces are skipped and some not;
    unselected positions give exactly 0."""
    devices = mesh.pop("devices", None)
    rules = rules_for(devices, **mesh)
    cfg = tiny(vocab_size=512)
    graphdef, params = init_model(cfg, rules, seed=0)
    rng = np.random.default_rng(1)
    B, T = 4, 48
    tokens = rng.integers(0, 512, (B, T)).astype(np.int32)
    targets = rng.integers(0, 512, (B, T)).astype(np.int32)
    weights = np.zeros((B, T), np.float32)
    weights[0] = 1.0
    weights[1, T // 2 :] = rng.random(T - T // 2) + 0.5
    weights[2, rng.choice(T, 7, replace=False)] = 1.0  # row 3 selects nothing
    grad = jax.jit(jax.value_and_grad(_loss), static_argnums=(1, 5, 6))
    ref_value, ref_grads = grad(params, graphdef, tokens, targets, weights, 0)
    for chunk in (0, 20):  # pieces of T / WHERE_PIECES; chunks that leave a padded last one
        value, grads = grad(params, graphdef, tokens, targets, weights, chunk, True)
        np.testing.assert_allclose(value, ref_value, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(b))))
    model = nnx.merge(graphdef, params)
    everywhere = target_logps(model, model.hidden(tokens), targets, stats=True)
    for a in (0, 16):  # row 0 selects all of T: no piece is skipped, the stats follow the selection
        selected = target_logps(
            model, model.hidden(tokens), targets, chunk=a, stats=True, where_BxT=weights > 0
        )
        for x, y in zip(selected, everywhere, strict=True):
            np.testing.assert_allclose(x, np.where(weights > 0, y, 0), rtol=1e-5, atol=1e-5)
    # Only the rows' ends unselected: the pieces past them are skipped, and give 0.
    short = np.zeros((B, T), bool)
    short[:, :5] = True
    selected = target_logps(model, model.hidden(tokens), targets, where_BxT=short)
    for x, y in zip(selected, everywhere[:2], strict=True):
        np.testing.assert_allclose(x, np.where(short, y, 0), rtol=1e-5, atol=1e-5)


def test_chunked_pass_holds_one_chunk_of_logits():
    """XLA's memory analysis of forward + backward: chunking saves at least 3/4 of one [B, T, V] f32 buffer of
    temporaries (the unchunked pass holds the logits and their gradient; the chunked one a chunk of them)."""
    rules = rules_for(1, fsdp=1)
    cfg = tiny(vocab_size=8192, n_layers=1)
    graphdef, params = init_model(cfg, rules, seed=0)
    B, T, V = 16, 128, cfg.vocab_size
    tokens = jnp.zeros((B, T), jnp.int32)
    weights = jnp.ones((B, T), jnp.float32)

    def temp_bytes(chunk):
        f = jax.jit(jax.grad(_loss), static_argnums=(1, 5))
        return (
            f.lower(params, graphdef, tokens, tokens, weights, chunk)
            .compile()
            .memory_analysis()
            .temp_size_in_bytes
        )

    full = B * T * V * 4
    unchunked, chunked = temp_bytes(0), temp_bytes(16)
    assert unchunked >= full, (unchunked, full)
    assert unchunked - chunked >= 0.75 * full, (unchunked, chunked, full)


def test_transformer_logits_agree_with_target_logps():
    cfg = tiny()
    model = Transformer(cfg, nnx.Rngs(0))
    tokens = jnp.arange(2 * 16, dtype=jnp.int32).reshape(2, 16) % cfg.vocab_size
    logits = model(tokens)
    expected = jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1)[..., 0]
    logps, _ = target_logps(model, model.hidden(tokens), tokens, chunk=5)
    np.testing.assert_allclose(logps, expected, rtol=1e-5, atol=1e-5)
