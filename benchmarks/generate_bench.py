"""Generation throughput of `rl.sampler` on the reference model.

    python benchmarks/generate_bench.py [--repeats 5] [--batch 8] [--prompt 32] [--new 128] [--scan]

Reference model of benchmarks/train_throughput.py (vocab 8192, d_model 256, 4 layers, 4 heads of 64, 2 KV heads,
MLP 1024, f32, one device); 8 prompts of 32 tokens, 128 greedy new tokens (no EOS, so every step runs). Times the
two compiled programs of `sampler.generate` separately: the prefill and the decode loop (sampling of all
`--new` tokens, `--new - 1` cached forward steps). `first_call_s` is the first `generate` call, compiles included.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np
from flax import nnx

from jaxalign.config import MeshConfig, ModelConfig
from jaxalign.models.transformer import Transformer, init_model
from jaxalign.parallel.mesh import Rules, make_mesh
from jaxalign.rl import sampler


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--scan", action="store_true")
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
    out = sampler.generate(model, prompts, max_new_tokens=C, temperature=0.0)
    jax.block_until_ready(out)
    first_call_s = time.perf_counter() - start

    ids = jax.device_put(np.asarray(prompts, np.int32))
    mask = jax.device_put(np.ones((B, P), np.int32))
    rng = jax.random.key(0)
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
            temperature=0.0,
            top_k=0,
            top_p=1.0,
            eos_ids=(),
            pad_id=0,
        )
        jax.block_until_ready(tokens)
        decode_times.append(time.perf_counter() - start)
    assert (np.asarray(tokens) == np.asarray(out.tokens)).all(), "timed run differs from generate()"

    prefill_s, decode_s = float(np.median(prefill_times)), float(np.median(decode_times))
    load = os.getloadavg()[0]
    rows = [
        ("batch x prompt x new", f"{B} x {P} x {C}"),
        ("first generate() call (compiles)", f"{first_call_s:.2f} s"),
        (f"prefill (median of {args.repeats})", f"{prefill_s * 1e3:.1f} ms"),
        (f"decode loop (median of {args.repeats})", f"{decode_s * 1e3:.1f} ms"),
        ("decode step", f"{decode_s / C * 1e3:.2f} ms"),
        ("prefill tokens/s", f"{B * P / prefill_s:,.0f}"),
        ("decode tokens/s", f"{B * C / decode_s:,.0f}"),
        ("load average (1 min)", f"{load:.2f}"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"greedy generation, reference model on {jax.devices()[0].device_kind} (scan={args.scan})")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print(
        json.dumps(
            {
                "workload": "reference",
                "decode_tokens_per_s": round(B * C / decode_s, 1),
                "prefill_tokens_per_s": round(B * P / prefill_s, 1),
                "first_call_s": round(first_call_s, 2),
                "decode_step_ms": round(decode_s / C * 1e3, 3),
                "load_avg_1m": round(load, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
