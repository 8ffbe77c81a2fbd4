"""Cluster detection goes through JAX's own ClusterEnv classes; single-process environments are left alone;
a multi-slice mesh keeps every axis but `data` inside a slice.

The multi-process start itself (explicit variables and a simulated SLURM job) is tested end to end in
tests/train/test_multiprocess.py.
"""

import dataclasses
import os

import jax
import numpy as np
import pytest

from jaxalign.errors import ConfigError
from jaxalign.parallel import distributed


@pytest.fixture
def clean_env(monkeypatch):
    """No launcher or cluster variables of the machine running the tests leak in."""
    for k in list(os.environ):
        if k.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")):
            monkeypatch.delenv(k)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    return monkeypatch


def slurm(env, ntasks, procid=0):
    env.setenv("SLURM_JOB_ID", "4242")
    env.setenv("SLURM_STEP_NODELIST", "gpu[017-018],other")
    env.setenv("SLURM_NTASKS", str(ntasks))
    env.setenv("SLURM_PROCID", str(procid))
    env.setenv("SLURM_LOCALID", str(procid))


def test_no_cluster_is_a_single_process_run(clean_env):
    assert distributed.detect() is None
    assert distributed.maybe_initialize() is None


def test_slurm_is_detected_by_jax_and_a_one_task_allocation_is_left_alone(clean_env):
    slurm(clean_env, ntasks=1)
    assert distributed.detect() is None
    slurm(clean_env, ntasks=4, procid=3)
    cluster = distributed.detect()
    assert (cluster.name, cluster.num_processes) == ("slurm", 4)
    # The coordinator JAX will use: first host of the step's node list, port derived from the job id.
    assert cluster.env.get_coordinator_address(None, None) == f"gpu017:{4242 % 4096 + 61440}"


def test_open_mpi_is_detected(clean_env):
    clean_env.setenv("OMPI_MCA_orte_hnp_uri", "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911")
    clean_env.setenv("OMPI_COMM_WORLD_SIZE", "16")
    clean_env.setenv("OMPI_COMM_WORLD_RANK", "5")
    clean_env.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "5")
    cluster = distributed.detect()
    assert (cluster.name, cluster.num_processes) == ("ompi", 16)


def test_explicit_variables_win_over_detection(clean_env):
    slurm(clean_env, ntasks=4)
    clean_env.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    clean_env.setenv("JAX_NUM_PROCESSES", "2")
    clean_env.setenv("JAX_PROCESS_ID", "1")
    cluster = distributed.detect()
    assert (cluster.name, cluster.num_processes, cluster.env) == ("explicit", 2, None)
    clean_env.setenv("JAX_NUM_PROCESSES", "1")
    clean_env.setenv("JAX_PROCESS_ID", "0")
    assert distributed.detect() is None


@pytest.mark.parametrize(
    "env, message",
    [
        ({"JAX_NUM_PROCESSES": "2"}, "but not ['JAX_COORDINATOR_ADDRESS', 'JAX_PROCESS_ID']"),
        (
            {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
            "must be in [0,",
        ),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "integers"),
    ],
)
def test_bad_explicit_variables_are_one_line_errors(clean_env, env, message):
    for k, v in env.items():
        clean_env.setenv(k, v)
    with pytest.raises(ConfigError) as e:
        distributed.detect()
    assert message in str(e.value)


@dataclasses.dataclass(frozen=True)
class SliceDevice:
    """A device of a multi-slice TPU set as mesh building sees it (CPU devices have no `slice_index`)."""

    id: int
    slice_index: int
    platform: str = "cpu"
    device_kind: str = "cpu"


def test_multislice_mesh_keeps_everything_but_data_inside_a_slice():
    # 4 slices of 8 devices, listed interleaved as a runtime may enumerate them.
    devices = [SliceDevice(i, i % 4) for i in range(32)]
    assert distributed.num_slices(devices) == 4
    grid = distributed.multislice_devices((8, 2, 2, 1), devices)
    assert grid.shape == (8, 2, 2, 1)
    slice_of = np.vectorize(lambda d: d.slice_index)(grid)
    # Every data index lies within one slice, and the data axis walks over all of them.
    assert all(len(set(slice_of[d].ravel())) == 1 for d in range(8))
    assert sorted(slice_of[:, 0, 0, 0]) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert sorted(d.id for d in grid.ravel()) == list(range(32))
    with pytest.raises(ConfigError, match="mesh.data=2 must be a multiple of the 4 slices"):
        distributed.multislice_devices((2, 16, 1, 1), devices)
    assert distributed.num_slices(jax.devices()) == 1
