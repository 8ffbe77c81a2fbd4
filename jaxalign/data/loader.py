"""The machinery under every input pipeline: record streams, worker processes, packing and the checkpointable
`Loader` that feeds the training loop (the per-stage encoders and batch formats are in `jaxalign.data.pipelines`:
LM, SFT, and `jaxalign.data.prompt_pipelines`: preference, KTO, RL prompts).

The records (after a global shuffle that changes every epoch) are dealt into `shards` streams (`[shard::shards]`,
default one per process); each stream is packed into its rows of every global batch and each process runs its
contiguous range of streams, so a fixed `shards` gives the same global batches on any number of processes. With
`shard_by="file"` each shard is instead a span of the input's bytes (`jaxalign.data.file_shards`), shuffled within
itself every epoch, so a process opens and indexes only its shards' files or byte ranges (infinite epochs only).
With infinite epochs (the default, for training) every process yields batches forever. A finite number of epochs
is first trimmed to a multiple of the process count, so the unpacked loaders (preference, RL) yield equal batch
counts on every process; packed loaders may differ by a batch or two at the end of a finite input, so iterate those
a fixed number of batches (as evaluation does). At the end of a finite input the last packed batch is padded (rows
of segment id 0, weight 0) and a last partial unpacked batch is dropped.

A source is a glob of files, or a seqio Task or Mixture (`seqio:<name>`, `jaxalign.data.seqio_source`: shuffled,
repeated and dealt into the same shards by seqio, its position the count of records read); `jaxalign.data.mixture`
mixes several sources by weight.

Execution, per process:
  records --shuffle, repeat, shard--> chunks of 16 records --read, parse, tokenize (num_workers processes)-->
  examples --raise or count bad records (here)--> pack or batch (here) --background thread--> Loader
The tokenizing map is 1:1 over chunks, which `mp_prefetch` deals out to the workers and interleaves back in order,
so N workers yield the same batches as none. Packing is first fit over the B rows of a batch; the first example that
fits no row opens the next batch.

A bad record raises a `DataError` naming file:line, here in the main process; with `on_error="skip"` it is dropped and
counted in `Loader.counts["skipped"]`. Over-long examples are cut (`overlong="truncate"`, counted in
`counts["truncated"]`) or rejected as bad records (`overlong="reject"`).

The `Loader` records what determines the data order (its `Layout`: files, seed, batch, shard layout, workers) with its
state; restoring under a different layout is a `CheckpointError` naming the field, never silently different data.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any

import grain
import jax
import numpy as np
from absl import flags, logging

from jaxalign.data import chat, file_shards, seqio_source
from jaxalign.data.mixture import Mixture
from jaxalign.data.sources import Source, expand_glob, open_source
from jaxalign.errors import CheckpointError, ConfigError, DataError

_MAX_LOGGED_SKIPS = 10
_PREFETCH = 2  # batches prepared ahead of the training step
_RECORDS_PER_CHUNK = 16


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
    kind: str = "lm"
    process_index: int = 0
    packing: bool = True
    # Independent record streams the global batch is made of (see `assemble`).
    shards: int = 1
    # Further sources mixed in by example count: ((files, weight), ...) (see `assemble`'s `mixture`).
    mixture: tuple = ()
    # "record": one global shuffle dealt into the shards; "file": each shard its own span of the files.
    shard_by: str = "record"


class Loader:
    """An iterator of host batches (dicts of numpy arrays) whose state can be saved and restored.

    Implements the `get_state() -> bytes` / `set_state(bytes)` protocol of Grain's Orbax checkpoint handler, so each
    process writes its own iterator state. `counts` holds this process's "examples", "skipped" and "truncated"
    counts since the loader was built (including the few batches prepared ahead).
    """

    def __init__(self, dataset: grain.IterDataset, layout: Layout, counts: collections.Counter | None = None):
        self.layout = layout
        self.counts = counts if counts is not None else collections.Counter()
        # A background thread prepares the next batches while the training step runs (the state stays exact: it is
        # the state after the last batch returned here).
        self._iterator = iter(
            grain.experimental.ThreadPrefetchIterDataset(dataset, prefetch_buffer_size=_PREFETCH)
        )

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        return next(self._iterator)

    def get_state(self) -> bytes:
        state = {"iterator": self._iterator.get_state(), "layout": dataclasses.asdict(self.layout)}
        return json.dumps(state, sort_keys=True).encode()

    def set_state(self, state: bytes) -> None:
        state = json.loads(state)
        saved = state["layout"]
        current = json.loads(json.dumps(dataclasses.asdict(self.layout)))
        # A field newer than the checkpoint compares as its default.
        defaults = json.loads(
            json.dumps(
                dataclasses.asdict(
                    Layout(
                        files=(),
                        seed=0,
                        global_batch_size=1,
                        seq_len=1,
                        process_count=1,
                        num_workers=0,
                        shuffle=False,
                    )
                )
            )
        )
        saved = {**{k: v for k, v in defaults.items() if k not in ("files", "seed")}, **saved}
        diffs = [
            f"{k}: checkpoint has {saved.get(k)!r}, this run has {v!r}"
            for k, v in current.items()
            if saved.get(k) != v
        ]
        if diffs:
            raise CheckpointError("the data pipeline differs from the checkpoint's: " + "; ".join(diffs))
        self._iterator.set_state(state["iterator"])

    def start_prefetch(self) -> None:
        """Called by Grain's checkpoint handler after a restore: starts preparing batches."""
        self._iterator.start_prefetch()

    def close(self) -> None:
        """Stops the background thread and worker processes (also done at garbage collection)."""
        self._iterator.close()


# --- the shared machinery ------------------------------------------------------------------------------------------


class _Guarded:
    """A source whose bad records read as `{"_error": message}` instead of raising (so errors cross processes)."""

    def __init__(self, source: Source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            return self.source.read(index)
        except DataError as e:
            return {"_error": str(e)}


class _Encode:
    """The map over chunks of records: each record -> {"examples": [...], "truncated": n} or
    {"_error": "file:line: ..."} (errors travel as values, so they cross worker processes intact)."""

    def __init__(self, encode: Callable[[dict[str, Any], str], tuple[list[dict], int]]):
        self.encode = encode

    def __call__(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [self._one(r) for r in records]

    def _one(self, record: dict[str, Any]) -> dict[str, Any]:
        if "_error" in record:
            return record
        where = record.get("_where", "?")
        try:
            examples, truncated = self.encode(record, where)
        except DataError as e:
            message = str(e)
            return {"_error": message if message.startswith(where) else f"{where}: {message}"}
        return {"examples": examples, "truncated": truncated}


class _Tally(grain.experimental.FlatMapTransform):
    """Main process: raises or counts errors, counts truncations, and emits the examples of a chunk in order."""

    max_fan_out = 1 << 20

    def __init__(self, on_error: str, counts: collections.Counter):
        self.on_error = on_error
        self.counts = counts

    def flat_map(self, chunk: list[dict[str, Any]]) -> list[dict[str, Any]]:
        examples = []
        for encoded in chunk:
            if "_error" in encoded:
                if self.on_error != "skip":
                    raise DataError(encoded["_error"])
                self.counts["skipped"] += 1
                if self.counts["skipped"] <= _MAX_LOGGED_SKIPS:
                    logging.warning("skipping a bad record: %s", encoded["_error"])
                continue
            self.counts["truncated"] += encoded["truncated"]
            self.counts["examples"] += len(encoded["examples"])
            examples.extend(encoded["examples"])
        return examples


def _check_common(
    global_batch_size: int, process_count: int, on_error: str, overlong: str, num_workers: int
) -> int:
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ConfigError(
            f"train.batch_size={global_batch_size} must be a positive multiple of the {process_count} processes"
        )
    if on_error not in ("error", "skip"):
        raise ConfigError(f"data.on_error={on_error!r} is not one of ['error', 'skip']")
    if overlong not in ("truncate", "reject"):
        raise ConfigError(f"data.overlong={overlong!r} is not one of ['truncate', 'reject']")
    if num_workers < 0:
        raise ConfigError(f"data.num_workers={num_workers} must be >= 0")
    return global_batch_size // process_count


def assemble(
    pattern: str | Mixture,
    encode: Callable[[dict[str, Any], str], tuple[list[dict], int]],
    batch: Callable[[grain.IterDataset, int], grain.IterDataset],
    *,
    kind: str,
    seq_len: int,
    packing: bool,
    global_batch_size: int,
    seed: int,
    shuffle: bool,
    num_workers: int,
    on_error: str,
    overlong: str,
    num_epochs: int | None,
    process_index: int | None,
    process_count: int | None,
    shards: int = 0,
    mixture: Sequence[tuple[str, Callable[[dict[str, Any], str], tuple[list[dict], int]], float]] = (),
    shard_by: str = "record",
) -> Loader:
    """The shared pipeline: shuffle, repeat, shard, encode (in workers), tally, then `batch(examples, rows)`.

    `pattern` is a glob, or a `Mixture` of globs (`data.mixture`) all encoded by `encode` with their weights.
    `mixture` adds sources `(pattern, encode, weight)` whose examples are mixed with the main source's before
    batching (Grain's deterministic mixture by example count; the main source, or the `Mixture`'s sources in their
    proportions, keep 1 - sum of the weights). Every source is shuffled, repeated and dealt into the same shards on
    its own, so a mixture is as checkpointable and process-count independent as one source.

    `shard_by="record"` shuffles each source's records globally (every process indexes every file) and deals them
    round-robin into the shards; `shard_by="file"` gives each shard its own span of each source's files
    (`jaxalign.data.file_shards`), shuffled within the shard, so a process opens and indexes only its shards' spans.
    Shards then hold different record counts, which no process knows for the others' shards, so finite epochs are
    refused there (training is infinite; evaluation loaders shard by record)."""
    process_index, process_count = _processes(process_index, process_count)
    rows = _check_common(global_batch_size, process_count, on_error, overlong, num_workers)
    shards = shards or process_count
    if shards % process_count or global_batch_size % shards:
        raise ConfigError(
            f"data.shards={shards} must be a multiple of the {process_count} processes and divide "
            f"train.batch_size={global_batch_size}"
        )
    weights = [w for _, _, w in mixture]
    if mixture and (min(weights) <= 0 or sum(weights) >= 1):
        raise ConfigError(
            f"mixture weights {weights} must be > 0 and sum to less than 1 (the main source's share)"
        )
    main = pattern.parts if isinstance(pattern, Mixture) else ((pattern, 1.0),)
    if (mixture or len(main) > 1) and num_epochs is not None:
        raise ConfigError("a mixture of sources needs infinite epochs (num_epochs=None)")
    if shard_by not in ("record", "file"):
        raise ConfigError(f"data.shard_by={shard_by!r} is not one of ['record', 'file']")
    if shard_by == "file" and num_epochs is not None:
        raise ConfigError(
            f"data.shard_by='file' needs infinite epochs (num_epochs=None, got {num_epochs}): its shards hold "
            "different record counts, so processes would run out at different steps; use data.shard_by='record'"
        )
    main_share = 1.0 - sum(weights)
    main_total = sum(w for _, w in main)
    patterns = [p for p, _ in main] + [p for p, _, _ in mixture]
    if shard_by == "file":  # no file is opened here: each shard opens its own spans below
        sources = [
            _open(p, on_error) if seqio_source.is_seqio(p) else _FileShards(p, shards) for p in patterns
        ]
    else:
        sources = [_open(p, on_error) for p in patterns]
    if num_workers and any(isinstance(s, seqio_source.SeqioInput) for s in sources):
        raise ConfigError(
            f"data.num_workers={num_workers} must be 0 with a seqio input (tf.data has its own threads)"
        )
    encoders = [encode] * len(main) + [e for _, e, _ in mixture]
    proportions = [main_share * w / main_total for _, w in main] + weights
    datasets = []
    for i, source in enumerate(sources):
        if isinstance(source, seqio_source.SeqioInput | _FileShards):
            datasets.append(source)  # shuffled, repeated and sharded per shard (`_shard`)
            continue
        ds = grain.MapDataset.source(_Guarded(source))
        if shuffle:
            ds = ds.shuffle(seed=seed + i)  # a new permutation every epoch
        ds = ds.repeat(num_epochs)
        if num_epochs is not None:
            ds = ds[: len(ds) // shards * shards]
        datasets.append(ds)
    counts = collections.Counter()
    # The records are split into `shards` streams, each packed into global_batch_size / shards rows of every batch;
    # this process runs its contiguous range of streams. A fixed `shards` gives the same global batches whatever the
    # number of processes.
    per_process = shards // process_count
    streams = []
    for shard in range(process_index * per_process, (process_index + 1) * per_process):
        parts = [
            _examples(
                _shard(ds, shard, shards, seed + i, shuffle, num_epochs, on_error),
                enc,
                num_workers,
                on_error,
                counts,
            )
            for i, (ds, enc) in enumerate(zip(datasets, encoders, strict=True))
        ]
        examples = parts[0] if len(parts) == 1 else grain.IterDataset.mix(parts, proportions)
        streams.append(batch(examples, rows // per_process))
    source = sources[0]
    it = streams[0] if len(streams) == 1 else grain.experimental.ZipIterDataset(streams).map(_concat_rows)
    layout = Layout(
        files=tuple(source.files),
        seed=seed,
        global_batch_size=global_batch_size,
        seq_len=seq_len,
        process_count=process_count,
        num_workers=num_workers,
        shuffle=shuffle,
        kind=kind,
        process_index=process_index,
        packing=packing,
        shards=shards,
        mixture=tuple((tuple(src.files), w) for src, w in zip(sources[1:], proportions[1:], strict=True)),
        shard_by=shard_by,
    )
    return Loader(it, layout, counts)


def _open(pattern: str, on_error: str) -> Source | seqio_source.SeqioInput:
    return (
        seqio_source.open_seqio(pattern) if seqio_source.is_seqio(pattern) else open_source(pattern, on_error)
    )


class _FileShards:
    """A source glob under `shard_by="file"`: its files and their split into shards (sizes only, nothing opened)."""

    def __init__(self, pattern: str, shards: int):
        self.pattern = pattern
        self.files = expand_glob(pattern)
        self.spans = file_shards.plan(self.files, shards, repr(pattern))

    def open(self, shard: int, on_error: str) -> grain.MapDataset:
        source = file_shards.open_spans(self.spans[shard], on_error)
        if not len(source):  # bytes but no line start in them (inside one long line) or only blank lines
            where = ", ".join(f"{s.file} bytes [{s.start}, {s.end})" for s in self.spans[shard])
            raise DataError(
                f"data.shard_by='file': shard {shard} of data.shards={len(self.spans)} of {self.pattern!r} holds "
                f"no record ({where}); use fewer shards or data.shard_by='record'"
            )
        return grain.MapDataset.source(_Guarded(source))


def _shard(
    ds: grain.MapDataset | seqio_source.SeqioInput | _FileShards,
    shard: int,
    shards: int,
    seed: int,
    shuffle: bool,
    num_epochs: int | None,
    on_error: str,
) -> grain.MapDataset | grain.IterDataset:
    """Shard `shard` of `shards` of a source's records: dealt round-robin, a seqio input's own shard, or the records
    of the shard's own file spans, shuffled (anew every epoch) by a seed of (seed, shard) and repeated forever."""
    if isinstance(ds, seqio_source.SeqioInput):
        return ds.stream(shard, shards, seed=seed, shuffle=shuffle, num_epochs=num_epochs)
    if isinstance(ds, _FileShards):
        records = ds.open(shard, on_error)
        if shuffle:
            records = records.shuffle(seed=int(np.random.SeedSequence([seed, shard]).generate_state(1)[0]))
        return records.repeat(num_epochs)
    return ds[shard::shards]


def _concat_rows(parts: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    """One batch from the batches of several streams: their rows, in stream order."""
    out = {}
    for key, first in parts[0].items():
        values = [p[key] for p in parts]
        out[key] = (
            np.concatenate(values) if isinstance(first, np.ndarray) else [v for vs in values for v in vs]
        )
    return out


def _examples(
    ds: grain.MapDataset | grain.IterDataset,
    encode: Callable[[dict[str, Any], str], tuple[list[dict], int]],
    num_workers: int,
    on_error: str,
    counts: collections.Counter,
) -> grain.IterDataset:
    """One shard's records -> encoded examples (in worker processes when asked)."""
    # Records travel in chunks: per-element costs (Grain's bookkeeping, inter-process queues) are paid per chunk.
    ds = ds.batch(_RECORDS_PER_CHUNK, batch_fn=list)
    # No reader threads: tokenizing holds the GIL, so threads only add contention (3-4x slower on 2 cores);
    # worker processes are the way to parallelise.
    it = ds.map(_Encode(encode))
    if isinstance(it, grain.MapDataset):
        it = it.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    if num_workers > 0:
        if not flags.FLAGS.is_parsed():
            # Grain's worker processes read absl flags; outside an absl app (tests, notebooks) use their defaults.
            flags.FLAGS.mark_as_parsed()
        # Examples are small: pickling them through the queue is far cheaper than a shared-memory block per array.
        it = grain.experimental.WithOptionsIterDataset(
            it, grain.experimental.DatasetOptions(min_shm_size=1 << 30)
        )
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=8))
    return grain.experimental.FlatMapIterDataset(it, _Tally(on_error, counts))


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ConfigError(f"process_index={index} is not in [0, {count})")
    return index, count


class _PackedBatches(grain.IterDataset):
    """First-fit packing of examples {"inputs", "targets", "weights"} [n <= T] into batches of B rows [B, T]."""

    def __init__(self, parent: grain.IterDataset, seq_len: int, batch_size: int, packing: bool):
        super().__init__(parent)
        self.seq_len, self.batch_size, self.packing = seq_len, batch_size, packing

    def __iter__(self) -> _PackIterator:
        return _PackIterator(self._parent.__iter__(), self.seq_len, self.batch_size, self.packing)


class _PackIterator(grain.DatasetIterator):
    """Places each example in the first of the B rows with room for it (without packing: the first empty row). The
    first example that fits no row closes the batch and opens the next one, so the iterator state is the parent's
    state just before that example, and a restore re-reads it. The last batch of a finite input comes out with its
    unused rows as padding (segment id 0, weight 0)."""

    def __init__(self, parent: grain.DatasetIterator, seq_len: int, batch_size: int, packing: bool):
        super().__init__(parent)
        self.seq_len, self.batch_size, self.packing = seq_len, batch_size, packing
        self._state = parent.get_state()  # where the next batch starts
        self._carry = None  # an example already read that opens the next batch

    def __next__(self) -> dict[str, np.ndarray]:
        B, T = self.batch_size, self.seq_len
        batch = {
            "inputs": np.zeros((B, T), np.int32),
            "targets": np.zeros((B, T), np.int32),
            "segment_ids": np.zeros((B, T), np.int32),
            "positions": np.zeros((B, T), np.int32),
            "weights": np.zeros((B, T), np.float32),
        }
        used, segments = [0] * B, [0] * B
        while True:
            if self._carry is not None:
                example, self._carry = self._carry, None
            else:
                before = self._parent.get_state()
                try:
                    example = next(self._parent)
                except StopIteration:
                    if not any(segments):
                        raise
                    self._state = self._parent.get_state()
                    return batch
            n = len(example["inputs"])
            if n > T:  # the encoders cut every example to fit: this is a bug, not bad data
                raise ValueError(f"an example of {n} tokens does not fit a row of {T}")
            row = next((r for r in range(B) if used[r] + n <= T and (self.packing or not segments[r])), None)
            if row is None:
                self._carry, self._state = example, before
                return batch
            a, b = used[row], used[row] + n
            segments[row] += 1
            used[row] = b
            batch["inputs"][row, a:b] = example["inputs"]
            batch["targets"][row, a:b] = example["targets"]
            batch["weights"][row, a:b] = example["weights"]
            batch["segment_ids"][row, a:b] = segments[row]
            batch["positions"][row, a:b] = np.arange(n)

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._state}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._state, self._carry = state["parent"], None


def packed(seq_len: int, packing: bool) -> Callable[[grain.IterDataset, int], grain.IterDataset]:
    return lambda examples, rows: _PackedBatches(examples, seq_len, rows, packing)


def stacked(batch_fn: Callable | None = None) -> Callable[[grain.IterDataset, int], grain.IterDataset]:
    return lambda examples, rows: examples.batch(rows, drop_remainder=True, batch_fn=batch_fn)


def shifted(ids: Sequence[int], mask: Sequence[int]) -> dict[str, np.ndarray]:
    """Next-token example of `ids` [n]: inputs/targets/weights [n - 1]; a target's weight is its token's mask."""
    ids_arr = np.asarray(ids, np.int32)
    return {
        "inputs": ids_arr[:-1],
        "targets": ids_arr[1:],
        "weights": np.asarray(mask[1:], np.float32),
    }


def string_field(record: dict[str, Any], field: str, where: str) -> str:
    value = record.get(field)
    if value is None:
        present = sorted(k for k in record if k != "_where")
        raise DataError(f"{where}: missing field {field!r} (has {present})")
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    return value


def messages_field(record: dict[str, Any], field: str, where: str, **checks: Any) -> list[dict[str, str]]:
    """`record[field]` checked by `chat.check_messages(..., **checks)`; a DataError names where and the field."""
    try:
        return chat.check_messages(record[field], **checks)
    except DataError as e:
        raise DataError(f"{where}: field {field!r}: {e}") from None


def continuation_fields(
    record: dict[str, Any], field: str, where: str
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(prompt, completion) message lists of a conversational prompt + `field` record: the prompt ends with a user
    turn and the two together are in a valid turn order (the completion starts with the assistant)."""
    prompt = messages_field(record, "prompt", where, last="user")
    completion = messages_field(record, field, where, turns=False)
    try:
        chat.check_messages([*prompt, *completion])
    except DataError as e:
        raise DataError(f"{where}: fields 'prompt' + {field!r}: {e}") from None
    return prompt, completion


def is_conversational(value: Any) -> bool:
    return isinstance(value, list)
