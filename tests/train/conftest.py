"""Fixtures shared by the checkpoint, resume and multi-process tests."""

import json

import pytest

from jaxalign.data import synthetic
from jaxalign.data.tokenizer import train_sentencepiece


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """The smoke corpus and a tokenizer trained once for every run of the session."""
    directory = tmp_path_factory.mktemp("corpus")
    paths = synthetic.write_pretraining(str(directory), num_people=60, seed=0)
    records = [json.loads(line) for line in open(paths["train"])]
    train_sentencepiece((r["text"] for r in records), str(directory / "sp.model"), vocab_size=512)
    return {"input": paths["train"], "tokenizer": str(directory / "sp.model")}
