"""jaxalign vs Tunix 0.1.7 (and optionally TRL 1.16) on the reference workloads, measured in the same run.

    python benchmarks/compare_tunix.py [--tunix-python /work/venv-tunix/bin/python] [--rounds 1]
                                       [--only sft,dpo,generate,grpo] [--quick] [--trl]

Setup of the Tunix side (Tunix pins its own dependencies, so it lives in its own venv):
    python3 -m venv /work/venv-tunix && /work/venv-tunix/bin/pip install google-tunix==0.1.7
(on this machine that resolves to jax 0.10.2 and flax 0.12.8, the versions jaxalign runs on).

Rows, each the reference workload of the jaxalign benchmark named, run in its own process per framework:
  sft       train_throughput.py --stage sft    8 x 256 tokens, loss on the last 3/4          tokens/s
  dpo       train_throughput.py --stage dpo    8 pairs of 64 + 192 tokens, live reference    tokens/s
  generate  generate_bench.py                  8 prompts of 32, 128 greedy new tokens        decode tokens/s
  grpo      grpo_bench.py                      2 prompts x 4 generations, 32 + 64 tokens     s per step
The Tunix side is benchmarks/tunix_workloads.py run by `--tunix-python` (its docstring says which Tunix API each
row times and how); `--trl` adds TRL rows from benchmarks/trl_workloads.py (SFTTrainer / DPOTrainer steps on a
transformers LlamaForCausalLM of the same shapes, torch CPU) for sft and dpo. Each row runs jaxalign, then Tunix
(then TRL); with `--rounds 2` the second round runs them in the reverse order, and a row's figure is the median
over rounds, so both frameworks see the same machine load. The 1-minute load average is printed before each
timed block and kept with each figure. The ratio is jaxalign's advantage (throughput ratio, or Tunix's time over
jaxalign's for grpo) against the goal of issues #9 / #10 (sft, dpo >= 1.4x; decode >= 1.5x; grpo step <= 1/2).
`--quick` runs fewer timed steps (same workload per step). The last line printed is one JSON object:
{"rows": {row: {"jaxalign": value, "tunix": value, "trl": value, "ratio": .., "goal": .., "met": bool,
 "ratio_trl": ..}},
 "unit": {row: unit}, "runs": [every run's JSON with its framework, row and round], "failed": [...],
 "load_avg_1m": [before, after]}.
Exits non-zero when a run fails (the others still run and are shown).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

from run_all import run  # one way to run a benchmark script and read its JSON line

ROWS = ("sft", "dpo", "generate", "grpo")
# row: (jaxalign's figure key, tunix's figure key, unit, higher is better, goal of the jaxalign / tunix ratio)
FIGURES = {
    "sft": ("tokens_per_s", "tokens_per_s", "tokens/s", True, 1.4),
    "dpo": ("tokens_per_s", "tokens_per_s", "tokens/s", True, 1.4),
    "generate": ("decode_tokens_per_s", "decode_tokens_per_s", "decode tokens/s", True, 1.5),
    "grpo": ("s_per_step", "s_per_step", "s/step", False, 2.0),
}
TRL_ROWS = ("sft", "dpo")


def commands(row: str, quick: bool) -> dict[str, list[str]]:
    """Script and arguments per framework for one row."""
    train_steps = ["--steps", "3" if quick else "10"]
    jaxalign = {
        "sft": ["train_throughput.py", "--stage", "sft", *train_steps],
        "dpo": ["train_throughput.py", "--stage", "dpo", *train_steps],
        "generate": ["generate_bench.py", "--repeats", "2" if quick else "5"],
        "grpo": ["grpo_bench.py", "--steps", "2" if quick else "5"],
    }[row]
    steps = {"sft": train_steps[1], "dpo": train_steps[1], "generate": jaxalign[-1], "grpo": jaxalign[-1]}[
        row
    ]
    out = {
        "jaxalign": jaxalign,
        "tunix": ["tunix_workloads.py", "--workload", row, "--steps", steps],
    }
    if row in TRL_ROWS:
        out["trl"] = ["trl_workloads.py", "--workload", row, "--steps", steps]
    return out


def table(rows: dict[str, dict[str, Any]], frameworks: list[str]) -> str:
    trl = "trl" in frameworks
    header = [
        "row",
        "unit",
        *frameworks,
        "vs Tunix",
        "goal",
        "met",
        *(["vs TRL"] if trl else []),
        "load (1 min)",
    ]
    body = []
    for name, r in rows.items():
        unit, higher = FIGURES[name][2], FIGURES[name][3]
        cells = [name, unit]
        for fw in frameworks:
            v = r.get(fw)
            cells.append(
                "" if fw not in r else "failed" if v is None else f"{v:,.0f}" if higher else f"{v:.3f}"
            )
        ratio = r.get("ratio")
        cells += [
            "" if ratio is None else f"{ratio:.2f}x",
            f">= {FIGURES[name][4]:g}x",
            "" if ratio is None else ("yes" if r["met"] else "no"),
            *([] if not trl else ["" if r.get("ratio_trl") is None else f"{r['ratio_trl']:.2f}x"]),
            " / ".join(f"{x:.1f}" for x in r["loads"]),
        ]
        body.append(cells)
    widths = [max(len(b[i]) for b in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(header), "-" * len(line(header)), *(line(b) for b in body)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tunix-python", default="/work/venv-tunix/bin/python")
    parser.add_argument(
        "--rounds", type=int, default=1, help="rounds per row (even rounds reverse the order)"
    )
    parser.add_argument("--only", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument("--quick", action="store_true", help="fewer timed steps")
    parser.add_argument("--trl", action="store_true", help="add TRL 1.16 rows (sft, dpo) run by this python")
    args = parser.parse_args()
    only = [n for n in args.only.split(",") if n]
    unknown = sorted(set(only) - set(ROWS))
    if unknown:
        parser.error(f"--only: unknown row(s) {unknown}; accepted: {','.join(ROWS)}")
    if not os.path.exists(args.tunix_python):
        parser.error(f"--tunix-python: {args.tunix_python} does not exist (see this script's docstring)")
    if args.rounds < 1:
        parser.error(f"--rounds: {args.rounds}; accepted: >= 1")
    pythons = {"jaxalign": sys.executable, "tunix": args.tunix_python, "trl": sys.executable}
    frameworks = ["jaxalign", "tunix", *(["trl"] if args.trl else [])]

    load_before = os.getloadavg()[0]
    runs: list[dict[str, Any]] = []
    failed: list[str] = []
    rows: dict[str, dict[str, Any]] = {}
    for name in [n for n in ROWS if n in only]:
        cmds = commands(name, args.quick)
        order = [fw for fw in frameworks if fw in cmds]
        values: dict[str, list[float]] = {fw: [] for fw in order}
        loads = []
        for rnd in range(args.rounds):
            for fw in order if rnd % 2 == 0 else order[::-1]:
                load = os.getloadavg()[0]
                loads.append(load)
                print(
                    f"==> {name} / {fw} (round {rnd + 1}), load {load:.2f}: benchmarks/{' '.join(cmds[fw])}"
                )
                start = time.perf_counter()
                raw, output = run(cmds[fw], pythons[fw], jaxalign_path=fw != "tunix")
                print(output.rstrip(), f"\n    ({time.perf_counter() - start:.0f} s)\n", flush=True)
                key = FIGURES[name][0] if fw == "jaxalign" else FIGURES[name][1]
                if raw is None or key not in raw:
                    failed.append(f"{name}/{fw}")
                    continue
                values[fw].append(float(raw[key]))
                runs.append({"row": name, "framework": fw, "round": rnd + 1, "load_before": load, **raw})
        r: dict[str, Any] = {fw: (statistics.median(v) if v else None) for fw, v in values.items()}
        higher, goal = FIGURES[name][3], FIGURES[name][4]
        ours, theirs = r["jaxalign"], r["tunix"]
        r["ratio"] = None if not (ours and theirs) else (ours / theirs if higher else theirs / ours)
        r["goal"] = goal
        if r.get("trl") and ours:
            r["ratio_trl"] = ours / r["trl"] if higher else r["trl"] / ours
        r["met"] = None if r["ratio"] is None else r["ratio"] >= goal
        r["loads"] = [round(x, 2) for x in loads]
        rows[name] = r

    print(
        f"jaxalign vs Tunix{' vs TRL' if args.trl else ''} on the reference workloads, one CPU device, "
        f"{args.rounds} round(s){' (--quick)' if args.quick else ''}"
    )
    print(table(rows, frameworks))
    print(
        "vs Tunix / vs TRL: jaxalign's throughput over theirs (grpo: their s/step over jaxalign's); load: 1-minute load "
        "average before each run, in run order"
    )
    load = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    units = {name: FIGURES[name][2] for name in rows}
    print(json.dumps({"rows": rows, "unit": units, "runs": runs, "failed": failed, "load_avg_1m": load}))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
