"""The eval job through the real command line (configs/eval.py:smoke): eval.json, the printed table, user MC JSONL,
and one-line config errors."""

import json

from tests.test_main import run_main


def test_eval_smoke_writes_eval_json_and_prints_the_table(tmp_path):
    mc_file = tmp_path / "mc.jsonl"
    records = [
        {"question": "Where was Ada Abbott born?", "choices": ["Lisbon", "Oslo"], "answer": "Lisbon"},
        {"question": "What is 3 + 4?", "choices": ["6", "7", "8"], "answer": 1},
    ]
    mc_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    workdir = tmp_path / "run"
    (workdir).mkdir()
    (workdir / "eval.json").write_text(json.dumps({"sft": {"qa_exact_match": 0.25}}))  # kept, not overwritten
    proc = run_main(
        "--config=configs/eval.py:smoke",
        f"--config.workdir={workdir}",
        f"--config.eval.mc_input={mc_file}",
        "--config.eval.name=base",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((workdir / "eval.json").read_text())
    assert results["sft"] == {"qa_exact_match": 0.25}
    base = results["base"]
    assert set(base) == {
        "qa_exact_match",
        "arith_accuracy",
        "mean_length",
        "perplexity",
        "mc_acc",
        "mc_acc_norm",
        "mc_count",
    }
    # Random weights (std 0.02) give a near-uniform next-token distribution: perplexity ~ the vocabulary size.
    assert 0.9 * 1024 < base["perplexity"] < 1.1 * 1024, base["perplexity"]
    assert 1 <= base["mean_length"] <= 8 and base["mc_count"] == 2
    assert all(0.0 <= base[k] <= 1.0 for k in ("qa_exact_match", "arith_accuracy", "mc_acc", "mc_acc_norm"))
    table = proc.stdout.splitlines()
    assert table[0].split() == ["metric", "base"]
    assert table[2].split()[0] == "qa_exact_match" and "perplexity" in proc.stdout


def test_eval_bad_config_exits_with_one_line(tmp_path):
    proc = run_main(
        "--config=configs/eval.py:smoke", f"--config.workdir={tmp_path}", "--config.eval.kl_estimator=k9"
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "ConfigError: eval.kl_estimator='k9' is not one of ['k1', 'k3']"
    ]
    proc = run_main(
        "--config=configs/eval.py:smoke", f"--config.workdir={tmp_path}", "--config.eval.baseline=sft"
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "ConfigError: eval.baseline='sft' must be '', 'ckpt:/path' or 'hf:/path'"
    ]
