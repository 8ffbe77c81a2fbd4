"""GRPO through the real command line: a run SIGKILLed right after a checkpoint resumes bitwise (the sampler's
per-step key and the prompt iterator's position are restored), on `configs/grpo.py:smoke` shrunk."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

# One xdist worker runs this module (pyproject.toml's --dist loadgroup): the uninterrupted GRPO run is made once.
pytestmark = pytest.mark.xdist_group("test_grpo_resume")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def command(workdir, *overrides):
    return [
        sys.executable,
        "-m",
        "jaxalign.main",
        "--config=configs/grpo.py:smoke",
        f"--config.workdir={workdir}",
        "--config.model.d_model=32",
        "--config.model.d_ff=64",
        "--config.model.head_dim=8",
        "--config.grpo.max_completion_length=8",
        "--config.train.steps=6",
        "--config.train.log_every=1",
        "--config.train.eval_every=0",
        "--config.train.progress=False",
        "--config.train.peak_flops=1e9",  # skips measuring the matmul peak (MFU is not compared)
        "--config.checkpoint.every_steps=3",
        *overrides,
    ]


def run(workdir, *overrides, expect=0, **extra_env):
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu", **extra_env
    )
    proc = subprocess.run(
        command(workdir, *overrides), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == expect, proc.stderr[-3000:]
    return proc


def records(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}


def state_bytes(workdir, step):
    restored = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / "grpo" / str(step) / "state")
    leaves = jax.tree_util.tree_leaves_with_path({"params": restored["params"], "opt": restored["opt_state"]})
    return [(jax.tree_util.keystr(path), np.asarray(x).tobytes()) for path, x in leaves]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    run(workdir)
    return workdir


def test_grpo_resume_after_sigkill_is_bitwise_identical(straight, tmp_path):
    shared = (
        f"--config.data.input={straight / 'data' / 'rl_train.jsonl'}",
        f"--config.data.eval_input={straight / 'data' / 'rl_eval.jsonl'}",
        f"--config.data.tokenizer={straight / 'tokenizer.model'}",
    )
    run(tmp_path, *shared, expect=-signal.SIGKILL, JAXALIGN_FAULT_KILL_AFTER_SAVE="3")
    proc = run(tmp_path, *shared)
    assert "resumed from step 3" in proc.stdout
    assert state_bytes(tmp_path, 6) == state_bytes(straight, 6)
    resumed, reference = records(tmp_path), records(straight)
    assert sorted(resumed) == list(range(1, 7))
    for step in range(4, 7):  # the same completions, rewards and updates after the resume
        for key in ("loss", "reward", "completions/mean_length", "kl", "clip_ratio/region_mean"):
            assert resumed[step][key] == reference[step][key], (step, key)
