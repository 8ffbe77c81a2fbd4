"""Grain input pipelines, one per kind of stage, and the checkpointable `Loader` that feeds the training loop.

LM batches (all int32 `[B, T]` except `weights`, float32):
  inputs, targets     next-token pairs; a target never crosses a document boundary
  segment_ids         1, 2, ... per packed document, 0 on padding
  positions           position within the document (RoPE restarts per document)
  weights             1.0 where the target is trained on, else 0.0

Each JAX process reads its own slice of the records (`[process_index::process_count]`) and yields its share of the
global batch. The `Loader` records what determines the data order (seed, batch, shard layout, workers) with its
state; restoring under a different layout is an error, never silently different data.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import grain
import jax
import numpy as np

from jaxalign.data.sources import JsonlSource, require_fields
from jaxalign.data.tokenizer import Tokenizer
from jaxalign.errors import CheckpointError


@dataclasses.dataclass(frozen=True)
class Layout:
    """Everything that determines which records land in which batch, in which order."""

    files: tuple[str, ...]
    seed: int
    global_batch_size: int
    seq_len: int
    process_count: int
    num_workers: int
    shuffle: bool


class Loader:
    """An iterator of host batches (dicts of numpy arrays) whose state can be saved and restored.

    Implements the `get_state() -> bytes` / `set_state(bytes)` protocol of Grain's Orbax checkpoint handler, so each
    process writes its own iterator state.
    """

    def __init__(self, dataset: grain.IterDataset, layout: Layout):
        self.layout = layout
        self._iterator = iter(dataset)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def get_state(self) -> bytes:
        state = {"iterator": self._iterator.get_state(), "layout": dataclasses.asdict(self.layout)}
        return json.dumps(state, sort_keys=True).encode()

    def set_state(self, state: bytes) -> None:
        state = json.loads(state)
        saved = state["layout"]
        current = json.loads(json.dumps(dataclasses.asdict(self.layout)))
        diffs = [f"{k}: checkpoint has {saved.get(k)!r}, this run has {v!r}" for k, v in current.items() if saved.get(k) != v]
        if diffs:
            raise CheckpointError("the data pipeline differs from the checkpoint's: " + "; ".join(diffs))
        self._iterator.set_state(state["iterator"])

    def start_prefetch(self) -> None:
        """Called by Grain's checkpoint handler after a restore; batches are produced on demand."""


class _Chunk(grain.experimental.FlatMapTransform):
    """Tokenizes a document as [bos, ..., eos] and cuts it into next-token chunks of at most `seq_len` targets."""

    def __init__(self, tokenizer: Tokenizer, seq_len: int, text_field: str, max_chunks: int):
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.text_field = text_field
        self.max_fan_out = max_chunks

    def flat_map(self, record: dict[str, Any]) -> list[dict[str, np.ndarray]]:
        require_fields(record, [self.text_field])
        ids = np.asarray(
            [self.tokenizer.bos_id, *self.tokenizer.encode(record[self.text_field]), self.tokenizer.eos_id], np.int32
        )
        # A chunk of seq_len targets needs seq_len + 1 tokens; consecutive chunks overlap by one token so that every
        # next-token pair of the document is trained on exactly once.
        starts = range(0, min(len(ids) - 1, self.seq_len * self.max_fan_out), self.seq_len)
        pieces = [ids[s : s + self.seq_len + 1] for s in starts]
        return [{"inputs": p[:-1], "targets": p[1:]} for p in pieces]


def _lm_batch(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        "inputs": packed["inputs"].astype(np.int32),
        "targets": packed["targets"].astype(np.int32),
        "segment_ids": packed["inputs_segment_ids"].astype(np.int32),
        "positions": packed["inputs_positions"].astype(np.int32),
        "weights": (packed["targets_segment_ids"] > 0).astype(np.float32),
    }


def lm_loader(
    pattern: str,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_workers: int = 0,
    on_error: str = "error",
    text_field: str = "text",
    num_epochs: int | None = None,
    max_chunks_per_doc: int = 64,
) -> Loader:
    """Tokenized, packed LM batches of this process's share of `global_batch_size` rows of `seq_len` tokens."""
    process_count, process_index = jax.process_count(), jax.process_index()
    if global_batch_size % process_count:
        raise CheckpointError(f"batch size {global_batch_size} is not divisible by {process_count} processes")
    source = JsonlSource(pattern, on_error=on_error)
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    ds = ds[process_index::process_count]
    ds = ds.filter(lambda r: r is not None)
    it = grain.experimental.FlatMapIterDataset(
        ds.to_iter_dataset(), _Chunk(tokenizer, seq_len, text_field, max_chunks_per_doc)
    )
    batch_size = global_batch_size // process_count
    it = grain.experimental.FirstFitPackIterDataset(
        it,
        length_struct={"inputs": seq_len, "targets": seq_len},
        num_packing_bins=batch_size,
        seed=seed,
        shuffle_bins=shuffle,
    )
    it = it.batch(batch_size, drop_remainder=True).map(_lm_batch)
    if num_workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    layout = Layout(
        files=tuple(source.files),
        seed=seed,
        global_batch_size=global_batch_size,
        seq_len=seq_len,
        process_count=process_count,
        num_workers=num_workers,
        shuffle=shuffle,
    )
    return Loader(it, layout)
