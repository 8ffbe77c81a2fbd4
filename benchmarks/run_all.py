"""Every benchmark of the reference workload in one table: training, generation, GRPO and curation.

    python benchmarks/run_all.py [--quick] [--only pretrain,sft,reward,dpo,generate,grpo,curate]

Runs, one after the other (each in its own process, so peak RSS is per benchmark):
  train_throughput.py --stage pretrain|sft|reward|dpo     tokens/s, MFU, step device memory, peak RSS, s/step
  generate_bench.py                                       decode tokens/s, s per decode step
  grpo_bench.py                                           s per GRPO step (generation + update)
  curate_bench.py                                         curation docs/s (wall, 1 and 2 workers), dedup recall
and reads the last line each prints (one JSON object). MFU is against the float32 matmul peak each training
benchmark measures in its own process, in this run; the table shows it per row, since on a shared machine it moves
with the load. `--quick` runs fewer timed steps and a smaller curation corpus (7.5 minutes on the shared 2-core
CPU at load ~6, mostly compiles); figures are noisier, the workload per step is the same. The last line printed is one JSON object:
{"quick", "rows": {name: {figure: value}}, "raw": {name: that benchmark's JSON}, "failed": [names],
"load_avg_1m": [before, after]}.
Exits non-zero when a benchmark fails (the others still run and are shown).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TRAIN_STAGES = ("pretrain", "sft", "reward", "dpo")
NAMES = (*TRAIN_STAGES, "generate", "grpo", "curate")


def commands(quick: bool, scratch: str) -> dict[str, list[str]]:
    """The benchmark command lines, by row name (`--quick`: fewer timed steps, a smaller curation corpus)."""
    train = ["--steps", "3"] if quick else []
    out = {s: ["train_throughput.py", "--stage", s, *train] for s in TRAIN_STAGES}
    out["generate"] = ["generate_bench.py", *(["--repeats", "2"] if quick else [])]
    out["grpo"] = ["grpo_bench.py", *(["--steps", "2"] if quick else [])]
    corpus = ["--base_docs", "600", "--planted", "180"] if quick else []
    out["curate"] = ["curate_bench.py", *corpus, "--workdir", os.path.join(scratch, "curate")]
    return out


def run(
    args: list[str], python: str = sys.executable, jaxalign_path: bool = True
) -> tuple[dict[str, Any] | None, str]:
    """Runs benchmarks/<args[0]> with `python` (this checkout first on the path when `jaxalign_path`, no
    PYTHONPATH otherwise); returns its last line's JSON object (None if it failed or printed none) and its output."""
    env = dict(os.environ)
    paths = env.pop("PYTHONPATH", None)
    if jaxalign_path:
        env["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [paths])])
    proc = subprocess.run(
        [python, os.path.join(HERE, args[0]), *args[1:]],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    output = proc.stdout + (
        f"\n[stderr, exit code {proc.returncode}]\n{proc.stderr[-3000:]}" if proc.returncode else ""
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        return None, output
    try:
        result = json.loads(lines[-1])
    except json.JSONDecodeError:
        return None, output
    return (result if isinstance(result, dict) else None), output


def row(name: str, raw: dict[str, Any]) -> dict[str, float]:
    """The table's figures of one benchmark's JSON (keys of `COLUMNS`; what does not apply is left out)."""
    if name in TRAIN_STAGES:
        keys = {
            "tokens_per_s": "tokens_per_s",
            "mfu": "mfu",
            "step_memory_mb": "step_memory_mb",
            "peak_rss_mb": "peak_rss_mb",
            "s_per_step": "step_s",
            "matmul_gflops": "matmul_gflops",
        }
        return {k: raw[v] for k, v in keys.items() if v in raw}
    if name == "generate":
        return {"tokens_per_s": raw["decode_tokens_per_s"], "s_per_step": raw["decode_step_ms"] / 1e3}
    if name == "grpo":
        return {"s_per_step": raw["s_per_step"], "generation_fraction": raw["generation_fraction"]}
    if name == "curate":
        out = {"docs_per_s": raw.get("docs_per_s_wall_1w"), "docs_per_s_2w": raw.get("docs_per_s_wall_2w")}
        out["dedup_recall"] = raw.get("recall_j08")
        return {k: v for k, v in out.items() if v is not None}
    raise ValueError(name)


# (key, header, format): the table's columns.
COLUMNS = (
    ("tokens_per_s", "tokens/s", "{:,.0f}"),
    ("mfu", "MFU", "{:.3f}"),
    ("step_memory_mb", "step mem MB", "{:,.0f}"),
    ("peak_rss_mb", "peak RSS MB", "{:,.0f}"),
    ("s_per_step", "s/step", "{:.4f}"),
    ("docs_per_s", "docs/s 1w", "{:,.0f}"),
    ("docs_per_s_2w", "docs/s 2w", "{:,.0f}"),
    ("matmul_gflops", "matmul GFLOP/s", "{:,.1f}"),
)
LABELS = {"generate": "generate (decode)", "grpo": "grpo (rollout+update)", "curate": "curate (wall)"}


def table(rows: dict[str, dict[str, float] | None]) -> str:
    header = ["benchmark", *(h for _, h, _ in COLUMNS)]
    body = []
    for name, figures in rows.items():
        if figures is None:
            body.append([LABELS.get(name, name), "failed", *[""] * (len(COLUMNS) - 1)])
            continue
        body.append(
            [LABELS.get(name, name), *(f.format(figures[k]) if k in figures else "" for k, _, f in COLUMNS)]
        )
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    line = lambda r: "  ".join(
        (c.ljust(w) if i == 0 else c.rjust(w)) for i, (c, w) in enumerate(zip(r, widths, strict=True))
    ).rstrip()
    return "\n".join([line(header), "-" * len(line(header)), *(line(r) for r in body)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, smaller curation corpus")
    parser.add_argument(
        "--only", default=",".join(NAMES), help=f"comma-separated subset of {','.join(NAMES)}"
    )
    args = parser.parse_args()
    only = [n for n in args.only.split(",") if n]
    unknown = sorted(set(only) - set(NAMES))
    if unknown:
        parser.error(f"--only: unknown benchmark(s) {unknown}; accepted: {','.join(NAMES)}")

    load_before = os.getloadavg()[0]
    rows: dict[str, dict[str, float] | None] = {}
    raws: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="run_all_") as scratch:
        cmds = commands(args.quick, scratch)
        for name in [n for n in NAMES if n in only]:
            start = time.perf_counter()
            print(f"==> {name}: python benchmarks/{' '.join(cmds[name])}", flush=True)
            raw, output = run(cmds[name])
            print(output.rstrip(), f"\n    ({time.perf_counter() - start:.0f} s)\n", flush=True)
            rows[name] = None if raw is None else row(name, raw)
            if raw is not None:
                raws[name] = raw
    failed = [n for n, r in rows.items() if r is None]
    print(f"reference workload{' (--quick)' if args.quick else ''}: one row per benchmark process")
    print(table(rows))
    extra = []
    if "grpo" in raws:
        extra.append(f"grpo generation fraction {raws['grpo']['generation_fraction']:.2f}")
    if "generate" in raws:
        extra.append(
            f"decode step {raws['generate']['decode_step_ms']:.2f} ms "
            f"(its matmul floor {raws['generate']['matmul_floor_step_ms']:.2f} ms)"
        )
    if "curate" in raws and "recall_j08" in raws["curate"]:
        extra.append(
            f"curation dedup recall {raws['curate']['recall_j08']:.3f}, "
            f"precision {raws['curate'].get('precision_j07', float('nan')):.3f}"
        )
    load = (round(load_before, 2), round(os.getloadavg()[0], 2))  # a shared machine's figures move with it
    extra.append(f"load average (1 min) {load[0]:.2f} before, {load[1]:.2f} after")
    print("; ".join(extra))
    print(json.dumps({"quick": args.quick, "rows": rows, "raw": raws, "failed": failed, "load_avg_1m": load}))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
