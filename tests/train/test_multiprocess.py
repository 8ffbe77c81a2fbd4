"""Two processes x 2 fake devices (JAX distributed runtime, gloo collectives) train like one process with 4 devices,
save from both processes and resume; started with explicit JAX variables or a simulated SLURM job step (JAX's own
SLURM detection). SIGTERM to every process or to one of them stops both at the same step with a committed
checkpoint and exit 0."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.train.test_resume import ROOT, committed_steps, losses

# One xdist worker runs this module (pyproject.toml's --dist loadgroup): the single-process reference run is made once.
pytestmark = pytest.mark.xdist_group("test_multiprocess")


def args(workdir, corpus):
    return [
        "--config=configs/pretrain.py:smoke",
        f"--config.workdir={workdir}",
        f"--config.data.input={corpus['input']}",
        f"--config.data.tokenizer={corpus['tokenizer']}",
        "--config.data.shards=2",
        "--config.model.vocab_size=512",
        "--config.model.d_model=32",
        "--config.model.d_ff=64",
        "--config.model.head_dim=8",
        "--config.train.seq_len=64",
        "--config.train.steps=8",
        "--config.train.log_every=1",
        "--config.train.eval_every=0",
        "--config.train.progress=False",
        "--config.train.peak_flops=1e9",  # skips measuring the matmul peak (MFU is not compared)
        "--config.checkpoint.every_steps=4",
    ]


def launch_command(workdir, corpus, cluster="explicit", *overrides):
    return [
        sys.executable,
        "launch/local.py",
        "--processes",
        "2",
        "--devices-per-process",
        "2",
        f"--cluster={cluster}",
        "--",
        *args(workdir, corpus),
        *overrides,
    ]


def launch_env(**extra_env):
    env = dict(os.environ, **extra_env)
    env.pop("XLA_FLAGS", None)
    return env


def launch(workdir, corpus, cluster="explicit", **extra_env):
    cmd = launch_command(workdir, corpus, cluster)
    return subprocess.run(
        cmd, cwd=ROOT, env=launch_env(**extra_env), capture_output=True, text=True, timeout=400
    )


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory):
    """The reference: one process with 4 devices."""
    single = tmp_path_factory.mktemp("single")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "jaxalign.main", *args(single, corpus)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "distributed:" not in proc.stdout  # a single-process run is left alone
    return single


@pytest.mark.parametrize("cluster", ["explicit", "slurm"])
def test_two_processes_match_one_and_resume(corpus, single, tmp_path, cluster):
    multi = tmp_path / "multi"
    proc = launch(multi, corpus, cluster, JAXALIGN_FAULT_KILL_AFTER_SAVE="4")
    assert proc.returncode == 128 + signal.SIGKILL, proc.stderr[-3000:]
    for pid in range(2):
        assert f"[p{pid}] distributed: {cluster} cluster, process {pid} of 2" in proc.stdout
    assert committed_steps(multi) == [4]
    # Both processes wrote their own data-iterator state into the committed checkpoint.
    data_dir = multi / "checkpoints" / "pretrain" / "4" / "data"
    assert sorted(p.name for p in data_dir.iterdir() if p.suffix == ".json") == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
    proc = launch(multi, corpus, cluster)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step 4" in proc.stdout

    a, b = losses(single), losses(multi)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    np.testing.assert_allclose([b[s] for s in range(1, 9)], [a[s] for s in range(1, 9)], rtol=1e-5)
    config = json.loads((multi / "config.json").read_text())
    assert config["data"]["shards"] == 2


@pytest.mark.parametrize(
    "sig, target",
    [(signal.SIGTERM, "every process"), (signal.SIGTERM, "one process"), (signal.SIGINT, "every process")],
    ids=["sigterm-to-all", "sigterm-to-one", "sigint-to-all"],
)
def test_signal_stops_every_process_at_the_same_step_with_a_checkpoint(corpus, tmp_path, sig, target):
    workdir, out, err = tmp_path / "run", tmp_path / "stdout", tmp_path / "stderr"
    # Long enough that the run is still going when the signal arrives; no periodic save before step 100.
    cmd = launch_command(
        workdir, corpus, "explicit", "--config.train.steps=400", "--config.checkpoint.every_steps=100"
    )
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=launch_env(), stdout=stdout, stderr=stderr, text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.05)
    if target == "every process":
        proc.send_signal(sig)  # the launcher forwards it to both
    else:
        children = [int(p) for p in re.findall(r"\[launch\] process \d: pid (\d+)", out.read_text())]
        os.kill(children[1], sig)  # the coordination service tells process 0
    proc.wait(timeout=300)
    stdout = out.read_text()
    assert proc.returncode == 0, err.read_text()[-3000:]
    saved = re.findall(r"\[p(\d)\] pretrain: preempted; saved step (\d+)", stdout)
    assert sorted(p for p, _ in saved) == ["0", "1"] and len({s for _, s in saved}) == 1, stdout[-3000:]
    step = int(saved[0][1])
    assert 3 <= step < 100
    assert committed_steps(workdir) == [step]
    assert max(losses(workdir)) == step
    data_dir = workdir / "checkpoints" / "pretrain" / str(step) / "data"
    assert len([p for p in data_dir.iterdir() if p.suffix == ".json"]) == 2
