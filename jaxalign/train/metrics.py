"""The run directory's metrics: one JSON object per logged step, `{"stage": ..., "step": ..., "loss": ..., ...}`.

Two layouts, chosen by where the workdir is (`storage.is_local`), with one reader for both:

  local disk    `W/metrics.jsonl`, appended one line per logged step, flushed and fsynced, so a kill loses at most
                the line being written (a torn last line, which readers skip).
  object store  (`gs://`, `s3://`, ...: no append, an object is written whole) `W/metrics/<stage>-<first step>.jsonl`
                immutable part objects. Lines are buffered and written as a new part before every checkpoint save
                (the loop calls `flush`), every `flush_seconds`, and at close. A kill loses only lines after the last
                part; all of them are after the last checkpoint that can have committed, so the resumed run redoes
                and logs them again.

On resume from step s, this stage's lines with step > s are dropped (they are about to be redone): the local file is
rewritten atomically; parts holding such lines are rewritten without them, or deleted when nothing is left. So both
layouts read the same as an uninterrupted run.

`read(workdir)` returns every record (the local file's lines in order, then the parts in (stage, first step) order:
each stage's lines together, in step order), skipping torn or non-object lines. Only process 0 writes; TensorBoard event files go to W/tb/<stage>.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import jax

from jaxalign import storage

FILE = "metrics.jsonl"
PARTS = "metrics"


def _parse(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None  # a line torn by a kill mid-write
    return record if isinstance(record, dict) else None


def _part_key(name: str) -> tuple[str, int]:
    stage, _, first = name.removesuffix(".jsonl").rpartition("-")
    return (stage, int(first) if first.isdigit() else -1)


def part_names(workdir: str) -> list[str]:
    """Names of the part objects under W/metrics/, in (stage, first step) order."""
    directory = storage.path(workdir) / PARTS
    if not directory.is_dir():
        return []
    return sorted((p.name for p in directory.iterdir() if p.name.endswith(".jsonl")), key=_part_key)


def read(workdir: str) -> list[dict[str, Any]]:
    """Every metrics record of `workdir`, from W/metrics.jsonl and the W/metrics/ parts (module doc)."""
    root = storage.path(workdir)
    texts = [(root / FILE).read_text(encoding="utf-8")] if (root / FILE).is_file() else []
    texts += [(root / PARTS / name).read_text(encoding="utf-8") for name in part_names(workdir)]
    return [r for text in texts for line in text.splitlines() if (r := _parse(line)) is not None]


class _ObjectRecordWriter:
    """A TensorBoard event file on an object store, through epath: buffered, and the whole object rewritten at
    every flush (what tensorboardX's own GCS writer does through google-cloud-storage, which is not installed)."""

    def __init__(self, path: str):
        self.path = path
        self.data = bytearray()

    def write(self, value: bytes) -> None:
        self.data += value

    def flush(self) -> None:
        storage.write_atomic(self.path, bytes(self.data))

    def close(self) -> None:
        self.flush()


class _ObjectRecordWriterFactory:
    def open(self, path: str) -> _ObjectRecordWriter:
        return _ObjectRecordWriter(path)

    def directory_check(self, path: str) -> None:
        pass  # object stores have no directories to create


def _summary_writer_class() -> type:
    """tensorboardX's SummaryWriter, imported with PyTorch hidden unless it is loaded already: tensorboardX imports
    torch when it is installed only to accept torch tensors (1-3 s of every process's start beside torch, as in the
    test environment), and jaxalign logs Python floats."""
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX catches
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def _register_tensorboard_writer(workdir: str) -> None:
    from tensorboardX import record_writer

    record_writer.register_writer_factory(workdir.split(":", 1)[0], _ObjectRecordWriterFactory())


class MetricsLog:
    """Writes this stage's metrics (module doc) and mirrors scalars to TensorBoard (process 0 only)."""

    def __init__(self, workdir: str, stage: str, resume_step: int, flush_seconds: float = 60.0):
        self.stage = stage
        self.workdir = workdir
        self.primary = jax.process_index() == 0
        self.local = storage.is_local(workdir)
        self.path = storage.join(workdir, FILE)
        self.flush_seconds = flush_seconds
        self._buffer: list[tuple[int, str]] = []  # (step, line) not yet in a part (object stores only)
        self._last_flush = time.monotonic()
        self.writer = None
        if not self.primary:
            return
        storage.path(workdir).mkdir(parents=True, exist_ok=True)
        self._drop_after(resume_step)
        writer_class = _summary_writer_class()
        if not self.local:
            _register_tensorboard_writer(workdir)
        self.writer = writer_class(storage.join(workdir, "tb", stage))

    def _redone(self, line: str, resume_step: int) -> bool:
        """True for this stage's lines after the restored step, and for a line torn by a kill mid-write."""
        if not line.strip():
            return True
        record = _parse(line)
        if record is None:
            return True
        return record.get("stage") == self.stage and record.get("step", 0) > resume_step

    def _drop_after(self, resume_step: int) -> None:
        """On resume, forget this stage's lines logged after the restored step: they are about to be redone."""
        files = [self.path] if storage.exists(self.path) else []
        # This stage's parts, in step order: one that starts after the restored step is redone whole; of the others
        # only the last can hold later lines. Other stages' parts are not read.
        mine = [
            (_part_key(name)[1], name)
            for name in part_names(self.workdir)
            if _part_key(name)[0] == self.stage
        ]
        for first, name in mine:
            if first > resume_step:
                storage.path(storage.join(self.workdir, PARTS, name)).unlink()
        earlier = [name for first, name in mine if first <= resume_step]
        files += [storage.join(self.workdir, PARTS, earlier[-1])] if earlier else []
        for path in files:
            lines = storage.read_text(path).splitlines(keepends=True)
            kept = [
                line if line.endswith("\n") else line + "\n"
                for line in lines
                if not self._redone(line, resume_step)
            ]
            if len(kept) == len(lines):
                continue
            if kept or path == self.path:
                storage.write_atomic(path, "".join(kept))
            else:
                storage.path(path).unlink()

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.primary:
            return
        line = json.dumps({"stage": self.stage, "step": step, **metrics}) + "\n"
        if self.local:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        else:
            self._buffer.append((step, line))
            if time.monotonic() - self._last_flush >= self.flush_seconds:
                self.flush()
        for k, v in metrics.items():
            self.writer.add_scalar(f"{self.stage}/{k}", v, step)

    def flush(self) -> None:
        """Makes every line written so far durable: on an object store, one new part object."""
        self._last_flush = time.monotonic()
        if not self.primary or not self._buffer:
            return
        first = self._buffer[0][0]
        part = storage.join(self.workdir, PARTS, f"{self.stage}-{first:09d}.jsonl")
        existing = (
            storage.read_text(part) if storage.exists(part) else ""
        )  # an eval line logged at a step's end
        storage.write_atomic(part, existing + "".join(line for _, line in self._buffer))
        self._buffer = []

    def close(self) -> None:
        self.flush()
        if self.writer is not None:
            self.writer.close()
