"""LoRA and QLoRA SFT against full SFT on the synthetic world: the share of full SFT's held-out exact-match gain.

    python benchmarks/lora_world_effect.py [--workdir /tmp/lora_world] [--lora-lr 5e-3] [--rank 16]

The world-effect chain of tests/stages/test_world_effects.py (configs/quickstart.py without curation, 400 pretraining
steps) is pretrained once; then three SFT runs start from that same checkpoint with the quickstart's SFT settings
(150 steps, half of each batch replayed pretraining text): full fine-tuning (lr 1e-3), LoRA and QLoRA (NF4 base) of
rank `--rank`, alpha 2 * rank, on every projection, at `--lora-lr`. Each run's `eval/exact_match` (held-out SFT
examples reproduced exactly by greedy decoding) is read before its first step and after its last; the gain is the
difference. Prints a table; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAIN = (
    "--config=configs/quickstart.py",
    "--config.train.progress=False",
    "--config.pipeline.pretrain.steps=400",
)


def main_cmd(workdir: str, *args: str) -> None:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "jaxalign.main", *CHAIN, f"--config.workdir={workdir}", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])


def sft_gain(workdir: str) -> tuple[float, float]:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        records = [r for r in map(json.loads, f) if r["stage"] == "sft" and "eval/exact_match" in r]
    return records[0]["eval/exact_match"], records[-1]["eval/exact_match"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp/lora_world")
    parser.add_argument("--lora-lr", type=float, default=5e-3)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()

    base = os.path.join(args.workdir, "pretrained")
    if not os.path.exists(os.path.join(base, "pipeline", "pretrain.done")):
        main_cmd(base, "--config.pipeline.stages=pretrain")
    lora = (f"--config.lora.rank={args.rank}", f"--config.lora.alpha={2 * args.rank}")
    variants = {
        "full": (),
        "lora": (*lora, f"--config.pipeline.sft.lr={args.lora_lr}"),
        "qlora": (*lora, "--config.lora.quantize=nf4", f"--config.pipeline.sft.lr={args.lora_lr}"),
    }
    results = {}
    for name, flags in variants.items():
        workdir = os.path.join(args.workdir, name)
        if not os.path.exists(os.path.join(workdir, "pipeline", "sft.done")):
            shutil.rmtree(workdir, ignore_errors=True)
            shutil.copytree(base, workdir, ignore=shutil.ignore_patterns("metrics.jsonl", "events*"))
            main_cmd(workdir, "--config.pipeline.stages=sft", *flags)
        before, after = sft_gain(workdir)
        results[name] = {"before": before, "after": after, "gain": after - before}
    full_gain = results["full"]["gain"]
    print(f"SFT held-out exact match on the synthetic world (rank {args.rank}, LoRA lr {args.lora_lr})")
    print(f"  {'variant':<8} {'before':>7} {'after':>7} {'gain':>7} {'of full':>8}")
    for name, r in results.items():
        share = r["gain"] / full_gain if full_gain else float("nan")
        r["share_of_full"] = share
        print(f"  {name:<8} {r['before']:7.3f} {r['after']:7.3f} {r['gain']:7.3f} {share:8.2f}")
    print(json.dumps({"rank": args.rank, "lora_lr": args.lora_lr, **results}))


if __name__ == "__main__":
    main()
