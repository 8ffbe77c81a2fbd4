"""Model invariants: causality, packed == unpacked, scan == unrolled, remat == no remat."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign import losses
from jaxalign.models.transformer import Transformer, flops_per_token, init_model, num_params
from jaxalign.stages import pretrain
from tests.helpers import lm_batch, rules_for, tiny


@functools.cache
def single_device_rules():
    return rules_for(devices=1)


def test_loss_at_t_has_zero_gradient_wrt_later_tokens():
    cfg = tiny(tie_embeddings=False)
    graphdef, params = init_model(cfg, single_device_rules(), seed=0)
    T, t = 16, 7
    # Tokens at positions <= t come from [4, 100), later ones from [100, 200): their embedding rows are used only by
    # later positions, so the loss at t must not depend on them.
    rng = np.random.default_rng(0)
    tokens = np.concatenate([rng.integers(4, 100, t + 1), rng.integers(100, 200, T - t - 1)])[None].astype(
        np.int32
    )
    target = np.array([5], np.int32)

    def loss_at_t(params):
        logits = nnx.merge(graphdef, params)(jnp.asarray(tokens))
        return -losses.token_logps(logits[0, t][None], target)[0][0]

    grads = jax.grad(loss_at_t)(params)
    g_embed = np.asarray(grads["embed"][...])
    assert np.all(g_embed[100:200] == 0.0)
    assert np.abs(g_embed[4:100]).max() > 0  # earlier tokens do matter
    # And the same through a perturbation: changing later tokens leaves logits at <= t bit-identical.
    other = tokens.copy()
    other[0, t + 1 :] = rng.integers(100, 200, T - t - 1)
    model = nnx.merge(graphdef, params)
    a, b = model(jnp.asarray(tokens)), model(jnp.asarray(other))
    np.testing.assert_array_equal(a[0, : t + 1], b[0, : t + 1])
    assert not np.array_equal(a[0, t + 1 :], b[0, t + 1 :])


@pytest.mark.parametrize("attention", ["xla"])
def test_packed_sequences_give_the_same_per_token_losses_as_alone(attention):
    cfg = tiny(attention=attention)
    graphdef, params = init_model(cfg, single_device_rules(), seed=1)
    model = nnx.merge(graphdef, params)
    rng = np.random.default_rng(1)
    a_len, b_len, T = 11, 9, 24
    seq_a = rng.integers(4, cfg.vocab_size, a_len + 1).astype(np.int32)
    seq_b = rng.integers(4, cfg.vocab_size, b_len + 1).astype(np.int32)

    def per_token(inputs, targets, positions=None, segment_ids=None):
        logits = model(jnp.asarray(inputs)[None], positions, segment_ids)[0]
        return np.asarray(losses.token_logps(logits, jnp.asarray(targets))[0])

    alone_a = per_token(seq_a[:-1], seq_a[1:])
    alone_b = per_token(seq_b[:-1], seq_b[1:])

    pad = T - a_len - b_len
    inputs = np.concatenate([seq_a[:-1], seq_b[:-1], np.zeros(pad, np.int32)])
    targets = np.concatenate([seq_a[1:], seq_b[1:], np.zeros(pad, np.int32)])
    segment_ids = np.concatenate([np.full(a_len, 1), np.full(b_len, 2), np.zeros(pad)]).astype(np.int32)[None]
    positions = np.concatenate([np.arange(a_len), np.arange(b_len), np.zeros(pad)]).astype(np.int32)[None]
    packed = per_token(inputs, targets, jnp.asarray(positions), jnp.asarray(segment_ids))

    np.testing.assert_allclose(packed[:a_len], alone_a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(packed[a_len : a_len + b_len], alone_b, rtol=1e-5, atol=1e-6)


def _loss_and_grads(cfg, params_from=None):
    graphdef, params = init_model(cfg, single_device_rules(), seed=2)
    if params_from is not None:
        params = params_from
    batch = {k: jnp.asarray(v) for k, v in lm_batch(np.random.default_rng(2), 2, 16, cfg.vocab_size).items()}
    loss = functools.partial(pretrain.loss_fn, graphdef=graphdef, z_loss=0.0)
    (value, _), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, batch)
    return params, value, grads


def test_scan_layers_equals_unrolled():
    unrolled_params, loss_u, grads_u = _loss_and_grads(tiny(scan_layers=False))
    # Stack the unrolled layers' params into the scanned layout.
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[unrolled_params["blocks"][i] for i in range(2)])
    _, scanned = init_model(tiny(scan_layers=True), single_device_rules(), seed=2)
    scanned = jax.tree.map(lambda x: x, scanned)
    nnx.replace_by_pure_dict(
        scanned, {**nnx.to_pure_dict(unrolled_params), "blocks": nnx.to_pure_dict(stacked)}
    )
    _, loss_s, grads_s = _loss_and_grads(tiny(scan_layers=True), params_from=scanned)
    np.testing.assert_allclose(loss_s, loss_u, rtol=1e-6)
    for i in range(2):
        np.testing.assert_allclose(
            grads_s["blocks"]["mlp"]["w_gate"][...][i],
            grads_u["blocks"][i]["mlp"]["w_gate"][...],
            rtol=1e-5,
            atol=1e-8,
        )


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_changes_nothing_but_memory(remat):
    _, loss_a, grads_a = _loss_and_grads(tiny())
    _, loss_b, grads_b = _loss_and_grads(tiny(remat=remat))
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-8), grads_a, grads_b)


def test_variants_build_and_count_parameters():
    cfg = tiny(qkv_bias=True, qk_norm=True, tie_embeddings=True, norm_plus_one=True, activation="gelu_tanh")
    model = Transformer(cfg, nnx.Rngs(0))
    D, H, K, Dh, F, V = 64, 8, 4, 8, 128, 256
    per_layer = D * H * Dh * 2 + D * K * Dh * 2 + 3 * D * F + (H * Dh + 2 * K * Dh) + 2 * Dh + 2 * D
    assert num_params(nnx.state(model, nnx.Param)) == V * D + 2 * per_layer + D
    out = model(jnp.zeros((2, 5), jnp.int32))
    assert out.shape == (2, 5, V) and out.dtype == jnp.float32
    # 6N rule: 3 x (2 FLOPs per matmul parameter) per token, the embedding lookup is no matmul, plus attention.
    plain = Transformer(tiny(), nnx.Rngs(0))
    norm_params = 2 * 2 * D + D
    matmul_params = num_params(nnx.state(plain, nnx.Param)) - V * D - norm_params
    T = 16
    attention = 2 * (
        2 * 2 * H * Dh * T / 2
    )  # layers x (QK^T and PV, 2 FLOPs each, half the keys when causal)
    assert flops_per_token(tiny(), T) == pytest.approx(3 * (2 * matmul_params + attention))
