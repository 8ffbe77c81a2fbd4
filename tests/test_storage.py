"""Runs on an object store, end to end: every file of a run goes through `gs://` (tests/object_store.py: fsspec's
memory filesystem standing in for GCS, no append), so any path that falls back to local disk either fails or leaves a
local `gs:` directory, which every test checks for.

Orbax is the exception, with the evidence: Orbax 0.12.8 on a `gs://` directory asks google-cloud-storage whether the
bucket has a hierarchical namespace (`orbax/checkpoint/_src/path/gcs_utils.py`, `is_hierarchical_namespace_enabled`,
called by `step.py::_glob_step_paths` when the CheckpointManager lists steps) and writes arrays through TensorStore's
native `gcs` kvstore driver (`_src/serialization/tensorstore_utils.py::build_kvstore_tspec`: `gs://` -> `gcs`, else
an absolute path for the `file` driver). Neither goes through fsspec, so no stand-in can catch them: checkpoints go to
a local `checkpoint.directory` here, while the workdir (config, world, tokenizer, metrics, TensorBoard) is `gs://`.
tests/test_gcs.py puts the checkpoints on `gs://` too, against a GCS emulator those clients do reach.
"""

import importlib.util
import os

import numpy as np
import pytest

from jaxalign import config as config_lib
from jaxalign import main, storage
from jaxalign.errors import ConfigError, DataError
from jaxalign.train import loop, metrics
from tests import object_store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ("tokens_per_s", "mfu", "step_s")


def job_config(name: str, arg: str | None = None):
    spec = importlib.util.spec_from_file_location(f"{name}_job", os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def local_url_dirs(*roots) -> list[str]:
    """Local files or directories named like a URL scheme (`gs:`), anywhere under `roots`."""
    found = []
    for root in roots:
        for directory, dirs, files in os.walk(root):
            found += [
                os.path.join(directory, n) for n in dirs + files if n.endswith(":") or n.startswith("gs:")
            ]
    return found


@pytest.fixture
def gcs(tmp_path, monkeypatch):
    """A fresh stand-in `gs://`, with the working directory in tmp_path; afterwards nothing may have fallen back to
    a local `gs:` path."""
    monkeypatch.chdir(tmp_path)
    with object_store.install() as fs:
        yield fs
    assert local_url_dirs(tmp_path, ROOT) == []
    assert [n for n in os.listdir("/tmp") if n.startswith("gs:") or n.endswith(":")] == []


def tiny_pretrain(workdir: str, checkpoints: str, steps: int = 8):
    c = job_config("pretrain", "smoke")
    c.workdir = workdir
    c.checkpoint.directory = checkpoints
    c.checkpoint.every_steps = 4
    c.model.update(vocab_size=512, d_model=32, d_ff=64, head_dim=8, n_layers=1)
    c.train.update(steps=steps, seq_len=64, log_every=1, eval_every=0, progress=False)
    c.data.synthetic_entities = 20
    return config_lib.from_config_dict(c)


def crash_at_step(monkeypatch, step: int) -> None:
    """The next run raises while building the batch of `step` (after the save of every earlier checkpoint)."""
    calls = {"n": 0}
    real = loop.to_global

    def to_global(batch, shardings):
        calls["n"] += 1
        if calls["n"] == step:
            raise RuntimeError(f"simulated crash at step {step}")
        return real(batch, shardings)

    monkeypatch.setattr(loop, "to_global", to_global)


def train_lines(workdir: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in metrics.read(workdir)]


# The pretrain smoke with resume on gs:// (workdir and Orbax checkpoints) runs against a real GCS-protocol server in
# tests/test_gcs.py; this stand-in keeps the parts no emulator is needed for.


def test_metrics_parts_lose_nothing_a_resume_keeps(gcs):
    """A kill (no close) after the checkpoint-time flush of step 4 and an unflushed step 5: the resumed run (from
    step 4) reads steps 1-4 and then its own; another stage's lines are untouched."""
    other = metrics.MetricsLog("gs://bucket/m", "sft", 0)
    other.write(1, {"loss": 9.0})
    other.close()
    log = metrics.MetricsLog("gs://bucket/m", "pretrain", 0)
    for step in range(1, 6):
        log.write(step, {"loss": float(step)})
        if step == 4:
            log.flush()  # what the loop does right before saving checkpoint 4
    log.writer.close()  # TensorBoard's own file; the metrics buffer (step 5) is never flushed: killed

    resumed = metrics.MetricsLog("gs://bucket/m", "pretrain", 4)
    resumed.write(5, {"loss": 50.0})
    resumed.write(6, {"loss": 60.0})
    resumed.close()
    lines = [(r["stage"], r["step"], r["loss"]) for r in metrics.read("gs://bucket/m")]
    # Parts in (stage, first step) order.
    assert lines == [("pretrain", s, float(s)) for s in range(1, 5)] + [
        ("pretrain", 5, 50.0),
        ("pretrain", 6, 60.0),
        ("sft", 1, 9.0),
    ]

    # A resume from step 2 rewrites the part that holds steps 1-4 and deletes the one that holds only 5-6.
    again = metrics.MetricsLog("gs://bucket/m", "pretrain", 2)
    again.close()
    assert [(r["stage"], r["step"]) for r in metrics.read("gs://bucket/m")] == [
        ("pretrain", 1),
        ("pretrain", 2),
        ("sft", 1),
    ]
    assert metrics.part_names("gs://bucket/m") == ["pretrain-000000001.jsonl", "sft-000000001.jsonl"]


def test_sft_reads_its_input_from_the_object_store(gcs, small_world, tmp_path):
    """The same SFT run with its JSONL input and tokenizer on gs:// and on local disk logs bitwise the same."""
    for name in ("sft_train", "sft_eval"):
        storage.write_atomic(f"gs://data/sft/{name}.jsonl", storage.read_bytes(small_world[name]))
    storage.write_atomic("gs://data/sp.model", storage.read_bytes(small_world["tokenizer"]))

    def sft(workdir: str, inputs: str, eval_input: str, tokenizer: str):
        c = job_config("sft", "smoke")
        c.workdir = workdir
        c.model.update(vocab_size=512, d_model=32, d_ff=64, head_dim=8, n_layers=1)
        c.train.update(
            steps=3, seq_len=128, batch_size=8, log_every=1, eval_every=3, eval_batches=1, progress=False
        )
        c.data.update(input=inputs, eval_input=eval_input, tokenizer=tokenizer)
        c.checkpoint.enabled = False
        main.run(config_lib.from_config_dict(c))
        return train_lines(workdir)

    remote = sft(
        "gs://bucket/sft",
        "gs://data/sft/sft_train.jsonl",
        "gs://data/sft/sft_eval.jsonl",
        "gs://data/sp.model",
    )
    local = sft(
        str(tmp_path / "sft"), small_world["sft_train"], small_world["sft_eval"], small_world["tokenizer"]
    )
    assert [r["step"] for r in remote if "loss" in r] == [1, 2, 3]
    assert any("eval/loss" in r for r in remote)
    assert remote == local


def test_hf_save_load_round_trip_on_object_store(gcs, tmp_path):
    from flax import nnx

    from jaxalign.models import hf
    from tests.helpers import random_model

    model = nnx.merge(*random_model(seed=3))
    hf.save(model, "gs://bucket/hf", max_shard_bytes=40_000)  # several shards and an index
    hf.save(model, str(tmp_path / "hf"), max_shard_bytes=40_000)
    names = sorted(p.name for p in storage.path("gs://bucket/hf").iterdir())
    assert names == sorted(os.listdir(tmp_path / "hf")) and hf.INDEX_FILE in names and len(names) > 3
    for name in names:  # the same bytes as safetensors' own file writer
        assert storage.read_bytes(f"gs://bucket/hf/{name}") == (tmp_path / "hf" / name).read_bytes(), name

    loaded = hf.load("gs://bucket/hf")
    want = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    got = dict(nnx.to_flat_state(nnx.state(loaded, nnx.Param)))
    assert want.keys() == got.keys()
    for key in want:
        np.testing.assert_array_equal(np.asarray(got[key].get_value()), np.asarray(want[key].get_value()))

    hf.save(model, "gs://bucket/hf")  # one file now: the stale shards and index go
    assert sorted(p.name for p in storage.path("gs://bucket/hf").iterdir()) == ["config.json", hf.SINGLE_FILE]


def test_globs_on_the_object_store(gcs):
    from jaxalign.data import sources

    for name in ("a/x.jsonl", "a/y.jsonl", "a/deep/z.jsonl", "b/w.jsonl", "b/skip.txt"):
        storage.write_atomic(f"gs://bucket/in/{name}", '{"text": "hi"}\n')
    assert storage.glob("gs://bucket/in/a/*.jsonl") == [
        "gs://bucket/in/a/x.jsonl",
        "gs://bucket/in/a/y.jsonl",
    ]
    assert storage.glob("gs://bucket/in/*/w.jsonl") == ["gs://bucket/in/b/w.jsonl"]
    assert storage.glob("gs://bucket/in/**/z.jsonl") == ["gs://bucket/in/a/deep/z.jsonl"]
    assert storage.glob("gs://bucket/in/a/x.jsonl") == ["gs://bucket/in/a/x.jsonl"]
    assert sources.expand_glob("gs://bucket/in/b/*.jsonl,gs://bucket/in/a/*.jsonl") == [
        "gs://bucket/in/b/w.jsonl",
        "gs://bucket/in/a/x.jsonl",
        "gs://bucket/in/a/y.jsonl",
    ]
    source = sources.open_source("gs://bucket/in/a/*.jsonl")
    assert [source[i]["_where"] for i in range(len(source))] == [
        "gs://bucket/in/a/x.jsonl:1",
        "gs://bucket/in/a/y.jsonl:1",
    ]
    with pytest.raises(DataError, match="gs://bucket/in/c/\\*.jsonl"):
        sources.expand_glob("gs://bucket/in/c/*.jsonl")


def test_unknown_url_schemes_are_refused_not_made_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for url in ("memory://run", "ftp://host/run"):
        with pytest.raises(ConfigError, match="unsupported URL scheme"):
            storage.path(url)
    assert storage.join("gs://b/run", "x", "y") == "gs://b/run/x/y"
    assert storage.relpath("gs://b/run/curated/x", "gs://b/run/work") == "../curated/x"
    assert storage.resolve("gs://b/run/work", "../curated/x") == "gs://b/run/curated/x"
    assert local_url_dirs(tmp_path) == []


def test_curation_on_the_object_store_writes_what_it_writes_locally(gcs, tmp_path):
    """Inputs (plain and .gz), work files, markers and outputs on gs:// are byte-identical to a local run, and a
    re-run on gs:// redoes nothing (its markers are found and checked there)."""
    from jaxalign.data import curate
    from tests.data.test_curate import corpus, make_config

    (tmp_path / "in").mkdir()
    pattern = corpus(tmp_path / "in")
    for local in storage.glob(pattern):
        storage.write_atomic(f"gs://data/raw/{os.path.basename(local)}", storage.read_bytes(local))
    curate.run(make_config(pattern, tmp_path / "w"))
    curate.run(make_config("gs://data/raw/part*", "gs://bucket/w"))

    def outputs(root: str) -> dict[str, bytes]:
        names = ["removed.jsonl"] + [f"curated/{p.name}" for p in storage.path(f"{root}/curated").iterdir()]
        return {n: storage.read_bytes(f"{root}/{n}") for n in sorted(names)}

    assert outputs("gs://bucket/w") == outputs(str(tmp_path / "w"))
    assert len(outputs("gs://bucket/w")) == 4
    before = {k: v for k, v in gcs.store.items() if "/curate_work/" in k or "/curated/" in k}
    curate.run(make_config("gs://data/raw/part*", "gs://bucket/w"))
    after = {k: v for k, v in gcs.store.items() if "/curate_work/" in k or "/curated/" in k}
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)  # nothing rewritten
