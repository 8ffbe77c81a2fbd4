"""seqio Tasks and Mixtures as a Grain record stream: `data.input="seqio:<task_or_mixture>[:<split>]"`.

Optional: needs the `seqio` extra (`pip install 'jaxalign[seqio]'`, which pulls TensorFlow). Nothing here imports
seqio or TensorFlow until a seqio input is opened, so the core never needs them.

Registration. seqio finds Tasks and Mixtures in its global registries; `data.seqio_module` names the user's module
that registers them (a dotted module name, or a path to a .py file), imported once before the loaders are built.

Records. Each seqio example (a dict of features after the Task's preprocessors, `sequence_length=None`: nothing is
cut there) becomes a record like a JSONL line's: string features (bytes) decode as UTF-8 strings, numeric features as
Python numbers or lists. The stage's encoder then reads its usual fields (`text`; `prompt`/`completion`;
`prompt`/`chosen`/`rejected`; `prompt` + reward columns), so a Task's output features are named after those fields.
A record's `_where` is `seqio:<name>:<split> shard i/n example k` (k 1-based within the shard's stream).

Sharding. A seqio input is dealt into the loader's `shards` streams by seqio itself: stream s reads
`get_dataset(shard_info=ShardInfo(s, shards))` (seqio shards at the source when it has enough files, else by
example), so with the default `data.shards=0` the shard index and count are the JAX process index and count.

Position. The stream's iterator state is the number of examples it has yielded. seqio's stream for a fixed (name,
split, shard, seed, shuffle, epochs) is deterministic, so a restore rebuilds it and skips that many examples
(`tf.data.Dataset.skip`: the skipped examples are read and preprocessed again, so a resume costs time linear in the
position, not memory). Shuffling is seqio's (its shuffle buffer, seeded by the run's seed); `num_epochs=None`
repeats forever. Worker processes (`data.num_workers > 0`) are refused: tf.data runs its own threads.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import sys
from typing import Any

import grain
import numpy as np

from jaxalign.errors import ConfigError

SCHEME = "seqio:"


def is_seqio(pattern: Any) -> bool:
    """Whether a data input names a seqio Task or Mixture (`seqio:<name>[:<split>]`)."""
    return isinstance(pattern, str) and pattern.startswith(SCHEME)


def _import_seqio():
    try:
        import seqio
    except ImportError as e:
        raise ConfigError(
            f"a seqio data input needs the seqio extra (pip install 'jaxalign[seqio]'): {e}"
        ) from None
    return seqio


def register(module: str, key: str = "data.seqio_module") -> None:
    """Imports the user's module that registers seqio Tasks/Mixtures: a dotted name or a .py file path."""
    if not module:
        return
    _import_seqio()
    try:
        if module.endswith(".py"):
            name = "jaxalign_seqio_tasks_" + str(abs(hash(module)))
            if name in sys.modules:
                return
            spec = importlib.util.spec_from_file_location(name, module)
            if spec is None or spec.loader is None:
                raise ImportError(f"no such file {module!r}")
            loaded = importlib.util.module_from_spec(spec)
            sys.modules[name] = loaded
            try:
                spec.loader.exec_module(loaded)
            except BaseException:
                del sys.modules[name]
                raise
        else:
            importlib.import_module(module)
    except (ImportError, OSError) as e:
        raise ConfigError(
            f"{key}={module!r} cannot be imported ({e}); give a module name on the path or a .py file"
        ) from None


@dataclasses.dataclass(frozen=True)
class SeqioInput:
    """An opened `seqio:<name>[:<split>]` input: a checked Task or Mixture name and split."""

    pattern: str
    name: str
    split: str

    @property
    def files(self) -> tuple[str, ...]:
        """What the loader's `Layout` records for this source (in place of file names)."""
        return (self.pattern,)

    def stream(self, shard: int, shards: int, *, seed: int, shuffle: bool, num_epochs: int | None):
        """Records of shard `shard` of `shards`, as a checkpointable Grain `IterDataset`."""
        return _SeqioDataset(self, shard, shards, seed, shuffle, num_epochs)


def open_seqio(pattern: str, key: str = "data.input") -> SeqioInput:
    """Checks that `seqio:<name>[:<split>]` names a registered Task or Mixture with that split (default "train")."""
    spec = pattern[len(SCHEME) :]
    name, _, split = spec.partition(":")
    split = split or "train"
    if not name:
        raise ConfigError(f"{key}={pattern!r} must be 'seqio:<task_or_mixture>' or 'seqio:<name>:<split>'")
    seqio = _import_seqio()
    try:
        provider = seqio.get_mixture_or_task(name)
    except ValueError:
        raise ConfigError(
            f"{key}={pattern!r}: no seqio Task or Mixture named {name!r} is registered (set data.seqio_module to "
            "the module that registers it)"
        ) from None
    if split not in provider.splits:
        raise ConfigError(
            f"{key}={pattern!r}: {name!r} has no split {split!r}; it has {sorted(provider.splits)}"
        )
    return SeqioInput(pattern, name, split)


class _SeqioDataset(grain.IterDataset):
    def __init__(
        self, source: SeqioInput, shard: int, shards: int, seed: int, shuffle: bool, num_epochs: int | None
    ):
        super().__init__()
        self.source, self.shard, self.shards = source, shard, shards
        self.seed, self.shuffle, self.num_epochs = seed, shuffle, num_epochs

    def __iter__(self) -> _SeqioIterator:
        return _SeqioIterator(self)

    def __str__(self) -> str:
        return f"SeqioDataset({self.source.pattern}, shard {self.shard}/{self.shards})"


class _SeqioIterator(grain.DatasetIterator):
    """Yields records; its state is the count yielded so far, restored by rebuilding seqio's stream and skipping."""

    def __init__(self, ds: _SeqioDataset):
        super().__init__()
        self._ds = ds
        self._count = 0
        self._examples = None  # seqio's numpy iterator, built at the first `next` (and after `set_state`)

    def _start(self) -> None:
        seqio = _import_seqio()
        ds = self._ds
        dataset = seqio.get_mixture_or_task(ds.source.name).get_dataset(
            sequence_length=None,
            split=ds.source.split,
            shuffle=ds.shuffle,
            seed=ds.seed,
            shard_info=seqio.ShardInfo(index=ds.shard, num_shards=ds.shards),
            num_epochs=ds.num_epochs,
        )
        self._examples = dataset.skip(self._count).as_numpy_iterator()

    def __next__(self) -> dict[str, Any]:
        if self._examples is None:
            self._start()
        example = next(self._examples)  # StopIteration at the end of a finite number of epochs
        self._count += 1
        ds = self._ds
        where = f"{ds.source.pattern} shard {ds.shard}/{ds.shards} example {self._count}"
        try:
            return {**{k: _value(v) for k, v in example.items()}, "_where": where}
        except UnicodeDecodeError as e:
            return {"_error": f"{where}: a string feature is not UTF-8 ({e})"}

    def get_state(self) -> dict[str, Any]:
        return {"count": self._count}

    def set_state(self, state: dict[str, Any]) -> None:
        self._count, self._examples = int(state["count"]), None


def _value(v: Any) -> Any:
    """A seqio feature value as JSON-like Python: bytes -> str, numpy scalars and arrays -> numbers and lists."""
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, np.ndarray):
        return [_value(x) for x in v] if v.dtype == object else v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, dict):
        return {k: _value(x) for k, x in v.items()}
    return v
