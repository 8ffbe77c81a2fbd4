"""Generation throughput of `rl.sampler` on the reference model.

    python benchmarks/generate_bench.py [--repeats 5] [--batch 8] [--prompt 32] [--new 128] [--scan]
                                        [--temperature 0]

Reference model of benchmarks/train_throughput.py (vocab 8192, d_model 256, 4 layers, 4 heads of 64, 2 KV heads,
MLP 1024, f32, one device); 8 prompts of 32 tokens, 128 greedy new tokens (no EOS, so every step runs). Times the
two compiled programs of `sampler.generate` separately: the prefill and the decode loop (sampling of all
`--new` tokens, `--new - 1` cached forward steps). `--temperature` > 0 samples instead (as RL does; no EOS
either). `first_call_s` is the first `generate` call, compiles included. Two floors are measured in the same run
(`matmul_floors`): the decode's weight matmuls alone, and reading the weights once per step.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign.config import MeshConfig, ModelConfig
from jaxalign.models.transformer import Transformer, init_model
from jaxalign.parallel.mesh import Rules, make_mesh
from jaxalign.rl import sampler


def matmul_floors(model: Transformer, rows: int, steps: int, repeats: int) -> tuple[float, float]:
    """Seconds for `steps` iterations of only the weight matmuls of a decode step, on `rows` rows, in one jitted
    loop: the part of a step no sampler can avoid, measured in the same run as the decode so that it shows how much
    of a step is overhead whatever the load on the machine. Returns (dots, stream): `dots` runs the decode's own
    matmuls (per layer the fused q|k|v and gate|up kernels, wo and w_down; then the LM head), each input depending
    on the one before; `stream` multiplies by every one of those weights at once (one matmul against all of them
    side by side), the memory-bandwidth bound of reading the weights once per step."""
    weights = lambda b: (b.attn.wq, b.attn.wk, b.attn.wv, b.attn.wo, b.mlp.w_gate, b.mlp.w_up, b.mlp.w_down)
    if model.cfg.scan_layers:  # one stacked block: (L, ...) arrays
        layers = zip(*(w[...] for w in weights(model.blocks)), strict=True)
    else:
        layers = [tuple(w[...] for w in weights(b)) for b in model.blocks]
    kernels = []
    for wq, wk, wv, wo, w_gate, w_up, w_down in layers:
        kernels += [
            jnp.concatenate([wq, wk, wv], axis=1),
            wo,
            jnp.concatenate([w_gate, w_up], axis=1),
            w_down,
        ]
    kernels.append(model.embed[...].T if model.cfg.tie_embeddings else model.lm_head[...])
    D = model.cfg.d_model

    def chained(kernels, x_RxD):
        for w in kernels:
            y = x_RxD[:, : w.shape[0]] if w.shape[0] <= D else jnp.tile(x_RxD, (1, w.shape[0] // D))
            x_RxD = x_RxD + (y @ w)[:, :D] * 1e-6
        return x_RxD

    def stream(kernels, x_RxD):
        side_by_side = jnp.concatenate([w if w.shape[0] == D else w.T for w in kernels], axis=1)
        return x_RxD + (x_RxD @ side_by_side)[:, :D] * 1e-6

    def timed(f) -> float:
        loop = jax.jit(lambda kernels, x: jax.lax.fori_loop(0, steps, lambda _, x: f(kernels, x), x))
        x_RxD = jax.random.normal(jax.random.key(0), (rows, D), jnp.float32)
        jax.block_until_ready(loop(kernels, x_RxD))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(loop(kernels, x_RxD))
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    return timed(chained), timed(stream)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--scan", action="store_true")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the reference workload)")
    args = parser.parse_args()

    cfg = ModelConfig(
        vocab_size=8192,
        d_model=256,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        head_dim=64,
        d_ff=1024,
        scan_layers=args.scan,
    )
    mesh_cfg = MeshConfig(data=1, fsdp=1, tensor=1, stage=1)
    rules = Rules(make_mesh(mesh_cfg, jax.devices()[:1]), mesh_cfg.rules)
    graphdef, params = init_model(cfg, rules, seed=0)
    model: Transformer = nnx.merge(graphdef, params)
    B, P, C = args.batch, args.prompt, args.new
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, P)).tolist()

    start = time.perf_counter()
    rng = jax.random.key(0)
    out = sampler.generate(model, prompts, max_new_tokens=C, temperature=args.temperature, rng=rng)
    jax.block_until_ready(out)
    first_call_s = time.perf_counter() - start

    ids = jax.device_put(np.asarray(prompts, np.int32))
    mask = jax.device_put(np.ones((B, P), np.int32))
    prefill_times, decode_times = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        cache, logits, ids_r, mask_r = sampler.jit_prefill(graphdef, params, ids, mask, cache_len=P + C)
        jax.block_until_ready(cache)
        prefill_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        tokens, _, _, _ = sampler.jit_decode(
            graphdef,
            params,
            cache,
            logits,
            mask_r,
            rng,
            max_new_tokens=C,
            temperature=args.temperature,
            top_k=0,
            top_p=1.0,
            eos_ids=(),
            pad_id=0,
        )
        jax.block_until_ready(tokens)
        decode_times.append(time.perf_counter() - start)
    assert (np.asarray(tokens) == np.asarray(out.tokens)).all(), "timed run differs from generate()"
    floor_s, stream_s = matmul_floors(model, B, C, args.repeats)

    prefill_s, decode_s = float(np.median(prefill_times)), float(np.median(decode_times))
    best_decode_s = min(decode_times)
    load = os.getloadavg()[0]
    rows = [
        ("batch x prompt x new", f"{B} x {P} x {C}"),
        ("first generate() call (compiles)", f"{first_call_s:.2f} s"),
        (f"prefill (median of {args.repeats})", f"{prefill_s * 1e3:.1f} ms"),
        (f"decode loop (median of {args.repeats})", f"{decode_s * 1e3:.1f} ms"),
        ("decode step", f"{decode_s / C * 1e3:.2f} ms"),
        ("matmul floor per step (same run)", f"{floor_s / C * 1e3:.2f} ms"),
        ("  weights read once (one matmul)", f"{stream_s / C * 1e3:.2f} ms"),
        ("prefill tokens/s", f"{B * P / prefill_s:,.0f}"),
        ("decode tokens/s (median)", f"{B * C / decode_s:,.0f}"),
        ("decode tokens/s (best run)", f"{B * C / best_decode_s:,.0f}"),
        ("load average (1 min)", f"{load:.2f}"),
    ]
    width = max(len(r[0]) for r in rows)
    kind = "greedy" if args.temperature == 0 else f"sampled (temperature {args.temperature:g})"
    print(f"{kind} generation, reference model on {jax.devices()[0].device_kind} (scan={args.scan})")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print(
        json.dumps(
            {
                "workload": "reference" if args.temperature == 0 else f"temperature={args.temperature:g}",
                "decode_tokens_per_s": round(B * C / decode_s, 1),
                "prefill_tokens_per_s": round(B * P / prefill_s, 1),
                "first_call_s": round(first_call_s, 2),
                "decode_tokens_per_s_best": round(B * C / best_decode_s, 1),
                "decode_step_ms": round(decode_s / C * 1e3, 3),
                "matmul_floor_step_ms": round(floor_s / C * 1e3, 3),
                "stream_floor_step_ms": round(stream_s / C * 1e3, 3),
                "load_avg_1m": round(load, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
