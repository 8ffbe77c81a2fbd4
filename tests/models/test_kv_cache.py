"""KV-cache decoding (`Transformer.prefill` + `decode_step`) against the full training forward.

Invariant: the logits of a left-padded prompt prefilled into a cache and then fed one token at a time equal the
logits of one teacher-forced forward over the whole sequence at every real position, up to float32 summation order:
2e-6 of the largest logit (~17 ulps; measured 6.3e-7 and 1.3e-6 of it on an AVX-512 CPU, whose matmul kernels sum
in another order than AVX2's). Every parameter (norm scales and biases too) is drawn at random, so a path that skips one shows.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign.models.transformer import KVCache
from tests.helpers import random_model

# Of the largest |logit|: the Gemma variant (scaled embeddings) has logits up to ~9, the Llama one up to ~5.
REL_TOL = 2e-6

# name -> ModelConfig overrides; between them: GQA and MQA, qkv bias, qk-norm, llama3 RoPE, the Gemma variant (1 + w
# norms, scaled embeddings, gelu-tanh, tied), unrolled and scanned layers.
VARIANTS = {
    "llama_qwen_gqa_unrolled": dict(
        n_heads=4, n_kv_heads=2, qkv_bias=True, qk_norm=True, rope_scaling="llama3", rope_original_max_len=16
    ),
    "gemma_mqa_scan": dict(
        n_heads=4,
        n_kv_heads=1,
        norm_plus_one=True,
        scale_embeddings=True,
        activation="gelu_tanh",
        tie_embeddings=True,
        scan_layers=True,
    ),
}


def left_padded(rng: np.random.Generator, lengths, width: int, extra: int, vocab: int):
    """Tokens (B, width + extra) whose first `width` columns are left-padded prompts, the mask and positions."""
    B = len(lengths)
    mask = (np.arange(width)[None] >= width - np.asarray(lengths)[:, None]).astype(np.int32)
    tokens = rng.integers(1, vocab, (B, width + extra)).astype(np.int32)
    tokens[:, :width] *= mask
    full_mask = np.concatenate([mask, np.ones((B, extra), np.int32)], axis=1)
    positions = np.maximum(np.cumsum(full_mask, axis=1) - 1, 0).astype(np.int32)
    return tokens, mask, full_mask, positions


def cached_logits(graphdef, params, tokens, mask, positions, width, per_layer):
    """Prefill the first `width` columns, then decode the rest one token at a time; logits at every column."""
    B, T = tokens.shape
    tokens, positions = jnp.asarray(tokens), jnp.asarray(positions)
    model = nnx.merge(graphdef, params)
    h, cache = model.prefill(tokens[:, :width], positions[:, :width], mask, T)
    out = [model.logits(h).reshape(B, width, -1)]
    if per_layer:
        cache = KVCache(*(tuple(x) for x in cache))
    valid = jnp.pad(jnp.asarray(mask, bool), ((0, 0), (0, T - width)))

    def step(carry, t):
        cache, valid = carry
        valid = valid.at[:, t].set(True)
        h, cache = model.decode_step(tokens[:, t], positions[:, t], cache, t, valid)
        return (cache, valid), model.logits(h)

    (cache, _), logits = jax.lax.scan(step, (cache, valid), jnp.arange(width, T, dtype=jnp.int32))
    return jnp.concatenate([out[0], logits.transpose(1, 0, 2)], axis=1), cache


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cached_decode_logits_equal_full_forward(name):
    overrides = VARIANTS[name]
    graphdef, params = random_model(**overrides)
    width, extra = 7, 6
    tokens, mask, full_mask, positions = left_padded(np.random.default_rng(0), [7, 3, 1], width, extra, 128)

    @jax.jit
    def run(params):
        full = nnx.merge(graphdef, params)(tokens, positions, full_mask)
        cached, cache = cached_logits(graphdef, params, tokens, mask, positions, width, per_layer=False)
        # The per-layer tuple form a decode loop carries (the layers unrolled, scanned models' too).
        per_layer, _ = cached_logits(graphdef, params, tokens, mask, positions, width, per_layer=True)
        return full, cached, cache, per_layer

    full, cached, cache, per_layer = run(params)
    real = full_mask.astype(bool)
    for form, logits in (("stacked", cached), ("per-layer", per_layer)):
        err = float(np.abs(np.asarray(full) - np.asarray(logits))[real].max())
        print(
            f"{name}, {form} cache: max |cached - full| logits = {err:.2e} (|logits| <= {float(np.abs(full).max()):.1f})"
        )
        assert err <= REL_TOL * float(np.abs(full).max()), (form, err)
    # The same layers in the same order, whichever form the cache takes.
    np.testing.assert_array_equal(np.asarray(per_layer), np.asarray(cached))
    # GQA-aware: the cache holds K kv heads, never repeated to H.
    cfg = nnx.merge(graphdef, params).cfg
    assert cache.k.shape == (cfg.n_layers, 3, width + extra, cfg.n_kv_heads, cfg.head_dim)


def test_padded_slots_are_never_attended_to():
    """Changing the tokens under the left padding changes nothing, in the prefill or in the decode."""
    graphdef, params = random_model()
    width, extra = 6, 4
    tokens, mask, _, positions = left_padded(np.random.default_rng(1), [6, 2], width, extra, 128)
    other = tokens.copy()
    other[1, :4] = 77
    run = jax.jit(lambda p, t: cached_logits(graphdef, p, t, mask, positions, width, True)[0])
    a, b = np.asarray(run(params, tokens)), np.asarray(run(params, other))
    np.testing.assert_array_equal(a[:, width:], b[:, width:])
    np.testing.assert_array_equal(a[1, 4:], b[1, 4:])
