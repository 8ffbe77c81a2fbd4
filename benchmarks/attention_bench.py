"""Attention throughput: the Pallas flash kernel vs `xla_attention` vs `jax.nn.dot_product_attention`.

    python benchmarks/attention_bench.py            # GPU/TPU: a few minutes; CPU: ~20 s, correctness only
    python benchmarks/attention_bench.py --seq 2048,8192 --batch_tokens 16384 --heads 32 --kv_heads 8

Causal self-attention in bf16, layouts `q_BxTxHxD`, `k/v_BxSxKxD`. FLOPs follow the FlashAttention-2 convention:
forward 4*B*H*T*S*D (two matmuls), halved for causal; backward 2.5x the forward (recomputing the scores is not
counted). The backward is timed alone, from saved residuals. Without an accelerator the Pallas kernel only runs
in interpret mode, whose speed means nothing: the script then times one small shape to check that the
interpreted kernel agrees with the XLA reference, and still prints the table.
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.kernels.flash_attention import flash_attention
from jaxalign.models.attention import xla_attention


def implementations(block_q: int, block_k: int) -> dict:
    return {
        "flash (pallas)": functools.partial(flash_attention, causal=True, block_q=block_q, block_k=block_k),
        "xla_attention": functools.partial(xla_attention, causal=True),
        "jax.nn.dot_product_attention": functools.partial(jax.nn.dot_product_attention, is_causal=True),
    }


def best_seconds(fn, *args, iters: int) -> float:
    """Best wall time of `iters` calls after one warm-up (which also compiles)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def measure(attn, q, k, v, iters: int) -> dict:
    """Forward and backward-only times (s) and outputs/gradients for the correctness check."""
    fwd = jax.jit(attn)
    o, vjp_fn = jax.vjp(attn, q, k, v)
    do = jnp.asarray(np.random.default_rng(1).standard_normal(o.shape, dtype=np.float32), o.dtype)
    bwd = jax.jit(lambda vjp_fn, do: vjp_fn(do))  # vjp_fn is a pytree: residuals are inputs, not recomputed
    return {
        "fwd_s": best_seconds(fwd, q, k, v, iters=iters),
        "bwd_s": best_seconds(bwd, vjp_fn, do, iters=iters),
        "values": (fwd(q, k, v), *bwd(vjp_fn, do)),
    }


def run_shape(B, T, H, K, D, impls, iters, dtype) -> list[dict]:
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, dtype=np.float32), dtype)
    q, k, v = normal(B, T, H, D), normal(B, T, K, D), normal(B, T, K, D)
    fwd_flops = 4 * B * H * T * T * D / 2  # causal: half the score matrix
    rows, reference = [], None
    for name, attn in impls.items():
        row = {"impl": name, "B": B, "T": T, "H": H, "K": K, "D": D}
        try:
            m = measure(attn, q, k, v, iters)
        except Exception as e:  # e.g. out of memory for the materialised T x T scores
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
            rows.append(row)
            continue
        if reference is None and name == "xla_attention":
            reference = m["values"]
        row.update(
            fwd_ms=1e3 * m["fwd_s"],
            bwd_ms=1e3 * m["bwd_s"],
            fwd_tflops=fwd_flops / m["fwd_s"] / 1e12,
            bwd_tflops=2.5 * fwd_flops / m["bwd_s"] / 1e12,
        )
        row["_values"] = m["values"]
        rows.append(row)
    for row in rows:  # max |difference| to xla_attention over o, dq, dk, dv
        values = row.pop("_values", None)
        if values is not None and reference is not None:
            row["max_abs_err_vs_xla"] = max(
                float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                for a, b in zip(values, reference, strict=True)
            )
    return rows


def print_table(rows: list[dict]) -> None:
    header = f"{'impl':30} {'B':>3} {'T':>6} {'H':>3} {'K':>3} {'D':>4} {'fwd ms':>9} {'fwd TF/s':>9} "
    header += f"{'bwd ms':>9} {'bwd TF/s':>9} {'max|err|':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        shape = f"{r['impl']:30} {r['B']:>3} {r['T']:>6} {r['H']:>3} {r['K']:>3} {r['D']:>4} "
        if "error" in r:
            print(shape + r["error"])
            continue
        err = r.get("max_abs_err_vs_xla", float("nan"))
        print(
            shape
            + f"{r['fwd_ms']:9.3f} {r['fwd_tflops']:9.4f} {r['bwd_ms']:9.3f} {r['bwd_tflops']:9.4f} {err:9.2e}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq", default="1024,2048,4096,8192", help="comma-separated sequence lengths")
    parser.add_argument("--batch_tokens", type=int, default=16384, help="B = batch_tokens // T (at least 1)")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv_heads", type=int, default=8)
    parser.add_argument("--head_dim", type=int, default=128)
    parser.add_argument("--block_q", type=int, default=128)
    parser.add_argument("--block_k", type=int, default=128)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()

    backend = jax.default_backend()
    accelerator = backend != "cpu"
    impls = implementations(args.block_q, args.block_k)
    print(f"backend: {backend}, devices: {jax.devices()[0].device_kind} x {jax.device_count()}")
    if accelerator:
        shapes = [
            (max(1, args.batch_tokens // T), T, args.heads, args.kv_heads, args.head_dim)
            for T in map(int, args.seq.split(","))
        ]
        dtype, iters = jnp.bfloat16, args.iters
    else:
        print(
            "no accelerator present: the Pallas kernel runs in interpret mode, so the times below check "
            "correctness at one small shape and say nothing about kernel speed."
        )
        impls["flash (pallas)"] = functools.partial(flash_attention, causal=True, block_q=32, block_k=32)
        shapes, dtype, iters = [(1, 128, 4, 2, 32)], jnp.float32, 2
    rows = [row for shape in shapes for row in run_shape(*shape, impls, iters, dtype)]
    print_table(rows)
    print(
        json.dumps(
            {"backend": backend, "accelerator": accelerator, "dtype": jnp.dtype(dtype).name, "results": rows}
        )
    )


if __name__ == "__main__":
    main()
