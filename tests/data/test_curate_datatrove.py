"""Our Gopher quality, Gopher repetition and C4 decisions against datatrove's on real English prose.

The documents are Python's pydoc topics and standard-library module docstrings; datatrove's decisions on them are in
tests/fixtures/datatrove_filters.json.gz, made by tests/fixtures/make_datatrove_fixtures.py with datatrove 0.10.1,
whose English word tokenizer is spaCy's rule-based `spacy.blank("en")` (no model download; nltk is not used for
English). `test_fixture_is_what_datatrove_decides` re-runs datatrove live on a sample when it is installed.

Ours tokenizes with `jaxalign.data.words` (a port of spaCy's English tokenizer, compared token by token in
tests/data/test_words.py). KNOWN_DIFFERENCES lists, per filter, documents whose decision may differ and why; the test
fails if any other document disagrees or a listed one starts agreeing, so the agreement cannot drift silently. It is
empty: every decision agrees.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os

import pytest

from jaxalign.data import curate_filters as filters

FIXTURE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "datatrove_filters.json.gz"
)

# filter -> {document id: why its decision differs from datatrove's}.
KNOWN_DIFFERENCES: dict[str, dict[str, str]] = {"gopher_quality": {}, "gopher_repetition": {}, "c4": {}}


def load_fixture() -> dict:
    with gzip.open(FIXTURE, "rt", encoding="utf-8") as f:
        return json.load(f)


def ours(text: str, name: str) -> tuple[str, str]:
    """Our reason for filter `name` without its family prefix ("" = kept), and for C4 the sha256 of the kept text."""
    if name == "c4":
        reason, kept = filters.c4_quality(text, drop_lines=True)
        return reason.partition(":")[2], hashlib.sha256(kept.encode()).hexdigest()
    return getattr(filters, name)(text).partition(":")[2], ""


@pytest.mark.parametrize("name", sorted(KNOWN_DIFFERENCES))
def test_decisions_equal_datatrove_on_real_text_except_known_differences(name):
    docs = load_fixture()["docs"]
    differ = {}
    for doc in docs:
        reason, kept_sha256 = ours(doc["text"], name)
        if bool(reason) != bool(doc[name]):  # keep / drop
            differ[doc["id"]] = (reason, doc[name])
        elif name == "c4" and not reason:
            assert kept_sha256 == doc["c4_text_sha256"], doc["id"]  # C4 keeps the same lines
    agreement = 1 - len(differ) / len(docs)
    print(f"{name}: {len(docs) - len(differ)}/{len(docs)} decisions agree ({agreement:.1%})")
    assert sorted(differ) == sorted(KNOWN_DIFFERENCES[name]), differ


def test_fixture_is_what_datatrove_decides():
    pytest.importorskip("datatrove")
    pytest.importorskip("spacy")
    from tests.fixtures import make_datatrove_fixtures as make

    docs = load_fixture()["docs"]
    for doc in docs[::40]:  # 17 documents: spaCy is slow
        assert make.decisions(doc["text"]) == {k: v for k, v in doc.items() if k not in ("id", "text")}, doc[
            "id"
        ]
