"""Log-probabilities of target tokens from final hidden states, optionally a chunk of positions at a time.

    logps_BxT, lse_BxT = target_logps(model, h_NxD, targets_BxT, chunk=0, where_BxT=None)

With `chunk > 0` the vocabulary projection and log-softmax run over `chunk` sequence positions at a time inside a
`lax.scan` whose body is rematerialised, so at most [B, chunk, V] float32 logits exist at once, in the forward and in
the backward pass; the result and its gradient equal the unchunked computation. Chunks split the length, never the
batch, so every chunk stays spread over the data-parallel devices (and over `tensor` for a sharded vocabulary).
With `where_BxT` (the loss positions) the rest cost nothing: each row's selected positions move to its front and the
pieces past the longest selection are skipped (SFT's and DPO's prompts and padding, a quarter of their workloads).

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
    model: Transformer,
    h_NxD: jax.Array,
    targets_BxT: jax.Array,
    *,
    chunk: int = 0,
    stats: bool = False,
    where_BxT: jax.Array | None = None,
) -> tuple[jax.Array, ...]:
    """(log p(target), log-partition) per position, float32 [B, T] each, from final-normed hidden states `h_NxD`.
    With `stats`, also the softmax entropy [B, T] (nats) and whether each target is the argmax [B, T] (bool), both
    without gradient: TRL's `entropy` and `mean_token_accuracy`. With `where_BxT` (bool), every output is 0 (False)
    where it is False and only the positions where it is True pay for the vocabulary projection (`_where`)."""
    B, T = targets_BxT.shape
    h_BxTxD = h_NxD.reshape(B, T, -1)
    w_DxV = _output_weights(model)
    if where_BxT is not None:
        return _where(model, h_BxTxD, w_DxV, targets_BxT, where_BxT, chunk, stats)
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


# Without a chunk length, `_where` walks the rows in this many pieces: finer skips what a piece of loss-free positions
# costs more precisely, coarser makes fewer, larger matmuls.
WHERE_PIECES = 8


def _where(model, h_BxTxD, w_DxV, targets_BxT, where_BxT, chunk: int, stats: bool):
    """`target_logps` on the positions where `where_BxT` is True only. Each row's selected positions move to its
    front (a stable sort, so in order), the rows are walked a piece of C positions at a time, and a piece past every
    row's last selected position is skipped (`lax.cond`: no projection, no log-softmax, in the backward pass
    either); the results move back to their positions and are 0 elsewhere. Prompts (SFT, DPO) and padding are the
    positions skipped: a quarter of the reference workloads' rows. With `chunk`, C = chunk and each piece is
    rematerialised as in the chunked path (one piece of logits at a time); without, C = T / WHERE_PIECES and the
    pieces' logits are kept for the backward pass, as the unchunked path keeps all of them."""
    B, T = targets_BxT.shape
    C = chunk if chunk > 0 else -(-T // WHERE_PIECES)
    n = -(-T // C)
    order_BxT = jnp.argsort(~where_BxT, axis=1, stable=True)  # selected positions first, in order
    needed = jnp.max(jnp.sum(where_BxT, axis=1))  # positions of the longest selection
    pad = n * C - T
    h = jnp.pad(jnp.take_along_axis(h_BxTxD, order_BxT[..., None], axis=1), ((0, 0), (0, pad), (0, 0)))
    t = jnp.pad(jnp.take_along_axis(targets_BxT, order_BxT, axis=1), ((0, 0), (0, pad)))
    h_chunks = h.reshape(B, n, C, -1).swapaxes(0, 1)
    t_chunks = t.reshape(B, n, C).swapaxes(0, 1)

    def piece(h_BxCxD, t_BxC):
        return _logps(model, h_BxCxD, w_DxV, t_BxC, stats)

    if chunk > 0:
        piece = jax.checkpoint(piece, policy=jax.checkpoint_policies.nothing_saveable)
    shapes = jax.eval_shape(piece, h_chunks[0], t_chunks[0])

    def body(carry, x):
        i, h_BxCxD, t_BxC = x
        skipped = lambda h_, t_: tuple(jnp.zeros(s.shape, s.dtype) for s in shapes)
        return carry, jax.lax.cond(i * C < needed, piece, skipped, h_BxCxD, t_BxC)

    _, outs = jax.lax.scan(body, None, (jnp.arange(n), h_chunks, t_chunks))
    back_BxT = jnp.argsort(order_BxT, axis=1)  # the inverse permutation
    outs = (jnp.take_along_axis(x.swapaxes(0, 1).reshape(B, n * C)[:, :T], back_BxT, axis=1) for x in outs)
    return tuple(jnp.where(where_BxT, x, jnp.zeros((), x.dtype)) for x in outs)
