"""4-bit NormalFloat (NF4) weights with double-quantised block scales: the frozen base of QLoRA.

Storage of one (In, Out) weight matrix (stacked layers add leading dimensions to every array), In a multiple of 64;
a block is 64 consecutive inputs of one output, as bitsandbytes blocks a torch (Out, In) weight:

  codes     uint8 (In/2, Out)        two 4-bit code-book indices per byte (even row in the high nibble)
  scales_q  int8  (In/64, Out)       each block's absmax minus `offset`, quantised linearly to 8 bits
  scales_s  float32 (S2,)         absmax of each block of 256 consecutive (offset-centred) scales, S2 = ceil(In*Out/64/256)
  offset    float32 ()            the mean of the block absmaxes (centring them makes the 8-bit grid symmetric)

Bits per parameter: 4 + 8/64 + 32/(64*256) = 4.127 (+ 32 bits per matrix). This is the QLoRA paper's layout
(Dettmers et al. 2023, section 3 and appendix E) and bitsandbytes' `quant_type="nf4"`, `compress_statistics=True`,
except that the second level is a linear int8 grid where bitsandbytes uses its 8-bit dynamic-tree code.

Dequantisation happens on the fly in `matmul` (inside the jitted step): the dequantised (In, Out) matrix of one layer
exists only as the operand of that layer's dot. In the optimised HLO on XLA:CPU the nibble unpacking, the code-book
lookup and both scale levels are one loop fusion that writes the f32 weight, which then feeds the dot (XLA:CPU does
not fuse producers into a dot; under `scan_layers` only one layer's weight is live at a time). See
tests/peft/test_nf4.py for the measured figures.

Shape legend: In input features, Out output features, N tokens, NB = In*Out/64 first-level blocks.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign.errors import ConfigError

BLOCK = 64
SCALE_BLOCK = 256

# The 16 NF4 values, exactly as printed in appendix E of the QLoRA paper (and bitsandbytes' `nf4` table).
NF4_CODE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)
# Decision boundaries between neighbouring code values: round to nearest.
_MIDPOINTS = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2


class Nf4Data(nnx.Variable):
    """Frozen quantised storage (never trained, never in the optimizer)."""


def check_shape(path: str, shape: tuple[int, ...]) -> None:
    if shape[-2] % BLOCK:
        raise ConfigError(
            f"lora.quantize='nf4': weight {path} has shape {shape}; its input dimension must be a multiple of {BLOCK}"
        )


def quantize(w_InxOut: jax.Array) -> dict[str, jax.Array]:
    """The NF4 storage (module docstring) of a float (..., In, Out) weight, leading dimensions kept."""
    *lead, In, Out = w_InxOut.shape
    w = w_InxOut.astype(jnp.float32).reshape(*lead, In // BLOCK, BLOCK, Out)
    absmax = jnp.max(jnp.abs(w), axis=-2)  # (..., In/64, Out)
    safe = jnp.where(absmax > 0, absmax, 1.0)
    idx = jnp.sum(w[..., None] / safe[..., None, :, None] > jnp.asarray(_MIDPOINTS), axis=-1, dtype=jnp.int32)
    idx = idx.reshape(*lead, In, Out)
    codes = (idx[..., 0::2, :] << 4 | idx[..., 1::2, :]).astype(jnp.uint8)
    # Double quantisation: centre the block scales on their mean, then 8 bits per scale in blocks of 256.
    offset = jnp.mean(absmax, axis=(-2, -1))
    centred = (absmax - offset[..., None, None]).reshape(*lead, -1)
    nb = centred.shape[-1]
    pad = -nb % SCALE_BLOCK
    blocks = jnp.pad(centred, [(0, 0)] * len(lead) + [(0, pad)]).reshape(*lead, -1, SCALE_BLOCK)
    scales_s = jnp.max(jnp.abs(blocks), axis=-1)
    q = jnp.round(blocks / jnp.where(scales_s > 0, scales_s, 1.0)[..., None] * 127)
    scales_q = q.reshape(*lead, -1)[..., :nb].reshape(*lead, In // BLOCK, Out).astype(jnp.int8)
    return {"codes": codes, "scales_q": scales_q, "scales_s": scales_s, "offset": offset}


def block_scales(scales_q: jax.Array, scales_s: jax.Array, offset: jax.Array) -> jax.Array:
    """The dequantised first-level absmax of every 64-value block, (..., In/64, Out) float32."""
    *lead, InB, Out = scales_q.shape
    flat = scales_q.reshape(*lead, -1).astype(jnp.float32)
    nb = flat.shape[-1]
    pad = -nb % SCALE_BLOCK
    flat = jnp.pad(flat, [(0, 0)] * len(lead) + [(0, pad)]).reshape(*lead, -1, SCALE_BLOCK)
    absmax = (flat / 127 * scales_s[..., None]).reshape(*lead, -1)[..., :nb].reshape(*lead, InB, Out)
    return absmax + offset[..., None, None]


def dequantize(q: dict[str, jax.Array], dtype=jnp.float32) -> jax.Array:
    """The (..., In, Out) weight a `quantize` storage stands for."""
    codes = q["codes"]
    *lead, In2, Out = codes.shape
    idx = jnp.stack([codes >> 4, codes & 15], axis=-2).reshape(*lead, 2 * In2, Out)
    values = jnp.asarray(NF4_CODE)[idx.astype(jnp.int32)]
    absmax = block_scales(q["scales_q"], q["scales_s"], q["offset"])
    w = values.reshape(*lead, 2 * In2 // BLOCK, BLOCK, Out) * absmax[..., None, :]
    return w.reshape(*lead, 2 * In2, Out).astype(dtype)


def bits_per_param(q: dict[str, jax.Array]) -> float:
    """Storage bits per weight of a `quantize` result."""
    n = 2 * math.prod(q["codes"].shape)
    return sum(8 * x.size * x.dtype.itemsize for x in jax.tree.leaves(q)) / n


class Nf4Weight(nnx.Module):
    """A frozen (..., In, Out) weight stored as NF4; `axes` are the logical axes of the float weight it replaces, which
    the codes and first-level scales keep (so the same rules shard them), the small second level is replicated."""

    def __init__(self, w: jax.Array, axes: tuple[str | None, ...]):
        q = quantize(w)
        lead = tuple(axes[:-2])
        self.codes = Nf4Data(q["codes"], axes=axes)
        self.scales_q = Nf4Data(q["scales_q"], axes=axes)
        self.scales_s = Nf4Data(q["scales_s"], axes=(*lead, None))
        self.offset = Nf4Data(q["offset"], axes=lead)

    def storage(self) -> dict[str, jax.Array]:
        return {k: getattr(self, k)[...] for k in ("codes", "scales_q", "scales_s", "offset")}

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return dequantize(self.storage(), dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, In2, Out = self.codes.shape
        return (*lead, 2 * In2, Out)


def matmul(x_NxIn: jax.Array, w: Nf4Weight) -> jax.Array:
    """x @ dequantize(w) in x's dtype: the weight is dequantised inside the traced computation, per call."""
    return x_NxIn @ w.dequantize(x_NxIn.dtype)
