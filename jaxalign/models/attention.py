"""Attention dispatch: the XLA reference path and the Pallas flash kernel.

Shapes: B batch, T query length, S key length, H query heads, K key/value heads (H is a multiple of K: GQA),
D head dim. `segment_ids_BxT` (int32) marks packed documents: a token attends only to tokens of its own segment.
Key/value heads are never materialised repeated: queries are grouped as (K, H // K) instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxalign.errors import ConfigError

IMPLEMENTATIONS = ("xla", "flash", "auto")


def xla_attention(
    q_BxTxHxD: jax.Array,
    k_BxSxKxD: jax.Array,
    v_BxSxKxD: jax.Array,
    *,
    causal: bool = True,
    segment_ids: jax.Array | None = None,
    sm_scale: float | None = None,
) -> jax.Array:
    """Reference softmax attention in plain XLA ops (softmax in float32). Returns `o_BxTxHxD`."""
    B, T, H, D = q_BxTxHxD.shape
    S, K = k_BxSxKxD.shape[1], k_BxSxKxD.shape[2]
    if H % K:
        raise ValueError(f"query heads {H} must be a multiple of key/value heads {K}")
    scale = D**-0.5 if sm_scale is None else sm_scale
    q_BxTxKxGxD = q_BxTxHxD.reshape(B, T, K, H // K, D)
    s_BxKxGxTxS = jnp.einsum("btkgd,bskd->bkgts", q_BxTxKxGxD, k_BxSxKxD, preferred_element_type=jnp.float32)
    s_BxKxGxTxS = s_BxKxGxTxS * scale
    mask_BxTxS = jnp.ones((1, T, S), dtype=bool)
    if causal:
        mask_BxTxS = jnp.tril(jnp.ones((T, S), dtype=bool), k=S - T)[None]
    if segment_ids is not None:
        if S != T:
            raise ValueError("segment_ids need self-attention (T == S)")
        mask_BxTxS = mask_BxTxS & (segment_ids[:, :, None] == segment_ids[:, None, :])
    s_BxKxGxTxS = jnp.where(mask_BxTxS[:, None, None], s_BxKxGxTxS, jnp.finfo(jnp.float32).min)
    p_BxKxGxTxS = jax.nn.softmax(s_BxKxGxTxS, axis=-1).astype(v_BxSxKxD.dtype)
    o_BxTxKxGxD = jnp.einsum("bkgts,bskd->btkgd", p_BxKxGxTxS, v_BxSxKxD)
    return o_BxTxKxGxD.reshape(B, T, H, D)


def resolve(implementation: str) -> str:
    """Maps "auto" to "flash" on GPU/TPU and "xla" on CPU."""
    if implementation not in IMPLEMENTATIONS:
        raise ConfigError(f"model.attention={implementation!r} is not one of {list(IMPLEMENTATIONS)}")
    if implementation == "auto":
        return "xla" if jax.default_backend() == "cpu" else "flash"
    return implementation


def attention(
    q_BxTxHxD: jax.Array,
    k_BxSxKxD: jax.Array,
    v_BxSxKxD: jax.Array,
    *,
    implementation: str = "xla",
    causal: bool = True,
    segment_ids: jax.Array | None = None,
    sm_scale: float | None = None,
) -> jax.Array:
    """Dispatches to the chosen implementation; all take and return the same layouts."""
    implementation = resolve(implementation)
    if implementation == "flash":
        from jaxalign.kernels.flash_attention import flash_attention

        return flash_attention(
            q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, causal=causal, segment_ids=segment_ids, sm_scale=sm_scale
        )
    return xla_attention(
        q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, causal=causal, segment_ids=segment_ids, sm_scale=sm_scale
    )
