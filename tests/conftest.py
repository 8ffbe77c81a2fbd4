"""Test set-up: 8 fake CPU devices, set before JAX is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import pytest  # noqa: E402

# The persistent compilation cache every test's subprocesses share (below): the settings a subprocess inherits.
_SUBPROCESS_CACHE_ENV = {
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    # Any size limit turns on JAX's file lock around reads and writes (its cache writes no temporary file): the
    # xdist workers' subprocesses share the folder. 16 GiB is never reached, so nothing is evicted.
    "JAX_COMPILATION_CACHE_MAX_SIZE": str(16 << 30),
}


@pytest.fixture(scope="session", autouse=True)
def compilation_cache_for_subprocesses(tmp_path_factory):
    """One persistent compilation cache for every `python -m jaxalign.main` a test starts, shared by the xdist
    workers: most subprocesses compile the same few programs (the smoke models' steps), so only the first compiles.
    Set in os.environ, which the subprocesses copy; this process imported JAX before and keeps its own settings.
    A cached executable is the one XLA would compile again (the key covers the program, devices and flags), so no
    result changes; the resume tests' bitwise comparisons would show it if one did."""
    base = tmp_path_factory.getbasetemp()
    # Under xdist each worker's basetemp is a folder of the controller's: the workers share the cache.
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    settings = {"JAX_COMPILATION_CACHE_DIR": str(root / "xla-cache"), **_SUBPROCESS_CACHE_ENV}
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    yield settings
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


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
