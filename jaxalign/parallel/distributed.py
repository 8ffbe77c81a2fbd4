"""Multi-process start-up through JAX's own distributed runtime and cluster detection.

`maybe_initialize()` is called once by `main` before anything touches a JAX backend. It starts the distributed
runtime when either
  - the launcher set the explicit variables `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`
    (launch/local.py does), or
  - one of JAX's own cluster environments (`jax._src.clusters`: Open MPI, SLURM, GKE TPU, GCE TPU VM, Kubernetes)
    is present; then `jax.distributed.initialize()` is called with no arguments and JAX reads the coordinator,
    process count and id (and, under SLURM / Open MPI on GPUs, the local device) itself,
and the run has more than one process. A single-process run (no cluster, a one-task SLURM allocation, a one-host TPU
VM) is left untouched: no runtime, no collectives setting.

`multislice_devices` lays a mesh out over several TPU slices (data axis across slices), which `jax.make_mesh`
refuses to do.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax._src import clusters
from jax._src import distributed as jax_distributed
from jax.experimental import mesh_utils

from jaxalign.errors import ConfigError

_EXPLICIT = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


@dataclasses.dataclass(frozen=True)
class Cluster:
    """What was detected: "explicit" or JAX's ClusterEnv name ("ompi", "slurm", "gketpu", "gcetpu", "k8s")."""

    name: str
    num_processes: int
    env: type[clusters.ClusterEnv] | None = None


def detect() -> Cluster | None:
    """The cluster this process runs in, or None for a single-process run.

    Explicit variables win over detection (a launcher that sets them means them). Detection is JAX's: the first
    present, non-opt-in `ClusterEnv` in JAX's own order, as `jax.distributed.initialize()` would pick it.
    """
    given = [k for k in _EXPLICIT if k in os.environ]
    if given:
        missing = [k for k in _EXPLICIT if k not in os.environ]
        if missing:
            raise ConfigError(
                f"multi-process launch sets {given} but not {missing}: set all of {list(_EXPLICIT)} or none"
            )
        try:
            n, pid = int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"])
        except ValueError:
            raise ConfigError(
                f"JAX_NUM_PROCESSES={os.environ['JAX_NUM_PROCESSES']!r} and "
                f"JAX_PROCESS_ID={os.environ['JAX_PROCESS_ID']!r} must be integers"
            ) from None
        if not 0 <= pid < n:
            raise ConfigError(f"JAX_PROCESS_ID={pid} must be in [0, JAX_NUM_PROCESSES={n})")
        return Cluster("explicit", n) if n > 1 else None
    for env in clusters.ClusterEnv._cluster_types:
        if env.opt_in_only_method or not env.is_env_present():
            continue
        n = env.get_process_count()
        name = env.name or env.__name__.removesuffix("Cluster").lower()  # K8sCluster has no name
        return Cluster(name, n, env) if n > 1 else None
    return None


def maybe_initialize() -> Cluster | None:
    """Starts JAX's distributed runtime when a multi-process cluster is detected; returns what was detected.

    Prints one line: the cluster, this process's id and the process count, and the coordinator address.
    """
    cluster = detect()
    if cluster is None:
        return None
    # Cross-process collectives between CPU devices (tests, CPU-only clusters) need gloo; accelerators use their
    # own collectives. Must be set before any backend starts; harmless where the CPU backend is not used.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if cluster.env is None:
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    else:
        jax.distributed.initialize()
    state = jax_distributed.global_state
    print(
        f"distributed: {cluster.name} cluster, process {state.process_id} of {state.num_processes} "
        f"(coordinator {state.coordinator_address})",
        flush=True,
    )
    return cluster


def num_slices(devices: Sequence[Any]) -> int:
    """How many TPU slices (ICI domains joined over the data-center network) `devices` span; 1 off TPU."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def multislice_devices(shape: Sequence[int], devices: Sequence[Any]) -> np.ndarray:
    """Devices arranged as a (data, fsdp, tensor, stage) mesh of `shape` over several slices.

    `jax.make_mesh` refuses multi-slice device sets. Here the data axis is split across slices and every other axis
    stays inside a slice, so FSDP all-gathers and tensor-parallel collectives run on the fast inter-chip links and
    only the data-parallel gradient reduction crosses the data-center network (JAX's `create_hybrid_device_mesh`).
    """
    slices = num_slices(devices)
    data, *inner = shape
    if data % slices:
        raise ConfigError(
            f"mesh.data={data} must be a multiple of the {slices} slices the devices span: only the data axis may "
            f"cross slices (mesh {tuple(shape)})"
        )
    return mesh_utils.create_hybrid_device_mesh(
        (data // slices, *inner), (slices,) + (1,) * len(inner), list(devices)
    )
