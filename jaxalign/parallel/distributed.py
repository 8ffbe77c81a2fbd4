"""Multi-process start-up through JAX's own distributed runtime.

A launcher (launch/local.py, SLURM, GKE, TPU VMs) sets the standard variables; on TPU pods and SLURM JAX detects the
cluster itself. With none of them set this is a single-process run and nothing happens.
"""

from __future__ import annotations

import os

import jax

_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def maybe_initialize() -> None:
    """Calls `jax.distributed.initialize` when the launcher asked for more than one process."""
    if int(os.environ.get("JAX_NUM_PROCESSES", "1")) <= 1:
        return
    missing = [k for k in _ENV if k not in os.environ]
    if missing:
        raise RuntimeError(f"multi-process launch is missing environment variables {missing}")
    # Cross-process collectives between CPU devices (tests, laptops); accelerators use their own. Set before
    # anything touches a backend.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]),
    )
