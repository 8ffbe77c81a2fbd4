"""KV-cache generation with the one jaxalign `Transformer`, and the trainer-side log-probs it agrees with.

    out = sampler.generate(model, prompts, max_new_tokens=64, temperature=1.0, top_k=0, top_p=1.0,
                           eos_id=None, rng=None, num_generations=1)
    out.tokens  # [B*G, C] int32, pad_id after EOS
    out.logps   # [B*G, C] float32 log-probs of the sampled tokens under the distribution sampled from
    out.mask    # [B*G, C] int32, 1 up to and including the EOS token, 0 after

Which entry to use:
- `generate(model, prompts, ...)`: the host-side convenience for evaluation, scripts and tests. Takes an nnx
  `Transformer` (`hf.load`ed ones included) and prompts as token-id lists (or an `rl_loader` batch), validates every
  argument into one-line errors, then runs two jitted calls: the prefill, and the decode loop over the donated cache.
- `sample(graphdef, params, prompt_ids_BxP, prompt_mask_BxP, rng, ...)`: a pure, traceable function of device
  arrays with the same output. RL stages call it inside their jitted step (no host round trip, no re-validation of
  array contents: rows must be left-padded and non-empty, which `rl_loader` guarantees).
- `completion_logps(graphdef, params, ...)`: the trainer's teacher-forced recomputation of `logps`, through the
  training forward (`Transformer.hidden`) and the same `process_logits`. RL stages use it for the policy, old and
  reference log-probs; it is the oracle the sampler's `logps` are tested against.
- `process_logits(logits, temperature, top_k, top_p)`: the one place where logits become the sampling
  distribution (temperature, then top-k, then top-p, as transformers' warpers).

Shape legend: B rows (prompts, or prompts x generations), P prompt width, C completion length (max_new_tokens),
S cache slots (>= P + C), V vocabulary, G generations per prompt.

Layout: prompts are left-padded (right-aligned) in [B, P], so every row's next token goes to the same cache slot.
A row's real tokens have RoPE positions 0 .. len-1 and segment id 1; pad slots have segment 0 and are never
attended to. Generated token t of a row is fed at slot P + t with position len + t. With G > 1 the P prompts are
prefilled once and their cache and last logits are repeated G times, prompt-major: rows p*G .. p*G+G-1.

Randomness: step t samples every row with one key, `fold_in(rng, t)`: one uniform number per row, whose inverse
CDF under the row's distribution is the token (`inverse_cdf_sample`). With JAX's partitionable threefry (the
default, `jax_threefry_partitionable=True`) row r's number depends only on (rng, t, r), so samples are the same
whatever the sharding, the batch size, or whether the prefill was shared.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign.errors import ConfigError, DataError
from jaxalign.kernels import vmem
from jaxalign.models.transformer import CACHE_AXES, KVCache, Transformer

__all__ = [
    "SampleOutput",
    "completion_logps",
    "generate",
    "process_logits",
    "sample",
    "sample_tokens",
    "inverse_cdf_sample",
]


class SampleOutput(NamedTuple):
    """Generated completions (row order: prompt-major, rows p*G .. p*G+G-1 are prompt p's samples)."""

    tokens: jax.Array  # [B, C] int32, pad_id after EOS
    logps: jax.Array  # [B, C] float32, 0 after EOS
    mask: jax.Array  # [B, C] int32, 1 up to and including EOS
    prompt_ids: jax.Array  # [B, P] int32, the prompts repeated per generation (left-padded)
    prompt_mask: jax.Array  # [B, P] int32


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """Raises ConfigError unless temperature >= 0 (0 is greedy), top_k >= 0 (0 is off) and 0 < top_p <= 1."""
    if not isinstance(temperature, numbers.Real) or not math.isfinite(temperature) or temperature < 0:
        raise ConfigError(f"temperature={temperature!r} must be a finite number >= 0 (0 is greedy)")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise ConfigError(f"top_k={top_k!r} must be an integer >= 0 (0 keeps every token)")
    if not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1:
        raise ConfigError(f"top_p={top_p!r} must be in (0, 1] (1 keeps every token)")


def process_logits(
    logits_BxV: jax.Array, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> jax.Array:
    """The distribution sampled from, as float32 logits over the last axis (any leading shape): divided by
    `temperature` (0 means greedy and leaves them unscaled), then every token below the k-th largest logit
    (`top_k` > 0) and outside the smallest set whose probability reaches `top_p` (< 1) set to -inf. Ties at a
    threshold are all kept. `log_softmax` of the result gives the log-probs of that distribution."""
    check_sampling(temperature, top_k, top_p)
    logits = logits_BxV.astype(jnp.float32)
    if temperature > 0:
        logits = logits / temperature
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = jax.lax.top_k(logits, int(top_k))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1:
        sorted_desc = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        # A token is kept if the tokens ranked above it hold less than top_p (so the top token always is).
        kept = jnp.sum(jnp.cumsum(probs, axis=-1) - probs < top_p, axis=-1, keepdims=True)
        threshold = jnp.take_along_axis(sorted_desc, kept - 1, axis=-1)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def sample_tokens(
    logits_BxV: jax.Array, key: jax.Array, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """One token per row from `process_logits(logits_BxV, ...)` (argmax when `temperature == 0`); returns
    (token_B int32, logp_B float32: its log-prob under that distribution)."""
    processed_BxV = process_logits(logits_BxV, temperature, top_k, top_p)
    logp_BxV = jax.nn.log_softmax(processed_BxV, axis=-1)
    if temperature == 0:
        token_B = jnp.argmax(processed_BxV, axis=-1).astype(jnp.int32)
    else:
        token_B = inverse_cdf_sample(jnp.exp(logp_BxV), key)
    return token_B, jnp.take_along_axis(logp_BxV, token_B[:, None], axis=-1)[:, 0]


def inverse_cdf_sample(probs_BxV: jax.Array, key: jax.Array, block: int = 128) -> jax.Array:
    """One draw per row from the (unnormalised, non-negative) `probs_BxV` by inverting its CDF at one uniform
    number per row, in two levels: the block of `block` tokens whose cumulative mass passes u, then the token inside
    it. Tokens of probability 0 (masked by top-k / top-p) are never drawn. On CPU this is ~20x cheaper per decode
    step than `jax.random.categorical`, which draws Gumbel noise for every one of the B x V logits (~4 ms of a
    ~10 ms decode step at B=8, V=8192: benchmarks/generate_bench.py --temperature=1). Returns token_B int32."""
    B, V = probs_BxV.shape
    N = -(-V // block)
    probs_BxNxK = jnp.pad(probs_BxV, ((0, 0), (0, N * block - V))).reshape(B, N, block)
    mass_BxN = jnp.sum(probs_BxNxK, axis=-1)
    cdf_BxN = jnp.cumsum(mass_BxN, axis=-1)
    u_Bx1 = jax.random.uniform(key, (B, 1), jnp.float32) * cdf_BxN[:, -1:]
    n_B = _pick(cdf_BxN > u_Bx1, mass_BxN > 0)
    before_B = jnp.where(
        n_B > 0, jnp.take_along_axis(cdf_BxN, jnp.maximum(n_B - 1, 0)[:, None], 1)[:, 0], 0.0
    )
    probs_BxK = jnp.take_along_axis(probs_BxNxK, n_B[:, None, None], axis=1)[:, 0]
    cdf_BxK = before_B[:, None] + jnp.cumsum(probs_BxK, axis=-1)
    return n_B * block + _pick(cdf_BxK > u_Bx1, probs_BxK > 0)


def _pick(passed_BxN: jax.Array, positive_BxN: jax.Array) -> jax.Array:
    """The first entry of positive mass whose cumulative mass passes u; if float rounding leaves none (u at the
    very top of the range), the last entry of positive mass. Never an entry of zero mass."""
    hit_BxN = passed_BxN & positive_BxN
    N = hit_BxN.shape[-1]
    last_B = N - 1 - jnp.argmax(positive_BxN[:, ::-1], axis=-1)
    return jnp.where(jnp.any(hit_BxN, axis=-1), jnp.argmax(hit_BxN, axis=-1), last_B).astype(jnp.int32)


def _positions(mask_BxT: jax.Array) -> jax.Array:
    """RoPE positions restarting at 0 on each row's first real token (0 on left padding)."""
    return jnp.maximum(jnp.cumsum(mask_BxT, axis=1) - 1, 0).astype(jnp.int32)


def _check_lengths(width: int, max_new_tokens: int, cache_len: int, max_seq_len: int, longest: int) -> None:
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, numbers.Integral)
        or max_new_tokens < 1
    ):
        raise ConfigError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    if width + max_new_tokens > cache_len:
        raise ConfigError(
            f"prompt width {width} + max_new_tokens={max_new_tokens} = {width + max_new_tokens} overflows the KV "
            f"cache of cache_len={cache_len} slots; raise cache_len or shorten the request"
        )
    if longest + max_new_tokens > max_seq_len:
        raise ConfigError(
            f"longest prompt {longest} + max_new_tokens={max_new_tokens} = {longest + max_new_tokens} exceeds the "
            f"model's max_seq_len={max_seq_len}; shorten the prompts or max_new_tokens"
        )


def _check_generations(num_generations: int) -> None:
    if (
        isinstance(num_generations, bool)
        or not isinstance(num_generations, numbers.Integral)
        or num_generations < 1
    ):
        raise ConfigError(f"num_generations={num_generations!r} must be an integer >= 1")


def _eos_tuple(eos_id: int | Sequence[int] | None, vocab_size: int) -> tuple[int, ...]:
    ids = () if eos_id is None else (eos_id,) if isinstance(eos_id, numbers.Integral) else tuple(eos_id)
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < vocab_size:
            raise ConfigError(
                f"eos_id={eos_id!r}: every id must be an integer in [0, vocab_size={vocab_size})"
            )
    return tuple(int(i) for i in ids)


def prefill(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    prompt_ids_PxT: jax.Array,
    prompt_mask_PxT: jax.Array,
    *,
    cache_len: int,
    num_generations: int = 1,
) -> tuple[KVCache, jax.Array, jax.Array, jax.Array]:
    """Runs the P left-padded prompts once and repeats the result G times (prompt-major). Returns the cache
    (L, P*G, cache_len, K, Dh), the last-column logits (P*G, V) and the repeated prompt ids and mask (P*G, T)."""
    model = nnx.merge(graphdef, params)
    P, T = prompt_ids_PxT.shape
    h_NxD, cache = model.prefill(prompt_ids_PxT, _positions(prompt_mask_PxT), prompt_mask_PxT, cache_len)
    logits_PxV = model.logits(h_NxD.reshape(P, T, -1)[:, -1])
    G = num_generations
    if G > 1:
        cache = KVCache(*(model._constrain(jnp.repeat(x, G, axis=1), CACHE_AXES) for x in cache))
        logits_PxV = jnp.repeat(logits_PxV, G, axis=0)
        prompt_ids_PxT, prompt_mask_PxT = (
            jnp.repeat(x, G, axis=0) for x in (prompt_ids_PxT, prompt_mask_PxT)
        )
    return cache, logits_PxV, prompt_ids_PxT, prompt_mask_PxT


def decode(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    cache: KVCache,
    logits_BxV: jax.Array,
    prompt_mask_BxP: jax.Array,
    rng: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    eos_ids: tuple[int, ...],
    pad_id: int,
) -> tuple[jax.Array, jax.Array, jax.Array, KVCache]:
    """The decode loop after `prefill`: samples token 0 from `logits_BxV`, then a `lax.while_loop` feeds each
    token through `Transformer.decode_step` (cache updated in place) until `max_new_tokens` or every row has
    emitted an EOS id. Returns (tokens_BxC, logps_BxC, mask_BxC, final cache); returning the cache lets a jit that
    donates it run the loop in the prefill's buffer instead of a copy."""
    model = nnx.merge(graphdef, params)
    B, P = prompt_mask_BxP.shape
    S, C = cache.k.shape[2], max_new_tokens
    eos_E = jnp.asarray(eos_ids, jnp.int32)
    lengths_B = jnp.sum(prompt_mask_BxP, axis=1).astype(jnp.int32)
    slots_S = jnp.arange(S, dtype=jnp.int32)
    prompt_valid_BxS = jnp.pad(prompt_mask_BxP.astype(bool), ((0, 0), (0, S - P)))

    def is_eos(token_B):
        return jnp.any(token_B[:, None] == eos_E[None], axis=1) if eos_ids else jnp.zeros(token_B.shape, bool)

    token_B, logp_B = sample_tokens(logits_BxV, jax.random.fold_in(rng, 0), temperature, top_k, top_p)
    tokens_BxC = jnp.full((B, C), pad_id, jnp.int32).at[:, 0].set(token_B)
    logps_BxC = jnp.zeros((B, C), jnp.float32).at[:, 0].set(logp_B)
    mask_BxC = jnp.zeros((B, C), jnp.int32).at[:, 0].set(1)

    def cond(carry):
        t, done_B = carry[0], carry[-1]
        return (t < C) & ~jnp.all(done_B)

    def body(carry):
        t, token_B, cache, tokens_BxC, logps_BxC, mask_BxC, done_B = carry
        slot = P + t - 1  # where the previous token goes
        valid_BxS = prompt_valid_BxS | ((slots_S >= P) & (slots_S <= slot))[None]
        h_BxD, cache = model.decode_step(token_B, lengths_B + t - 1, cache, slot, valid_BxS)
        token_B, logp_B = sample_tokens(
            model.logits(h_BxD), jax.random.fold_in(rng, t), temperature, top_k, top_p
        )
        live_B = ~done_B
        token_B = jnp.where(live_B, token_B, pad_id)
        column = lambda x: x[:, None]
        tokens_BxC = jax.lax.dynamic_update_slice(tokens_BxC, column(token_B), (0, t))
        logps_BxC = jax.lax.dynamic_update_slice(logps_BxC, column(jnp.where(live_B, logp_B, 0.0)), (0, t))
        mask_BxC = jax.lax.dynamic_update_slice(mask_BxC, column(live_B.astype(jnp.int32)), (0, t))
        return t + 1, token_B, cache, tokens_BxC, logps_BxC, mask_BxC, done_B | (live_B & is_eos(token_B))

    # The loop carries one cache array per layer (`Transformer.decode_step`: a stacked cache is copied each step).
    cache = KVCache(*(tuple(x) for x in cache))
    carry = (jnp.int32(1), token_B, cache, tokens_BxC, logps_BxC, mask_BxC, is_eos(token_B))
    _, _, cache, tokens_BxC, logps_BxC, mask_BxC, _ = jax.lax.while_loop(cond, body, carry)
    cache = KVCache(*(jnp.stack(x) for x in cache))
    return tokens_BxC, logps_BxC, mask_BxC, cache


def sample(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    prompt_ids_BxP: jax.Array,
    prompt_mask_BxP: jax.Array,
    rng: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_ids: tuple[int, ...] = (),
    pad_id: int = 0,
    num_generations: int = 1,
    cache_len: int | None = None,
) -> SampleOutput:
    """Generation as a pure function of device arrays, for use inside a jitted RL step: prefill of the B
    left-padded prompts (every row non-empty), then the decode loop, G samples per prompt (rows prompt-major).
    `cache_len` defaults to P + max_new_tokens. The scalar arguments are static (trace-time) values."""
    cfg = nnx.merge(graphdef, params).cfg
    check_sampling(temperature, top_k, top_p)
    _check_generations(num_generations)
    P = prompt_ids_BxP.shape[1]
    cache_len = P + max_new_tokens if cache_len is None else cache_len
    _check_lengths(P, max_new_tokens, cache_len, cfg.max_seq_len, longest=P)
    cache, logits_BxV, ids_BxP, mask_BxP = prefill(
        graphdef,
        params,
        prompt_ids_BxP,
        prompt_mask_BxP,
        cache_len=cache_len,
        num_generations=num_generations,
    )
    tokens, logps, mask, _ = decode(
        graphdef,
        params,
        cache,
        logits_BxV,
        mask_BxP,
        rng,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_ids=tuple(eos_ids),
        pad_id=pad_id,
    )
    return SampleOutput(tokens, logps, mask, ids_BxP, mask_BxP)


def completion_logps(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    prompt_ids_BxP: jax.Array,
    prompt_mask_BxP: jax.Array,
    completion_ids_BxC: jax.Array,
    completion_mask_BxC: jax.Array,
    *,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    with_entropy: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Teacher-forced log-probs (B, C) float32 of the completion tokens under `process_logits` of the model's
    logits, 0 where `completion_mask_BxC` is 0. One training forward over [prompt | completion] (differentiable,
    with the model's remat and attention settings); left-padded prompts as in `sample`. `with_entropy` also
    returns the entropy (nats, B x C, 0 where masked) of each position's sampling distribution."""
    model = nnx.merge(graphdef, params)
    B, P = prompt_ids_BxP.shape
    C = completion_ids_BxC.shape[1]
    tokens_BxT = jnp.concatenate([prompt_ids_BxP, completion_ids_BxC], axis=1).astype(jnp.int32)
    # Completion padding after EOS stays in segment 1: only later (masked) positions could see it.
    segments_BxT = jnp.concatenate([prompt_mask_BxP, jnp.ones_like(completion_ids_BxC)], axis=1).astype(
        jnp.int32
    )
    h_BxTxD = model.hidden(tokens_BxT, _positions(segments_BxT), segments_BxT).reshape(B, P + C, -1)
    # Position P - 1 + c predicts completion token c.
    logits_NxV = model.logits(h_BxTxD[:, P - 1 : P + C - 1].reshape(B * C, -1))
    if vmem.target_platform() == "cpu":
        # Keeps the LM head a plain matmul: XLA:CPU otherwise fuses it with the log-softmax's reductions into a
        # kernel ~2x slower than the matmul alone (grpo_bench's update 217 -> 205 ms). Values are the same.
        logits_NxV = jax.lax.optimization_barrier(logits_NxV)
    logp_NxV = jax.nn.log_softmax(process_logits(logits_NxV, temperature, top_k, top_p), axis=-1)
    hit_NxV = jnp.arange(logp_NxV.shape[-1])[None, :] == completion_ids_BxC.reshape(-1, 1)
    logps_BxC = jnp.sum(jnp.where(hit_NxV, logp_NxV, 0.0), axis=-1).reshape(B, C)
    logps_BxC = jnp.where(completion_mask_BxC > 0, logps_BxC, 0.0)
    if not with_entropy:
        return logps_BxC
    # Tokens removed by top-k / top-p have p = 0 and log p = -inf: they add 0, not NaN.
    plogp_NxV = jnp.where(logp_NxV > -jnp.inf, jnp.exp(logp_NxV) * logp_NxV, 0.0)
    entropy_BxC = -jnp.sum(plogp_NxV, axis=-1).reshape(B, C)
    return logps_BxC, jnp.where(completion_mask_BxC > 0, entropy_BxC, 0.0)


# The host-side path: the prefill and the decode loop as two compiled programs (cached by jit on the static
# arguments); the decode donates the cache so the while loop updates the prefill's buffer in place.
jit_prefill = jax.jit(prefill, static_argnames=("graphdef", "cache_len", "num_generations"))
jit_decode = jax.jit(
    decode,
    static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p", "eos_ids", "pad_id"),
    donate_argnames=("cache",),
)


def _left_pad(prompts: Any, pad_id: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """[B, P] int32 ids and mask from token-id lists, or from an `rl_loader` batch (`prompt_ids`, `prompt_mask`)."""
    if isinstance(prompts, Mapping):
        if "prompt_ids" not in prompts or "prompt_mask" not in prompts:
            raise DataError(
                f"prompts: a batch needs 'prompt_ids' and 'prompt_mask', got keys {sorted(prompts)}"
            )
        ids, mask = np.asarray(prompts["prompt_ids"]), np.asarray(prompts["prompt_mask"])
        if ids.ndim != 2 or ids.shape != mask.shape or ids.shape[0] == 0:
            raise DataError(
                f"prompts: prompt_ids {ids.shape} and prompt_mask {mask.shape} must be equal [B, P], B > 0"
            )
        for b, row in enumerate(mask):
            n = int(row.sum())
            if n == 0:
                raise DataError(
                    f"prompts: row {b} of prompt_mask is empty; every prompt needs at least one token"
                )
            if not (row[-n:] == 1).all() or row[:-n].any():
                raise DataError(
                    f"prompts: row {b} of prompt_mask is not left-padded (0 ... 0 1 ... 1): {row.tolist()}"
                )
        rows = [ids[b, mask.shape[1] - int(mask[b].sum()) :] for b in range(len(ids))]
    else:
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
            raise DataError(
                f"prompts must be a non-empty list of token-id lists, got {type(prompts).__name__}"
            )
        rows = []
        for b, prompt in enumerate(prompts):
            row = np.asarray(prompt)
            if row.ndim != 1 or not np.issubdtype(row.dtype, np.integer) and row.size:
                raise DataError(f"prompts[{b}] must be a list of token ids, got {str(prompt)[:60]}")
            if row.size == 0:
                raise DataError(f"prompts[{b}] is empty; every prompt needs at least one token")
            rows.append(row)
    for b, row in enumerate(rows):
        if row.min() < 0 or row.max() >= vocab_size:
            raise DataError(
                f"prompts[{b}] has token ids outside [0, vocab_size={vocab_size}): {row.tolist()[:20]}"
            )
    width = max(len(r) for r in rows)
    ids_BxP = np.full((len(rows), width), pad_id, np.int32)
    mask_BxP = np.zeros((len(rows), width), np.int32)
    for b, row in enumerate(rows):
        ids_BxP[b, width - len(row) :], mask_BxP[b, width - len(row) :] = row, 1
    return ids_BxP, mask_BxP


def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]] | Mapping[str, Any],
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | Sequence[int] | None = None,
    rng: jax.Array | int | None = None,
    num_generations: int = 1,
    *,
    pad_id: int = 0,
    cache_len: int | None = None,
) -> SampleOutput:
    """Samples `max_new_tokens` tokens after each prompt, `num_generations` per prompt (rows prompt-major).

    `prompts`: token-id lists of any lengths, or an `rl_loader` batch (left-padded `prompt_ids`/`prompt_mask`).
    `eos_id`: an id or ids (e.g. `chat.stop_ids(...)`) that end a row; it keeps the EOS token, then pad_id.
    `rng`: a key or an int seed (None: seed 0). `cache_len`: cache slots, default prompt width + max_new_tokens.
    Runs on the model's own mesh (`model.rules`): prompts are split over the batch axes, the cache over batch and
    kv heads. Bad arguments raise one-line ConfigError/DataError before anything is compiled."""
    cfg = model.cfg
    check_sampling(temperature, top_k, top_p)
    _check_generations(num_generations)
    eos_ids = _eos_tuple(eos_id, cfg.vocab_size)
    if (
        isinstance(pad_id, bool)
        or not isinstance(pad_id, numbers.Integral)
        or not 0 <= pad_id < cfg.vocab_size
    ):
        raise ConfigError(f"pad_id={pad_id!r} must be an integer in [0, vocab_size={cfg.vocab_size})")
    ids_BxP, mask_BxP = _left_pad(prompts, pad_id, cfg.vocab_size)
    width = ids_BxP.shape[1]
    cache_len = width + max_new_tokens if cache_len is None and isinstance(max_new_tokens, int) else cache_len
    _check_lengths(width, max_new_tokens, cache_len or 0, cfg.max_seq_len, longest=int(mask_BxP.sum(1).max()))
    if rng is None or isinstance(rng, numbers.Integral):
        rng = jax.random.key(0 if rng is None else int(rng))
    if model.rules is not None:
        ids_BxP, mask_BxP = (
            jax.device_put(x, model.rules.sharding(("batch", "length"), x.shape)) for x in (ids_BxP, mask_BxP)
        )
    graphdef, params = nnx.split(model)
    cache, logits_BxV, ids_BxP, mask_BxP = jit_prefill(
        graphdef, params, ids_BxP, mask_BxP, cache_len=cache_len, num_generations=int(num_generations)
    )
    tokens, logps, mask, _ = jit_decode(
        graphdef,
        params,
        cache,
        logits_BxV,
        mask_BxP,
        rng,
        max_new_tokens=int(max_new_tokens),
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
        eos_ids=eos_ids,
        pad_id=int(pad_id),
    )
    return SampleOutput(tokens, logps, mask, ids_BxP, mask_BxP)
