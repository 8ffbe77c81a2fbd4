"""NF4 with double quantisation (`jaxalign.peft.nf4`): the paper's code book, the error bound of a quantise ->
dequantise round trip, ~4.127 storage bits per parameter, and the on-the-fly dequantised matmul."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
from scipy.stats import norm

from jaxalign.peft import nf4


def test_code_book_is_the_papers():
    # QLoRA appendix E builds NF4 from normal quantiles, as bitsandbytes' create_normal_map(offset=0.9677083): 8
    # positive and 7 negative quantiles of float32 torch.linspace grids, plus 0, normalised to [-1, 1]. Recomputed
    # independently here, it matches the table bit for bit.
    offset = 0.9677083
    pos = norm.ppf(torch.linspace(offset, 0.5, 9)[:-1].numpy())
    neg = -norm.ppf(torch.linspace(offset, 0.5, 8)[:-1].numpy())
    values = np.sort(np.concatenate([pos, [0.0], neg]))
    values = (values / np.abs(values).max()).astype(np.float32)
    np.testing.assert_array_equal(nf4.NF4_CODE, values)
    assert nf4.NF4_CODE.shape == (16,) and nf4.NF4_CODE[7] == 0.0
    # The printed table's literal values (the paper / bitsandbytes), exactly.
    assert nf4.NF4_CODE[1] == np.float32(-0.6961928009986877)
    assert nf4.NF4_CODE[14] == np.float32(0.7229568362236023)


def test_round_trip_error_bound_and_exact_codes():
    w = jax.random.normal(jax.random.key(0), (3, 256, 96)) * 0.02  # 3 stacked layers
    q = nf4.quantize(w)
    assert q["codes"].dtype == jnp.uint8 and q["codes"].shape == (3, 128, 96)
    assert q["scales_q"].dtype == jnp.int8 and q["scales_q"].shape == (3, 4, 96)
    deq = np.asarray(nf4.dequantize(q))
    wn = np.asarray(w).reshape(3, 4, 64, 96)
    absmax = np.abs(wn).max(axis=2, keepdims=True)
    scales = np.asarray(nf4.block_scales(q["scales_q"], q["scales_s"], q["offset"]))[:, :, None, :]
    # Second level: the 8-bit grid's half step of each 256-block of centred scales.
    half_step = (np.asarray(q["scales_s"]) / 127 / 2).max(axis=-1)[:, None, None, None]
    assert np.all(np.abs(scales - absmax) <= half_step * 1.0001 + 1e-9)
    # First level: within half the widest gap of the code book, times the block scale, plus the scale's error.
    gap = np.diff(nf4.NF4_CODE).max() / 2
    err = np.abs(deq.reshape(wn.shape) - wn)
    assert np.all(err <= gap * absmax + np.abs(scales - absmax) + 1e-7)
    # Each code is the nearest code-book value of w / absmax (with the true absmax), as bitsandbytes picks it.
    idx = np.abs(wn / absmax - nf4.NF4_CODE[:, None, None, None, None]).argmin(axis=0).reshape(3, 256, 96)
    codes = np.asarray(q["codes"])
    np.testing.assert_array_equal(codes >> 4, idx[:, 0::2])
    np.testing.assert_array_equal(codes & 15, idx[:, 1::2])
    # And the round trip is far better than a uniform 4-bit grid's worst case would allow on normal weights.
    rel = np.sqrt(np.mean(err**2) / np.mean(wn**2))
    assert rel < 0.12, rel


def test_bits_per_parameter_with_double_quantisation():
    q = nf4.quantize(jnp.ones((4096, 1024)))
    bits = nf4.bits_per_param(q)
    # 4 + 8/64 + 32/(64*256) = 4.1270 (+ one f32 offset over 4M weights).
    assert abs(bits - (4 + 8 / 64 + 32 / (64 * 256))) < 1e-4, bits
    assert abs(bits - 4.127) < 1e-3


def test_dequantised_matmul_equals_reference():
    w = jax.random.normal(jax.random.key(1), (128, 64))
    x = jax.random.normal(jax.random.key(2), (16, 128))
    module = nf4.Nf4Weight(w, ("embed", "mlp"))
    got = jax.jit(nf4.matmul)(x, module)
    ref = np.asarray(x, np.float64) @ np.asarray(nf4.dequantize(nf4.quantize(w)), np.float64)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-4)


def test_dequantisation_is_one_fusion_feeding_the_dot():
    """What XLA:CPU makes of `matmul`: unpacking, code-book lookup and both scale levels in one loop fusion that
    writes the float weight, then the dot; no other op touches the weight."""
    module = nf4.Nf4Weight(jax.random.normal(jax.random.key(1), (128, 64)), ("embed", "mlp"))
    x = jnp.ones((8, 128))
    hlo = jax.jit(lambda x, s: x @ nf4.dequantize(s, x.dtype)).lower(x, module.storage()).compile().as_text()
    entry = [line for line in hlo[hlo.index("ENTRY") :].splitlines()[1:] if " = " in line]
    ops = [line.split(" = ", 1)[1].split("(", 1)[0] for line in entry if "parameter(" not in line]
    fusions = [line for line in entry if " fusion(" in line]
    assert len(fusions) == 2, entry
    assert "f32[128,64]" in fusions[0] and "u8[64,64]" not in fusions[1], fusions
    assert all("fusion" in op or "constant" in op for op in ops), ops
