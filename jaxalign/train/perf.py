"""Peak FLOP/s per device for MFU: known accelerator peaks, or a measured float32 matmul on CPU."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets.
KNOWN_PEAKS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA A100": 312e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA B200": 2250e12,
}


def measure_matmul_flops(n: int = 2048, repeats: int = 3) -> float:
    """Best-of-`repeats` float32 FLOP/s of an n x n x n matmul on the default device (all its cores)."""
    key = jax.random.PRNGKey(0)
    a = jax.random.normal(key, (n, n), jnp.float32)
    b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


@functools.cache
def peak_flops() -> float:
    """Peak FLOP/s of all devices of the run: known chip peaks times the device count; on CPU (where fake devices
    share the same cores) and unknown chips, a matmul measured on this host."""
    kind = jax.devices()[0].device_kind
    for name, peak in KNOWN_PEAKS.items():
        if kind.startswith(name):
            return peak * jax.device_count()
    return measure_matmul_flops() * jax.process_count()
