"""Test set-up: 8 fake CPU devices, fast-compiling XLA flags (tests/xla.py) and one persistent XLA compilation cache
for the session, set before JAX is imported anywhere."""

import os
import shutil
import tempfile

from tests import xla  # noqa: E402  (no JAX import)

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla.flags(8)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Most of the suite's time is XLA compiling the same tiny programs again: the same model's step in many tests, the same
# smoke job in every subprocess run. One compilation cache for the whole session (the pytest-xdist workers and every
# subprocess a test starts inherit these variables) compiles each program once; a cached executable is the one the
# compiler would have built, so no result changes. A size limit turns on JAX's file lock, so concurrent processes never
# read a half-written entry. The folder is the session's own and is removed when it ends; a cache the caller already
# set is used and kept.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxalign-xla-cache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(16 << 30))


import pytest  # noqa: E402


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """The synthetic world with 20 people (every stage's files) and a 512-piece tokenizer trained once on it, for the
    SFT / reward / DPO tests: {file name: path, ..., "tokenizer": path}."""
    import json

    from jaxalign.data import synthetic
    from jaxalign.data.tokenizer import train_sentencepiece
    from jaxalign.stages.common import record_texts

    directory = tmp_path_factory.mktemp("small_world")
    paths = synthetic.write_world(str(directory / "data"), 20, seed=0)
    texts = []
    for name in ("pretrain_train", "sft_train", "preference_train"):
        with open(paths[name], encoding="utf-8") as f:
            texts.extend(t for line in f for t in record_texts(json.loads(line)))
    train_sentencepiece(texts, str(directory / "sp.model"), vocab_size=512)
    return {**paths, "tokenizer": str(directory / "sp.model")}
