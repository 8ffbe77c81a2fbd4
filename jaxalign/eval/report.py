"""W/report.md: the evaluation and training curves of a pipeline workdir, as tables and PNG plots.

    summary = write_report(workdir)        writes W/report.md (+ W/*.png), returns the summary table as text
    python -m jaxalign.eval.report W       the same from the command line (prints the summary table)

Inputs, each optional (what is missing is left out of the report, never an error):
  W/eval.json                 {"curate": {...}, "base": {...}, "sft": {...}, "reward": {"pair_accuracy"}, ...}
                              (`jaxalign.eval.evaluate.write_results`); every key gets a table, whatever its name
  W/metrics.jsonl, W/*/metrics.jsonl
                              one JSON object a logged step, `{"stage", "step", <metric>: value}` (`train.loop`);
                              a record without "stage" belongs to its directory's name; a torn line is skipped

Outputs:
  report.md                   summary table (one row per policy stage in eval.json), one table per eval.json key,
                              the last logged training values per stage, and the plots below (relative paths)
  loss.png                    training loss (and held-out `eval/loss`) against step, one panel per stage
  rl.png                      reward, KL and completion length against step for every RL stage (any stage that
                              logs a reward: GRPO's `reward`/`kl`, PPO's `objective/scores`/`objective/kl`)
  rm_accuracy.png             the reward model's held-out pairwise accuracy (`eval/accuracy`) against step

The report has no timestamps or paths in it: the same workdir gives the same bytes (report.md and the PNGs).
Numbers are printed with 4 significant digits (`format(v, ".4g")`), integers as integers.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from etils import epath

from jaxalign import storage
from jaxalign.train import metrics

# The summary table: its rows (policy stages of eval.json, in pipeline order; others follow sorted) and columns.
POLICY_STAGES = ("base", "sft", "dpo", "kto", "ppo", "grpo")
NON_POLICY = ("curate", "reward")
SUMMARY_COLUMNS = (
    "qa_exact_match",
    "arith_accuracy",
    "win_rate_vs_sft",
    "mean_rm_score",
    "kl_to_ref",
    "mean_length",
)
# The order of the per-stage sections; eval.json keys not listed follow, sorted.
SECTION_ORDER = ("curate", "base", "sft", "reward", "dpo", "kto", "ppo", "grpo")
# What each RL panel plots: the first of these metric names a stage logs (GRPO's names, then TRL PPO's).
RL_PANELS = (
    ("reward", ("reward", "objective/scores")),
    ("KL", ("kl", "objective/kl")),
    ("completion length (tokens)", ("completions/mean_length",)),
)
RM_ACCURACY = "eval/accuracy"
# Training stages in pipeline order (metrics.jsonl's "stage"); others follow, sorted.
STAGE_ORDER = ("pretrain", "sft", "reward", "dpo", "kto", "ppo", "grpo")
LOSS_PNG, RL_PNG, RM_PNG = "loss.png", "rl.png", "rm_accuracy.png"

# {stage: {metric: {step: value}}}: the last logged value of every (stage, metric, step).
Curves = dict[str, dict[str, dict[int, float]]]


def fmt(value: Any) -> str:
    """A table cell: integers as integers, other numbers to 4 significant digits, strings as they are."""
    if value is None:
        return ""
    return format(value, ".4g") if isinstance(value, float) else str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown pipe table, columns padded so it also reads as plain text."""
    cells = [list(header), *map(list, rows)]
    widths = [max(3, *(len(r[i]) for r in cells)) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def _ordered(keys: Sequence[str], order: Sequence[str]) -> list[str]:
    return [k for k in order if k in keys] + sorted(set(keys) - set(order))


# --- inputs --------------------------------------------------------------------------------------------------------


def read_eval(workdir: epath.Path) -> dict[str, dict[str, Any]]:
    """W/eval.json's stage -> metrics; {} when it is missing or not a JSON object of objects."""
    path = workdir / "eval.json"
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        print(f"report: {path} is not valid JSON; evaluation tables left out", file=sys.stderr)
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict)}


def read_curves(workdir: epath.Path) -> Curves:
    """Every numeric metric of W and W/* (metrics.jsonl, or metrics/ parts on an object store: `train.metrics`), as
    {stage: {metric: {step: value}}}."""
    curves: Curves = {}
    subdirs = {
        p.parent for p in [*workdir.glob("*/metrics.jsonl"), *workdir.glob(f"*/{metrics.PARTS}/*.jsonl")]
    }
    subdirs = {p.parent if p.name == metrics.PARTS else p for p in subdirs}
    for directory in [workdir, *sorted(subdirs)]:
        default_stage = directory.name if directory != workdir else "train"
        for record in metrics.read(os.fspath(directory)):
            if not isinstance(record.get("step"), int | float):
                continue
            stage = str(record.get("stage", default_stage))
            step = int(record["step"])
            for key, value in record.items():
                if key in ("stage", "step") or isinstance(value, bool) or not isinstance(value, int | float):
                    continue
                curves.setdefault(stage, {}).setdefault(key, {})[step] = float(value)
    return curves


# --- tables --------------------------------------------------------------------------------------------------------


def policy_stages(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The eval.json keys that are policies: the known ones in pipeline order, then any other key (not curate or
    reward) that has a summary column."""
    others = [
        k
        for k in results
        if k not in POLICY_STAGES + NON_POLICY and any(c in results[k] for c in SUMMARY_COLUMNS)
    ]
    return [k for k in POLICY_STAGES if k in results] + sorted(others)


def summary_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per policy stage, one column per `SUMMARY_COLUMNS` metric (blank where it does not apply)."""
    rows = [
        [stage, *(fmt(results[stage].get(c)) for c in SUMMARY_COLUMNS)] for stage in policy_stages(results)
    ]
    return markdown_table(["stage", *SUMMARY_COLUMNS], rows)


def stage_table(metrics: Mapping[str, Any]) -> str:
    """One eval.json entry as a two-column table, metrics in `evaluate.ORDER`, the rest sorted."""
    from jaxalign.eval.evaluate import ORDER

    head = ("dup_precision", "dup_recall", "pair_accuracy", *ORDER)
    return markdown_table(["metric", "value"], [[k, fmt(metrics[k])] for k in _ordered(list(metrics), head)])


def training_table(curves: Curves) -> str:
    """Per stage: the last logged step, its training loss and its last held-out loss."""
    last = lambda curve: curve[max(curve)] if curve else None
    rows = []
    for stage in _ordered(list(curves), STAGE_ORDER):
        metrics = curves[stage]
        steps = [s for m in metrics.values() for s in m]
        rows.append(
            [stage, fmt(max(steps)), fmt(last(metrics.get("loss"))), fmt(last(metrics.get("eval/loss")))]
        )
    return markdown_table(["stage", "last step", "loss", "eval/loss"], rows)


# --- plots ---------------------------------------------------------------------------------------------------------


def _save(fig: Any, path: epath.Path) -> None:
    """PNG bytes through Agg (no pyplot state, no display), written with epath so gs:// works."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buffer, metadata={"Software": None})
    path.write_bytes(buffer.getvalue())


def _line(ax: Any, curve: Mapping[int, float], label: str, **kwargs: Any) -> None:
    steps = sorted(curve)
    ax.plot(steps, [curve[s] for s in steps], label=label, marker="." if len(steps) < 30 else None, **kwargs)


def plot_loss(curves: Curves, path: epath.Path) -> bool:
    """One panel per stage that logs `loss`: training loss and held-out `eval/loss` against step."""
    from matplotlib.figure import Figure

    stages = [s for s in _ordered(list(curves), STAGE_ORDER) if "loss" in curves[s]]
    if not stages:
        return False
    cols = min(3, len(stages))
    rows = math.ceil(len(stages) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, stage in zip(axes, stages, strict=False):
        _line(ax, curves[stage]["loss"], "train")
        if curves[stage].get("eval/loss"):
            _line(ax, curves[stage]["eval/loss"], "held-out", linestyle="--")
        ax.set(title=stage, xlabel="step", ylabel="loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(stages) :]:
        ax.set_axis_off()
    _save(fig, path)
    return True


def rl_stages(curves: Curves) -> list[str]:
    """Stages that log a reward per step (the first RL panel's metric names)."""
    rewards = RL_PANELS[0][1]
    return [s for s in _ordered(list(curves), STAGE_ORDER) if any(curves[s].get(m) for m in rewards)]


def plot_rl(curves: Curves, path: epath.Path) -> bool:
    """Reward, KL and completion length against step, one line per RL stage."""
    from matplotlib.figure import Figure

    stages = rl_stages(curves)
    if not stages:
        return False
    fig = Figure(figsize=(12.6, 3.2), layout="constrained")
    for ax, (title, names) in zip(fig.subplots(1, len(RL_PANELS)), RL_PANELS, strict=True):
        for stage in stages:
            name = next((m for m in names if curves[stage].get(m)), None)
            if name is not None:
                _line(ax, curves[stage][name], f"{stage} ({name})")
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
        else:  # e.g. no KL term (beta = 0) logs no KL
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    _save(fig, path)
    return True


def plot_rm_accuracy(curves: Curves, path: epath.Path) -> bool:
    """The reward model's held-out pairwise accuracy (and its training-batch accuracy) against step."""
    from matplotlib.figure import Figure

    metrics = curves.get("reward", {})
    if not metrics.get(RM_ACCURACY):
        return False
    fig = Figure(figsize=(4.8, 3.2), layout="constrained")
    ax = fig.subplots()
    _line(ax, metrics[RM_ACCURACY], "held-out")
    if metrics.get("accuracy"):
        _line(ax, metrics["accuracy"], "training batch", linestyle="--", alpha=0.6)
    ax.set(title="reward model pairwise accuracy", xlabel="step", ylabel="accuracy", ylim=(0.0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    _save(fig, path)
    return True


# --- the report ----------------------------------------------------------------------------------------------------


def write_report(workdir: str | epath.Path) -> str:
    """Writes workdir/report.md and its PNG plots from workdir/eval.json and the metrics.jsonl files (module doc);
    returns the summary table (Markdown, also readable as plain text; "" when eval.json has no policy stage)."""
    workdir = storage.path(workdir)
    results = read_eval(workdir)
    curves = read_curves(workdir)
    summary = summary_table(results) if policy_stages(results) else ""

    parts = ["# jaxalign report", ""]
    if summary:
        parts += [
            "## Summary",
            "",
            "Policies on the world's held-out splits (win rate and KL against SFT).",
            "",
        ]
        parts += [summary, ""]
    notes = []
    if "pair_accuracy" in results.get("reward", {}):
        notes.append(
            f"- reward model pairwise accuracy (held-out): {fmt(results['reward']['pair_accuracy'])}"
        )
    curate = results.get("curate", {})
    if "dup_precision" in curate or "dup_recall" in curate:
        notes.append(
            f"- curation against the planted duplicates: precision {fmt(curate.get('dup_precision'))}, "
            f"recall {fmt(curate.get('dup_recall'))}"
        )
    if notes:
        parts += [*notes, ""]

    plots = [
        (plot_loss, LOSS_PNG, "Training loss", "training loss per stage"),
        (
            plot_rl,
            RL_PNG,
            "RL: reward, KL and completion length per step",
            "reward, KL and length per RL step",
        ),
        (plot_rm_accuracy, RM_PNG, "Reward model accuracy", "reward model held-out accuracy"),
    ]
    for plot, name, title, alt in plots:
        if plot(curves, workdir / name):
            parts += [f"## {title}", "", f"![{alt}]({name})", ""]

    if curves:
        parts += ["## Training (last logged values)", "", training_table(curves), ""]
    for stage in _ordered(list(results), SECTION_ORDER):
        if results[stage]:
            parts += [f"## {stage}", "", stage_table(results[stage]), ""]
    if not results and not curves:
        parts += ["Nothing to report: no eval.json and no metrics.jsonl in this workdir.", ""]

    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "report.md").write_text("\n".join(parts))
    return summary


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m jaxalign.eval.report WORKDIR")
    print(write_report(sys.argv[1]))
