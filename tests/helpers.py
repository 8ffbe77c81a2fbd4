"""Shared test helpers: tiny configs derived from the real defaults, and random LM batches."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign.config import MeshConfig, ModelConfig
from jaxalign.models.transformer import Transformer, param_shardings
from jaxalign.parallel.mesh import PipelineSchedule, Rules, make_mesh

# Every dimension divides 8 devices, so any test mesh shards every axis.
TINY = ModelConfig(
    vocab_size=256, d_model=64, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=8, d_ff=128, max_seq_len=128
)


def tiny(**overrides) -> ModelConfig:
    return dataclasses.replace(TINY, **overrides)


def rules_for(devices: int | None = None, schedule: str = "gpipe", **mesh) -> Rules:
    """Rules over a mesh of the first `devices` devices (all by default) with the given axis sizes (and, with a
    `stage` axis, the pipeline `schedule` at its default microbatches)."""
    cfg = MeshConfig(**{"fsdp": -1, **mesh})
    devs = jax.devices()[: devices or jax.device_count()]
    return Rules(make_mesh(cfg, devs), cfg.rules, PipelineSchedule(schedule))


def lm_batch(rng: np.random.Generator, batch: int, length: int, vocab: int, packed: bool = True) -> dict:
    """A random LM batch; with `packed`, each row holds 2-3 documents and some padding at the end."""
    inputs = rng.integers(4, vocab, size=(batch, length)).astype(np.int32)
    targets = rng.integers(4, vocab, size=(batch, length)).astype(np.int32)
    segment_ids = np.ones((batch, length), np.int32)
    positions = np.tile(np.arange(length, dtype=np.int32), (batch, 1))
    if packed:
        for b in range(batch):
            a, c = sorted(rng.choice(np.arange(2, length - 2), size=2, replace=False))
            pad = int(rng.integers(0, 3))
            segment_ids[b, a:] = 2
            segment_ids[b, c:] = 3
            positions[b, a:] = np.arange(length - a)
            positions[b, c:] = np.arange(length - c)
            if pad:
                segment_ids[b, -pad:] = 0
                positions[b, -pad:] = 0
    weights = (segment_ids > 0).astype(np.float32)
    return dict(inputs=inputs, targets=targets, segment_ids=segment_ids, positions=positions, weights=weights)


def random_model(seed: int = 0, rules: Rules | None = None, **overrides) -> tuple[nnx.GraphDef, nnx.State]:
    """A tiny model (vocab 128, d_model 32, head_dim 8 unless overridden) with every parameter drawn at random in
    numpy, norm scales around 1 and biases non-zero (no compiled init: seconds faster on a loaded CPU). With
    `rules`, the parameters are placed in their shardings."""
    cfg = tiny(**{"vocab_size": 128, "d_model": 32, "head_dim": 8, **overrides})
    graphdef, abstract = jax.eval_shape(lambda: nnx.split(Transformer(cfg, nnx.Rngs(seed), rules)))
    rng = np.random.default_rng(seed)
    flat = [
        (path, var.replace((path[-1] == "scale") + 0.2 * rng.standard_normal(var.shape).astype(np.float32)))
        for path, var in nnx.to_flat_state(abstract)
    ]
    params = nnx.from_flat_state(flat)
    if rules is not None:
        return graphdef, jax.device_put(params, param_shardings(abstract, rules))
    return graphdef, jax.tree.map(jnp.asarray, params)
