"""Checkpoint averaging: the element-wise mean of the parameters of several checkpoints of one run.

    python -m jaxalign.tools.average --workdir W --steps 100,200,300 --out DIR [--hf-out HF_DIR]
    python -m jaxalign.tools.average --workdir W --last 3 --out DIR
    python -m jaxalign.tools.average --workdir W --last 1 --item ema --out DIR --hf-out HF_DIR   # export the EMA

The run's config is read from `W/config.json` (JSON data, never executed) to find its checkpoints
(`checkpoint.directory`, default `W/checkpoints/<stage>`; `--stage` picks one when W holds several). Each named
step's `item` ("params", or "ema": the EMA of the params a run with `train.ema_decay` keeps) is read on the host, one
checkpoint at a time, and summed in float64; the mean is cast back to each leaf's saved dtype (float32: exactly the
rounded mean). `DIR` is written as a step directory that `model.init_from="ckpt:DIR"` (any stage, the eval job)
loads through the usual path: `DIR/state` holds `{"params": mean}` (Orbax, no pickle), `DIR/config` the config the
last averaged step was saved with (its `data.tokenizer` set to the run's tokenizer, so a stage started from DIR finds
it), and `DIR/average.json` records the source, steps and item. `--hf-out` also exports the averaged policy as a
Hugging Face checkpoint (`models.hf.save`), loading DIR through `stages.model_init.init_params` on this host's devices.

Averaging one step is a copy: `--last 1 --item ema` exports a run's EMA. LoRA runs are refused (their checkpoints
hold adapters, whose average is not the average of the merged weights), as are trees that differ between steps
(one-line CheckpointErrors naming the step and the parameter).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxalign import config as config_lib
from jaxalign import storage
from jaxalign.errors import CheckpointError, ConfigError, UserError
from jaxalign.train import checkpoint


def stage_dir(workdir: str, stage: str = "") -> tuple[config_lib.Config, str]:
    """(the run's config, the checkpoint directory of its stage `stage`, or of its one stage when empty)."""
    config_path = storage.path(storage.join(workdir, "config.json"))
    if not config_path.exists():
        raise CheckpointError(f"--workdir {workdir}: no config.json (is it a jaxalign run directory?)")
    config = config_lib.from_config_dict(json.loads(config_path.read_text(encoding="utf-8")))
    root = storage.path(config.checkpoint.directory or storage.join(workdir, "checkpoints"))
    stages = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    if stage:
        if stage not in stages:
            raise CheckpointError(f"--stage {stage}: {root} holds checkpoints of stages {stages}")
    elif len(stages) == 1:
        stage = stages[0]
    else:
        raise CheckpointError(f"{root} holds checkpoints of stages {stages}; name one with --stage")
    return config, checkpoint.stage_directory(config, stage)


def committed_steps(directory: str) -> list[int]:
    """The committed steps of a stage's checkpoint directory (as `checkpoint.find_step_dir` counts them)."""
    numbered = [d for d in storage.path(directory).iterdir() if d.name.isdigit()]
    steps = sorted(int(d.name) for d in numbered if (d / "commit_success.txt").exists())
    return steps or sorted(int(d.name) for d in numbered if (d / "state").is_dir())


def _flat(tree: dict) -> dict[str, Any]:
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def average_params(step_dirs: list[str], item: str = "params") -> dict:
    """The element-wise mean of `item` over `step_dirs` as a nested dict of numpy arrays (module doc)."""
    first_meta = checkpoint.saved_params_metadata(step_dirs[0], item)
    shapes = {k: (tuple(m.shape), np.dtype(m.dtype)) for k, m in _flat(first_meta).items()}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), first_meta)
    sums: dict[str, np.ndarray] = {}
    for step_dir in step_dirs:
        saved = checkpoint.saved_config(step_dir)
        if saved.get("lora", {}).get("rank", 0):
            raise CheckpointError(
                f"{step_dir} is a LoRA run's checkpoint (lora.rank={saved['lora']['rank']}): averaging adapters is "
                "not averaging the merged weights; export merged weights and average those"
            )
        meta = _flat(checkpoint.saved_params_metadata(step_dir, item))
        if set(meta) != set(shapes):
            diff = sorted(set(meta) ^ set(shapes))[:3]
            raise CheckpointError(
                f"{step_dir}: its {item} tree differs from {step_dirs[0]}'s (e.g. {diff}); average steps of one run"
            )
        for key, m in meta.items():
            if (tuple(m.shape), np.dtype(m.dtype)) != shapes[key]:
                raise CheckpointError(
                    f"{step_dir}: {item}{key} is {m.dtype}{list(m.shape)}, in {step_dirs[0]} "
                    f"{shapes[key][1]}{list(shapes[key][0])}"
                )
        with checkpoint._quiet(), ocp.PyTreeCheckpointer() as ckptr:
            restored = ckptr.restore(
                storage.path(step_dir) / "state",
                args=ocp.args.PyTreeRestore(
                    item={item: first_meta}, restore_args={item: restore_args}, partial_restore=True
                ),
            )[item]
        for key, x in _flat(restored).items():
            x = np.asarray(x, np.float64)
            sums[key] = x if key not in sums else sums[key] + x
    n = len(step_dirs)
    means = {k: (sums[k] / n).astype(shapes[k][1]) for k in shapes}
    paths = {jax.tree_util.keystr(p): p for p, _ in jax.tree_util.tree_leaves_with_path(first_meta)}
    out: dict = {}
    for key, path in paths.items():
        node = out
        for part in path[:-1]:
            node = node.setdefault(part.key, {})
        node[path[-1].key] = means[key]
    return out


def write(out: str, params: dict, saved_config: dict, record: dict) -> None:
    """Writes `out` as a step directory `ckpt:out` loads (module doc)."""
    out_path = storage.path(checkpoint._absolute(out))
    if out_path.exists() and any(out_path.iterdir()):
        raise CheckpointError(f"--out {out} exists and is not empty; choose a new directory")
    out_path.mkdir(parents=True, exist_ok=True)
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(out_path / "state", {"params": params})
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
        ckptr.save(out_path / "config", args=ocp.args.JsonSave(saved_config))
    (out_path / "average.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def export_hf(out: str, hf_out: str, saved_config: dict) -> None:
    """Loads `ckpt:out` as any stage would (on this host's devices) and writes it as a Hugging Face checkpoint."""
    from flax import nnx

    from jaxalign.models import hf
    from jaxalign.parallel.mesh import Rules
    from jaxalign.stages import model_init

    meta = checkpoint.saved_params_metadata(out)
    if "trunk" in meta or "trunk" in meta.get("policy", {}):
        raise ConfigError(
            f"--hf-out: {out} holds a scalar (reward / value) model; only policies export to HF"
        )
    config = config_lib.from_config_dict(
        {
            **saved_config,
            "mesh": dataclasses.asdict(config_lib.MeshConfig()),
            "model": {**saved_config["model"], "init_from": f"ckpt:{checkpoint._absolute(out)}"},
        }
    )
    graphdef, params = model_init.init_params(config, Rules.from_config(config), adapters=False)
    hf.save(nnx.merge(graphdef, params), hf_out)


def main(argv: list[str] | None = None) -> dict:
    """Command line (module doc); returns the record written to `DIR/average.json`."""
    parser = argparse.ArgumentParser(
        prog="python -m jaxalign.tools.average", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--workdir", required=True, help="the run directory (holds config.json)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--steps", help="comma-separated checkpoint steps, e.g. 100,200,300")
    which.add_argument("--last", type=int, help="the last N committed steps")
    parser.add_argument("--out", required=True, help="the averaged checkpoint (a new directory)")
    parser.add_argument("--hf-out", default="", help="also export it as a Hugging Face checkpoint here")
    parser.add_argument("--stage", default="", help="the stage, when the run directory holds several")
    parser.add_argument(
        "--item", default="params", choices=("params", "ema"), help="average the params or EMA"
    )
    args = parser.parse_args(argv)

    _, directory = stage_dir(args.workdir, args.stage)
    available = committed_steps(directory) if storage.path(directory).is_dir() else []
    if args.last is not None:
        if not 1 <= args.last <= len(available):
            raise ConfigError(
                f"--last {args.last}: {directory} holds {len(available)} committed steps {available}"
            )
        steps = available[-args.last :]
    else:
        try:
            steps = sorted({int(s) for s in args.steps.split(",") if s.strip()})
        except ValueError:
            raise ConfigError(
                f"--steps {args.steps!r}: expected comma-separated integers, e.g. 100,200"
            ) from None
        missing = [s for s in steps if s not in available]
        if missing or not steps:
            raise CheckpointError(
                f"--steps {args.steps}: steps {missing} are not committed in {directory}; committed: {available}"
            )
    step_dirs = [storage.join(directory, str(s)) for s in steps]
    params = average_params(step_dirs, args.item)
    saved = checkpoint.saved_config(step_dirs[-1])
    tokenizer = storage.join(args.workdir, "tokenizer.model")
    if not saved["data"]["tokenizer"] and storage.exists(tokenizer):
        saved["data"]["tokenizer"] = checkpoint._absolute(tokenizer)
    record = {"source": directory, "steps": steps, "item": args.item}
    write(args.out, params, saved, record)
    if args.hf_out:
        export_hf(args.out, args.hf_out, saved)
    print(f"averaged {args.item} of steps {steps} of {directory} -> {args.out}", flush=True)
    return record


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
