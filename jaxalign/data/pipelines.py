"""Grain input pipelines, one per kind of stage, and the checkpointable `Loader` that feeds the training loop.

Shapes: B = this process's rows (global batch / process count), T = `seq_len`, P = `max_prompt_length`.

LM and SFT batches (`lm_loader`, `sft_loader`), packed: all int32 [B, T] except `weights`, float32 [B, T]
  inputs, targets     next-token pairs; a target never crosses an example boundary
  segment_ids         1, 2, ... per packed example, 0 on padding (attention stays within a segment)
  positions           position within the example (RoPE restarts per example)
  weights             1.0 where the target is trained on, else 0.0 (LM: every real target; SFT: the loss mask of
                      the target token: completion or assistant tokens)

Preference batches (`preference_loader`), one pair per row, right-padded, each [B, T] (weights float32):
  chosen_inputs, chosen_targets, chosen_weights, chosen_positions, chosen_segment_ids
  rejected_inputs, rejected_targets, rejected_weights, rejected_positions, rejected_segment_ids
  `weights` are 1.0 on completion targets only; `segment_ids` are 1 on real tokens, 0 on padding. Chosen and rejected
  share the prompt; `concatenated(batch)` stacks them into an LM-style batch of 2B rows (chosen first).

RL prompt batches (`rl_loader`):
  prompt_ids          int32 [B, P], left-padded with pad_id (generation continues from the last column)
  prompt_mask         int32 [B, P], 1 on real tokens
  prompt_positions    int32 [B, P], 0, 1, ... over the real tokens (0 on padding)
  extras              a Python list of B dicts: every other column of the record (e.g. `answer`), for rewards

Records are conversational (`messages`; `prompt`/`completion`/`chosen`/`rejected` as message lists, rendered with a
chat template) or plain strings (`text`; `prompt`/`completion`; ...), as in TRL's dataset types.

Each JAX process reads its own slice of the records (`[process_index::process_count]`, after a global shuffle that
changes every epoch) and yields its share of the global batch. With infinite epochs (the default, for training)
every process yields batches forever. A finite number of epochs is first trimmed to a multiple of the process count,
so the unpacked loaders (preference, RL) yield equal batch counts on every process; packed loaders may differ by a
batch or two at the end of a finite input, so iterate those a fixed number of batches (as evaluation does). At the
end of a finite input the last packed batch is padded (rows of segment id 0, weight 0) and a last partial unpacked
batch is dropped.

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

from jaxalign.data import chat
from jaxalign.data.sources import Source, open_source
from jaxalign.data.tokenizer import Tokenizer
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
    # Independent record streams the global batch is made of (see `_assemble`).
    shards: int = 1


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


def _assemble(
    pattern: str,
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
) -> Loader:
    """The shared pipeline: shuffle, repeat, shard, encode (in workers), tally, then `batch(examples, rows)`."""
    process_index, process_count = _processes(process_index, process_count)
    rows = _check_common(global_batch_size, process_count, on_error, overlong, num_workers)
    shards = shards or process_count
    if shards % process_count or global_batch_size % shards:
        raise ConfigError(
            f"data.shards={shards} must be a multiple of the {process_count} processes and divide "
            f"train.batch_size={global_batch_size}"
        )
    source = open_source(pattern, on_error=on_error)
    ds = grain.MapDataset.source(_Guarded(source))
    if shuffle:
        ds = ds.shuffle(seed=seed)  # a new permutation every epoch
    ds = ds.repeat(num_epochs)
    if num_epochs is not None:
        ds = ds[: len(ds) // shards * shards]
    counts = collections.Counter()
    # The records are split into `shards` streams, each packed into global_batch_size / shards rows of every batch;
    # this process runs its contiguous range of streams. A fixed `shards` gives the same global batches whatever the
    # number of processes.
    per_process = shards // process_count
    streams = [
        _stream(ds[shard::shards], encode, batch, rows // per_process, num_workers, on_error, counts)
        for shard in range(process_index * per_process, (process_index + 1) * per_process)
    ]
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
    )
    return Loader(it, layout, counts)


def _concat_rows(parts: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    """One batch from the batches of several streams: their rows, in stream order."""
    out = {}
    for key, first in parts[0].items():
        values = [p[key] for p in parts]
        out[key] = (
            np.concatenate(values) if isinstance(first, np.ndarray) else [v for vs in values for v in vs]
        )
    return out


def _stream(
    ds: grain.MapDataset,
    encode: Callable[[dict[str, Any], str], tuple[list[dict], int]],
    batch: Callable[[grain.IterDataset, int], grain.IterDataset],
    rows: int,
    num_workers: int,
    on_error: str,
    counts: collections.Counter,
) -> grain.IterDataset:
    """One shard's records -> encoded examples (in worker processes when asked) -> batches of `rows` rows."""
    # Records travel in chunks: per-element costs (Grain's bookkeeping, inter-process queues) are paid per chunk.
    ds = ds.batch(_RECORDS_PER_CHUNK, batch_fn=list)
    # No reader threads: tokenizing holds the GIL, so threads only add contention (3-4x slower on 2 cores);
    # worker processes are the way to parallelise.
    it = ds.map(_Encode(encode)).to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    if num_workers > 0:
        if not flags.FLAGS.is_parsed():
            # Grain's worker processes read absl flags; outside an absl app (tests, notebooks) use their defaults.
            flags.FLAGS.mark_as_parsed()
        # Examples are small: pickling them through the queue is far cheaper than a shared-memory block per array.
        it = grain.experimental.WithOptionsIterDataset(
            it, grain.experimental.DatasetOptions(min_shm_size=1 << 30)
        )
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=8))
    it = grain.experimental.FlatMapIterDataset(it, _Tally(on_error, counts))
    return batch(it, rows)


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


def _packed(seq_len: int, packing: bool) -> Callable[[grain.IterDataset, int], grain.IterDataset]:
    return lambda examples, rows: _PackedBatches(examples, seq_len, rows, packing)


def _stacked(batch_fn: Callable | None = None) -> Callable[[grain.IterDataset, int], grain.IterDataset]:
    return lambda examples, rows: examples.batch(rows, drop_remainder=True, batch_fn=batch_fn)


def _shifted(ids: Sequence[int], mask: Sequence[int]) -> dict[str, np.ndarray]:
    """Next-token example of `ids` [n]: inputs/targets/weights [n - 1]; a target's weight is its token's mask."""
    ids_arr = np.asarray(ids, np.int32)
    return {
        "inputs": ids_arr[:-1],
        "targets": ids_arr[1:],
        "weights": np.asarray(mask[1:], np.float32),
    }


def _string(record: dict[str, Any], field: str, where: str) -> str:
    value = record.get(field)
    if value is None:
        present = sorted(k for k in record if k != "_where")
        raise DataError(f"{where}: missing field {field!r} (has {present})")
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    return value


def _messages(record: dict[str, Any], field: str, where: str) -> list[dict[str, str]]:
    try:
        return chat.check_messages(record[field])
    except DataError as e:
        raise DataError(f"{where}: field {field!r}: {e}") from None


def _is_conversational(value: Any) -> bool:
    return isinstance(value, list)


# --- LM -----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _LmEncode:
    """A document as [bos, ..., eos], cut into next-token chunks of at most `seq_len` targets."""

    tokenizer: Tokenizer
    seq_len: int
    text_field: str
    max_chunks: int
    overlong: str

    def __call__(self, record: dict[str, Any], where: str) -> tuple[list[dict], int]:
        text = _string(record, self.text_field, where)
        tok = self.tokenizer
        ids = np.asarray([tok.bos_id, *tok.encode(text), tok.eos_id], np.int32)
        limit = self.seq_len * self.max_chunks + 1
        truncated = len(ids) > limit
        if truncated and self.overlong == "reject":
            raise DataError(
                f"{where}: {len(ids)} tokens exceed max_chunks_per_doc x seq_len + 1 = {limit} (data.overlong='reject')"
            )
        # A chunk of seq_len targets needs seq_len + 1 tokens; consecutive chunks overlap by one token so that every
        # next-token pair of the document is trained on exactly once.
        ids = ids[:limit]
        pieces = [ids[s : s + self.seq_len + 1] for s in range(0, len(ids) - 1, self.seq_len)]
        return [
            {"inputs": p[:-1], "targets": p[1:], "weights": np.ones(len(p) - 1, np.float32)} for p in pieces
        ], int(truncated)


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
    overlong: str = "truncate",
    text_field: str = "text",
    num_epochs: int | None = None,
    max_chunks_per_doc: int = 64,
    process_index: int | None = None,
    process_count: int | None = None,
    shards: int = 0,
) -> Loader:
    """Tokenized, packed LM batches of this process's share of `global_batch_size` rows of `seq_len` tokens.

    Documents longer than `max_chunks_per_doc` rows are over-long (cut or rejected by `overlong`).
    """
    encode = _LmEncode(tokenizer, seq_len, text_field, max_chunks_per_doc, overlong)
    return _assemble(
        pattern,
        encode,
        _packed(seq_len, packing=True),
        kind="lm",
        seq_len=seq_len,
        packing=True,
        global_batch_size=global_batch_size,
        seed=seed,
        shuffle=shuffle,
        num_workers=num_workers,
        on_error=on_error,
        overlong=overlong,
        num_epochs=num_epochs,
        process_index=process_index,
        process_count=process_count,
        shards=shards,
    )


# --- SFT ----------------------------------------------------------------------------------------------------------


def _cut_to(ids: list[int], mask: list[int], limit: int, overlong: str, where: str, what: str):
    """`ids`/`mask` cut to `limit` tokens (keeping the start); (ids, mask, truncated)."""
    if len(ids) <= limit:
        return ids, mask, False
    if overlong == "reject":
        raise DataError(
            f"{where}: {what} has {len(ids)} tokens, over the maximum {limit} (data.overlong='reject')"
        )
    return ids[:limit], mask[:limit], True


@dataclasses.dataclass(frozen=True)
class _SftEncode:
    """`messages`, or `prompt` + `completion` (strings, or message lists), as ids with a loss mask."""

    tokenizer: Tokenizer
    seq_len: int
    template: str
    overlong: str
    completion_only_loss: bool
    assistant_only_loss: bool

    def ids_and_mask(self, record: dict[str, Any], where: str) -> tuple[list[int], list[int]]:
        """The whole example's ids and loss mask (before any truncation)."""
        tok = self.tokenizer
        if "messages" in record:
            messages = _messages(record, "messages", where)
            for i, m in enumerate(messages):
                if m["role"] == "assistant" and not m["content"].strip():
                    raise DataError(f"{where}: message {i} (assistant) has empty content")
            ids, mask = chat.render(tok, messages, self.template)
            if not self.assistant_only_loss:
                mask = [1] * len(ids)
            return ids, mask
        if "prompt" not in record or "completion" not in record:
            present = sorted(k for k in record if k != "_where")
            raise DataError(f"{where}: missing field 'messages' or 'prompt' and 'completion' (has {present})")
        if _is_conversational(record["prompt"]) or _is_conversational(record["completion"]):
            prompt, completion = _messages(record, "prompt", where), _messages(record, "completion", where)
            if not "".join(m["content"] for m in completion).strip():
                raise DataError(f"{where}: field 'completion' is empty")
            prompt_ids, ids, mask = chat.render_continuation(tok, prompt, completion, self.template)
            prompt_mask = [0 if self.completion_only_loss else 1] * len(prompt_ids)
            return prompt_ids + ids, prompt_mask + (mask if self.completion_only_loss else [1] * len(ids))
        prompt, completion = _string(record, "prompt", where), _string(record, "completion", where)
        if not completion.strip():
            raise DataError(f"{where}: field 'completion' is empty")
        prompt_ids = [tok.bos_id, *tok.encode(prompt)]
        completion_ids = [*tok.encode(completion), tok.eos_id]
        mask = [0 if self.completion_only_loss else 1] * len(prompt_ids) + [1] * len(completion_ids)
        return prompt_ids + completion_ids, mask

    def __call__(self, record: dict[str, Any], where: str) -> tuple[list[dict], int]:
        ids, mask = self.ids_and_mask(record, where)
        ids, mask, truncated = _cut_to(ids, mask, self.seq_len + 1, self.overlong, where, "the example")
        if not any(mask[1:]):
            after = f" after truncation to train.seq_len + 1 = {self.seq_len + 1} tokens" if truncated else ""
            raise DataError(f"{where}: no token is trained on{after} (no assistant/completion tokens)")
        return [_shifted(ids, mask)], int(truncated)


def sft_loader(
    pattern: str,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    chat_template: str = "chatml",
    completion_only_loss: bool = True,
    assistant_only_loss: bool = True,
    packing: bool = True,
    shuffle: bool = True,
    num_workers: int = 0,
    on_error: str = "error",
    overlong: str = "truncate",
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    shards: int = 0,
) -> Loader:
    """SFT batches with the LM keys (module doc); `weights` are the loss mask of each target token.

    `messages` records train on assistant turns (`assistant_only_loss`, else every token); `prompt`/`completion`
    records train on the completion (`completion_only_loss`, else every token). Examples over `seq_len + 1` tokens
    are cut at the end or rejected (`overlong`). `packing=False` puts one example per row.
    """
    chat.check_template(tokenizer, chat_template)
    encode = _SftEncode(
        tokenizer, seq_len, chat_template, overlong, completion_only_loss, assistant_only_loss
    )
    return _assemble(
        pattern,
        encode,
        _packed(seq_len, packing),
        kind="sft",
        seq_len=seq_len,
        packing=packing,
        global_batch_size=global_batch_size,
        seed=seed,
        shuffle=shuffle,
        num_workers=num_workers,
        on_error=on_error,
        overlong=overlong,
        num_epochs=num_epochs,
        process_index=process_index,
        process_count=process_count,
        shards=shards,
    )


# --- prompts (preference and RL) ----------------------------------------------------------------------------------


def _prompt_ids(tokenizer: Tokenizer, template: str, record: dict[str, Any], where: str) -> list[int]:
    """A prompt's ids: a message list rendered with the assistant header appended, or [bos] + a string's ids."""
    if _is_conversational(record.get("prompt")):
        messages = _messages(record, "prompt", where)
        ids, _ = chat.render(tokenizer, messages, template, add_generation_prompt=True)
        return ids
    prompt = _string(record, "prompt", where)
    if not prompt.strip():
        raise DataError(f"{where}: field 'prompt' is empty")
    return [tokenizer.bos_id, *tokenizer.encode(prompt)]


def _cut_prompt(
    ids: list[int], limit: int, truncation_mode: str, overlong: str, where: str
) -> tuple[list[int], bool]:
    if len(ids) <= limit:
        return ids, False
    if overlong == "reject":
        raise DataError(
            f"{where}: the prompt has {len(ids)} tokens, over data.max_prompt_length={limit} (data.overlong='reject')"
        )
    return (ids[-limit:] if truncation_mode == "keep_end" else ids[:limit]), True


def _check_prompt_options(max_prompt_length: int, truncation_mode: str) -> None:
    if max_prompt_length <= 0:
        raise ConfigError(f"data.max_prompt_length={max_prompt_length} must be > 0")
    if truncation_mode not in ("keep_end", "keep_start"):
        raise ConfigError(
            f"data.truncation_mode={truncation_mode!r} is not one of ['keep_end', 'keep_start']"
        )


# --- preference ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _PreferenceEncode:
    """A pair as two right-padded rows that share the prompt."""

    tokenizer: Tokenizer
    seq_len: int
    max_prompt_length: int
    template: str
    truncation_mode: str
    overlong: str

    def _completion(self, record: dict[str, Any], field: str, where: str) -> tuple[list[int], list[int]]:
        """(ids, mask) of a completion as it follows the prompt."""
        tok = self.tokenizer
        if _is_conversational(record.get(field)):
            messages = _messages(record, field, where)
            if not "".join(m["content"] for m in messages).strip():
                raise DataError(f"{where}: field {field!r} is empty")
            if not _is_conversational(record.get("prompt")):
                raise DataError(f"{where}: field {field!r} is a message list but 'prompt' is not")
            _, ids, mask = chat.render_continuation(
                tok, _messages(record, "prompt", where), messages, self.template
            )
            return ids, mask
        text = _string(record, field, where)
        if not text.strip():
            raise DataError(f"{where}: field {field!r} is empty")
        ids = [*tok.encode(text), tok.eos_id]
        return ids, [1] * len(ids)

    def _row(
        self, prompt_ids: list[int], ids: list[int], mask: list[int], prefix: str
    ) -> dict[str, np.ndarray]:
        seq = np.asarray(prompt_ids + ids, np.int32)
        weight = np.asarray([0] * len(prompt_ids) + mask, np.float32)
        n = len(seq) - 1  # real targets
        row = {
            "inputs": np.full(self.seq_len, self.tokenizer.pad_id, np.int32),
            "targets": np.full(self.seq_len, self.tokenizer.pad_id, np.int32),
            "weights": np.zeros(self.seq_len, np.float32),
            "positions": np.zeros(self.seq_len, np.int32),
            "segment_ids": np.zeros(self.seq_len, np.int32),
        }
        row["inputs"][:n], row["targets"][:n], row["weights"][:n] = seq[:-1], seq[1:], weight[1:]
        row["positions"][:n], row["segment_ids"][:n] = np.arange(n), 1
        return {f"{prefix}_{k}": v for k, v in row.items()}

    def __call__(self, record: dict[str, Any], where: str) -> tuple[list[dict], int]:
        for field in ("prompt", "chosen", "rejected"):
            if record.get(field) is None:
                present = sorted(k for k in record if k != "_where")
                raise DataError(f"{where}: missing field {field!r} (has {present})")
        if record["chosen"] == record["rejected"]:
            raise DataError(f"{where}: 'chosen' and 'rejected' are identical")
        prompt_ids = _prompt_ids(self.tokenizer, self.template, record, where)
        prompt_ids, truncated = _cut_prompt(
            prompt_ids, self.max_prompt_length, self.truncation_mode, self.overlong, where
        )
        out: dict[str, np.ndarray] = {}
        for side in ("chosen", "rejected"):
            ids, mask = self._completion(record, side, where)
            # prompt + completion may hold seq_len + 1 tokens (seq_len next-token targets).
            ids, mask, cut = _cut_to(
                ids, mask, self.seq_len + 1 - len(prompt_ids), self.overlong, where, f"{side!r}"
            )
            truncated |= cut
            if not any(mask):
                raise DataError(f"{where}: {side!r} has no trained token left after truncation")
            out.update(self._row(prompt_ids, ids, mask, side))
        return [out], int(truncated)


def preference_loader(
    pattern: str,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    max_prompt_length: int,
    truncation_mode: str = "keep_end",
    chat_template: str = "chatml",
    shuffle: bool = True,
    num_workers: int = 0,
    on_error: str = "error",
    overlong: str = "truncate",
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    shards: int = 0,
) -> Loader:
    """Preference batches (`chosen_*`, `rejected_*`, module doc), one pair per row of `seq_len` targets.

    A prompt over `max_prompt_length` tokens keeps its end (`truncation_mode="keep_end"`, as TRL) or its start; a
    completion that does not fit after the prompt keeps its start. With `overlong="reject"` either is a bad record.
    """
    _check_prompt_options(max_prompt_length, truncation_mode)
    chat.check_template(tokenizer, chat_template)
    if max_prompt_length >= seq_len:
        raise ConfigError(
            f"data.max_prompt_length={max_prompt_length} must be smaller than train.seq_len={seq_len} "
            "(the completion needs room)"
        )
    encode = _PreferenceEncode(
        tokenizer, seq_len, max_prompt_length, chat_template, truncation_mode, overlong
    )
    return _assemble(
        pattern,
        encode,
        _stacked(),
        kind="preference",
        seq_len=seq_len,
        packing=False,
        global_batch_size=global_batch_size,
        seed=seed,
        shuffle=shuffle,
        num_workers=num_workers,
        on_error=on_error,
        overlong=overlong,
        num_epochs=num_epochs,
        process_index=process_index,
        process_count=process_count,
        shards=shards,
    )


def concatenated(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A preference batch as LM keys over [2B, T]: rows [0, B) are the chosen, rows [B, 2B) the rejected."""
    keys = ("inputs", "targets", "weights", "positions", "segment_ids")
    return {k: np.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]]) for k in keys}


# --- RL prompts ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _RlEncode:
    """A prompt, left-padded, with the other columns of its record."""

    tokenizer: Tokenizer
    max_prompt_length: int
    template: str
    truncation_mode: str
    overlong: str
    columns: tuple[str, ...]

    def __call__(self, record: dict[str, Any], where: str) -> tuple[list[dict], int]:
        if record.get("prompt") is None:
            present = sorted(k for k in record if k != "_where")
            raise DataError(f"{where}: missing field 'prompt' (has {present})")
        for column in self.columns:
            if record.get(column) is None:
                present = sorted(k for k in record if k != "_where")
                raise DataError(f"{where}: missing field {column!r} for the reward functions (has {present})")
        ids = _prompt_ids(self.tokenizer, self.template, record, where)
        ids, truncated = _cut_prompt(ids, self.max_prompt_length, self.truncation_mode, self.overlong, where)
        P, n = self.max_prompt_length, len(ids)
        prompt_ids = np.full(P, self.tokenizer.pad_id, np.int32)
        prompt_mask = np.zeros(P, np.int32)
        positions = np.zeros(P, np.int32)
        prompt_ids[P - n :], prompt_mask[P - n :], positions[P - n :] = ids, 1, np.arange(n)
        extras = {k: v for k, v in record.items() if k not in ("prompt", "_where")}
        return [
            {
                "prompt_ids": prompt_ids,
                "prompt_mask": prompt_mask,
                "prompt_positions": positions,
                "extras": extras,
            }
        ], int(truncated)


def _rl_batch(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    batch = {k: np.stack([r[k] for r in rows]) for k in ("prompt_ids", "prompt_mask", "prompt_positions")}
    batch["extras"] = [r["extras"] for r in rows]
    return batch


def rl_loader(
    pattern: str,
    tokenizer: Tokenizer,
    *,
    global_batch_size: int,
    seed: int,
    max_prompt_length: int,
    truncation_mode: str = "keep_end",
    chat_template: str = "chatml",
    columns: Sequence[str] = (),
    shuffle: bool = True,
    num_workers: int = 0,
    on_error: str = "error",
    overlong: str = "truncate",
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    shards: int = 0,
) -> Loader:
    """RL prompt batches (`prompt_ids`, `prompt_mask`, `prompt_positions`, `extras`; module doc).

    `global_batch_size` counts prompts. `columns` names extra fields every record must have (e.g. ("answer",)); all
    fields but `prompt` are passed through in `extras` either way.
    """
    _check_prompt_options(max_prompt_length, truncation_mode)
    chat.check_template(tokenizer, chat_template)
    encode = _RlEncode(tokenizer, max_prompt_length, chat_template, truncation_mode, overlong, tuple(columns))
    return _assemble(
        pattern,
        encode,
        _stacked(_rl_batch),
        kind="rl",
        seq_len=max_prompt_length,
        packing=False,
        global_batch_size=global_batch_size,
        seed=seed,
        shuffle=shuffle,
        num_workers=num_workers,
        on_error=on_error,
        overlong=overlong,
        num_epochs=num_epochs,
        process_index=process_index,
        process_count=process_count,
        shards=shards,
    )
