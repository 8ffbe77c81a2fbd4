"""A Llama-family decoder in Flax NNX, used functionally (split into a graphdef and a param pytree).

Covers Llama 2/3 (llama3 RoPE scaling), Mistral, Qwen2 (qkv bias), Qwen3 (qk-norm) and Gemma-style variants
(1 + w norms, scaled embeddings, gelu-tanh MLP) through `ModelConfig`.

Shape legend: B batch, T sequence length, N = B * T flattened tokens, D d_model, H query heads, K key/value heads,
Dh head dim, F MLP width, V vocabulary, L layers.

Dense layers act on flattened (N, D) activations: on XLA:CPU the backward of a matmul on a 3-D activation is about
2x slower than on the flattened one, and on accelerators it is the same matmul.

With a `stage` mesh axis of more than one device, `hidden` runs the (then always stacked) layers as a pipeline
(`jaxalign/parallel/pipeline.py`); `prefill` and `decode_step` keep the plain scan over the stage-sharded layers.

Every parameter carries logical axis names in its `axes` metadata; `param_shardings` maps them to the mesh through
`Rules`. Activations are constrained at block boundaries only; XLA propagates the rest.

Generation (rl/sampler.py) uses the same modules and parameters through two more methods: `prefill` (the training
forward, also returning every layer's keys and values as a `KVCache` of (L, B, S, K, Dh), S cache slots, GQA-aware:
K kv heads, never repeated to H) and `decode_step` (one token per row against the cache; `decode_attention`). The
training path (`hidden`, `logits`, `__call__`) traces to the same jaxpr as before these were added.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign.config import ModelConfig
from jaxalign.models.attention import attention, decode_attention
from jaxalign.parallel import pipeline
from jaxalign.parallel.mesh import Rules
from jaxalign.peft.lora import dense, has_adapters

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# Logical axes of a KV cache array (L, B, S, K, Dh): it shards like the activations (batch) and the kv heads.
CACHE_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")


class KVCache(NamedTuple):
    """Keys and values of every layer, (L, B, S, K, Dh) each, in the compute dtype. Slot s of row b holds the
    token written there by `Transformer.prefill` (s < prompt width) or the `decode_step` that used slot s."""

    k: jax.Array
    v: jax.Array


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], std: float) -> nnx.Param:
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32), axes=axes)


def _constant(shape: tuple[int, ...], axes: tuple[str, ...], value: float) -> nnx.Param:
    return nnx.Param(jnp.full(shape, value, jnp.float32), axes=axes)


class RMSNorm(nnx.Module):
    """x / rms(x) * w, in float32; Gemma-style `plus_one` scales by (1 + w)."""

    def __init__(self, dim: int, eps: float, plus_one: bool):
        self.eps = eps
        self.plus_one = plus_one
        self.scale = _constant((dim,), ("norm",), 0.0 if plus_one else 1.0)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        w = self.scale[...] + 1.0 if self.plus_one else self.scale[...]
        return (y * w).astype(x.dtype)


def rope_frequencies(cfg: ModelConfig) -> jax.Array:
    """Inverse frequencies (Dh/2,), with Llama-3.1 frequency-dependent scaling when configured."""
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim))
    if cfg.rope_scaling == "llama3":
        low_wavelen = cfg.rope_original_max_len / cfg.rope_low_freq_factor
        high_wavelen = cfg.rope_original_max_len / cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (cfg.rope_original_max_len / wavelen - cfg.rope_low_freq_factor) / (
            cfg.rope_high_freq_factor - cfg.rope_low_freq_factor
        )
        smoothed = (1 - smooth) * inv_freq / cfg.rope_factor + smooth * inv_freq
        inv_freq = jnp.where(
            wavelen > low_wavelen,
            inv_freq / cfg.rope_factor,
            jnp.where(wavelen < high_wavelen, inv_freq, smoothed),
        )
    return inv_freq


def apply_rope(x_BxTxHxDh: jax.Array, cos_BxTxDh2: jax.Array, sin_BxTxDh2: jax.Array) -> jax.Array:
    """Rotary embedding in the rotate-half layout used by Hugging Face checkpoints."""
    x1, x2 = jnp.split(x_BxTxHxDh.astype(jnp.float32), 2, axis=-1)
    cos, sin = cos_BxTxDh2[:, :, None, :], sin_BxTxDh2[:, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BxTxHxDh.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, rules: Rules | None = None):
        self.cfg = cfg
        self.rules = rules
        D, H, K, Dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        std = cfg.init_std
        self.wq = _param(rngs, (D, H * Dh), ("embed", "heads"), std)
        self.wk = _param(rngs, (D, K * Dh), ("embed", "kv_heads"), std)
        self.wv = _param(rngs, (D, K * Dh), ("embed", "kv_heads"), std)
        self.wo = _param(rngs, (H * Dh, D), ("heads", "embed"), std / math.sqrt(2 * cfg.n_layers))
        if cfg.qkv_bias:
            self.bq = _constant((H * Dh,), ("heads",), 0.0)
            self.bk = _constant((K * Dh,), ("kv_heads",), 0.0)
            self.bv = _constant((K * Dh,), ("kv_heads",), 0.0)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(Dh, cfg.norm_eps, cfg.norm_plus_one)
            self.k_norm = RMSNorm(Dh, cfg.norm_eps, cfg.norm_plus_one)

    def _qkv(self, x_NxD, cos, sin, shape_BxT, fused=False):
        """Projected, normed and rotated q (B, T, H, Dh), k and v (B, T, K, Dh). `fused` does the three
        projections as one matmul against the concatenated kernels (decoding: fewer, wider matmuls; inside a decode
        loop XLA hoists the loop-invariant concatenation out of it)."""
        cfg = self.cfg
        B, T = shape_BxT
        dtype = x_NxD.dtype
        if fused and not has_adapters(self, ("wq", "wk", "wv")):
            HDh = cfg.n_heads * cfg.head_dim
            w = jnp.concatenate([self.wq[...], self.wk[...], self.wv[...]], axis=1).astype(dtype)
            qkv_NxQKV = x_NxD @ w
            if cfg.qkv_bias:
                qkv_NxQKV += jnp.concatenate([self.bq[...], self.bk[...], self.bv[...]]).astype(dtype)
            q_NxHDh, k_NxKDh, v_NxKDh = jnp.split(
                qkv_NxQKV, [HDh, HDh + cfg.n_kv_heads * cfg.head_dim], axis=1
            )
        else:
            q_NxHDh = dense(self, "wq", x_NxD)
            k_NxKDh = dense(self, "wk", x_NxD)
            v_NxKDh = dense(self, "wv", x_NxD)
            if cfg.qkv_bias:
                q_NxHDh += self.bq[...].astype(dtype)
                k_NxKDh += self.bk[...].astype(dtype)
                v_NxKDh += self.bv[...].astype(dtype)
        q = q_NxHDh.reshape(B, T, cfg.n_heads, cfg.head_dim)
        k = k_NxKDh.reshape(B, T, cfg.n_kv_heads, cfg.head_dim)
        v = v_NxKDh.reshape(B, T, cfg.n_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _out(self, o_BxTxHxDh):
        B, T = o_BxTxHxDh.shape[:2]
        return dense(self, "wo", o_BxTxHxDh.reshape(B * T, -1))

    def __call__(self, x_NxD, cos, sin, segment_ids_BxT, shape_BxT):
        return self.prefill(x_NxD, cos, sin, segment_ids_BxT, shape_BxT)[0]

    def prefill(self, x_NxD, cos, sin, segment_ids_BxT, shape_BxT):
        """The training forward, also returning this layer's keys and values (B, T, K, Dh) for a KV cache."""
        q, k, v = self._qkv(x_NxD, cos, sin, shape_BxT)
        o_BxTxHxDh = attention(
            q,
            k,
            v,
            implementation=self.cfg.attention,
            causal=True,
            segment_ids=segment_ids_BxT,
            rules=self.rules,
        )
        return self._out(o_BxTxHxDh), k, v

    def decode(self, x_BxD, cos, sin, k_BxSxKxDh, v_BxSxKxDh, slot, valid_BxS):
        """One new token per row: writes its key and value into this layer's cache at `slot` (the same for every
        row), then attends to the slots where `valid_BxS` (which must include `slot`). Writing before reading lets
        XLA update the cache in place: a read of the old cache alongside the write makes it copy the cache.
        Returns (out_BxD, k_BxSxKxDh, v_BxSxKxDh)."""
        B = x_BxD.shape[0]
        q, k, v = self._qkv(x_BxD, cos, sin, (B, 1), fused=True)
        k_BxSxKxDh = jax.lax.dynamic_update_slice(k_BxSxKxDh, k.astype(k_BxSxKxDh.dtype), (0, slot, 0, 0))
        v_BxSxKxDh = jax.lax.dynamic_update_slice(v_BxSxKxDh, v.astype(v_BxSxKxDh.dtype), (0, slot, 0, 0))
        o_Bx1xHxDh = decode_attention(q, k_BxSxKxDh, v_BxSxKxDh, valid_BxS)
        return self._out(o_Bx1xHxDh), k_BxSxKxDh, v_BxSxKxDh


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, F, std = cfg.d_model, cfg.d_ff, cfg.init_std
        self.activation = cfg.activation
        self.w_gate = _param(rngs, (D, F), ("embed", "mlp"), std)
        self.w_up = _param(rngs, (D, F), ("embed", "mlp"), std)
        self.w_down = _param(rngs, (F, D), ("mlp", "embed"), std / math.sqrt(2 * cfg.n_layers))

    def __call__(self, x_NxD, fused=False):
        """`fused` does the gate and up projections as one matmul (decoding; see `Attention._qkv`)."""
        dtype = x_NxD.dtype
        act = jax.nn.silu if self.activation == "silu" else functools.partial(jax.nn.gelu, approximate=True)
        if fused and not has_adapters(self, ("w_gate", "w_up")):
            F = self.w_gate.shape[1]
            gate_up_Nx2F = x_NxD @ jnp.concatenate([self.w_gate[...], self.w_up[...]], axis=1).astype(dtype)
            h_NxF = act(gate_up_Nx2F[:, :F]) * gate_up_Nx2F[:, F:]
        else:
            gate_NxF = dense(self, "w_gate", x_NxD)
            h_NxF = act(gate_NxF) * dense(self, "w_up", x_NxD)
        return dense(self, "w_down", h_NxF)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, rules: Rules | None = None):
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_plus_one)
        self.attn = Attention(cfg, rngs, rules)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_plus_one)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x_NxD, cos, sin, segment_ids_BxT, shape_BxT):
        return self.prefill(x_NxD, cos, sin, segment_ids_BxT, shape_BxT)[0]

    def prefill(self, x_NxD, cos, sin, segment_ids_BxT, shape_BxT):
        """The training forward, also returning the layer's keys and values (`Attention.prefill`)."""
        a_NxD, k, v = self.attn.prefill(self.attn_norm(x_NxD), cos, sin, segment_ids_BxT, shape_BxT)
        x_NxD = x_NxD + a_NxD
        return x_NxD + self.mlp(self.mlp_norm(x_NxD)), k, v

    def decode(self, x_BxD, cos, sin, k_BxSxKxDh, v_BxSxKxDh, slot, valid_BxS):
        """One token per row against this layer's cache (`Attention.decode`). Returns (x_BxD, k, v)."""
        a_BxD, k_BxSxKxDh, v_BxSxKxDh = self.attn.decode(
            self.attn_norm(x_BxD), cos, sin, k_BxSxKxDh, v_BxSxKxDh, slot, valid_BxS
        )
        x_BxD = x_BxD + a_BxD
        return x_BxD + self.mlp(self.mlp_norm(x_BxD), fused=True), k_BxSxKxDh, v_BxSxKxDh


def _stack(blocks: list[Block]) -> Block:
    """One Block whose parameters carry a leading `layers` axis, for `jax.lax.scan`."""
    splits = [nnx.split(b) for b in blocks]
    graphdef = splits[0][0]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[state for _, state in splits])
    block = nnx.merge(graphdef, stacked)
    for _, var in nnx.iter_graph(block):
        if isinstance(var, nnx.Variable):
            var.set_metadata(axes=("layers", *var.get_metadata()["axes"]))
    return block


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nnx.Module):
    """Decoder-only LM. `model(tokens_BxT) -> logits_BxTxV`; `hidden` gives the final normed states; `prefill` and
    `decode_step` are the KV-cache generation path."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, rules: Rules | None = None, lm_head: bool = True):
        """`lm_head=False` leaves out the untied output projection: the trunk of a scalar-head model
        (`models/heads.py`), which never computes vocabulary logits."""
        if pipeline.active(rules) and not cfg.scan_layers:
            # A pipeline splits the stacked layer dimension over `stage`, so any config runs with mesh.stage > 1.
            cfg = dataclasses.replace(cfg, scan_layers=True)
        self.cfg = cfg
        self.rules = rules
        self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std)
        blocks = [Block(cfg, rngs, rules) for _ in range(cfg.n_layers)]
        self.blocks = _stack(blocks) if cfg.scan_layers else nnx.List(blocks)
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_plus_one)
        if lm_head and not cfg.tie_embeddings:
            self.lm_head = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std)

    def _constrain(self, x, names):
        return x if self.rules is None else self.rules.constrain(x, names)

    def _rope(self, positions_BxT):
        angles_BxTxDh2 = positions_BxT[..., None].astype(jnp.float32) * rope_frequencies(self.cfg)
        return jnp.cos(angles_BxTxDh2), jnp.sin(angles_BxTxDh2)

    def _embed(self, tokens_BxT):
        cfg = self.cfg
        dtype = _DTYPES[cfg.compute_dtype]
        x_NxD = jnp.take(self.embed[...], tokens_BxT.reshape(-1), axis=0).astype(dtype)
        if cfg.scale_embeddings:
            x_NxD = x_NxD * jnp.asarray(math.sqrt(cfg.d_model), dtype)
        return self._constrain(x_NxD, ("batch", "act_embed"))

    def hidden(
        self,
        tokens_BxT: jax.Array,
        positions_BxT: jax.Array | None = None,
        segment_ids_BxT: jax.Array | None = None,
    ) -> jax.Array:
        """Final-normed hidden states, flattened: (N, D) with N = B * T."""
        cfg = self.cfg
        B, T = tokens_BxT.shape
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        cos, sin = self._rope(positions_BxT)
        x_NxD = self._embed(tokens_BxT)
        if pipeline.active(self.rules):
            return self.final_norm(self._pipelined(x_NxD, positions_BxT, segment_ids_BxT))

        def apply(graphdef, state, x_NxD):
            y = nnx.merge(graphdef, state)(x_NxD, cos, sin, segment_ids_BxT, (B, T))
            return self._constrain(y, ("batch", "act_embed"))

        if cfg.remat != "none":
            apply = jax.checkpoint(apply, policy=_REMAT_POLICIES[cfg.remat], static_argnums=(0,))
        if cfg.scan_layers:
            graphdef, state = nnx.split(self.blocks)
            x_NxD, _ = jax.lax.scan(lambda x, s: (apply(graphdef, s, x), None), x_NxD, state)
        else:
            for block in self.blocks:
                x_NxD = apply(*nnx.split(block), x_NxD)
        return self.final_norm(x_NxD)

    def _pipelined(self, x_NxD, positions_BxT, segment_ids_BxT):
        """The layers of `hidden` as a pipeline over the `stage` mesh axis (`parallel/pipeline.py`)."""
        graphdef, state = nnx.split(self.blocks)

        def layer(graphdef, p, x_nxD, cos, sin, segment_ids_bxT):
            y = nnx.merge(graphdef, p)(x_nxD, cos, sin, segment_ids_bxT, cos.shape[:2])
            return self._constrain(y, ("batch", "act_embed"))

        if self.cfg.remat != "none":
            layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[self.cfg.remat], static_argnums=(0,))
        return pipeline.run_layers(
            functools.partial(layer, graphdef),
            state,
            x_NxD,
            positions_BxT,
            segment_ids_BxT,
            self._rope,
            self.rules,
        )

    def prefill(
        self,
        tokens_BxT: jax.Array,
        positions_BxT: jax.Array,
        segment_ids_BxT: jax.Array | None,
        cache_len: int,
    ) -> tuple[jax.Array, KVCache]:
        """The forward of `hidden` (same numerics, no remat) that also fills a KV cache of `cache_len` >= T slots:
        slots [0, T) hold the prompt's keys and values, the rest zeros for `decode_step`. Returns (h_NxD, cache)."""
        cfg = self.cfg
        B, T = tokens_BxT.shape
        cos, sin = self._rope(positions_BxT)
        x_NxD = self._embed(tokens_BxT)

        def apply(block, x_NxD):
            y, k, v = block.prefill(x_NxD, cos, sin, segment_ids_BxT, (B, T))
            return self._constrain(y, ("batch", "act_embed")), (k, v)

        if cfg.scan_layers:
            graphdef, state = nnx.split(self.blocks)
            x_NxD, (k, v) = jax.lax.scan(lambda x, s: apply(nnx.merge(graphdef, s), x), x_NxD, state)
        else:
            ks, vs = [], []
            for block in self.blocks:
                x_NxD, (k, v) = apply(block, x_NxD)
                ks.append(k)
                vs.append(v)
            k, v = jnp.stack(ks), jnp.stack(vs)
        pad = ((0, 0), (0, 0), (0, cache_len - T), (0, 0), (0, 0))
        cache = KVCache(*(self._constrain(jnp.pad(x, pad), CACHE_AXES) for x in (k, v)))
        return self.final_norm(x_NxD), cache

    def decode_step(
        self,
        tokens_B: jax.Array,
        positions_B: jax.Array,
        cache: KVCache,
        slot: jax.Array,
        valid_BxS: jax.Array,
    ) -> tuple[jax.Array, KVCache]:
        """One token per row at RoPE position `positions_B`, written into cache slot `slot` (a scalar, the same for
        every row); attends to the slots where `valid_BxS` (earlier tokens and `slot` itself). Returns the
        final-normed hidden state (B, D) and the updated cache (donate it, or carry it through a loop: it is
        updated in place).

        `cache.k`/`cache.v` are (L, B, S, K, Dh) arrays, or tuples of L (B, S, K, Dh) arrays: the form a decode loop
        should carry, since XLA:CPU materialises every layer's slice of a stacked cache and copies the whole of it at
        each step. The layers run unrolled, scanned models' too (on layer slices of the stacked weights, which XLA
        hoists out of a decode loop): the reference model with scanned layers decodes greedily at 2.0 ms per step on
        CPU, 4.3 ms when a scan over layers carried a stacked cache. The cache comes back in the form it was given."""
        cos, sin = self._rope(positions_B[:, None])
        x_BxD = self._embed(tokens_B[:, None])

        def apply(block, x_BxD, k_BxSxKxDh, v_BxSxKxDh):
            x_BxD, k, v = block.decode(x_BxD, cos, sin, k_BxSxKxDh, v_BxSxKxDh, slot, valid_BxS)
            k, v = (self._constrain(c, CACHE_AXES[1:]) for c in (k, v))
            return self._constrain(x_BxD, ("batch", "act_embed")), (k, v)

        blocks = self.blocks
        if self.cfg.scan_layers:  # unrolled over layer slices of the stacked weights, as a decode loop wants
            graphdef, state = nnx.split(self.blocks)
            blocks = [
                nnx.merge(graphdef, jax.tree.map(lambda x, i=i: x[i], state)) for i in range(len(cache.k))
            ]
        ks, vs = [], []
        for layer, block in enumerate(blocks):
            x_BxD, (k, v) = apply(block, x_BxD, cache.k[layer], cache.v[layer])
            ks.append(k)
            vs.append(v)
        if isinstance(cache.k, jax.Array):
            return self.final_norm(x_BxD), KVCache(jnp.stack(ks), jnp.stack(vs))
        return self.final_norm(x_BxD), KVCache(tuple(ks), tuple(vs))

    def logits(self, h_NxD: jax.Array) -> jax.Array:
        """Vocabulary logits (N, V) in float32 from hidden states (N, D)."""
        w_DxV = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
        logits_NxV = jnp.dot(h_NxD, w_DxV.astype(h_NxD.dtype), preferred_element_type=jnp.float32)
        return self._constrain(logits_NxV, ("batch", "vocab"))

    def __call__(self, tokens_BxT, positions_BxT=None, segment_ids_BxT=None) -> jax.Array:
        B, T = tokens_BxT.shape
        return self.logits(self.hidden(tokens_BxT, positions_BxT, segment_ids_BxT)).reshape(B, T, -1)


def param_shardings(params: nnx.State, rules: Rules) -> nnx.State:
    """NamedShardings for a param state (concrete or abstract), from each variable's `axes` metadata."""
    return jax.tree.map(
        lambda v: v.replace(rules.sharding(v.get_metadata()["axes"], v.shape)),
        params,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def init_model(cfg: ModelConfig, rules: Rules, seed: int) -> tuple[nnx.GraphDef, nnx.State]:
    """Initialises the model directly into its shardings: shapes come from `nnx.eval_shape`, then one jitted init
    with `out_shardings`, so full unsharded weights never exist on one device."""
    create = lambda: nnx.split(Transformer(cfg, nnx.Rngs(seed), rules))
    graphdef, abstract = jax.eval_shape(create)
    shardings = param_shardings(abstract, rules)
    params = jax.jit(lambda: create()[1], out_shardings=shardings)()
    return graphdef, params


def num_params(params: nnx.State) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward): 6 * matmul params + causal attention."""
    D, H, K, Dh, F, V, L = (
        cfg.d_model,
        cfg.n_heads,
        cfg.n_kv_heads,
        cfg.head_dim,
        cfg.d_ff,
        cfg.vocab_size,
        cfg.n_layers,
    )
    matmul_params = L * (D * H * Dh * 2 + D * K * Dh * 2 + 3 * D * F) + D * V
    # QK^T and PV: 2 matmuls x 2 FLOPs x H*Dh per key; a causal mask halves the keys on average.
    attention = L * 2 * 2 * H * Dh * seq_len / 2
    return 3.0 * (2 * matmul_params + attention)
