"""Checkpoints and resume through the real command line: bitwise resume after SIGKILL (pretraining, pipelined
pretraining, SFT, reward model, DPO), SIGTERM preemption, a kill during an async save, mismatched checkpoints, and
NaN handling."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxalign.data.tokenizer import train_sentencepiece

# One xdist worker runs this module (pyproject.toml's --dist loadgroup): the uninterrupted reference runs is made once.
pytestmark = pytest.mark.xdist_group("test_resume")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def command(workdir, corpus, *overrides):
    return [
        sys.executable,
        "-m",
        "jaxalign.main",
        "--config=configs/pretrain.py:smoke",
        f"--config.workdir={workdir}",
        f"--config.data.input={corpus['input']}",
        f"--config.data.tokenizer={corpus['tokenizer']}",
        "--config.model.vocab_size=512",
        "--config.model.d_model=32",
        "--config.model.d_ff=64",
        "--config.model.head_dim=8",
        "--config.train.seq_len=64",
        "--config.train.steps=12",
        "--config.train.log_every=1",
        "--config.train.eval_every=0",
        "--config.train.progress=False",
        "--config.checkpoint.every_steps=4",
        *overrides,
    ]


def env(devices=2, **extra):
    return dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        **extra,
    )


def run(workdir, corpus, *overrides, expect=0, **extra_env):
    proc = subprocess.run(
        command(workdir, corpus, *overrides),
        cwd=ROOT,
        env=env(**extra_env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == expect, proc.stderr[-3000:]
    return proc


def losses(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def committed_steps(workdir):
    directory = workdir / "checkpoints" / "pretrain"
    return sorted(int(d.name) for d in directory.iterdir() if d.name.isdigit())


def params_bytes(workdir, step, stage="pretrain"):
    restored = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / stage / str(step) / "state")
    leaves = jax.tree_util.tree_leaves_with_path({"params": restored["params"], "opt": restored["opt_state"]})
    return [(jax.tree_util.keystr(path), np.asarray(x).tobytes()) for path, x in leaves]


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    run(workdir, corpus)
    return workdir


def test_resume_after_sigkill_is_bitwise_identical(corpus, straight, tmp_path):
    run(tmp_path, corpus, expect=-signal.SIGKILL, JAXALIGN_FAULT_KILL_AFTER_SAVE="8")
    assert committed_steps(tmp_path)[-1] == 8
    # A kill mid-write leaves half a JSON line at the end of metrics.jsonl: the resumed run drops it.
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"stage": "pretrain", "step": 9, "lo')
    run(tmp_path, corpus)
    assert all(json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines())
    assert params_bytes(tmp_path, 12) == params_bytes(straight, 12)
    resumed, reference = losses(tmp_path), losses(straight)
    assert sorted(resumed) == list(range(1, 13))  # steps 9.. were logged once, after the resume
    assert [resumed[s] for s in range(9, 13)] == [reference[s] for s in range(9, 13)]


# Pipeline parallelism over 2 stages (one layer each), 2 microbatches per step: the flag alone turns it on.
PIPELINED = ("--config.mesh.stage=2", "--config.mesh.fsdp=1")


def test_pipelined_resume_after_sigkill_is_bitwise_identical(corpus, tmp_path_factory):
    straight_dir, resumed_dir = (
        tmp_path_factory.mktemp("pipe_straight"),
        tmp_path_factory.mktemp("pipe_resumed"),
    )
    run(straight_dir, corpus, *PIPELINED)
    saved = json.loads((straight_dir / "config.json").read_text())
    assert saved["mesh"]["stage"] == 2 and saved["model"]["scan_layers"]
    run(resumed_dir, corpus, *PIPELINED, expect=-signal.SIGKILL, JAXALIGN_FAULT_KILL_AFTER_SAVE="8")
    assert committed_steps(resumed_dir)[-1] == 8
    run(resumed_dir, corpus, *PIPELINED)
    assert params_bytes(resumed_dir, 12) == params_bytes(straight_dir, 12)
    resumed, reference = losses(resumed_dir), losses(straight_dir)
    assert [resumed[s] for s in range(9, 13)] == [reference[s] for s in range(9, 13)]


def test_sigterm_saves_at_the_step_boundary_and_exits_zero(corpus, straight, tmp_path):
    proc = subprocess.Popen(
        command(tmp_path, corpus),
        cwd=ROOT,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    stopped = committed_steps(tmp_path)[-1]
    if stopped == 12:
        pytest.skip("the run finished before SIGTERM arrived")
    assert max(losses(tmp_path)) == stopped  # the checkpoint is at the step it stopped
    run(tmp_path, corpus)
    assert params_bytes(tmp_path, 12) == params_bytes(straight, 12)


def test_sigkill_during_async_save_restores_the_last_committed_step(corpus, straight, tmp_path):
    run(tmp_path, corpus, expect=-signal.SIGKILL, JAXALIGN_FAULT_KILL_DURING_SAVE="8")
    assert committed_steps(tmp_path)[-1] == 4
    proc = run(tmp_path, corpus)
    assert "resumed from step 4" in proc.stdout
    assert params_bytes(tmp_path, 12) == params_bytes(straight, 12)


def test_changed_config_is_refused_naming_the_difference(corpus, straight, tmp_path):
    import shutil

    shutil.copytree(straight, tmp_path, dirs_exist_ok=True)
    proc = run(tmp_path, corpus, "--config.model.d_ff=128", "--config.train.steps=16", expect=2)
    assert "model.d_ff: checkpoint 64, run 128" in proc.stderr
    proc = run(tmp_path, corpus, "--config.train.batch_size=4", "--config.train.steps=16", expect=2)
    assert "train.batch_size: checkpoint 8, run 4" in proc.stderr
    proc = run(tmp_path, corpus, "--config.data.num_workers=1", "--config.train.steps=16", expect=2)
    assert "data.num_workers: checkpoint 0, run 1" in proc.stderr
    # Another tokenizer (here trained on the same text with a smaller vocabulary) is refused before any step.
    other = str(tmp_path / "other.model")
    texts = (json.loads(line)["text"] for line in open(corpus["input"], encoding="utf-8"))
    train_sentencepiece(texts, other, vocab_size=400)
    proc = run(tmp_path, corpus, f"--config.data.tokenizer={other}", "--config.train.steps=16", expect=2)
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("CheckpointError: the checkpoints in ") and "trained with tokenizer" in line, line
    assert f"{corpus['tokenizer']} (sha256 " in line and f"tokenizer is {other} (sha256 " in line, line
    assert committed_steps(tmp_path) == committed_steps(straight)  # nothing written or lost


def test_only_uncommitted_checkpoints_are_reported(corpus, tmp_path):
    run(tmp_path, corpus, expect=-signal.SIGKILL, JAXALIGN_FAULT_KILL_DURING_SAVE="4")
    assert committed_steps(tmp_path) == []
    proc = run(tmp_path, corpus, "--config.train.steps=1")
    assert "holds only uncommitted temporary checkpoints" in proc.stdout


# --- SFT, reward model and DPO -------------------------------------------------------------------------------------

# Each job's :smoke config shrunk further: a tiny model, 12 steps, checkpoints every 4, no evaluation, on the small
# synthetic world of tests/conftest.py (every SFT conversation fits 128 tokens; preference prompts are cut to 32).
STAGE_ARGS = {
    "sft": ("sft_train", ["--config.train.seq_len=128"]),
    "reward": ("preference_train", ["--config.train.seq_len=64", "--config.data.max_prompt_length=32"]),
    "dpo": (
        "preference_train",
        ["--config.train.seq_len=64", "--config.data.max_prompt_length=32", "--config.dpo.reference=live"],
    ),
}


def stage_command(job, workdir, world):
    data, extra = STAGE_ARGS[job]
    return [
        sys.executable,
        "-m",
        "jaxalign.main",
        f"--config=configs/{job}.py:smoke",
        f"--config.workdir={workdir}",
        f"--config.data.input={world[data]}",
        f"--config.data.tokenizer={world['tokenizer']}",
        "--config.model.vocab_size=512",
        "--config.model.d_model=32",
        "--config.model.d_ff=64",
        "--config.model.head_dim=8",
        "--config.train.steps=12",
        "--config.train.log_every=1",
        "--config.train.eval_every=0",
        "--config.train.progress=False",
        "--config.train.peak_flops=1e9",  # skips measuring the matmul peak (MFU is not compared)
        "--config.checkpoint.every_steps=4",
        *extra,
    ]


def run_stage(job, workdir, world, expect=0, **extra_env):
    # The three runs of a job share the session's persistent compilation cache (tests/conftest.py): only the first
    # compiles (the programs are the same, so this changes no result; it keeps each test well under a minute).
    proc = subprocess.run(
        stage_command(job, workdir, world),
        cwd=ROOT,
        env=env(**extra_env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == expect, proc.stderr[-3000:]
    return proc


def logged(workdir):
    """{step: every logged training metric but the timings}."""
    timings = ("tokens_per_s", "mfu", "step_s")
    records = map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: {k: v for k, v in r.items() if k not in timings} for r in records if "loss" in r}


@pytest.fixture(scope="module")
def straight_stage(small_world, tmp_path_factory):
    """One uninterrupted run per job, shared by the tests of this module."""
    runs = {}

    def get(job):
        if job not in runs:
            runs[job] = tmp_path_factory.mktemp(f"straight_{job}")
            run_stage(job, runs[job], small_world)
        return runs[job]

    return get


@pytest.mark.parametrize("job", ["sft", "reward", "dpo"])
def test_stage_resume_after_sigkill_is_bitwise_identical(job, small_world, straight_stage, tmp_path):
    straight = straight_stage(job)
    run_stage(job, tmp_path, small_world, expect=-signal.SIGKILL, JAXALIGN_FAULT_KILL_AFTER_SAVE="8")
    directory = tmp_path / "checkpoints" / job
    assert max(int(d.name) for d in directory.iterdir() if d.name.isdigit()) == 8
    proc = run_stage(job, tmp_path, small_world)
    assert "resumed from step 8" in proc.stdout
    assert params_bytes(tmp_path, 12, job) == params_bytes(straight, 12, job)
    resumed, reference = logged(tmp_path), logged(straight)
    assert sorted(resumed) == list(range(1, 13))  # steps 9.. were logged once, after the resume
    assert resumed == reference  # the loss and every other training metric (TRL's names), exactly
    assert len({reference[s]["loss"] for s in range(8, 13)}) == 5  # the losses move: equal is not constant
