"""Test set-up: 8 fake CPU devices, set before JAX is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import pytest  # noqa: E402


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
