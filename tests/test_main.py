"""The real command line: the pretraining smoke job end to end, and one-line errors for bad configs."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args: str, devices: int = 4, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "jaxalign.main", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_pretrain_smoke_learns_and_records_its_config(tmp_path):
    workdir = tmp_path / "run"
    proc = run_main(
        "--config=configs/pretrain.py:smoke", f"--config.workdir={workdir}", "--config.train.progress=False"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert train[0]["step"] == 1 and train[-1]["step"] == 60
    assert train[-1]["loss"] < 0.6 * train[0]["loss"], (train[0]["loss"], train[-1]["loss"])
    assert all(r["stage"] == "pretrain" and r["skipped"] == 0 for r in train)
    assert {"tokens_per_s", "mfu", "grad_norm", "lr"} <= set(train[-1])
    evals = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in evals] == [30, 60] and evals[1]["eval/loss"] < evals[0]["eval/loss"]

    config = json.loads((workdir / "config.json").read_text())
    assert config["workdir"] == str(workdir)
    assert config["train"]["steps"] == 60 and config["model"]["d_model"] == 64  # the :smoke values, resolved
    assert config["mesh"]["fsdp"] == -1 and config["optim"]["lr"] == 3e-3
    assert (workdir / "checkpoints" / "pretrain" / "60").is_dir()
    assert list((workdir / "tb" / "pretrain").iterdir())


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--config.train.bogus=3"], "unknown config key in --config.train.bogus=3"),
        (
            ["--config.mesh.data=3"],
            "mesh sizes {'data': 3, 'fsdp': -1, 'tensor': 1, 'stage': 1} cannot fill 4 devices",
        ),
        (
            ["--config.mesh.data=4", "--config.mesh.fsdp=1", "--config.train.batch_size=6"],
            "train.batch_size=6 (microbatch 6 with train.grad_accum=1) is not divisible by the data-parallel size 4",
        ),
        (
            ["--config.train.seq_len=4096"],
            "train.seq_len=4096 exceeds the model's maximum model.max_seq_len=2048",
        ),
        (
            ["--config.model.remat=sometimes"],
            "model.remat='sometimes' is not one of ['none', 'full', 'dots']",
        ),
        (["--config.mesh.stage=4"], "model.n_layers=2 is not divisible by mesh.stage=4 x pipeline.repeats=1"),
        (
            ["--config.mesh.stage=2", "--config.pipeline.schedule=1f1b", "--config.pipeline.microbatches=1"],
            "pipeline.microbatches=1 must be >= mesh.stage=2 for schedule='1f1b'",
        ),
        (
            ["--config.pipeline.repeats=2"],
            "pipeline.repeats=2 needs pipeline.schedule='circular', got 'gpipe'",
        ),
        (["--config.checkpoint.every_steps=0"], "checkpoint.every_steps=0 must be > 0"),
        (["--config.data.shards=-1"], "data.shards=-1 must be >= 0 (0: one per process)"),
    ],
)
def test_bad_config_exits_with_one_line(tmp_path, args, expected):
    proc = run_main("--config=configs/pretrain.py:smoke", f"--config.workdir={tmp_path}", *args, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("ConfigError: ") and expected in lines[0], lines[0]
    assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_big_model_config_without_a_corpus_exits_with_one_line(tmp_path):
    """configs/llama3_8b.py:pod never falls back to the synthetic world: data.input has no default."""
    proc = run_main("--config=configs/llama3_8b.py:pod", f"--config.workdir={tmp_path}", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "ConfigError: data.input is required by this config and has no value: pass --config.data.input=..."
    ]
    assert not os.listdir(tmp_path)
