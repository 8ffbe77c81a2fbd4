"""FlashAttention-2 in Pallas: forward, dq and dk/dv kernels, causal + packed segments + GQA.

Shapes: B batch, T query length, S key length, H query heads, K key/value heads, G = H // K queries per kv
head, D head dim. Inside the kernels the layout is head-major: `q_BxHxTxD`, `k_BxKxSxD`; Tp and Sp are T and S
padded up to a multiple of the block sizes bq and bk. Per-row statistics are kept as columns, `lse_BxHxTpx1`,
so every value in a kernel body is 2-D.

Masking (identical to `jaxalign.models.attention.xla_attention`): query row r may see key c when
`c <= r + (S - T)` (causal, bottom-right aligned), `segment_ids[r] == segment_ids[c]` (packing), and `c < S`
(padding). Masked scores become a large finite negative number, never -inf, so padded and fully masked rows stay
finite in both passes. The one case where a real row sees no key at all (causal with T > S) is overwritten by
the mean of V in the wrapper, which is what the XLA reference's softmax over all-equal scores gives.

One kernel body per pass serves every backend:
- CPU: the Pallas interpreter (`interpret=None` lowers it for CPU; `True` everywhere), used by the tests.
- GPU (Triton): blocks become pointers and `k_ref[pl.ds(...)]` loads tiles from HBM. Block sizes must be powers
  of two and at least 16 (`tl.dot` minimum); a head dim that is not a power of two is zero-padded here.
- TPU (Mosaic): blocks are copied to VMEM, so the full-length K/V (forward, dq) and the group's full-length
  Q/dO (dk/dv) must fit next to the tiles; they are single-buffered (their block index does not move along the
  inner grid axis). `jaxalign.kernels.vmem` counts each pass's VMEM (with bf16 about 4*S*D bytes for forward and
  dq, 4*G*T*D for dk/dv, plus tiles), shrinks the blocks until every pass fits the target TPU generation, sets
  each pass's `vmem_limit_bytes`, and raises FlashDoesNotFit when nothing fits (`attention="auto"` then uses XLA).
  Use bq a multiple of 8 and bk a multiple of 128 to fill vregs.
The platform is the one the call is lowered for (`lax.platform_dependent`), not the one this process runs on, so a
CPU host exports the compiled kernels for TPU and GPU with `jax.export`.
GQA: K/V are never repeated. The forward and dq grids run over query heads and map head h to kv head h // G in
the BlockSpec index maps; the dk/dv grid runs over kv heads and loops over the G query heads of its group (free
reshape of Q to `BxKx(G*Tp)xD`), so dk/dv are summed in f32 inside the kernel. The dk/dv pass works on transposed
scores (bk, bq), so its per-query values are lane-dense rows (`lse_BxKx1x(G*Tp)`), not 128-lane-padded columns.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxalign.kernels import vmem

# Finite "minus infinity": exp(MASK - finite) == 0 exactly, and MASK - MASK == 0 keeps fully masked rows finite.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_NT = (((1,), (1,)), ((), ()))  # a @ b.T


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the kernels specialise on (hashable: it is a nondiff argument of the custom_vjp)."""

    causal: bool
    scale: float
    block_q: int
    block_k: int
    q_len: int  # T before padding
    kv_len: int  # S before padding
    interpret: bool | None  # None: by the lowering platform (see `_pallas`)
    vmem_limits: tuple[int, int, int] | None = None  # TPU vmem_limit_bytes of the fwd, dq, dkv passes

    @property
    def offset(self) -> int:
        return self.kv_len - self.q_len  # row r sees keys c <= r + offset when causal

    def num_k_blocks(self, i, nk: int):
        """Key blocks that q block i needs: causal ones fully above the diagonal are skipped (at least one)."""
        if not self.causal:
            return nk
        hi = lax.div((i + 1) * self.block_q + self.offset + self.block_k - 1, jnp.int32(self.block_k))
        return jnp.clip(hi, 1, nk)

    def first_q_block(self, j):
        """First q block whose rows can see key block j (causal); 0 otherwise."""
        if not self.causal:
            return 0
        first = lax.div(j * self.block_k - self.offset + self.block_q, jnp.int32(self.block_q)) - 1
        return jnp.maximum(first, 0)


def _pallas(st: _Static, name: str, kernel, grid, in_specs, out_specs, out_shape, resident, *inputs):
    """One pass as a `pallas_call` built for the platform it is lowered for (`lax.platform_dependent`: only the
    branch of the lowering platform is lowered), not the platform this process runs on:
    - cpu: the Pallas interpreter (only when `st.interpret` is None; True interprets on every platform);
    - tpu: Mosaic, every grid axis "parallel" (loops over the other sequence run inside the kernel), the pass's
      `vmem_limit_bytes` from `vmem.plan`, and the `resident` inputs (full-length blocks whose index does not move
      along the inner grid axis) single-buffered;
    - cuda/rocm: Triton (chosen by its CompilerParams, not Mosaic GPU, whose shared memory cannot hold the
      full-length blocks).
    """
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas import triton as pltriton

    def call(interpret, params, specs):
        return pl.pallas_call(
            kernel,
            grid=grid,
            in_specs=specs,
            out_specs=out_specs,
            out_shape=out_shape,
            compiler_params=params,
            interpret=interpret,
            name=f"flash_attention_{name}",
        )

    interpreted = call(True, None, in_specs)
    if st.interpret:
        return interpreted(*inputs)
    single = lambda spec: pl.BlockSpec(spec.block_shape, spec.index_map, pipeline_mode=pl.Buffered(1))
    tpu_specs = [single(x) if i in resident and x is not None else x for i, x in enumerate(in_specs)]
    tpu_params = pltpu.CompilerParams(
        dimension_semantics=("parallel",) * len(grid),
        vmem_limit_bytes=st.vmem_limits[vmem.PASSES.index(name)],
    )
    triton = call(False, pltriton.CompilerParams(num_warps=4, num_stages=2), in_specs)
    branches = dict(tpu=call(False, tpu_params, tpu_specs), cuda=triton, rocm=triton)
    if st.interpret is None:
        branches["cpu"] = interpreted
    return lax.platform_dependent(*inputs, **branches)


def _mask(st: _Static, q_pos, k_pos, q_seg, k_seg, mask_len: bool):
    """Boolean mask or None. Positions are (bq, bk) iotas, segments (bq, 1) and (1, bk); or all transposed."""
    mask = None
    if st.causal:
        mask = k_pos <= q_pos + st.offset
    if mask_len:  # causal never reaches past S - 1 from a real row, so this is only needed without it
        m = k_pos < st.kv_len
        mask = m if mask is None else mask & m
    if q_seg is not None:
        m = q_seg == k_seg
        mask = m if mask is None else mask & m
    return mask


def _masked(st: _Static, s, q_pos, k_pos, q_seg, k_seg, mask_len):
    """Scores `s` with masked entries set to MASK_VALUE; any orientation ((bq, bk) or transposed (bk, bq)) whose
    positions and segment ids broadcast to it."""
    mask = _mask(st, q_pos, k_pos, q_seg, k_seg, mask_len)
    return s if mask is None else jnp.where(mask, s, MASK_VALUE)


def _scores(st: _Static, q, k, q_pos, k_pos, q_seg, k_seg, mask_len):
    """Scaled f32 scores (bq, bk) with masked entries set to MASK_VALUE."""
    s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * st.scale
    return _masked(st, s, q_pos, k_pos, q_seg, k_seg, mask_len)


def _fwd_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref, *, st: _Static, mask_len: bool):
    bq, bk = st.block_q, st.block_k
    i = pl.program_id(2)
    q = q_ref[...]
    q_seg = None if qseg_ref is None else qseg_ref[...]
    q_pos = i * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)

    def body(j, carry):
        o, row_max, row_sum = carry
        k = k_ref[pl.ds(j * bk, bk), :]
        v = v_ref[pl.ds(j * bk, bk), :]
        k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        k_seg = None if kseg_ref is None else kseg_ref[:, pl.ds(j * bk, bk)]
        s = _scores(st, q, k, q_pos, k_pos, q_seg, k_seg, mask_len)
        new_max = jnp.maximum(row_max, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(row_max - new_max)  # rescales what was accumulated under the old maximum
        p = jnp.exp(s - new_max)
        row_sum = alpha * row_sum + jnp.sum(p, axis=1, keepdims=True)
        o = alpha * o + lax.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return o, new_max, row_sum

    init = (
        jnp.zeros((bq, q.shape[1]), jnp.float32),
        jnp.full((bq, 1), MASK_VALUE, jnp.float32),
        jnp.zeros((bq, 1), jnp.float32),
    )
    o, row_max, row_sum = lax.fori_loop(0, st.num_k_blocks(i, k_ref.shape[0] // bk), body, init)
    o_ref[...] = (o / row_sum).astype(o_ref.dtype)  # row_sum >= 1: the row maximum contributes exp(0)
    lse_ref[...] = row_max + jnp.log(row_sum)


def _dq_kernel(
    q_ref,
    k_ref,
    v_ref,
    qseg_ref,
    kseg_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dq_ref,
    *,
    st: _Static,
    mask_len: bool,
):
    bq, bk = st.block_q, st.block_k
    i = pl.program_id(2)
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    q_seg = None if qseg_ref is None else qseg_ref[...]
    q_pos = i * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)

    def body(j, dq):
        k = k_ref[pl.ds(j * bk, bk), :]
        v = v_ref[pl.ds(j * bk, bk), :]
        k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        k_seg = None if kseg_ref is None else kseg_ref[:, pl.ds(j * bk, bk)]
        p = jnp.exp(_scores(st, q, k, q_pos, k_pos, q_seg, k_seg, mask_len) - lse)
        dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta)
        return dq + lax.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    dq = jnp.zeros((bq, q.shape[1]), jnp.float32)
    dq = lax.fori_loop(0, st.num_k_blocks(i, k_ref.shape[0] // bk), body, dq)
    dq_ref[...] = (dq * st.scale).astype(dq_ref.dtype)


def _dkv_kernel(
    q_ref,
    k_ref,
    v_ref,
    qseg_ref,
    kseg_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dk_ref,
    dv_ref,
    *,
    st: _Static,
    mask_len: bool,
    groups: int,
):
    # Transposed scores sT (bk, bq), so per-query values are lane-dense rows (a (N, 1) column would take 128
    # lanes of VMEM per entry on TPU): q_ref, do_ref (G * Tp, D), the G query heads of this kv head stacked;
    # lse_ref, delta_ref (1, G * Tp); qseg_ref (1, Tp); kseg_ref (bk, 1).
    bq, bk = st.block_q, st.block_k
    j = pl.program_id(2)
    k, v = k_ref[...], v_ref[...]
    k_seg = None if kseg_ref is None else kseg_ref[...]
    k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (bk, bq), 0)
    tp = q_ref.shape[0] // groups
    nq = tp // bq

    first = st.first_q_block(j)
    per_group = jnp.maximum(nq - first, 0)  # q blocks per head that can see this key block
    divisor = jnp.maximum(per_group, 1)  # no division by zero even where the loop runs zero times

    def q_block(r, carry):  # one flat loop over (g, i): r = g * per_group + (i - first)
        dk, dv = carry
        g, i = lax.div(r, divisor), first + lax.rem(r, divisor)
        rows = pl.ds(g * tp + i * bq, bq)
        q, do, lse, delta = q_ref[rows, :], do_ref[rows, :], lse_ref[:, rows], delta_ref[:, rows]
        q_seg = None if qseg_ref is None else qseg_ref[:, pl.ds(i * bq, bq)]
        q_pos = i * bq + lax.broadcasted_iota(jnp.int32, (bk, bq), 1)
        s = lax.dot_general(k, q, _NT, preferred_element_type=jnp.float32) * st.scale
        p = jnp.exp(_masked(st, s, q_pos, k_pos, q_seg, k_seg, mask_len) - lse)
        dv = dv + lax.dot(p.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dp = lax.dot_general(v, do, _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta)
        dk = dk + lax.dot(ds.astype(q.dtype), q, preferred_element_type=jnp.float32)
        return dk, dv

    zeros = jnp.zeros((bk, k.shape[1]), jnp.float32)
    dk, dv = lax.fori_loop(0, groups * per_group, q_block, (zeros, zeros))
    dk_ref[...] = (dk * st.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _out_struct(shape, dtype, *inputs) -> jax.ShapeDtypeStruct:
    """Output type; inside shard_map(check_vma=True) it varies over every mesh axis an input varies over."""
    varying = frozenset().union(*(jax.typeof(x).manual_axis_type.varying for x in inputs if x is not None))
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.sharding.ManualAxisType(varying=varying))


def _seg_specs(qseg, kseg, q_map, k_map, q_rows, k_cols):
    if qseg is None:
        return [None, None]
    return [pl.BlockSpec((None, q_rows, 1), q_map), pl.BlockSpec((None, 1, k_cols), k_map)]


def _forward(st: _Static, q, k, v, qseg, kseg):
    """q_BxHxTpxD, k/v_BxKxSpxD, qseg_BxTpx1, kseg_Bx1xSp -> (o_BxHxTpxD, lse_BxHxTpx1)."""
    B, H, Tp, D = q.shape
    K, Sp = k.shape[1], k.shape[2]
    G, bq = H // K, st.block_q
    q_spec = pl.BlockSpec((None, None, bq, D), lambda b, h, i: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, Sp, D), lambda b, h, i: (b, h // G, 0, 0))
    row_spec = pl.BlockSpec((None, None, bq, 1), lambda b, h, i: (b, h, i, 0))
    seg = _seg_specs(qseg, kseg, lambda b, h, i: (b, i, 0), lambda b, h, i: (b, 0, 0), bq, Sp)
    inputs = (q, k, v, qseg, kseg)
    return _pallas(
        st,
        "fwd",
        functools.partial(_fwd_kernel, st=st, mask_len=Sp != st.kv_len and not st.causal),
        (B, H, Tp // bq),
        [q_spec, kv_spec, kv_spec, *seg],
        [q_spec, row_spec],
        [_out_struct(q.shape, q.dtype, *inputs), _out_struct((B, H, Tp, 1), jnp.float32, *inputs)],
        {1, 2, 4},  # K, V, key ids
        *inputs,
    )


def _backward(st: _Static, q, k, v, qseg, kseg, o, lse, do):
    B, H, Tp, D = q.shape
    K, Sp = k.shape[1], k.shape[2]
    G, bq, bk = H // K, st.block_q, st.block_k
    mask_len = Sp != st.kv_len and not st.causal
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)

    q_spec = pl.BlockSpec((None, None, bq, D), lambda b, h, i: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, Sp, D), lambda b, h, i: (b, h // G, 0, 0))
    row_spec = pl.BlockSpec((None, None, bq, 1), lambda b, h, i: (b, h, i, 0))
    seg = _seg_specs(qseg, kseg, lambda b, h, i: (b, i, 0), lambda b, h, i: (b, 0, 0), bq, Sp)
    inputs = (q, k, v, qseg, kseg, do, lse, delta)
    dq = _pallas(
        st,
        "dq",
        functools.partial(_dq_kernel, st=st, mask_len=mask_len),
        (B, H, Tp // bq),
        [q_spec, kv_spec, kv_spec, *seg, q_spec, row_spec, row_spec],
        q_spec,
        _out_struct(q.shape, q.dtype, *inputs),
        {1, 2, 4},  # K, V, key ids
        *inputs,
    )

    # Head h = kh * G + g, so a kv head's query heads are contiguous: these reshapes are free, as are those that
    # turn (N, 1) columns into (1, N) rows.
    group_spec = pl.BlockSpec((None, None, G * Tp, D), lambda b, kh, j: (b, kh, 0, 0))
    group_row_spec = pl.BlockSpec((None, None, 1, G * Tp), lambda b, kh, j: (b, kh, 0, 0))
    kv_block_spec = pl.BlockSpec((None, None, bk, D), lambda b, kh, j: (b, kh, j, 0))
    seg = [None, None]
    if qseg is not None:
        qseg, kseg = qseg.reshape(B, 1, Tp), kseg.reshape(B, Sp, 1)
        seg = [
            pl.BlockSpec((None, 1, Tp), lambda b, kh, j: (b, 0, 0)),
            pl.BlockSpec((None, bk, 1), lambda b, kh, j: (b, j, 0)),
        ]
    to_groups = lambda x: x.reshape(B, K, G * Tp, D)
    to_group_rows = lambda x: x.reshape(B, K, 1, G * Tp)
    dk, dv = _pallas(
        st,
        "dkv",
        functools.partial(_dkv_kernel, st=st, mask_len=mask_len, groups=G),
        (B, K, Sp // bk),
        [group_spec, kv_block_spec, kv_block_spec, *seg, group_spec, group_row_spec, group_row_spec],
        [kv_block_spec, kv_block_spec],
        [_out_struct(k.shape, k.dtype, *inputs), _out_struct(v.shape, v.dtype, *inputs)],
        {0, 3, 5, 6, 7},  # the group's Q, query ids, dO, lse, delta
        *(to_groups(q), k, v, qseg, kseg, to_groups(do), to_group_rows(lse), to_group_rows(delta)),
    )
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st: _Static, q, k, v, qseg, kseg):
    return _forward(st, q, k, v, qseg, kseg)[0]


def _flash_fwd(st: _Static, q, k, v, qseg, kseg):
    o, lse = _forward(st, q, k, v, qseg, kseg)
    return o, (q, k, v, qseg, kseg, o, lse)


def _flash_bwd(st: _Static, res, do):
    dq, dk, dv = _backward(st, *res, do)
    return dq, dk, dv, None, None  # segment ids are integers: no cotangent


_flash.defvjp(_flash_fwd, _flash_bwd)


def _block(requested: int, length: int, name: str) -> int:
    if requested < 16 or requested & (requested - 1):
        raise ValueError(f"{name} must be a power of two >= 16 (Triton tiles), got {requested}")
    return min(requested, max(16, pl.next_power_of_2(length)))


def _pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def _plan(T, S, G, D, dtype, segments, block_q, block_k, interpret, generation=None):
    """Padded lengths and head dim, and the blocks and VMEM limits (`vmem.plan`) for the target TPU generation."""
    bq, bk = _block(block_q, T, "block_q"), _block(block_k, S, "block_k")
    Tp, Sp, Dp = pl.cdiv(T, bq) * bq, pl.cdiv(S, bk) * bk, pl.next_power_of_2(D)
    # Smaller blocks than bq, bk (powers of two) still divide Tp and Sp.
    shapes = vmem.Shapes(Tp, Sp, Dp, G, jnp.dtype(dtype).itemsize, segments)
    if generation is None and not interpret:
        generation = vmem.target_generation()
    return Tp, Sp, Dp, vmem.plan(shapes, bq, bk, generation)


def why_not_fits(
    q_BxTxHxD: jax.ShapeDtypeStruct,
    k_BxSxKxD: jax.ShapeDtypeStruct,
    *,
    segments: bool,
    block_q: int = 128,
    block_k: int = 128,
    generation: str | None = None,
) -> str | None:
    """None when `flash_attention` can run these shapes on the target (TPU: every pass fits the generation's VMEM,
    by default the one being traced for; other platforms: always), else the one-line reason it cannot."""
    _, T, H, D = q_BxTxHxD.shape
    S, K = k_BxSxKxD.shape[1], k_BxSxKxD.shape[2]
    try:
        _plan(T, S, H // K, D, q_BxTxHxD.dtype, segments, block_q, block_k, False, generation)
    except vmem.FlashDoesNotFit as e:
        return e.reason
    return None


def flash_attention(
    q_BxTxHxD: jax.Array,
    k_BxSxKxD: jax.Array,
    v_BxSxKxD: jax.Array,
    *,
    causal: bool = True,
    segment_ids: jax.Array | None = None,
    sm_scale: float | None = None,
    block_q: int = 128,
    block_k: int = 128,
    interpret: bool | None = None,
) -> jax.Array:
    """Softmax attention with the semantics of `xla_attention`; returns `o_BxTxHxD` in the dtype of q.

    segment_ids: int32 [B, T] for packed self-attention (needs T == S). sm_scale defaults to D**-0.5.
    block_q / block_k: tile sizes (powers of two >= 16), shrunk for short sequences and, on TPU, until every pass
    fits the target generation's VMEM (`vmem.plan`; raises `vmem.FlashDoesNotFit`, a ConfigError, when none does).
    interpret: None chooses by the platform the call is lowered for (Pallas interpreter on CPU, Mosaic on TPU,
    Triton on GPU), so a CPU host can export for TPU/GPU; True interprets everywhere; False never interprets.
    Differentiable in q, k and v (custom VJP, Pallas).
    """
    B, T, H, D = q_BxTxHxD.shape
    S, K = k_BxSxKxD.shape[1], k_BxSxKxD.shape[2]
    if k_BxSxKxD.shape != v_BxSxKxD.shape or k_BxSxKxD.shape[0] != B or k_BxSxKxD.shape[3] != D:
        raise ValueError(f"k {k_BxSxKxD.shape} and v {v_BxSxKxD.shape} must be [B={B}, S, K, D={D}]")
    if H % K:
        raise ValueError(f"query heads {H} must be a multiple of key/value heads {K}")
    if segment_ids is not None:
        if S != T:
            raise ValueError(f"segment_ids need self-attention (T == S), got T={T}, S={S}")
        if segment_ids.shape != (B, T):
            raise ValueError(f"segment_ids must be [B={B}, T={T}], got {segment_ids.shape}")
    Tp, Sp, Dp, budget = _plan(
        T, S, H // K, D, q_BxTxHxD.dtype, segment_ids is not None, block_q, block_k, interpret
    )
    st = _Static(
        causal=causal,
        scale=float(D**-0.5 if sm_scale is None else sm_scale),
        block_q=budget.block_q,
        block_k=budget.block_k,
        q_len=T,
        kv_len=S,
        interpret=None if interpret is None else bool(interpret),
        vmem_limits=budget.vmem_limits,
    )
    # Zero padding: extra head dims add 0 to scores and give output columns that are sliced off; padded keys are
    # masked; padded query rows are discarded (and receive a zero cotangent).
    q = _pad_axis(_pad_axis(q_BxTxHxD.transpose(0, 2, 1, 3), 2, Tp), 3, Dp)
    k = _pad_axis(_pad_axis(k_BxSxKxD.transpose(0, 2, 1, 3), 2, Sp), 3, Dp)
    v = _pad_axis(_pad_axis(v_BxSxKxD.transpose(0, 2, 1, 3), 2, Sp), 3, Dp)
    qseg = kseg = None
    if segment_ids is not None:
        seg = segment_ids.astype(jnp.int32)
        qseg = _pad_axis(seg, 1, Tp, value=-1)[:, :, None]
        kseg = _pad_axis(seg, 1, Sp, value=-1)[:, None, :]
    o_BxTxHxD = _flash(st, q, k, v, qseg, kseg)[:, :, :T, :D].transpose(0, 2, 1, 3)
    if causal and T > S:
        # Rows r < T - S see no key; the reference's softmax over all-masked scores is uniform over the S keys.
        mean_v = jnp.mean(v_BxSxKxD.astype(jnp.float32), axis=1).astype(o_BxTxHxD.dtype)  # BxKxD
        mean_v_BxHxD = jnp.repeat(mean_v, H // K, axis=1)
        blind_T = jnp.arange(T) < T - S
        o_BxTxHxD = jnp.where(blind_T[None, :, None, None], mean_v_BxHxD[:, None], o_BxTxHxD)
    return o_BxTxHxD
