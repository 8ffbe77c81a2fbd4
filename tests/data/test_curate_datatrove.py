"""Our Gopher quality, Gopher repetition and C4 decisions against datatrove's on real English prose.

The documents are Python's pydoc topics and standard-library module docstrings; datatrove's decisions on them are in
tests/fixtures/datatrove_filters.json.gz, made by tests/fixtures/make_datatrove_fixtures.py with datatrove 0.10.1,
whose English word tokenizer is spaCy's rule-based `spacy.blank("en")` (no model download; nltk is not used for
English). `test_fixture_is_what_datatrove_decides` re-runs datatrove live on a sample when it is installed.

Ours tokenizes with a regex (curate_filters.TOKEN_RE). Where the two disagree, the cause is the tokenizer, listed
per document in KNOWN_DIFFERENCES; the test fails if any other document disagrees or a listed one starts agreeing
(the list then shrinks), so the agreement figure cannot drift silently.
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

# filter -> {document id: the tokenizer difference that flips the decision}. All are code inside one whitespace
# chunk, which spaCy keeps whole (it splits prefixes and suffixes off a chunk, and infixes only at hyphens between
# letters, colons, slashes and a few more) and our regex splits at every bracket or operator.
_CODE = "code: spaCy keeps chunks like `print(C` or `g.throw(E(V` whole; we split at each bracket"
_DE_COMPRESSION = "spaCy keeps `de)compression` whole; we split `(de)compression` into 4 tokens"
KNOWN_DIFFERENCES: dict[str, dict[str, str]] = {
    "gopher_quality": {
        "doc:lzma.py": _DE_COMPRESSION + ": 50 words (ours, kept) against 48 (datatrove, gopher_short_doc)",
        "doc:socketserver.py": _CODE
        + " (`ThreadingUDPServer(ThreadingMixIn`): alpha ratio 0.798 against 0.805",
        "doc:turtle.py": _CODE + " (`turtle.forward(15`): alpha ratio 0.791 against 0.803",
        "doc:wsgiref/simple_server.py": _CODE + ' (`name__=="__main`): alpha ratio 0.763 against 0.809',
    },
    "gopher_repetition": {
        "doc:bz2.py": _DE_COMPRESSION + ": its top 4-gram is 0.211 of the characters (> 0.16)",
        **dict.fromkeys(
            (
                "topic:async",
                "topic:numeric-types",
                "doc:http/cookies.py",
                "doc:json/__init__.py",
                "doc:lib2to3/fixes/fix_dict.py",
                "doc:lib2to3/fixes/fix_isinstance.py",
                "doc:lib2to3/fixes/fix_throw.py",
            ),
            _CODE + ": more repeated n-grams such as `( self , other`",
        ),
    },
    "c4": {},
}


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
def test_decisions_equal_datatrove_on_real_text_except_known_tokenizer_differences(name):
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
