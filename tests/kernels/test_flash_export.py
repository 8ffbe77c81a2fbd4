"""The Pallas flash kernel (forward, dq and dk/dv) lowers for TPU (Mosaic) and for GPU (Triton) through `jax.export`
on this CPU-only machine, at Llama-3-8B attention shapes (T=8192, 32 query / 8 kv heads, head dim 128, bf16,
packed segments).

What it takes, and why the whole model with attention="flash" does not export the same way yet:
- Mosaic TPU lowering asks `tpu_info.get_tpu_info()` for the chip generation (e.g. for `lax.sign`), which reads the
  local device kind ("cpu" here: "Unsupported TPU device kind: cpu") unless an `AbstractMesh` with a TPU
  `AbstractDevice` is in context, as below.
- In JAX 0.10 a `pallas_call` without compiler params lowers for GPU with Mosaic GPU
  (`jax_pallas_use_mosaic_gpu=True` by default), and this kernel's whole-length K/V blocks need 4.3 MB of shared
  memory there (> 227 KB: "Mosaic GPU kernel exceeds available shared memory"); Triton is chosen by
  `pltriton.CompilerParams` or by turning that flag off, as below. `jax.export` also refuses Triton's custom
  call, which has no compatibility guarantee, unless that check is disabled.
- `flash_attention(interpret=None)` and `_compiler_params` follow `jax.default_backend()` (cpu here), not the
  platform being lowered for: inside the model the kernel is traced in interpret mode, so exporting the model for
  TPU/GPU from a CPU host exports the interpreter. Choosing both by the lowering platform (e.g.
  `interpret=False` plus per-platform compiler params) would let the model export like the kernel does here.
- Lowering does not check VMEM: by the kernel's own bound the dk/dv pass keeps the group's full-length Q and dO in
  VMEM, 8 x G x T x D = 32 MiB at these shapes, above the default scoped-VMEM limit, so it needs
  `vmem_limit_bytes` (or smaller tiles) when compiled on a TPU.
"""

import re

import jax
import jax.numpy as jnp
import pytest
from jax import export
from jax._src.mesh import AbstractDevice
from jax.sharding import AbstractMesh, AxisType

from jaxalign.kernels.flash_attention import flash_attention

B, T, H, K, D = 1, 8192, 32, 8, 128
Q = jax.ShapeDtypeStruct((B, T, H, D), jnp.bfloat16)
KV = jax.ShapeDtypeStruct((B, T, K, D), jnp.bfloat16)
SEG = jax.ShapeDtypeStruct((B, T), jnp.int32)


def forward_and_grads(q, k, v, segment_ids):
    def loss(q, k, v):
        o = flash_attention(q, k, v, causal=True, segment_ids=segment_ids, interpret=False)
        return o.astype(jnp.float32).sum()

    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def custom_calls(exported: export.Exported) -> list[str]:
    return re.findall(r"custom_call @([\w$.]+)", exported.mlir_module())


@pytest.mark.parametrize("device_kind", ["TPU v5 lite", "TPU v5p", "TPU v6 lite"])
def test_lowers_for_tpu(device_kind):
    target = AbstractDevice(device_kind=device_kind, num_cores=1, platform="tpu")
    mesh = AbstractMesh((1,), ("x",), axis_types=(AxisType.Auto,), abstract_device=target)
    with jax.sharding.use_abstract_mesh(mesh):
        exported = export.export(jax.jit(forward_and_grads), platforms=["tpu"])(Q, KV, KV, SEG)
    assert custom_calls(exported).count("tpu_custom_call") == 3  # forward, dq, dk/dv kernels
    assert [(a.shape, a.dtype) for a in exported.out_avals] == [(s.shape, s.dtype) for s in (Q, KV, KV)]


def test_lowers_for_gpu_through_triton():
    previous = jax.config.jax_pallas_use_mosaic_gpu
    jax.config.update("jax_pallas_use_mosaic_gpu", False)
    try:
        triton = "__gpu$xla.gpu.triton"
        exported = export.export(
            jax.jit(forward_and_grads),
            platforms=["cuda"],
            disabled_checks=[export.DisabledSafetyCheck.custom_call(triton)],
        )(Q, KV, KV, SEG)
    finally:
        jax.config.update("jax_pallas_use_mosaic_gpu", previous)
    assert custom_calls(exported).count(triton) == 3
    assert [(a.shape, a.dtype) for a in exported.out_avals] == [(s.shape, s.dtype) for s in (Q, KV, KV)]
