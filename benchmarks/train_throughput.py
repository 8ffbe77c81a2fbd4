"""Training throughput of the real pretraining step on the reference workload.

    python benchmarks/train_throughput.py [--steps 10] [--batch 8] [--seq 256] [--remat none] [--scan]

Reference workload: vocab 8192, d_model 256, 4 layers, 4 heads of 64, 2 KV heads, MLP 1024, batch 8, seq 256, f32,
one device. Prints tokens/s, step time, compile time, peak RSS and MFU against the float32 matmul peak measured in
the same run; the last line is one JSON object for other tools.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import time

import jax
import numpy as np

from jaxalign.config import MeshConfig, ModelConfig, OptimConfig
from jaxalign.models.transformer import flops_per_token, init_model, num_params
from jaxalign.parallel.mesh import Rules, make_mesh
from jaxalign.stages import pretrain
from jaxalign.train import perf
from jaxalign.train import state as state_lib


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--remat", default="none")
    parser.add_argument("--scan", action="store_true")
    parser.add_argument("--attention", default="xla")
    args = parser.parse_args()

    cfg = ModelConfig(
        vocab_size=8192,
        d_model=256,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        head_dim=64,
        d_ff=1024,
        remat=args.remat,
        scan_layers=args.scan,
        attention=args.attention,
    )
    mesh_cfg = MeshConfig(data=1, fsdp=1, tensor=1, stage=1)
    rules = Rules(make_mesh(mesh_cfg, jax.devices()[:1]), mesh_cfg.rules)
    optim_cfg = OptimConfig(lr=1e-3, warmup_steps=10)

    matmul_flops = perf.measure_matmul_flops(2048, repeats=5)

    graphdef, params = init_model(cfg, rules, seed=0)
    state, shardings = state_lib.create_sharded(graphdef, params, optim_cfg, 1000, 0, rules)
    batch_sharding = rules.sharding(("batch", "length"))
    step = jax.jit(
        functools.partial(pretrain.train_step, optim=optim_cfg, z_loss=0.0, microbatches=1),
        in_shardings=(shardings, batch_sharding),
        out_shardings=(shardings, None),
        donate_argnums=(0,),
    )
    rng = np.random.default_rng(0)
    B, T = args.batch, args.seq
    batch = {
        "inputs": rng.integers(0, cfg.vocab_size, (B, T), dtype=np.int32),
        "targets": rng.integers(0, cfg.vocab_size, (B, T), dtype=np.int32),
        "segment_ids": np.ones((B, T), np.int32),
        "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
        "weights": np.ones((B, T), np.float32),
    }
    batch = jax.device_put(batch, batch_sharding)

    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    state, metrics = compiled(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)

    step_s = float(np.median(times))
    tokens_per_s = B * T / step_s
    fpt = flops_per_token(cfg, T)
    mfu = tokens_per_s * fpt / matmul_flops
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    rows = [
        ("parameters", f"{num_params(params) / 1e6:.2f} M"),
        ("tokens per step", f"{B * T}"),
        ("FLOPs per step", f"{fpt * B * T / 1e9:.1f} GFLOP"),
        ("f32 matmul peak (2048^3)", f"{matmul_flops / 1e9:.1f} GFLOP/s"),
        ("compile", f"{compile_s:.2f} s"),
        (f"step (median of {args.steps})", f"{step_s * 1e3:.0f} ms"),
        ("ideal step at matmul peak", f"{fpt * B * T / matmul_flops * 1e3:.0f} ms"),
        ("tokens/s", f"{tokens_per_s:,.0f}"),
        ("MFU vs measured peak", f"{mfu:.3f}"),
        ("peak RSS", f"{peak_rss_mb:,.0f} MB"),
        ("loss after steps", f"{float(metrics['loss']):.4f}"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"reference workload on {jax.devices()[0].device_kind} (remat={args.remat}, scan={args.scan})")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print(
        json.dumps(
            {
                "workload": "reference",
                "tokens_per_s": round(tokens_per_s, 1),
                "mfu": round(mfu, 4),
                "matmul_gflops": round(matmul_flops / 1e9, 1),
                "step_s": round(step_s, 4),
                "compile_s": round(compile_s, 2),
                "peak_rss_mb": round(peak_rss_mb, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
