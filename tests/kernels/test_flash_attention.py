"""Parity of the Pallas flash attention kernel (interpret mode on CPU) with the XLA reference.

Each case checks the output and dq, dk, dv (gradients of a random linear functional of the output) against
`xla_attention`. Shapes are small because the Pallas interpreter compiles slowly; lengths are chosen to not be
multiples of the blocks so padding and masking are always exercised.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxalign.kernels.flash_attention import _Static, flash_attention
from jaxalign.models.attention import xla_attention

# XLA:CPU compile time dominates these tests (the interpreted kernels are large while loops); these options
# cut it about threefold and leave the arithmetic (IEEE f32, no fast-math) as it is.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def packed_segment_ids(batch: int, length: int, seed: int = 0) -> jax.Array:
    """Segment ids like [0,0,0,1,1,2,2,2,...] with random document lengths 1..12, one layout per row."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(batch):
        lengths = rng.integers(1, 13, size=length)
        rows.append(np.repeat(np.arange(length), lengths)[:length])
    return jnp.asarray(np.stack(rows), dtype=jnp.int32)


def make_inputs(B, T, S, H, K, D, dtype, seed=0):
    """Standard normal q, k, v (in `dtype`) and the f32 weights w of the linear functional sum(o * w).

    NumPy draws them: jax.random would compile a sampler per shape, which costs more than the kernels."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
    q_BxTxHxD, k_BxSxKxD, v_BxSxKxD = normal(B, T, H, D), normal(B, S, K, D), normal(B, S, K, D)
    return q_BxTxHxD.astype(dtype), k_BxSxKxD.astype(dtype), v_BxSxKxD.astype(dtype), normal(B, T, H, D)


def output_and_grads(attn, q, k, v, w):
    """(o, dq, dk, dv) where the gradients are of sum(o * w), all in one jitted program."""

    def functional(q, k, v):
        o = attn(q, k, v)
        return jnp.sum(o.astype(jnp.float32) * w), o

    (_, o), grads = jax.value_and_grad(functional, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return (o, *grads)


def run_both(B, T, S, H, K, D, causal, packed, block_q, block_k, dtype):
    q, k, v, w = make_inputs(B, T, S, H, K, D, dtype)
    seg = packed_segment_ids(B, T) if packed else None
    flash = functools.partial(
        flash_attention, causal=causal, segment_ids=seg, block_q=block_q, block_k=block_k
    )
    ref = functools.partial(xla_attention, causal=causal, segment_ids=seg)
    got = jax.jit(functools.partial(output_and_grads, flash), compiler_options=FAST_COMPILE)(q, k, v, w)
    want = jax.jit(functools.partial(output_and_grads, ref), compiler_options=FAST_COMPILE)(q, k, v, w)
    return got, want, (q, k, v, w, seg)


NAMES = ("o", "dq", "dk", "dv")


def assert_close_fp32(got, want, name):
    """rtol 1e-5, and atol 1e-6 of the array's scale: an entry that cancels to ~0 (a token alone in its segment has
    dq = 0 exactly in the reference) keeps the rounding of the terms that cancelled, which scale with the array."""
    assert got.dtype == want.dtype == jnp.float32, name
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max(), err_msg=name)


# B, T, S, H, K, D, causal, packed, block_q, block_k. Every length is ragged w.r.t. its block; together the cases
# cover GQA ratios 1, 2, 4, causal and not, packed and not, T < S and T > S, unequal blocks (the causal
# block-skipping bounds) and a head dim that is padded.
FP32_CASES = [
    pytest.param(2, 37, 37, 2, 2, 24, True, True, 16, 16, id="mha-causal-packed-D24"),
    pytest.param(2, 40, 40, 4, 1, 16, False, True, 16, 32, id="gqa4-full-packed"),
    pytest.param(2, 24, 56, 4, 2, 32, False, False, 16, 32, id="gqa2-full-cross"),
    pytest.param(2, 40, 40, 4, 2, 16, True, False, 32, 16, id="gqa2-causal-bq32-bk16"),
    pytest.param(2, 24, 40, 4, 1, 16, True, False, 16, 32, id="gqa4-causal-T<S-bq16-bk32"),
    pytest.param(1, 40, 24, 2, 1, 16, True, False, 16, 16, id="gqa2-causal-T>S"),
]


@pytest.mark.parametrize("B,T,S,H,K,D,causal,packed,block_q,block_k", FP32_CASES)
def test_matches_xla_fp32(B, T, S, H, K, D, causal, packed, block_q, block_k):
    got, want, _ = run_both(B, T, S, H, K, D, causal, packed, block_q, block_k, jnp.float32)
    for name, g, r in zip(NAMES, got, want, strict=True):
        assert_close_fp32(g, r, name)


BF16_CASES = [
    pytest.param(2, 40, 40, 4, 2, 16, True, False, 16, 16, id="gqa2-causal"),
    pytest.param(2, 40, 40, 4, 1, 32, False, True, 32, 16, id="gqa4-full-packed"),
]


@pytest.mark.parametrize("B,T,S,H,K,D,causal,packed,block_q,block_k", BF16_CASES)
def test_matches_xla_bf16(B, T, S, H, K, D, causal, packed, block_q, block_k):
    """bf16 inputs: output and gradients in bf16, close to the XLA path in bf16 and to the fp32 truth."""
    got, want, (q, k, v, w, seg) = run_both(B, T, S, H, K, D, causal, packed, block_q, block_k, jnp.bfloat16)
    ref32 = functools.partial(xla_attention, causal=causal, segment_ids=seg)
    up = lambda x: x.astype(jnp.float32)
    truth = jax.jit(functools.partial(output_and_grads, ref32), compiler_options=FAST_COMPILE)(
        up(q), up(k), up(v), w
    )
    for name, g, r, t in zip(NAMES, got, want, truth, strict=True):
        assert g.dtype == jnp.bfloat16, name
        g, r, t = np.asarray(up(g)), np.asarray(up(r)), np.asarray(t)
        # Within one bf16 ulp (2**-7 relative) of the entry plus one of the array's largest entry.
        np.testing.assert_allclose(g, r, rtol=2**-7, atol=2**-7 * np.abs(r).max(), err_msg=name)
        # f32 accumulation: against the fp32 truth the kernel is within one bf16 ulp of the array's scale (half
        # of it is the output rounding; the rest the FlashAttention-2 roundings of p and ds to bf16), as is XLA.
        scale = 2**-7 * np.abs(t).max()
        assert np.abs(g - t).max() <= scale and np.abs(r - t).max() <= scale, name


def test_sharded_matches_unsharded():
    """Batch on 'data', heads on 'tensor' of a 2x4 mesh; the kernel runs per shard inside shard_map."""
    mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    B, T, H, K, D = 2, 40, 8, 4, 16
    q, k, v, w = make_inputs(B, T, T, H, K, D, jnp.float32, seed=1)
    seg = packed_segment_ids(B, T, seed=1)
    heads, rows = P("data", None, "tensor", None), P("data", None)

    def flash_sharded(q, k, v):
        kernel = lambda q, k, v, seg: flash_attention(q, k, v, segment_ids=seg, block_q=16, block_k=16)
        sharded = jax.shard_map(kernel, mesh=mesh, in_specs=(heads, heads, heads, rows), out_specs=heads)
        return sharded(q, k, v, seg)

    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
    args = (put(q, heads), put(k, heads), put(v, heads), put(w, heads))
    got = jax.jit(functools.partial(output_and_grads, flash_sharded), compiler_options=FAST_COMPILE)(*args)
    ref = functools.partial(xla_attention, causal=True, segment_ids=seg)
    want = jax.jit(functools.partial(output_and_grads, ref), compiler_options=FAST_COMPILE)(q, k, v, w)
    for name, g, r in zip(NAMES, got, want, strict=True):
        assert g.sharding.is_equivalent_to(NamedSharding(mesh, heads), g.ndim), name
        assert_close_fp32(g, r, name)


def test_causal_output_ignores_future_keys():
    """Changing the last key/value changes only the last query row (and padding never leaks in)."""
    q, k, v, _ = make_inputs(1, 21, 21, 2, 1, 16, jnp.float32)
    attn = jax.jit(functools.partial(flash_attention, block_q=16, block_k=16), compiler_options=FAST_COMPILE)
    o = attn(q, k, v)
    o2 = attn(q, k.at[:, -1].add(1.0), v.at[:, -1].add(1.0))
    np.testing.assert_array_equal(o[:, :-1], o2[:, :-1])
    assert np.abs(o[:, -1] - o2[:, -1]).min() > 0


@pytest.mark.parametrize(
    "T,S,bq,bk", [(64, 64, 16, 16), (40, 40, 32, 16), (24, 40, 16, 32), (56, 24, 16, 16)]
)
def test_causal_block_skipping_is_tight(T, S, bq, bk):
    """The loops visit exactly the key blocks (forward, dq) and query blocks (dk/dv) that hold a visible pair."""
    st = _Static(causal=True, scale=1.0, block_q=bq, block_k=bk, q_len=T, kv_len=S, interpret=True)
    nq, nk = -(-T // bq), -(-S // bk)
    visible_TxS = np.tril(np.ones((T, S), bool), k=S - T)
    pad = np.zeros((nq * bq, nk * bk), bool)
    pad[:T, :S] = visible_TxS
    needed_NQxNK = pad.reshape(nq, bq, nk, bk).any(axis=(1, 3))
    for i in range(nq):
        last = np.flatnonzero(needed_NQxNK[i])
        # A q block that sees no key at all (T > S) still runs one fully masked block.
        want = last[-1] + 1 if last.size else 1
        assert int(st.num_k_blocks(jnp.int32(i), nk)) == want, i
    for j in range(nk):
        first = np.flatnonzero(needed_NQxNK[:, j])
        assert min(int(st.first_q_block(jnp.int32(j))), nq) == (first[0] if first.size else nq), j


@pytest.mark.parametrize(
    "kwargs,q_shape,kv_shape,message",
    [
        ({"block_q": 24}, (1, 8, 2, 16), (1, 8, 2, 16), "block_q must be a power of two >= 16"),
        ({}, (1, 8, 3, 16), (1, 8, 2, 16), "multiple of key/value heads"),
        ({"segment_ids": jnp.zeros((1, 8), jnp.int32)}, (1, 8, 2, 16), (1, 9, 2, 16), "T == S"),
        ({"segment_ids": jnp.zeros((1, 9), jnp.int32)}, (1, 8, 2, 16), (1, 8, 2, 16), r"\[B=1, T=8\]"),
    ],
)
def test_rejects_bad_arguments(kwargs, q_shape, kv_shape, message):
    q, kv = jnp.zeros(q_shape), jnp.zeros(kv_shape)
    with pytest.raises(ValueError, match=message):
        flash_attention(q, kv, kv, **kwargs)
