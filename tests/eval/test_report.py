"""W/report.md from a hand-made workdir: the eval.json numbers in the right rows and columns, valid PNG plots that
draw the logged curves, missing stages skipped, and the same bytes on a re-run."""

import json
import shutil

import numpy as np
import pytest
from matplotlib import image as mpl_image

from jaxalign.eval import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# matplotlib's first two default line colours: the first and second RL stage in the RL plot (ppo, then grpo).
C0, C1 = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)

EVAL = {
    "curate": {
        "dup_precision": 0.9166666666666666,
        "dup_recall": 0.6363636363636364,
        "planted_duplicates": 11,
    },
    "base": {
        "qa_exact_match": 0.015625,
        "arith_accuracy": 0.03125,
        "mean_length": 27.546875,
        "perplexity": 41.2,
    },
    "sft": {
        "qa_exact_match": 0.40625,
        "arith_accuracy": 0.21875,
        "mean_rm_score": 0.123456789,
        "mean_length": 9.5,
    },
    "reward": {"pair_accuracy": 0.859375},
    "dpo": {
        "qa_exact_match": 0.4375,
        "arith_accuracy": 0.234375,
        "win_rate_vs_sft": 0.5703125,
        "mean_rm_score": 0.3141592653589793,
        "kl_to_ref": 0.000123456,
        "kl_estimator": "k3",
        "mean_length": 8.25,
    },
    "ppo": {
        "qa_exact_match": 0.40625,
        "win_rate_vs_sft": 0.53125,
        "mean_rm_score": 1.7320508,
        "kl_to_ref": 2.5,
    },
    "grpo": {
        "qa_exact_match": 0.390625,
        "arith_accuracy": 0.453125,
        "win_rate_vs_sft": 0.5,
        "kl_to_ref": 0.0625,
    },
}


def _write_jsonl(path, records, torn=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + torn)


def _workdir(tmp_path, with_ppo=True):
    """A finished pipeline's files: eval.json; W/metrics.jsonl (every stage's lines, as train.loop writes them, and a
    line torn by a kill); PPO's lines in W/ppo/metrics.jsonl without a "stage" key (the directory names it)."""
    w = tmp_path / "W"
    w.mkdir(parents=True)
    (w / "eval.json").write_text(
        json.dumps(EVAL if with_ppo else {k: v for k, v in EVAL.items() if k != "ppo"})
    )
    lines = []
    for stage, start in (("pretrain", 7.0), ("sft", 4.0), ("reward", 0.7), ("dpo", 0.69)):
        for step in (1, 5, 10):
            lines.append({"stage": stage, "step": step, "loss": start / step, "lr": 1e-3})
        lines.append({"stage": stage, "step": 10, "eval/loss": start / 9})
    lines += [
        {"stage": "reward", "step": s, "eval/accuracy": a} for s, a in ((0, 0.5), (5, 0.75), (10, 0.875))
    ]
    lines += [{"stage": "reward", "step": 10, "accuracy": 0.9, "flag": True}]
    for step in (1, 2, 3, 4):
        lines.append(
            {
                "stage": "grpo",
                "step": step,
                "loss": 0.1,
                "reward": 0.2 * step,
                "kl": 0.01 * step,
                "completions/mean_length": 20.0 - step,
            }
        )
    _write_jsonl(w / "metrics.jsonl", lines, torn='{"stage": "grpo", "step": 5, "rew')
    if with_ppo:
        ppo = [
            {
                "step": s,
                "loss": 0.3,
                "objective/scores": 0.1 * s,
                "objective/kl": 0.02 * s,
                "completions/mean_length": 12.0 + s,
            }
            for s in (1, 2, 3)
        ]
        _write_jsonl(w / "ppo" / "metrics.jsonl", ppo)
    return w


def _table_after(text, heading):
    """The first Markdown table under `## heading`, as a list of dicts keyed by its header."""
    lines = text.split(f"## {heading}\n", 1)[1].splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[first:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    header, body = rows[0], rows[2:]
    return [dict(zip(header, r, strict=True)) for r in body]


NAMES = ("report.md", report.LOSS_PNG, report.RL_PNG, report.RM_PNG)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The hand-made workdir with its report written once: (workdir, returned summary, {file name: bytes})."""
    w = _workdir(tmp_path_factory.mktemp("written"))
    summary = report.write_report(w)
    return w, summary, {n: (w / n).read_bytes() for n in NAMES}


def test_report_puts_eval_json_numbers_in_their_rows_and_columns(written):
    w, summary, _ = written
    text = (w / "report.md").read_text()
    assert summary in text

    rows = _table_after(text, "Summary")
    assert [r["stage"] for r in rows] == ["base", "sft", "dpo", "ppo", "grpo"]
    for row in rows:
        for column in report.SUMMARY_COLUMNS:
            value = EVAL[row["stage"]].get(column)
            assert row[column] == ("" if value is None else format(value, ".4g")), (row["stage"], column)
    # Spot-check the rounding by hand: 4 significant digits.
    assert rows[1]["mean_rm_score"] == "0.1235" and rows[2]["kl_to_ref"] == "0.0001235"
    assert rows[0]["mean_length"] == "27.55" and rows[3]["mean_rm_score"] == "1.732"

    for stage, metrics in EVAL.items():
        table = {r["metric"]: r["value"] for r in _table_after(text, stage)}
        expected = {
            k: v if isinstance(v, str) else str(v) if isinstance(v, int) else format(v, ".4g")
            for k, v in metrics.items()
        }
        assert table == expected, stage
    assert "reward model pairwise accuracy (held-out): 0.8594" in text
    assert "precision 0.9167, recall 0.6364" in text

    training = {r["stage"]: r for r in _table_after(text, "Training (last logged values)")}
    assert list(training) == ["pretrain", "sft", "reward", "dpo", "ppo", "grpo"]
    assert training["pretrain"] == {
        "stage": "pretrain",
        "last step": "10",
        "loss": "0.7",
        "eval/loss": "0.7778",
    }
    assert training["grpo"]["last step"] == "4"  # the torn step-5 line is skipped


def test_curves_read_both_layouts_and_skip_torn_lines(tmp_path):
    curves = report.read_curves(_workdir(tmp_path))
    assert curves["ppo"]["objective/scores"] == {1: 0.1, 2: 0.2, 3: pytest.approx(0.3)}
    assert curves["grpo"]["reward"] == {1: 0.2, 2: 0.4, 3: pytest.approx(0.6), 4: 0.8}
    assert curves["reward"]["eval/accuracy"] == {0: 0.5, 5: 0.75, 10: 0.875}
    assert "flag" not in curves["reward"]  # booleans are not curves
    assert report.rl_stages(curves) == ["ppo", "grpo"]


def _pixels(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    image = mpl_image.imread(path)  # decodes the whole file: a truncated PNG raises
    assert image.ndim == 3 and image.shape[2] in (3, 4) and min(image.shape[:2]) >= 200
    return np.round(image[..., :3] * 255).astype(int).reshape(-1, 3)


def _has_colour(pixels, rgb):
    return bool(np.any(np.all(np.abs(pixels - np.array(rgb)) <= 2, axis=1)))


def test_plots_are_valid_pngs_referenced_relatively_and_draw_every_rl_stage(written, tmp_path):
    w, _, _ = written
    text = (w / "report.md").read_text()
    for name in (report.LOSS_PNG, report.RL_PNG, report.RM_PNG):
        assert f"]({name})" in text
        _pixels(w / name)
    rl = _pixels(w / report.RL_PNG)
    assert _has_colour(rl, C0) and _has_colour(rl, C1)  # ppo and grpo both drawn

    only_grpo = _workdir(tmp_path, with_ppo=False)
    report.write_report(only_grpo)
    rl = _pixels(only_grpo / report.RL_PNG)
    assert _has_colour(rl, C0) and not _has_colour(rl, C1)


def test_missing_stages_and_files_are_skipped(tmp_path):
    w = tmp_path / "W"
    w.mkdir()
    (w / "eval.json").write_text(json.dumps({"sft": EVAL["sft"], "reward": EVAL["reward"]}))
    summary = report.write_report(w)
    text = (w / "report.md").read_text()
    assert [r["stage"] for r in _table_after(text, "Summary")] == ["sft"]
    for absent in ("## base", "## dpo", "## grpo", "## curate", "curation", ".png", "## Training"):
        assert absent not in text
    assert not list(w.glob("*.png"))
    assert summary.splitlines()[2].startswith("| sft ")

    empty = tmp_path / "empty"
    assert report.write_report(empty) == ""
    assert "Nothing to report" in (empty / "report.md").read_text()

    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / "eval.json").write_text('{"sft": {"qa_exact')  # killed mid-write: the tables are left out
    _write_jsonl(torn / "metrics.jsonl", [{"stage": "sft", "step": 1, "loss": 2.0}])
    assert report.write_report(torn) == ""
    assert (torn / report.LOSS_PNG).exists() and "## Summary" not in (torn / "report.md").read_text()


def test_report_is_the_same_bytes_on_a_rerun_and_in_another_directory(written, tmp_path):
    w, first_summary, first = written
    moved = shutil.copytree(w, tmp_path / "elsewhere" / "W2")
    for n in NAMES:
        (moved / n).unlink()
    assert report.write_report(moved) == first_summary
    assert {n: (moved / n).read_bytes() for n in NAMES} == first
    assert report.write_report(moved) == first_summary  # a re-run over its own output
    assert {n: (moved / n).read_bytes() for n in NAMES} == first
