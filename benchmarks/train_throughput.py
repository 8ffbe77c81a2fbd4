"""Training throughput of the real train steps on the reference workload, per stage.

    python benchmarks/train_throughput.py [--stage pretrain|sft|reward|dpo] [--steps 10] [--batch 8] [--seq 256]
                                          [--remat none] [--scan] [--reference live|precomputed]
                                          [--lora-rank 0] [--quantize none|nf4] [--vocab 8192]
                                          [--logits-chunk 0]

Reference workload: vocab 8192, d_model 256, 4 layers, 4 heads of 64, 2 KV heads, MLP 1024, f32, one device.
  pretrain, sft   8 rows x 256 tokens (SFT: the loss on the completion, the last 3/4 of each row)
  reward, dpo     8 pairs of 64 prompt + 192 completion tokens (chosen + rejected counted: 4,096 tokens a step);
                  DPO with its frozen reference in memory (`--reference live`) or precomputed log-probs
Prints tokens/s, step time, compile time, the step's device memory (XLA's memory analysis of the compiled step:
arguments + temporaries, not counting the donated state twice), peak RSS and MFU against the float32 matmul peak
measured in the same run; the last line is one JSON object for other tools.

`--logits-chunk C` computes the vocabulary logits C positions at a time (`train.logits_chunk`, recomputed in the
backward), so the full float32 [B, T, V] logits never exist at once. Pretrain, 8 x 256 tokens, measured (load ~3):
  vocab 8192 (reference)     step device memory 595 MB unchunked -> 509 MB at C=64; loss after 3 steps equal
  vocab 128256 (Llama 3's)   step device memory 3,884 MB -> 2,385 MB at C=64 (peak RSS 5,035 -> 3,534 MB); equal loss

`--lora-rank R` trains rank-R LoRA adapters (alpha 2R) on every projection with the base frozen (`jaxalign.peft`);
`--quantize nf4` stores the frozen projections as NF4 (QLoRA). Full vs LoRA vs QLoRA, SFT, on this machine:
    python benchmarks/train_throughput.py --stage sft --steps 3 [--lora-rank 16 [--quantize nf4]] --logits-chunk 64
  measured (load ~12): state (params + Adam) 93.0 / 35.1 / 22.1 MB; step device memory 509 / 389 / 391 MB (8 x 256
  tokens: activations dominate). Weight-dominated, `--batch 1 --seq 64 --remat full --scan --logits-chunk 32`:
  step device memory 216 / 42 / 29 MB (QLoRA 14% of full).
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.config import DpoConfig, MeshConfig, ModelConfig, OptimConfig
from jaxalign.models.transformer import flops_per_token, init_model, num_params
from jaxalign.parallel.mesh import Rules, make_mesh
from jaxalign.stages import dpo, pretrain, reward, sft
from jaxalign.stages.model_init import init_params
from jaxalign.train import perf
from jaxalign.train import state as state_lib


def lm_batch(rng, B, T, vocab, completion_from=0):
    weights = np.ones((B, T), np.float32)
    weights[:, :completion_from] = 0.0
    return {
        "inputs": rng.integers(0, vocab, (B, T), dtype=np.int32),
        "targets": rng.integers(0, vocab, (B, T), dtype=np.int32),
        "segment_ids": np.ones((B, T), np.int32),
        "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
        "weights": weights,
    }


def pair_batch(rng, B, prompt, completion, vocab):
    T = prompt + completion
    out = {}
    for side in ("chosen", "rejected"):
        out.update({f"{side}_{k}": v for k, v in lm_batch(rng, B, T, vocab, completion_from=prompt).items()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", default="pretrain", choices=["pretrain", "sft", "reward", "dpo"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens of a pair (reward, dpo)")
    parser.add_argument("--remat", default="none")
    parser.add_argument("--scan", action="store_true")
    parser.add_argument("--attention", default="xla")
    parser.add_argument("--logits-chunk", type=int, default=0)
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary size (128256: Llama 3's)")
    parser.add_argument("--reference", default="live", choices=["live", "precomputed"])
    parser.add_argument("--lora-rank", type=int, default=0, help="0: full fine-tuning")
    parser.add_argument("--quantize", default="none", choices=["none", "nf4"])
    args = parser.parse_args()

    cfg = ModelConfig(
        vocab_size=args.vocab,
        d_model=256,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        head_dim=64,
        d_ff=1024,
        max_seq_len=2048,
        remat=args.remat,
        scan_layers=args.scan,
        attention=args.attention,
    )
    mesh_cfg = MeshConfig(data=1, fsdp=1, tensor=1, stage=1)
    rules = Rules(make_mesh(mesh_cfg, jax.devices()[:1]), mesh_cfg.rules)
    optim_cfg = OptimConfig(lr=1e-3, warmup_steps=10)
    matmul_flops = perf.measure_matmul_flops(2048, repeats=5)

    rng = np.random.default_rng(0)
    B, T = args.batch, args.seq
    frozen = ()
    if args.stage in ("pretrain", "sft"):
        graphdef, params = init_model(cfg, rules, seed=0)
        batch = lm_batch(rng, B, T, cfg.vocab_size, completion_from=T // 4 if args.stage == "sft" else 0)
        tokens = B * T
        if args.stage == "pretrain":
            step_fn = functools.partial(
                pretrain.train_step,
                optim=optim_cfg,
                z_loss=0.0,
                microbatches=1,
                logits_chunk=args.logits_chunk,
            )
        else:
            step_fn = functools.partial(
                sft.train_step, optim=optim_cfg, microbatches=1, logits_chunk=args.logits_chunk
            )
        fpt = flops_per_token(cfg, T)
    else:
        from jaxalign.config import Config

        config = Config(workdir="/tmp/unused", model=cfg)
        graphdef, params = init_params(config, rules, scalar=args.stage == "reward")
        batch = pair_batch(rng, B, args.prompt, T - args.prompt, cfg.vocab_size)
        tokens = 2 * B * T
        fpt = flops_per_token(cfg, T)
        if args.stage == "reward":
            step_fn = functools.partial(reward.train_step, optim=optim_cfg, center_coef=0.0, microbatches=1)
        else:
            dcfg = DpoConfig(reference=args.reference)
            step_fn = functools.partial(
                dpo.train_step, cfg=dcfg, optim=optim_cfg, microbatches=1, logits_chunk=args.logits_chunk
            )
            if args.reference == "live":
                frozen = (jax.tree.map(jnp.copy, params),)
                fpt = fpt * 4 / 3  # the reference's forward pass
            else:
                batch["ref_chosen_logps"] = rng.normal(-300, 10, B).astype(np.float32)
                batch["ref_rejected_logps"] = rng.normal(-300, 10, B).astype(np.float32)
    n_params = num_params(params)
    if args.lora_rank:
        from jaxalign.config import LoraConfig
        from jaxalign.peft import lora
        from jaxalign.stages.model_init import BaseReference

        lora_cfg = LoraConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank, quantize=args.quantize)
        graphdef, params = lora.attach(graphdef, params, lora_cfg, rules, seed=0)
        if frozen:
            frozen = (BaseReference(),)  # the base with adapters off: no second copy
    trainable = lora.split_trainable(params)[0] if args.lora_rank else params
    state, shardings = state_lib.create_sharded(graphdef, params, optim_cfg, 1000, 0, rules)
    batch_sharding = {
        k: rules.sharding(("batch", "length") if v.ndim == 2 else ("batch",)) for k, v in batch.items()
    }
    step = jax.jit(
        step_fn,
        in_shardings=(shardings, batch_sharding)
        + ((frozen[0] if args.lora_rank else shardings.params,) if frozen else ()),
        out_shardings=(shardings, None),
        donate_argnums=(0,),
    )
    batch = jax.device_put(batch, batch_sharding)

    start = time.perf_counter()
    compiled = step.lower(state, batch, *frozen).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    step_memory_mb = (
        (
            mem.argument_size_in_bytes
            + mem.output_size_in_bytes
            - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes
        )
        / 2**20
        if mem is not None
        else float("nan")
    )
    state, metrics = compiled(state, batch, *frozen)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch, *frozen)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)

    step_s = float(np.median(times))
    tokens_per_s = tokens / step_s
    mfu = tokens_per_s * fpt / matmul_flops
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    state_mb = sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state))) / 2**20

    rows = [
        ("parameters", f"{n_params / 1e6:.2f} M"),
        ("trained parameters", f"{num_params(trainable) / 1e6:.3f} M"),
        ("state bytes (params + optimizer)", f"{state_mb:,.1f} MB"),
        ("tokens per step", f"{tokens}"),
        ("FLOPs per step", f"{fpt * tokens / 1e9:.1f} GFLOP"),
        ("f32 matmul peak (2048^3)", f"{matmul_flops / 1e9:.1f} GFLOP/s"),
        ("compile", f"{compile_s:.2f} s"),
        (f"step (median of {args.steps})", f"{step_s * 1e3:.0f} ms"),
        ("ideal step at matmul peak", f"{fpt * tokens / matmul_flops * 1e3:.0f} ms"),
        ("tokens/s", f"{tokens_per_s:,.0f}"),
        ("MFU vs measured peak", f"{mfu:.3f}"),
        ("step device memory", f"{step_memory_mb:,.0f} MB"),
        ("peak RSS", f"{peak_rss_mb:,.0f} MB"),
        ("loss after steps", f"{float(metrics['loss']):.4f}"),
    ]
    width = max(len(r[0]) for r in rows)
    extra = f", reference={args.reference}" if args.stage == "dpo" else ""
    extra += f", lora_rank={args.lora_rank}, quantize={args.quantize}" if args.lora_rank else ""
    print(
        f"{args.stage} on the reference workload on {jax.devices()[0].device_kind} "
        f"(remat={args.remat}, scan={args.scan}{extra})"
    )
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print(
        json.dumps(
            {
                "workload": "reference",
                "stage": args.stage,
                "tokens_per_s": round(tokens_per_s, 1),
                "mfu": round(mfu, 4),
                "matmul_gflops": round(matmul_flops / 1e9, 1),
                "step_s": round(step_s, 4),
                "compile_s": round(compile_s, 2),
                "step_memory_mb": round(step_memory_mb, 1),
                "peak_rss_mb": round(peak_rss_mb, 1),
                "state_mb": round(state_mb, 2),
                "lora_rank": args.lora_rank,
                "quantize": args.quantize if args.lora_rank else "none",
            }
        )
    )


if __name__ == "__main__":
    main()
