"""Pipeline schedules side by side on fake CPU devices, to pick `pipeline.schedule/microbatches/repeats`.

    python benchmarks/pipeline_bench.py [--stages 4] [--layers 8] [--batch 16] [--seq 64] [--d-model 128] [--steps 2]

For each schedule (GPipe, 1F1B and circular with R = 2, each at M = S and 4S microbatches) it compiles the
forward + backward of the layer stack (`Transformer.hidden` of a model with a 64-token vocabulary, so the unpipelined
embedding and norm are negligible) on a mesh of S stages, and prints:
- bubble, analytic: (S - 1) / (R M + S - 1);
- bubble, measured from the program: 1 - (useful matmul FLOPs) / (executed matmul FLOPs), where the executed FLOPs
  are counted over the traced forward + backward program of the pipelined step (every dot_general, times the trip
  counts of the scans around it: the pipeline loop, the per-stage layer scan, the vmap over stages) and the useful
  ones over the unpipelined program. Idle stages compute on discarded data in SPMD: that work is the bubble. (XLA's
  own `cost_analysis` counts a loop body once, whatever its trip count, so it cannot measure this.) 1F1B's loop
  skips its backward while filling and its forward while draining under `lax.cond`, which a static count cannot
  see: there it is 1 - (useful stage runs, 2 M S) / (stage runs executed, counted at run time by a host callback in
  every per-stage application of a separately compiled copy of the step);
- peak activation memory per stage: the temporaries of the per-device program (XLA's memory analysis), which is
  what the schedule changes (parameters and gradients are the same 1 / S of the layers on every schedule);
- step time: the median of `--steps` runs. On fake CPU devices all stages share the host's cores, so this time is
  the total work (bubble included), not the pipelined wall-clock of real accelerators.
The last line is one JSON object.

Measured (`--stages 4 --layers 8 --batch 32 --steps 1`, idle 2-core CPU): activations per stage device GPipe
161 MB (M 4) / 100 MB (M 16), circular R 2 119 / 118 MB, 1F1B 36 / 16 MB; bubble measured == analytic for every
schedule (GPipe and 1F1B 0.429 / 0.158, circular 0.273 / 0.086); step s 1.34 / 1.00 GPipe, 0.88 / 0.89 circular,
1.04 / 0.93 1F1B.
"""

from __future__ import annotations

import argparse
import json
import os
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.extend.core  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jaxalign.config import MeshConfig, ModelConfig  # noqa: E402
from jaxalign.models.transformer import init_model  # noqa: E402
from jaxalign.parallel import pipeline  # noqa: E402
from jaxalign.parallel.mesh import PipelineSchedule, Rules, make_mesh  # noqa: E402


def compile_step(cfg: ModelConfig, rules: Rules, tokens: np.ndarray):
    """The compiled grad of mean(hidden^2) (the layers' forward and backward), its params and tokens, the jitted
    function."""
    graphdef, params = init_model(cfg, rules, seed=0)

    def loss(params, batch):  # the objectives' (loss_sum, (weight, metric_sums)) convention, summed over rows
        h = nnx.merge(graphdef, params).hidden(batch["tokens"])
        return jnp.sum(jnp.square(h)) / h.shape[-1], (jnp.float32(h.shape[0]), {})

    shardings = jax.tree.map(lambda x: x.sharding, params)
    step = jax.jit(
        lambda p, t: pipeline.value_and_grad(loss)(p, {"tokens": t}),
        in_shardings=(shardings, rules.sharding(("batch", "length"))),
    )
    tokens = jax.device_put(tokens, rules.sharding(("batch", "length")))
    return step.lower(params, tokens).compile(), params, tokens, step


def matmul_flops(jaxpr: jax.extend.core.Jaxpr) -> float:
    """FLOPs of every dot_general of `jaxpr`, sub-jaxprs included, scan bodies times their trip count."""
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[d] for d in contract])
        trips = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    total += trips * matmul_flops(inner)
    return total


def executed_stage_runs(cfg: ModelConfig, rules: Rules, tokens: np.ndarray) -> int:
    """How many times a stage's layers actually ran in one 1F1B step (forwards and the backward's recomputations),
    counted by a host callback in every per-stage application: `lax.cond` branches that are skipped do not count.
    Compiled separately from the timed step, so the callback costs that one nothing."""
    runs = [0]
    apply = pipeline._apply_layers

    def counted(*args):
        x = apply(*args)
        jax.debug.callback(lambda _: runs.__setitem__(0, runs[0] + 1), x[0, 0])
        return x

    pipeline._apply_layers = counted
    try:
        compiled, params, tokens, _ = compile_step(cfg, rules, tokens)
        jax.block_until_ready(compiled(params, tokens))
    finally:
        pipeline._apply_layers = apply
    return runs[0]


def measure(cfg: ModelConfig, rules: Rules, tokens: np.ndarray, steps: int) -> dict:
    compiled, params, tokens, step = compile_step(cfg, rules, tokens)
    flops = matmul_flops(jax.make_jaxpr(step)(params, tokens).jaxpr)
    memory = compiled.memory_analysis()
    jax.block_until_ready(compiled(params, tokens))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, tokens))
        times.append(time.perf_counter() - start)
    return {
        "flops": flops,
        "temp_bytes": int(memory.temp_size_in_bytes),
        "step_s": np.median(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    S = args.stages
    cfg = ModelConfig(
        vocab_size=64,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=4,
        n_kv_heads=2,
        head_dim=args.d_model // 4,
        d_ff=4 * args.d_model,
        max_seq_len=args.seq,
        scan_layers=True,
    )
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq), dtype=np.int32)
    mesh_cfg = MeshConfig(data=1, fsdp=1, tensor=1, stage=1)
    ref = measure(cfg, Rules(make_mesh(mesh_cfg, jax.devices()[:1]), mesh_cfg.rules), tokens, args.steps)

    schedules = [("gpipe", S, 1), ("gpipe", 4 * S, 1), ("circular", S, 2), ("circular", 4 * S, 2)]
    schedules += [("1f1b", S, 1), ("1f1b", 4 * S, 1)]
    rows = []
    stage_mesh = MeshConfig(data=1, fsdp=1, tensor=1, stage=S)
    for name, M, R in schedules:
        if args.batch % M or args.layers % (S * R):
            continue
        rules = Rules(
            make_mesh(stage_mesh, jax.devices()[:S]), stage_mesh.rules, PipelineSchedule(name, M, R)
        )
        m = measure(cfg, rules, tokens, args.steps)
        if name == "1f1b":  # useful: every microbatch once forward and once backward on each of the S stages
            measured = 1 - 2 * M * S / executed_stage_runs(cfg, rules, tokens)
        else:
            measured = 1 - ref["flops"] / m["flops"]
        rows.append(
            {
                "schedule": name,
                "microbatches": M,
                "repeats": R,
                "bubble_analytic": round(pipeline.bubble_fraction(S, M, R), 4),
                "bubble_measured": round(measured, 4),
                "activation_mb_per_stage": round(m["temp_bytes"] / 2**20, 2),
                "step_s": round(float(m["step_s"]), 4),
            }
        )

    print(
        f"pipeline schedules: {S} stages, {args.layers} layers x d{args.d_model}, batch {args.batch} x {args.seq}, "
        f"fp32, fake CPU devices (unpipelined single device: {ref['temp_bytes'] / 2**20:.2f} MB activations, "
        f"{ref['step_s']:.3f} s)"
    )
    header = ("schedule", "M", "R", "bubble analytic", "bubble measured", "activations/stage MB", "step s")
    print("  " + " | ".join(f"{h:>10}" for h in header))
    for r in rows:
        values = (r["schedule"], r["microbatches"], r["repeats"], r["bubble_analytic"], r["bubble_measured"])
        values += (r["activation_mb_per_stage"], r["step_s"])
        print("  " + " | ".join(f"{v!s:>10}" for v in values))
    print(
        json.dumps({"stages": S, "layers": args.layers, "batch": args.batch, "seq": args.seq, "rows": rows})
    )


if __name__ == "__main__":
    main()
