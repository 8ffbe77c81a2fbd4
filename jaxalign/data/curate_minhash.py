"""MinHash-LSH near-duplicate detection for curation (curate_stages.py, curate_beam.py): words, shingles,
signatures, LSH band keys, pair verification and connected components.

Shapes: N records, D documents of a batch, K = num_bands * rows_per_band permutations, B = num_bands bands,
S shingles, P candidate pairs.
"""

from __future__ import annotations

import hashlib
import itertools
import re

import numpy as np

from jaxalign.config import CurateConfig
from jaxalign.data import curate_filters as filters

_WORD_RE = re.compile(r"\w+")
_SIG_CHUNK_ROWS = 4096  # shingles per [rows, K] block: 4096 x 112 x 8 B = 3.7 MB stays in cache
_word_hash_cache: dict[bytes, int] = {}
# ASCII bytes -> itself for [A-Za-z0-9_] (what `\w` matches in ASCII), else a space: words by bytes.split().
_ASCII_WORDS = bytes(c if chr(c).isalnum() and c < 128 or c == ord("_") else 32 for c in range(256))


def words(text: str) -> list[str]:
    """The words MinHash and the benchmark's true Jaccard use: `\\w+` runs of the casefolded text."""
    return _WORD_RE.findall(text.casefold())


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Parameters (a_K odd, b_K) of K multiply-add-shift hashes h(x) = (a x + b mod 2^64) >> 32 of 32-bit x.

    Multiply-add-shift is strongly universal from 32 to 32 bits (Dietzfelbinger 1996), the standard stand-in for
    random permutations in MinHash, and needs only wrapping uint64 arithmetic.
    """
    rng = np.random.default_rng([seed, 0x6D696E68617368])
    a = rng.integers(0, 2**64, size=num_perm, dtype=np.uint64) | np.uint64(1)
    b = rng.integers(0, 2**64, size=num_perm, dtype=np.uint64)
    return a, b


def word_bytes(folded: str) -> list[bytes]:
    """`\\w+` words of casefolded text as UTF-8; ASCII text is split as bytes (8x faster than the regex, same words)."""
    if folded.isascii():
        return folded.encode().translate(_ASCII_WORDS).split()
    return [w.encode("utf-8", "surrogatepass") for w in _WORD_RE.findall(folded)]


def shingles(doc_words: list[list[bytes]], n: int) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes x_S (as uint64) of D documents' word n-grams and their document index doc_S, sorted by document.

    A document with fewer than n words has one shingle, of all its words; one without words has none. The n-gram keys
    of all documents are computed together on the concatenated words, and keys crossing a document end dropped.
    """
    cache = _word_hash_cache
    if len(cache) > 2_000_000:
        cache.clear()
    all_words = list(itertools.chain.from_iterable(doc_words))
    for w in set(all_words).difference(cache):
        cache[w] = int.from_bytes(hashlib.blake2b(w, digest_size=8).digest())
    ids_T = np.fromiter(map(cache.__getitem__, all_words), np.uint64, len(all_words))
    length_D = np.array([len(w) for w in doc_words], np.int64)
    start_D = np.cumsum(length_D) - length_D
    doc_T = np.repeat(np.arange(len(doc_words)), length_D)
    keys = filters.mix64(ids_T + np.uint64(1))  # k-gram keys at every position, k = 1 ... n (see ngram_keys)
    x, doc = [], []
    for k in range(1, n + 1):
        if k > 1:
            keys = filters.mix64(keys[:-1] ^ ids_T[k - 1 :])
        if k < n:
            short = np.flatnonzero(length_D == k)
            x.append(keys[start_D[short]])
            doc.append(short)
    d = doc_T[: len(keys)]
    inside = np.arange(len(keys)) - start_D[d] <= length_D[d] - n
    x.append(keys[inside])
    doc.append(d[inside])
    x_S, doc_S = np.concatenate(x), np.concatenate(doc)
    order = np.argsort(doc_S, kind="stable")
    return x_S[order] >> np.uint64(32), doc_S[order]


def minhash(
    x_S: np.ndarray, doc_S: np.ndarray, num_docs: int, a_K: np.ndarray, b_K: np.ndarray
) -> np.ndarray:
    """MinHash signatures [D, K] uint32 of shingles x_S grouped by (sorted) doc_S, hashed in [rows, K] blocks.

    A document without shingles keeps the all-ones signature (never used: it is not near-deduplicated).
    """
    sig_DxK = np.full((num_docs, len(a_K)), np.iinfo(np.uint32).max, np.uint64)
    for start in range(0, len(x_S), _SIG_CHUNK_ROWS):
        x, doc = x_S[start : start + _SIG_CHUNK_ROWS], doc_S[start : start + _SIG_CHUNK_ROWS]
        h_RxK = np.multiply.outer(x, a_K)
        h_RxK += b_K
        h_RxK >>= np.uint64(32)
        seg = np.flatnonzero(np.r_[True, doc[1:] != doc[:-1]])  # each document's run of rows in this block
        d = doc[seg]
        sig_DxK[d] = np.minimum(sig_DxK[d], np.minimum.reduceat(h_RxK, seg, axis=0))
    return sig_DxK.astype(np.uint32)


def band_keys(sig_NxK: np.ndarray, num_bands: int, rows: int) -> np.ndarray:
    """LSH bucket keys [N, B] uint64: a 64-bit hash of each band's `rows` signature values.

    Keys collide across different bands' values with probability ~N^2 / 2^64; verification catches that anyway.
    """
    key_NxB = np.empty((len(sig_NxK), num_bands), np.uint64)
    for band in range(num_bands):
        cols = sig_NxK[:, band * rows : (band + 1) * rows].astype(np.uint64)
        key = filters.mix64(cols[:, 0] + np.uint64(1))
        for c in range(1, rows):
            key = filters.mix64(key ^ cols[:, c])
        key_NxB[:, band] = key
    return key_NxB


def verified(sig_a_PxK: np.ndarray, sig_b_PxK: np.ndarray, threshold: float) -> np.ndarray:
    """[P] bool: pair p's signatures agree on >= `threshold` of the K hashes (every pair when threshold <= 0)."""
    if threshold <= 0:
        return np.ones(len(sig_a_PxK), bool)
    return (sig_a_PxK == sig_b_PxK).mean(axis=1) >= threshold


def candidate_pairs(sig_NxK: np.ndarray, num_bands: int, rows: int, threshold: float) -> np.ndarray:
    """Pairs [P, 2] (i < j) that share a band and whose signatures agree on >= `threshold` of the K hashes.

    Within a band's bucket (members in index order) every member is paired with the bucket's first member and its
    predecessor, so a bucket of m records costs < 2m pairs (curate_beam.py pairs its buckets by the same rule).
    """
    n = len(sig_NxK)
    pos = np.arange(n)
    found = []
    key_NxB = band_keys(sig_NxK, num_bands, rows)
    for band in range(num_bands):
        key = key_NxB[:, band]
        order = np.argsort(key, kind="stable")
        k = key[order]
        is_start = np.r_[True, k[1:] != k[:-1]]
        if is_start.all():
            continue
        first = order[np.maximum.accumulate(np.where(is_start, pos, 0))]
        member = np.flatnonzero(~is_start)
        found.append(np.stack([first[member], order[member]], 1))
        found.append(np.stack([order[member - 1], order[member]], 1))
    if not found:
        return np.zeros((0, 2), np.int64)
    pairs = np.unique(np.concatenate(found).astype(np.int64), axis=0)
    if threshold <= 0:
        return pairs
    keep = np.concatenate(
        [
            verified(sig_NxK[p[:, 0]], sig_NxK[p[:, 1]], threshold)
            for p in np.array_split(pairs, max(1, len(pairs) // 65536))
        ]
    )
    return pairs[keep]


def components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected components [N] of the graph with edges `pairs`, each labelled by its smallest member.

    Vectorised union-find: every round hooks each edge's two roots to the smaller one, then pointer-jumps until every
    node points at its root. Labels only decrease, so no cycles form and the root is the component's minimum.
    """
    label = np.arange(n)
    i, j = pairs[:, 0], pairs[:, 1]
    while True:
        li, lj = label[i], label[j]
        if np.array_equal(li, lj):
            return label
        low = np.minimum(li, lj)
        np.minimum.at(label, li, low)
        np.minimum.at(label, lj, low)
        while not np.array_equal(label[label], label):
            label = label[label]


def signatures(
    doc_words: list[list[bytes]], cfg: CurateConfig, a_K: np.ndarray, b_K: np.ndarray
) -> np.ndarray:
    """MinHash signatures [D, K] uint32 of D documents' words (`curate_stages.Processed.words`)."""
    return minhash(*shingles(doc_words, cfg.ngram), len(doc_words), a_K, b_K)
