"""Start a multi-process jaxalign run on this machine (the template for the TPU VM, SLURM and GKE launchers).

    python launch/local.py --processes 2 --devices-per-process 2 -- \\
        --config=configs/pretrain.py:smoke --config.workdir=runs/mp

Each process gets the JAX distributed-runtime variables (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
`JAX_PROCESS_ID`) that `jaxalign.parallel.distributed.maybe_initialize` reads, and on CPU its own fake devices.
`--cluster slurm` instead sets the variables a SLURM job step gives each task (`SLURM_JOB_ID`,
`SLURM_STEP_NODELIST`, `SLURM_NTASKS`, `SLURM_PROCID`, `SLURM_LOCALID`, coordinator on localhost through
`JAX_COORDINATOR_PORT`), so JAX's own SLURM detection starts the runtime as it would on a cluster.
Output lines are prefixed with the process id. SIGTERM/SIGINT are forwarded to every process (they save at the same
step and exit 0); if one process fails the others are stopped. The exit code is the first non-zero one (128 + N for
a process killed by signal N), else 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

_JAX_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_COORDINATOR_PORT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pump(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(f"{prefix}{line}")
        out.flush()


CLUSTERS = ("explicit", "slurm")
KILL_GRACE_S = 30.0


def cluster_env(cluster: str, processes: int, pid: int, port: int) -> dict[str, str]:
    """The variables process `pid` of `processes` gets to find the coordinator on localhost:`port`."""
    if cluster == "explicit":
        return {
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "JAX_NUM_PROCESSES": str(processes),
            "JAX_PROCESS_ID": str(pid),
        }
    if cluster == "slurm":
        return {
            "SLURM_JOB_ID": str(port),
            "SLURM_STEP_NODELIST": "localhost",
            "SLURM_NTASKS": str(processes),
            "SLURM_PROCID": str(pid),
            "SLURM_LOCALID": str(pid),
            "JAX_COORDINATOR_PORT": str(port),
        }
    raise ValueError(f"cluster={cluster!r} is not one of {CLUSTERS}")


def launch(
    processes: int, devices_per_process: int, args: list[str], cpu: bool = True, cluster: str = "explicit"
) -> int:
    port = free_port()
    children: list[subprocess.Popen] = []
    pumps = []

    def forward(signum, frame):
        for c in children:
            if c.poll() is None:
                c.send_signal(signum)

    # Installed before the first child starts, so no signal can kill the launcher and orphan its children.
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)

    # Variables of an enclosing launch would override or confuse the ones set here.
    inherited = {
        k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_")) and k not in _JAX_VARS
    }
    for pid in range(processes):
        env = dict(inherited, **cluster_env(cluster, processes, pid, port))
        if cpu:
            env["JAX_PLATFORMS"] = "cpu"
            env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices_per_process}"
        child = subprocess.Popen(
            [sys.executable, "-m", "jaxalign.main", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        children.append(child)
        print(f"[launch] process {pid}: pid {child.pid}", flush=True)
        for stream, out in ((child.stdout, sys.stdout), (child.stderr, sys.stderr)):
            t = threading.Thread(target=_pump, args=(stream, f"[p{pid}] ", out), daemon=True)
            t.start()
            pumps.append(t)

    code = 0
    failed_at = (
        None  # when the first process failed; the others get SIGTERM, then SIGKILL after a grace period
    )
    remaining = set(range(processes))
    while remaining:
        for pid in sorted(remaining):
            try:
                rc = children[pid].wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                continue
            remaining.discard(pid)
            if rc != 0 and code == 0:
                code = 128 - rc if rc < 0 else rc  # killed by signal N -> 128 + N, as a shell reports it
                failed_at = time.monotonic()
                for other in remaining:
                    children[other].terminate()
        # A survivor that took the SIGTERM as a preemption notice would wait forever in a collective with the
        # dead process: stop it for good.
        if failed_at is not None and time.monotonic() - failed_at > KILL_GRACE_S:
            for other in remaining:
                children[other].kill()
    for t in pumps:
        t.join(timeout=5)
    return code


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices-per-process", type=int, default=2, help="fake CPU devices per process")
    parser.add_argument(
        "--accelerators", action="store_true", help="use real accelerators, not fake CPU devices"
    )
    parser.add_argument(
        "--cluster", choices=CLUSTERS, default="explicit", help="how processes find each other (see above)"
    )
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then the jaxalign.main arguments")
    ns = parser.parse_args()
    args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
    sys.exit(launch(ns.processes, ns.devices_per_process, args, cpu=not ns.accelerators, cluster=ns.cluster))


if __name__ == "__main__":
    main()
