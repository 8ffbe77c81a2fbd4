"""`jaxalign.data.words` against spaCy's `spacy.blank("en")` tokenizer (datatrove's English word tokenizer), the oracle.

The port's data (word_rules.json) must be what the installed spaCy and datatrove hold, and its words must equal
spaCy's (whitespace tokens dropped and tokens stripped, as datatrove's `word_tokenize` does) on every document of
the datatrove fixture (644 pydoc topics and stdlib docstrings: prose, code, URLs, contractions). Without spaCy the
literal cases still run (their expected tokens were spaCy 3.8.18's).
"""

from __future__ import annotations

import json

import pytest

from jaxalign.data import words
from tests.data.test_curate_datatrove import load_fixture

# text -> spaCy 3.8.18's tokens: exceptions, affixes stripped repeatedly, infixes only at their patterns, a URL kept,
# and the special-case matcher ("''" in code).
CASES = {
    "Don't print(C) e.g. (de)compression, it's": [
        "Do",
        "n't",
        "print(C",
        ")",
        "e.g.",
        "(",
        "de)compression",
        ",",
        "it",
        "'s",
    ],
    "built-in x==y http://example.org/a?b=1. U.S. 3.14": [
        "built",
        "-",
        "in",
        "x==y",
        "http://example.org/a?b=1",
        ".",
        "U.S.",
        "3.14",
    ],
    "f('') --verbose __init__ ...": ["f", "(", "''", ")", "--verbose", "_", "_", "init", "_", "_", "..."],
}


@pytest.mark.parametrize("text", sorted(CASES))
def test_words_of_literal_cases(text):
    assert words.words(text) == CASES[text]


def test_rules_file_is_the_installed_spacys():
    pytest.importorskip("spacy")
    pytest.importorskip("datatrove")
    from tests.fixtures import make_word_rules

    on_disk = json.loads(words.RULES_PATH.read_text(encoding="utf-8"))
    installed = make_word_rules.rules()
    versions = ("made_by", "spacy", "datatrove")
    assert {k: v for k, v in on_disk.items() if k not in versions} == {
        k: v for k, v in installed.items() if k not in versions
    }, "word_rules.json is stale: run tests/fixtures/make_word_rules.py"


def test_words_equal_datatrove_spacy_words_on_every_fixture_document():
    pytest.importorskip("spacy")
    pytest.importorskip("datatrove")
    from datatrove.utils.word_tokenizers import SpaCyTokenizer

    oracle = SpaCyTokenizer("en")  # spacy.blank("en"); whitespace tokens dropped, tokens stripped
    docs = load_fixture()["docs"]
    differ, n_tokens = [], 0
    for doc in docs:
        expected = oracle.word_tokenize(doc["text"])
        n_tokens += len(expected)
        if words.words(doc["text"]) != expected:
            differ.append(doc["id"])
    print(f"words: {len(docs) - len(differ)}/{len(docs)} documents ({n_tokens} tokens) equal spaCy's")
    assert not differ, differ
