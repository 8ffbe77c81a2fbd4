"""Shared test helpers: tiny configs derived from the real defaults, and random LM batches."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jaxalign.config import MeshConfig, ModelConfig
from jaxalign.parallel.mesh import Rules, make_mesh

# Every dimension divides 8 devices, so any test mesh shards every axis.
TINY = ModelConfig(
    vocab_size=256, d_model=64, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=8, d_ff=128, max_seq_len=128
)


def tiny(**overrides) -> ModelConfig:
    return dataclasses.replace(TINY, **overrides)


def rules_for(devices: int | None = None, **mesh) -> Rules:
    """Rules over a mesh of the first `devices` devices (all by default) with the given axis sizes."""
    cfg = MeshConfig(**{"fsdp": -1, **mesh})
    devs = jax.devices()[: devices or jax.device_count()]
    return Rules(make_mesh(cfg, devs), cfg.rules)


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
