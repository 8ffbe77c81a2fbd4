"""A stand-in for Google Cloud Storage: fsspec's in-memory filesystem registered as the `gs`/`gcs` protocol.

etils.epath 1.15 routes `gs://` paths to its fsspec backend (TensorFlow is not installed), which asks fsspec for the
`gcs` filesystem: with `install()`, that is `FakeGCS`, so `epath.Path("gs://bucket/run")` and everything built on it
(jaxalign.storage, Orbax's metadata files, the readers) really go through the URL code path, and nothing lands on
local disk. Like a real object store it has no append: opening for "a" raises. (etils 1.15 has no `memory://` scheme
at all: `epath.Path("memory://x")` is a KeyError, hence this stand-in.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import fsspec
from etils.epath import backend
from fsspec.implementations.memory import MemoryFileSystem


class FakeGCS(MemoryFileSystem):
    protocol = ("gs", "gcs")
    root_marker = ""
    store: dict = {}
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        for prefix in ("gs://", "gcs://"):
            if path.startswith(prefix):
                path = path[len(prefix) :]
        return path.rstrip("/")

    def _open(self, path, mode="rb", **kwargs):
        if "a" in mode:
            raise OSError(f"{path}: object stores cannot append (mode {mode!r})")
        return super()._open(path, mode, **kwargs)


@contextlib.contextmanager
def install() -> Iterator[FakeGCS]:
    """`gs://` backed by a fresh in-memory store for the duration of the block."""
    from fsspec.registry import _registry

    previous = {p: _registry.get(p) for p in ("gs", "gcs")}
    FakeGCS.store, FakeGCS.pseudo_dirs = {}, [""]
    for p in ("gs", "gcs"):
        fsspec.register_implementation(p, FakeGCS, clobber=True)
    FakeGCS.clear_instance_cache()
    backend.fsspec_backend._get_filesystem.cache_clear()
    try:
        yield FakeGCS()
    finally:
        for p, cls in previous.items():
            if cls is None:
                _registry.pop(p, None)  # fsspec.registry is a read-only view of this dict
            else:
                fsspec.register_implementation(p, cls, clobber=True)
        FakeGCS.store, FakeGCS.pseudo_dirs = {}, [""]
        backend.fsspec_backend._get_filesystem.cache_clear()
