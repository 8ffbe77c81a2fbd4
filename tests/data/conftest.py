"""Fixtures shared by the data-pipeline tests (test_pipelines.py, test_file_shards.py)."""

import json

import pytest

from jaxalign.data import synthetic
from jaxalign.data.tokenizer import Tokenizer, train_sentencepiece


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> dict[str, str]:
    """The synthetic world with 40 people (seed 1), written once: {file name: path}. Tests only read it."""
    return synthetic.write_world(str(tmp_path_factory.mktemp("world")), 40, seed=1)


@pytest.fixture(scope="session")
def tok(world, tmp_path_factory) -> Tokenizer:
    """A 512-piece SentencePiece tokenizer trained once on the world's pretraining texts."""
    with open(world["pretrain_train"], encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    return train_sentencepiece(texts, str(tmp_path_factory.mktemp("tok") / "sp.model"), 512)
