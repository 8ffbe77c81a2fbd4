"""The device mesh and the one mapping from logical axis names to mesh axes.

Mesh axes are `data`, `fsdp`, `tensor`, `stage` (always in that order). Parameters and key activations carry
logical names (`embed`, `mlp`, `heads`, ...); `Rules` turns a tuple of logical names into a `PartitionSpec` using the
table in `config.mesh.rules`. An unknown logical name raises.

The mesh uses `AxisType.Auto` on purpose: the model annotates parameters and a few activations and lets XLA's
sharding propagation place the rest (GSPMD style), rather than typing every intermediate as Explicit mode requires.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxalign.config import Config, MeshConfig
from jaxalign.errors import ConfigError

AXES = ("data", "fsdp", "tensor", "stage")


def mesh_shape(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
    """Resolves the one `-1` axis and checks that the sizes multiply to `num_devices`."""
    sizes = {axis: getattr(cfg, axis) for axis in AXES}
    known = math.prod(s for s in sizes.values() if s != -1)
    for axis, size in sizes.items():
        if size == -1:
            if num_devices % known:
                raise ConfigError(
                    f"mesh sizes {sizes} cannot fill {num_devices} devices: {num_devices} is not divisible by {known}"
                )
            sizes[axis] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ConfigError(
            f"mesh sizes {sizes} multiply to {math.prod(sizes.values())}, but there are {num_devices} devices "
            f"(set one of mesh.data/fsdp/tensor/stage to -1 to fill)"
        )
    return sizes


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the 4-axis mesh over `devices` (default: all, in `jax.devices()` order)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(cfg, len(devices))
    shape = tuple(sizes[a] for a in AXES)
    from jaxalign.parallel import distributed

    if distributed.num_slices(devices) > 1:
        # Several TPU slices: only the data axis crosses slices (jax.make_mesh refuses multi-slice device sets).
        grid = distributed.multislice_devices(shape, devices)
        return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES))
    return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=(AxisType.Auto,) * len(AXES))


@dataclasses.dataclass(frozen=True)
class PipelineSchedule:
    """How the layers run over the `stage` mesh axis when it has more than one device (`parallel/pipeline.py`):
    the `pipeline.schedule`, `pipeline.microbatches` (0 = the number of stages) and `pipeline.repeats` keys."""

    schedule: str = "gpipe"
    microbatches: int = 0
    repeats: int = 1


@dataclasses.dataclass(frozen=True)
class Rules:
    """Logical axis name -> mesh axes, bound to a mesh; and the pipeline schedule the `stage` axis runs."""

    mesh: Mesh
    table: tuple[tuple[str, tuple[str, ...]], ...]
    pipeline: PipelineSchedule = PipelineSchedule()

    @classmethod
    def from_config(cls, config: Config, devices: Sequence[jax.Device] | None = None) -> Rules:
        """The job's mesh (over `devices`, default all), rules table and pipeline schedule."""
        p = config.pipeline
        schedule = PipelineSchedule(p.schedule, p.microbatches, p.repeats)
        return cls(make_mesh(config.mesh, devices), config.mesh.rules, schedule)

    def spec(self, names: Sequence[str | None], shape: Sequence[int] | None = None) -> PartitionSpec:
        """PartitionSpec for logical `names`. With `shape`, mesh axes that do not divide a dimension are dropped
        (that dimension is replicated), and mesh axes of size 1 are left out."""
        table = dict(self.table)
        used: set[str] = set()
        out = []
        for i, name in enumerate(names):
            if name is None:
                out.append(None)
                continue
            if name not in table:
                raise ConfigError(
                    f"logical axis {name!r} has no entry in mesh.rules (known: {sorted(table)})"
                )
            axes = []
            size = 1
            for axis in table[name]:
                n = self.mesh.shape[axis]
                if n == 1 or axis in used:
                    continue
                if shape is not None and shape[i] % (size * n):
                    continue
                axes.append(axis)
                size *= n
            used.update(axes)
            out.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
        return PartitionSpec(*out)

    def sharding(self, names: Sequence[str | None], shape: Sequence[int] | None = None) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(names, shape))

    def constrain(self, x: jax.Array, names: Sequence[str | None]) -> jax.Array:
        """`with_sharding_constraint` by logical names (a no-op on a one-device mesh)."""
        if self.mesh.size == 1:
            return x
        return jax.lax.with_sharding_constraint(x, self.sharding(names, x.shape))

    @property
    def data_parallel_size(self) -> int:
        """How many ways the `batch` logical axis is split."""
        return math.prod(self.mesh.shape[a] for a in dict(self.table).get("batch", ()))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
