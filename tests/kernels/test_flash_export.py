"""The Pallas flash kernel (forward, dq and dk/dv) lowers for TPU (Mosaic) and for GPU (Triton) through `jax.export`
on this CPU-only machine, at Llama-3-8B attention shapes (T=8192, 32 query / 8 kv heads, head dim 128, bf16,
packed segments).

What it takes:
- Mosaic TPU lowering asks `tpu_info.get_tpu_info()` for the chip generation (e.g. for `lax.sign`), which reads the
  local device kind ("cpu" here: "Unsupported TPU device kind: cpu") unless an `AbstractMesh` with a TPU
  `AbstractDevice` is in context, as below; `vmem.plan` reads the same device to pick the VMEM budget.
- `interpret=None` (the default) chooses per lowering platform (`lax.platform_dependent`): Mosaic with each
  pass's `vmem_limit_bytes` on TPU, Triton by its CompilerParams on GPU (a `pallas_call` without them would lower
  with Mosaic GPU, whose shared memory cannot hold the full-length K/V blocks), the interpreter on CPU.
- `jax.export` refuses Triton's custom call, which has no compatibility guarantee, unless that check is disabled.
The whole model's train step exports the same way: tests/models/test_flash_model_export.py.
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
        o = flash_attention(q, k, v, causal=True, segment_ids=segment_ids)
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
    assert custom_calls(exported) == ["tpu_custom_call"] * 3  # forward, dq, dk/dv kernels
    limits = re.findall(
        r"scoped_memory_configs\\22: \[\{\\22memory_space\\22:1, \\22offset\\22: 0, \\22size\\22: (\d+)\}",
        exported.mlir_module(),
    )
    assert [int(x) for x in limits] == [7 * 2**20, 7 * 2**20, 24 * 2**20]  # vmem.plan: fwd, dq, dk/dv
    assert [(a.shape, a.dtype) for a in exported.out_avals] == [(s.shape, s.dtype) for s in (Q, KV, KV)]


def test_lowers_for_gpu_through_triton():
    triton = "__gpu$xla.gpu.triton"
    exported = export.export(
        jax.jit(forward_and_grads),
        platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call(triton)],
    )(Q, KV, KV, SEG)
    assert custom_calls(exported) == [triton] * 3
    assert [(a.shape, a.dtype) for a in exported.out_avals] == [(s.shape, s.dtype) for s in (Q, KV, KV)]
