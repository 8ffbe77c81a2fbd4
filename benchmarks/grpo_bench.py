"""Time per GRPO step of `stages.grpo` on the reference model: generation vs update.

    python benchmarks/grpo_bench.py [--steps 5] [--prompts 2] [--generations 4] [--prompt 32] [--new 64] [--beta 0.04]

Reference model of benchmarks/train_throughput.py (vocab 8192, d_model 256, 4 layers, 4 heads of 64, 2 KV heads,
MLP 1024, f32, one device); 2 prompts of 32 random tokens x 4 generations, 64 sampled new tokens (temperature 1, no
stop id, so every decode step runs), one clipped update per step (`grpo.train_step`, dapo loss) with the frozen
reference's log-probs (beta > 0: the issue's workload holds a reference model). One step = the jitted generation
(`sampler.sample`, shared prefill) + host round trip + rewards (a cheap function of the tokens) + advantages + the
jitted update, each blocked on, as in the stage (`Rollout` does the same with a tokenizer and real rewards).
Compile time is excluded (one warm-up step). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import losses
from jaxalign.config import GrpoConfig, MeshConfig, ModelConfig, OptimConfig
from jaxalign.models.transformer import init_model
from jaxalign.parallel.mesh import Rules, make_mesh
from jaxalign.rl import sampler
from jaxalign.stages import grpo
from jaxalign.train import state as state_lib


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--beta", type=float, default=0.04)
    args = parser.parse_args()

    cfg = ModelConfig(
        vocab_size=8192, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=64, d_ff=1024
    )
    mesh_cfg = MeshConfig(data=1, fsdp=1, tensor=1, stage=1)
    rules = Rules(make_mesh(mesh_cfg, jax.devices()[:1]), mesh_cfg.rules)
    graphdef, params = init_model(cfg, rules, seed=0)
    optim = OptimConfig(lr=1e-5, warmup_steps=0)
    state, _ = state_lib.create_sharded(graphdef, params, optim, args.steps + 1, 0, rules)
    ref_params = jax.tree.map(jnp.copy, state.params) if args.beta else None
    P, G, W, C = args.prompts, args.generations, args.prompt, args.new
    gcfg = GrpoConfig(num_generations=G, max_completion_length=C, beta=args.beta)
    generate = jax.jit(
        functools.partial(sampler.sample, graphdef, max_new_tokens=C, temperature=1.0, num_generations=G)
    )
    step = jax.jit(
        functools.partial(grpo.train_step, cfg=gcfg, optim=optim, microbatches=1), donate_argnums=(0,)
    )
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(4, cfg.vocab_size, (P, W)), jnp.int32)
    mask = jnp.ones((P, W), jnp.int32)

    def one_step(state, i):
        t0 = time.perf_counter()
        out = generate(state.params, ids, mask, jax.random.fold_in(state.rng, i))
        tokens, cmask = np.asarray(out.tokens), np.asarray(out.mask)
        t1 = time.perf_counter()
        rewards_PxG = (tokens.sum(axis=1) % 7).astype(np.float32).reshape(P, G)  # stands in for a checker
        batch = {
            "prompt_ids": out.prompt_ids,
            "prompt_mask": out.prompt_mask,
            "completion_ids": out.tokens,
            "completion_mask": cmask,
            "advantages": np.asarray(losses.grpo_advantages(rewards_PxG)).reshape(-1),
            "sampler_logps": out.logps,
        }
        t2 = time.perf_counter()
        state, metrics = step(state, batch, ref_params)
        jax.block_until_ready(metrics)
        t3 = time.perf_counter()
        return state, (t1 - t0, t2 - t1, t3 - t2), metrics

    start = time.perf_counter()
    state, _, _ = one_step(state, 0)
    first_step_s = time.perf_counter() - start
    times = []
    for i in range(1, args.steps + 1):
        state, t, metrics = one_step(state, i)
        times.append(t)
    gen_s, score_s, update_s = (float(np.median([t[j] for t in times])) for j in range(3))
    step_s = float(np.median([sum(t) for t in times]))
    load = os.getloadavg()[0]
    rows = [
        ("prompts x generations, prompt + new", f"{P} x {G}, {W} + {C}"),
        ("first step (compiles)", f"{first_step_s:.2f} s"),
        (f"step (median of {args.steps})", f"{step_s * 1e3:.1f} ms"),
        ("  generation", f"{gen_s * 1e3:.1f} ms"),
        ("  rewards + advantages", f"{score_s * 1e3:.1f} ms"),
        ("  update (reference + policy)", f"{update_s * 1e3:.1f} ms"),
        ("generation fraction", f"{gen_s / step_s:.2f}"),
        ("sampler vs trainer |logp| max diff", f"{float(metrics['logps/sampler_max_abs_diff']):.2e}"),
        ("load average (1 min)", f"{load:.2f}"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"GRPO step, reference model on {jax.devices()[0].device_kind} (beta={args.beta})")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print(
        json.dumps(
            {
                "workload": "reference",
                "s_per_step": round(step_s, 4),
                "generation_fraction": round(gen_s / step_s, 3),
                "generation_s": round(gen_s, 4),
                "update_s": round(update_s, 4),
                "first_step_s": round(first_step_s, 2),
                "load_avg_1m": round(load, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
