"""The end-to-end job through the real command line: stages chain through their checkpoints in one workdir,
curation is scored against the world's planted duplicates, and a re-run skips finished stages."""

import json
import subprocess
import sys

from tests.test_main import ROOT, run_main


def _records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_quickstart_stages_chain_and_rerun_skips(tmp_path):
    workdir = tmp_path / "qs"
    args = [
        "--config=configs/quickstart.py:smoke",
        f"--config.workdir={workdir}",
        "--config.train.progress=False",
        "--config.pipeline.stages=curate,pretrain,sft",
        "--config.pipeline.pretrain.steps=12",
        "--config.pipeline.pretrain.eval_every=12",
        "--config.pipeline.sft.steps=4",
        "--config.pipeline.sft.eval_every=4",
    ]
    proc = run_main(*args, devices=1)
    assert proc.returncode == 0, proc.stderr[-3000:]

    scores = json.loads((workdir / "eval.json").read_text())["curate"]
    assert scores["planted_duplicates"] > 0
    assert scores["dup_precision"] == 1.0 and scores["dup_recall"] >= 0.6, scores

    records = _records(workdir)
    pretrain_eval = [r for r in records if r["stage"] == "pretrain" and "eval/loss" in r]
    sft_start = [r for r in records if r["stage"] == "sft" and r["step"] == 0][0]
    # The SFT stage starts from the pretrained weights: its held-out pretraining loss before its first step is the
    # pretraining stage's last evaluation (same data, same weights).
    assert (
        abs(sft_start["eval/pretrain_loss"] - pretrain_eval[-1]["eval/loss"])
        < 1e-5 * pretrain_eval[-1]["eval/loss"]
    )
    assert (workdir / "pipeline" / "sft.done").exists()

    before = (workdir / "metrics.jsonl").read_text()
    proc = run_main(*args, devices=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("finished before; skipped") == 3
    assert (workdir / "metrics.jsonl").read_text() == before


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
