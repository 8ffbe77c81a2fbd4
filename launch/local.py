"""Start a multi-process jaxalign run on this machine (the template for the TPU VM, SLURM and GKE launchers).

    python launch/local.py --processes 2 --devices-per-process 2 -- \\
        --config=configs/pretrain.py:smoke --config.workdir=runs/mp

Each process gets the JAX distributed-runtime variables (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
`JAX_PROCESS_ID`) that `jaxalign.parallel.distributed.maybe_initialize` reads, and on CPU its own fake devices.
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pump(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(f"{prefix}{line}")
        out.flush()


def launch(processes: int, devices_per_process: int, args: list[str], cpu: bool = True) -> int:
    port = free_port()
    children: list[subprocess.Popen] = []
    pumps = []
    for pid in range(processes):
        env = dict(
            os.environ,
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES=str(processes),
            JAX_PROCESS_ID=str(pid),
        )
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
        for stream, out in ((child.stdout, sys.stdout), (child.stderr, sys.stderr)):
            t = threading.Thread(target=_pump, args=(stream, f"[p{pid}] ", out), daemon=True)
            t.start()
            pumps.append(t)

    def forward(signum, frame):
        for c in children:
            if c.poll() is None:
                c.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)

    code = 0
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
                for other in remaining:
                    children[other].terminate()
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
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then the jaxalign.main arguments")
    ns = parser.parse_args()
    args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
    sys.exit(launch(ns.processes, ns.devices_per_process, args, cpu=not ns.accelerators))


if __name__ == "__main__":
    main()
