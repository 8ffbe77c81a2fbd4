"""Every file jaxalign reads or writes goes through here or through `etils.epath.Path` (what Orbax uses), so a
`gs://bucket/run` workdir or data glob works unchanged and never becomes a local `gs:` directory.

    path(p)          an `epath.Path`: `gs://`, `s3://`, `az://`, `hf://` URLs go to their object store (gfile or
                     fsspec backends); anything else is a local path, `~` expanded, never made absolute
    is_local(p)      False for a URL
    write_atomic     readers never see a half-written file: local files are written to a temporary sibling, fsynced
                     and renamed; an object store's single PUT is already atomic (and has no rename)
    glob(pattern)    sorted files matching a glob; `**` on an object store goes to fsspec directly, since epath refuses
                     it (one listing RPC per directory)
    relpath / resolve `..`-aware relative paths that never call `os.path.abspath` on a URL
    read_bytes / read_text / exists / join

Which schemes exist is epath's business: etils 1.15 knows `gs`, `s3`, `az` and `hf` and nothing else (a `memory://`
path is a KeyError there), so any other `xyz://` is refused here with one line instead of becoming a local directory.
"""

from __future__ import annotations

import glob as glob_lib
import os
import posixpath
import re
import tempfile
from typing import IO

from etils import epath

from jaxalign.errors import ConfigError

PathLike = str | os.PathLike
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_SCHEMES = ("gs", "s3", "az", "hf")
_WILDCARD = re.compile(r"[*?\[]")


def is_local(p: PathLike) -> bool:
    """True unless `p` is a URL (`scheme://...`)."""
    return _URL.match(os.fspath(p)) is None


def path(p: PathLike) -> epath.Path:
    """`p` as an `epath.Path`; local paths get `~` expanded and stay relative when they are; an unknown URL scheme
    is a ConfigError rather than a local directory named `scheme:`."""
    s = os.fspath(p)
    m = _URL.match(s)
    if m is None:
        return epath.Path(os.path.expanduser(s))
    if m.group(1) not in _SCHEMES:
        raise ConfigError(
            f"path {s!r}: unsupported URL scheme {m.group(1)!r}; accepted: a local path or {_SCHEMES}"
        )
    return epath.Path(s)


def join(*parts: PathLike) -> str:
    """`parts` joined as a string path (`gs://b/run` + `x` -> `gs://b/run/x`; no `os.path` on URLs)."""
    return os.fspath(path(parts[0]).joinpath(*[os.fspath(p) for p in parts[1:]]))


def _split(p: str) -> tuple[str, str]:
    """("gs://", "/bucket/x") of a URL; ("", p) of a local path."""
    m = _URL.match(p)
    return (m.group(0), "/" + p[m.end() :]) if m else ("", p)


def relpath(p: PathLike, start: PathLike) -> str:
    """`p` relative to the directory `start` (`..` allowed), for URLs too (no `os.path.abspath` on a URL)."""
    (scheme, a), (scheme_b, b) = _split(os.fspath(p)), _split(os.fspath(start))
    if scheme != scheme_b:
        raise ValueError(f"{p} and {start} are not on the same filesystem")
    return os.path.relpath(a, b) if not scheme else posixpath.relpath(a, b)


def resolve(base: PathLike, relative: str) -> str:
    """`relative` (may hold `..`) joined to the directory `base` and normalised; object stores have no `..`."""
    scheme, rest = _split(os.fspath(base))
    if not scheme:
        return os.path.normpath(os.path.join(rest, relative))
    return scheme + posixpath.normpath(posixpath.join(rest, relative))[1:]


def exists(p: PathLike) -> bool:
    return path(p).exists()


def read_bytes(p: PathLike) -> bytes:
    return path(p).read_bytes()


def read_text(p: PathLike) -> str:
    return path(p).read_text(encoding="utf-8")


def write_atomic(p: PathLike, data: str | bytes) -> None:
    """Writes `data` (str as UTF-8) so that readers see the old file or the new one, never a part; creates the
    parent directory. Local: temporary sibling, fsync, `os.replace`. Object stores: one PUT (atomic there)."""
    target = path(p)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    target.parent.mkdir(parents=True, exist_ok=True)
    if not is_local(p):
        target.write_bytes(payload)
        return
    fd, tmp = tempfile.mkstemp(dir=os.fspath(target.parent), prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


RANDOM_ACCESS_BLOCK = 2**16


def open_binary(p: PathLike, random_access: bool = False) -> IO[bytes]:
    """A seekable binary reader of `p` (a local file, or the object store's ranged reader). With `random_access`,
    an object is read in small blocks (fsspec's default read-ahead block is megabytes, which a shuffled reader
    would fetch for every record)."""
    if random_access and not is_local(p):
        import fsspec

        try:
            fs, _ = fsspec.core.url_to_fs(os.fspath(p))
        except ImportError:  # no fsspec client for the scheme: epath's other backend (TensorFlow's gfile)
            return path(p).open("rb")
        return fs.open(os.fspath(p), "rb", block_size=RANDOM_ACCESS_BLOCK)
    return path(p).open("rb")


def glob(pattern: PathLike) -> list[str]:
    """Sorted files (not directories) matching `pattern`, as strings in the pattern's own form (URL or local).
    `**` matches any number of directories, also on object stores."""
    pattern = os.fspath(pattern)
    if is_local(pattern):
        expanded = os.path.expanduser(pattern)
        return sorted(f for f in glob_lib.glob(expanded, recursive=True) if os.path.isfile(f))
    path(pattern)  # refuses unknown schemes
    if not _WILDCARD.search(pattern):
        return [pattern] if path(pattern).is_file() else []
    if "**" in pattern:
        import fsspec

        fs, _ = fsspec.core.url_to_fs(pattern)
        scheme = _URL.match(pattern).group(0)
        found = [p if _URL.match(p) else scheme + p for p in fs.glob(pattern)]
        return sorted(f for f in found if fs.isfile(f))
    # epath globs relative to a directory: split at the first component holding a wildcard.
    head, _, _ = pattern.partition(_WILDCARD.search(pattern).group(0))
    root = head.rsplit("/", 1)[0]
    rest = pattern[len(root) + 1 :]
    return sorted(os.fspath(f) for f in path(root).glob(rest) if f.is_file())
