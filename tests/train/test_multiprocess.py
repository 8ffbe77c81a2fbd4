"""Two processes x 2 fake devices (JAX distributed runtime, gloo collectives) train like one process with 4 devices,
save from both processes and resume."""

import json
import os
import signal
import subprocess
import sys

import numpy as np

from tests.train.test_resume import ROOT, committed_steps, losses


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
        "--config.checkpoint.every_steps=4",
    ]


def launch(workdir, corpus, **extra_env):
    cmd = [
        sys.executable,
        "launch/local.py",
        "--processes",
        "2",
        "--devices-per-process",
        "2",
        "--",
        *args(workdir, corpus),
    ]
    env = dict(os.environ, **extra_env)
    env.pop("XLA_FLAGS", None)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)


def test_two_processes_match_one_and_resume(corpus, tmp_path):
    single = tmp_path / "single"
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

    multi = tmp_path / "multi"
    proc = launch(multi, corpus, JAXALIGN_FAULT_KILL_AFTER_SAVE="4")
    assert proc.returncode == 128 + signal.SIGKILL, proc.stderr[-3000:]
    assert committed_steps(multi) == [4]
    # Both processes wrote their own data-iterator state into the committed checkpoint.
    data_dir = multi / "checkpoints" / "pretrain" / "4" / "data"
    assert sorted(p.name for p in data_dir.iterdir() if p.suffix == ".json") == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
    proc = launch(multi, corpus)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step 4" in proc.stdout

    a, b = losses(single), losses(multi)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    np.testing.assert_allclose([b[s] for s in range(1, 9)], [a[s] for s in range(1, 9)], rtol=1e-5)
    config = json.loads((multi / "config.json").read_text())
    assert config["data"]["shards"] == 2
