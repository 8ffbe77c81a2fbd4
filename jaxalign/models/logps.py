"""Log-probabilities of target tokens from final hidden states, optionally a chunk of positions at a time.

    logps_BxT, lse_BxT = target_logps(model, h_NxD, targets_BxT, chunk=0)

With `chunk > 0` the vocabulary projection and log-softmax run over `chunk` sequence positions at a time inside a
`lax.scan` whose body is rematerialised, so at most [B, chunk, V] float32 logits exist at once, in the forward and in
the backward pass; the result and its gradient equal the unchunked computation. Chunks split the length, never the
batch, so every chunk stays spread over the data-parallel devices (and over `tensor` for a sharded vocabulary).

Shape legend: B rows, T length, N = B * T, D d_model, V vocabulary, C chunk length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxalign.models.transformer import Transformer


def _output_weights(model: Transformer) -> jax.Array:
    return model.embed[...].T if model.cfg.tie_embeddings else model.lm_head[...]


def _logps(
    model: Transformer, h_BxCxD: jax.Array, w_DxV: jax.Array, targets_BxC: jax.Array, stats: bool = False
):
    logits_BxCxV = jnp.einsum(
        "bcd,dv->bcv", h_BxCxD, w_DxV.astype(h_BxCxD.dtype), preferred_element_type=jnp.float32
    )
    if model.rules is not None:
        logits_BxCxV = model.rules.constrain(logits_BxCxV, ("batch", "length", "vocab"))
    lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    target_BxC = jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
    if not stats:
        return target_BxC - lse_BxC, lse_BxC
    # Entropy of the softmax (nats) and whether the target is the argmax, without gradient (metrics only).
    logits_BxCxV = jax.lax.stop_gradient(logits_BxCxV)
    lse = jax.lax.stop_gradient(lse_BxC)
    p_BxCxV = jnp.exp(logits_BxCxV - lse[..., None])
    entropy_BxC = lse - jnp.sum(p_BxCxV * logits_BxCxV, axis=-1)
    top1_BxC = jax.lax.stop_gradient(target_BxC) >= jnp.max(logits_BxCxV, axis=-1)
    return target_BxC - lse_BxC, lse_BxC, entropy_BxC, top1_BxC


def target_logps(
    model: Transformer, h_NxD: jax.Array, targets_BxT: jax.Array, *, chunk: int = 0, stats: bool = False
) -> tuple[jax.Array, ...]:
    """(log p(target), log-partition) per position, float32 [B, T] each, from final-normed hidden states `h_NxD`.
    With `stats`, also the softmax entropy [B, T] (nats) and whether each target is the argmax [B, T] (bool), both
    without gradient: TRL's `entropy` and `mean_token_accuracy`."""
    B, T = targets_BxT.shape
    h_BxTxD = h_NxD.reshape(B, T, -1)
    w_DxV = _output_weights(model)
    if chunk <= 0 or chunk >= T:
        return _logps(model, h_BxTxD, w_DxV, targets_BxT, stats)
    n = -(-T // chunk)
    pad = n * chunk - T
    h_BxTxD = jnp.pad(h_BxTxD, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets_BxT, ((0, 0), (0, pad)))
    # [n, B, C, ...]: the scan walks the chunks of the length axis.
    h_chunks = h_BxTxD.reshape(B, n, chunk, -1).swapaxes(0, 1)
    t_chunks = targets.reshape(B, n, chunk).swapaxes(0, 1)
    # Only this chunk's hidden states are saved for the backward pass; its logits are recomputed there.
    body = jax.checkpoint(
        lambda h, t: _logps(model, h, w_DxV, t, stats), policy=jax.checkpoint_policies.nothing_saveable
    )
    _, outs = jax.lax.scan(lambda c, x: (c, body(*x)), None, (h_chunks, t_chunks))
    unchunk = lambda x: x.swapaxes(0, 1).reshape(B, n * chunk)[:, :T]
    return tuple(unchunk(x) for x in outs)
