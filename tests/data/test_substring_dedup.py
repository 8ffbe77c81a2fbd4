"""Exact-substring dedup: the suffix array equals a brute-force search, and curation cuts planted repeats."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from jaxalign.data import substring_dedup as substr
from tests.data.test_curate import document, outputs, run, write_jsonl


def brute_force_mask(texts: list[bytes], k: int) -> list[np.ndarray]:
    """Per document, the bytes covered by a k-byte window that also occurs in an earlier document (naive search)."""
    masks = []
    for d, text in enumerate(texts):
        mask = np.zeros(len(text), bool)
        for p in range(len(text) - k + 1):
            if any(text[p : p + k] in earlier for earlier in texts[:d]):
                mask[p : p + k] = True
        masks.append(mask)
    return masks


def span_mask(text: bytes, spans: list[tuple[int, int]]) -> np.ndarray:
    mask = np.zeros(len(text), bool)
    for s, e in spans:
        mask[s:e] = True
    return mask


def random_corpus(seed: int, docs: int) -> list[bytes]:
    """Short documents over a 3-letter alphabet (many chance repeats of every length) plus copied pieces."""
    rng = random.Random(seed)
    texts = []
    for _ in range(docs):
        text = "".join(rng.choice("ab ") for _ in range(rng.randint(0, 60)))
        if texts and rng.random() < 0.5:  # a piece of an earlier document, inserted somewhere
            src = rng.choice(texts).decode()
            i = rng.randint(0, len(src))
            at = rng.randint(0, len(text))
            text = text[:at] + src[i : i + rng.randint(0, 40)] + text[at:]
        texts.append(text.encode())
    return texts


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [1, 4, 9, 16])
def test_suffix_array_spans_equal_brute_force(seed, k):
    texts = random_corpus(seed, 30)
    tokens, k = k, substr.min_bytes(k)  # k bytes = 4 x tokens
    result = substr.dedup(texts, tokens)
    expected = brute_force_mask(texts, k)
    for text, spans, mask in zip(texts, result.spans, expected, strict=True):
        assert np.array_equal(span_mask(text, spans), mask)
        assert all(e - s >= k for s, e in spans)  # ASCII: nothing shorter than k is cut
    assert result.bytes_in == sum(map(len, texts))


def test_first_document_keeps_everything_and_no_match_crosses_a_document_end():
    texts = [b"abcdefgh", b"ijklmnop", b"ghij efgh", b"efgh ijkl"]  # "ghij" exists only across docs 0|1
    result = substr.dedup(texts, 1)  # k = 4 bytes
    assert result.spans == [[], [], [(5, 9)], [(0, 4), (5, 9)]]  # " " occurs earlier, but never as 4 bytes
    assert result.dropped.tolist() == [False, False, False, True]  # doc 3 keeps only " "; doc 2 keeps "ghij "


def test_spans_shorter_than_k_stay():
    rng = random.Random(1)
    k = substr.min_bytes(50)
    shared = document(rng)[: k - 1].encode()  # one byte short of a span
    texts = [shared + b" one", b"two " + shared, shared]
    result = substr.dedup(texts, 50)
    assert result.spans == [[], [], []] and not result.dropped.any() and result.bytes_removed == 0
    longer = substr.dedup([shared + b"x", b"y" + shared + b"x"], 50)
    assert longer.spans == [[], [(1, 1 + k)]]


def test_spans_end_on_character_boundaries():
    # é = C3 A9, ĩ = C4 A9, è = C3 A8: the byte match runs from A9 to C3, inside two characters, which stay whole.
    texts = ["é copied words that é".encode(), "ĩ copied words that è".encode()]
    result = substr.dedup(texts, 2)  # k = 8 bytes
    assert substr.remove(texts[1], result.spans[1]).decode() == "ĩè"  # decodes: no character was split
    ((s, e),) = result.spans[1]
    expected = brute_force_mask(texts, 8)[1]  # one byte more on each side: the A9 and the C3
    assert np.flatnonzero(expected).tolist() == list(range(s - 1, e + 1))


def corpus_with_planted_paragraphs(tmp_path, shards: int = 3) -> tuple[str, dict[str, str], str, str]:
    rng = random.Random(7)
    para, other = document(rng, 2), document(rng, 2)  # each >= 200 bytes of prose, passing every filter
    texts = {f"d{i}": document(rng) for i in range(12)}
    texts["d2"] = texts["d2"] + "\n" + para  # first occurrence: stays
    texts["d5"] = para + "\n" + texts["d5"]  # later: cut
    texts["d9"] = texts["d9"] + "\n" + para + "\n" + other  # later: cut both pieces
    texts["d10"] = other + "\n" + para  # nothing of its own left: dropped
    texts["d1"] = texts["d1"] + "\n" + other  # first occurrence of `other`
    ids = list(texts)
    for s in range(shards):
        write_jsonl(tmp_path / f"{s}.jsonl", [{"id": i, "text": texts[i]} for i in ids[s::shards]])
    return str(tmp_path / "*.jsonl"), texts, para, other


def test_curate_cuts_planted_paragraphs_from_later_documents_only(tmp_path):
    glob, texts, para, other = corpus_with_planted_paragraphs(tmp_path, shards=1)
    kept, removed, report = run(glob, tmp_path / "w", substring_dedup_tokens=50)
    # Input order d0 ... d11: `other` first occurs in d1, `para` in d2; both stay there.
    assert kept["d1"]["text"] == texts["d1"] and kept["d2"]["text"] == texts["d2"]
    assert kept["d5"]["text"] == texts["d5"][len(para) :]  # the span is `para` exactly: d2 ends after it
    # d9 = own + "\n" para "\n" other loses one span, which also takes the end of its own text that equals the
    # end of d2's own text (at least the final "."), since that precedes "\n" para in d2 too.
    own9, own2 = texts["d9"][: -len(para + other) - 2], texts["d2"][: -len(para) - 1]
    common = next(n for n in range(len(own9) + 1) if n == len(own9) or own9[-n - 1] != own2[-n - 1])
    assert common >= 1 and kept["d9"]["text"] == own9[: len(own9) - common]
    assert removed == {"d10": {"id": "d10", "reason": "substring_dup"}}  # nothing of its own left
    for i in set(texts) - {"d5", "d9", "d10"}:
        assert kept[i]["text"] == texts[i]
    section = report["substring_dedup"]
    assert report["removed_by_reason"] == {"substring_dup": 1}
    assert section["docs_dropped"] == 1 and section["docs_edited"] == 2 and section["spans_removed"] == 2
    assert section["bytes_removed"] == len(para) + len(para + other) + 2 + common + len(texts["d10"])
    assert section["bytes_in"] == sum(len(t) for t in texts.values())


def test_curate_substring_dedup_is_identical_for_1_and_2_workers_and_resumes(tmp_path):
    glob, _, _, _ = corpus_with_planted_paragraphs(tmp_path)
    run(glob, tmp_path / "one", substring_dedup_tokens=50, workers=1)
    run(glob, tmp_path / "two", substring_dedup_tokens=50, workers=2)
    assert outputs(tmp_path / "one") == outputs(tmp_path / "two")
    # Input order d0 d3 d6 d9 | d1 d4 d7 d10 | d2 d5 d8 d11: d9 (file 0) holds the first copies, files 1 and 2 are
    # cut. Switching the stage off re-writes those two from the same map outputs; file 0 keeps its marker.
    kept, removed, report = run(glob, tmp_path / "one", substring_dedup_tokens=0)
    assert report["shards"] == {"total": 3, "mapped": 0, "written": 2}
    assert "substring_dedup" not in report and not removed and len(kept) == 12
    report = run(glob, tmp_path / "one", substring_dedup_tokens=50)[2]
    assert report["shards"] == {"total": 3, "mapped": 0, "written": 2}
    assert outputs(tmp_path / "one") == outputs(tmp_path / "two")
    report = run(glob, tmp_path / "one", substring_dedup_tokens=50)[2]
    assert report["shards"]["written"] == 0
    with open(tmp_path / "one" / "curate_report.json") as f:
        assert json.load(f)["substring_dedup"]["docs_dropped"] == 1


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("tokens", [1, 2, 5])
@pytest.mark.parametrize("multibyte", [False, True], ids=["ascii", "utf8"])
def test_hashed_windows_flag_what_the_suffix_array_flags(seed, tokens, multibyte):
    """The Beam stage's steps (window digests -> group -> flag occurrences after the first document -> `cut`) give
    the suffix array's flagged starts, spans, drops and byte counts (multi-byte characters: spans get snapped)."""
    texts = random_corpus(seed, 40)
    if multibyte:
        texts = [t.decode().replace("b", "é").replace(" ", "€").encode() for t in texts]
    k = substr.min_bytes(tokens)
    stream, start_D = substr.join(texts)
    expected = substr.flagged_starts(stream, start_D, k)
    hashed = substr.hashed_flags(texts, k)
    assert np.array_equal(np.sort(np.concatenate([f + start_D[d] for d, f in enumerate(hashed)])), expected)
    assert len(expected) > 0  # not vacuous: the corpus repeats windows of every tested length
    a, b = substr.dedup(texts, tokens), substr.hashed_dedup(texts, tokens)
    assert b.spans == a.spans and b.dropped.tolist() == a.dropped.tolist()
    assert (b.bytes_in, b.bytes_removed) == (a.bytes_in, a.bytes_removed)
    assert a.dropped.any() or tokens > 1
