"""The end-to-end job through the real command line: stages chain through their checkpoints in one workdir,
curation is scored against the world's planted duplicates, and a re-run skips finished stages."""

import json
import os
import signal
import subprocess
import sys

from tests.test_main import ROOT


def _records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _quickstart(workdir, expect=0, **extra_env):
    """`configs/quickstart.py:smoke` through the real command line, on one device. All runs share the session's
    persistent compilation cache (tests/conftest.py): the programs are the same, so only the first run compiles."""
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
        JAX_PLATFORMS="cpu",
        **extra_env,
    )
    command = [
        sys.executable,
        "-m",
        "jaxalign.main",
        "--config=configs/quickstart.py:smoke",
        f"--config.workdir={workdir}",
        "--config.train.progress=False",
    ]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == expect, proc.stderr[-3000:]
    return proc


def test_quickstart_smoke_runs_every_stage_and_a_sigkilled_rerun_ends_with_the_same_eval(tmp_path):
    """The whole main job on its :smoke config: every stage chains through its checkpoints in one workdir;
    SIGKILL in the middle of SFT (right after its step-10 checkpoint) and a re-run of the same command finish with
    exactly the uninterrupted run's eval.json; a re-run of a finished workdir skips every stage."""
    straight = tmp_path / "straight"
    _quickstart(straight)
    scores = json.loads((straight / "eval.json").read_text())
    assert {"curate", "base", "sft", "reward", "dpo", "ppo", "grpo"} <= set(scores), sorted(scores)
    assert scores["curate"]["planted_duplicates"] > 0
    assert scores["curate"]["dup_precision"] == 1.0 and scores["curate"]["dup_recall"] >= 0.6, scores[
        "curate"
    ]
    for stage in ("sft", "dpo", "ppo", "grpo"):
        assert {"qa_exact_match", "arith_accuracy", "mean_rm_score", "mean_length"} <= set(scores[stage])
        assert stage == "sft" or "win_rate_vs_sft" in scores[stage]
    assert "pair_accuracy" in scores["reward"]
    assert (straight / "report.md").exists()

    records = _records(straight)
    pretrain_eval = [r for r in records if r["stage"] == "pretrain" and "eval/loss" in r]
    sft_start = [r for r in records if r["stage"] == "sft" and r["step"] == 0][0]
    # SFT starts from the pretrained weights: its held-out pretraining loss before its first step is the
    # pretraining stage's last evaluation (same data, same weights).
    assert (
        abs(sft_start["eval/pretrain_loss"] - pretrain_eval[-1]["eval/loss"])
        < 1e-5 * pretrain_eval[-1]["eval/loss"]
    )

    killed = tmp_path / "killed"
    _quickstart(killed, expect=-signal.SIGKILL, JAXALIGN_FAULT_KILL_AFTER_SAVE="sft:10")
    assert (killed / "pipeline" / "pretrain.done").exists() and not (
        killed / "pipeline" / "sft.done"
    ).exists()
    proc = _quickstart(killed)
    assert proc.stdout.count("finished before; skipped") == 2  # curate and pretrain
    assert json.loads((killed / "eval.json").read_text()) == scores

    before = (straight / "metrics.jsonl").read_text()
    proc = _quickstart(straight)
    assert proc.stdout.count("finished before; skipped") == 8
    assert (straight / "metrics.jsonl").read_text() == before


def test_unknown_or_misordered_stages_are_one_line_errors(tmp_path):
    for stages, expected in (
        ("sft,pretrain", "must list each stage once, in the order"),
        ("sft,rlhf", "unknown"),
    ):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "jaxalign.main",
                "--config=configs/quickstart.py:smoke",
                f"--config.workdir={tmp_path}",
                f"--config.pipeline.stages={stages}",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert expected in proc.stderr
