"""Quality filters and PII scrubbing for `jaxalign.data.curate`.

Every filter takes a document's text and returns `""` to keep it or a reason `"<family>:<datatrove reason>"` to drop
it. Thresholds and reason names are datatrove's defaults (huggingface/datatrove, src/datatrove/pipeline/filters/:
gopher_repetition_filter.py, gopher_quality_filter.py, c4_filters.py, fineweb_quality_filter.py), which follow
Gopher (Rae et al. 2021, Table A1 and Sec. A.1.1), C4 (Raffel et al. 2020, tfds c4_utils.py) and FineWeb
(Penedo et al. 2024). Where datatrove tokenizes (for English, spaCy's rule-based `spacy.blank("en")` tokenizer and
sentencizer in datatrove 0.10) we use `jaxalign.data.words`, a port of spaCy's tokenizer that gives the same words
without importing spaCy; a line has one sentence more than it has `.`/`!`/`?` runs followed by a space. On 644 real
documents (pydoc topics and stdlib docstrings, tests/data/test_curate_datatrove.py) the keep/drop decisions of Gopher
quality, Gopher repetition and C4 equal datatrove's for all 644.

Also here: `scrub_pii` (e-mails, public IPv4 addresses, phone numbers) and `mix64`/`ngram_keys`, the 64-bit n-gram
hashing that the repetition filter and MinHash share.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable

import numpy as np

from jaxalign.config import CurateConfig
from jaxalign.data import words as words_lib

# --- Gopher quality (datatrove GopherQualityFilter defaults) ---------------------------------------------------
GOPHER_MIN_DOC_WORDS = 50
GOPHER_MAX_DOC_WORDS = 100_000
GOPHER_MIN_AVG_WORD_LENGTH = 3
GOPHER_MAX_AVG_WORD_LENGTH = 10
GOPHER_MAX_SYMBOL_WORD_RATIO = 0.1  # '#' and ellipses per token
GOPHER_MAX_BULLET_LINES_RATIO = 0.9
GOPHER_MAX_ELLIPSIS_LINES_RATIO = 0.3
GOPHER_MIN_ALPHA_WORDS_RATIO = 0.8  # datatrove's `max_non_alpha_words_ratio`, used as a minimum
GOPHER_MIN_STOP_WORDS = 2
GOPHER_STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})

# --- Gopher repetition (datatrove GopherRepetitionFilter defaults = Gopher Table A1) ---------------------------
REP_DUP_LINE_FRAC = 0.3
REP_DUP_PARA_FRAC = 0.3
REP_DUP_LINE_CHAR_FRAC = 0.2
REP_DUP_PARA_CHAR_FRAC = 0.2
REP_TOP_N_GRAMS = ((2, 0.2), (3, 0.18), (4, 0.16))
REP_DUP_N_GRAMS = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))

# --- C4 quality (datatrove C4QualityFilter defaults) -------------------------------------------------------------
C4_MIN_NUM_SENTENCES = 5
C4_MIN_WORDS_PER_LINE = 3
C4_MAX_WORD_LENGTH = 1000
C4_END_PUNCTUATION = (".", "?", "!", '"', "'")
C4_CITATION_RE = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
C4_POLICY_SUBSTRINGS = (
    "terms of use",
    "privacy policy",
    "cookie policy",
    "uses cookies",
    "use of cookies",
    "use cookies",
)
# A sentence end inside a (stripped) line: terminal punctuation and a space, not the last dot of "e.g." or "U.S.";
# a line has one sentence more than it has of these, as spaCy's sentencizer (datatrove's) splits it.
_SENTENCE_END_RE = re.compile(r"(?<!\b[a-z]\.[a-z])[.!?]+(?=\s)", re.IGNORECASE)

# --- FineWeb quality (datatrove FineWebQualityFilter defaults) ---------------------------------------------------
FW_LINE_PUNCT_THR = 0.12
FW_SHORT_LINE_THR = 0.67
FW_SHORT_LINE_LENGTH = 30
FW_CHAR_DUPLICATES_RATIO = 0.01
FW_NEW_LINE_RATIO = 0.3
FW_STOP_CHARS = (".", "'", '"', "!", "?")


@functools.lru_cache(maxsize=2)
def tokenize(text: str) -> list[str]:
    """The words of `text` as datatrove's English tokenizer has them (`words.words`), cached: the Gopher and FineWeb
    filters see the same text in a row. Do not mutate."""
    return words_lib.words(text)


def gopher_quality(text: str) -> str:
    """Gopher's document heuristics: length, mean word length, symbols, bullets, ellipses, alphabetic words."""
    tokens = tokenize(text)
    n_tokens = len(tokens)
    punctuation = words_lib.punctuation()
    words = [w for w in tokens if not punctuation.issuperset(w)]  # datatrove's non-symbol words
    if len(words) < GOPHER_MIN_DOC_WORDS:
        return "gopher_quality:gopher_short_doc"
    if len(words) > GOPHER_MAX_DOC_WORDS:
        return "gopher_quality:gopher_long_doc"
    avg_len = sum(map(len, words)) / len(words)
    if avg_len < GOPHER_MIN_AVG_WORD_LENGTH:
        return "gopher_quality:gopher_below_avg_threshold"
    if avg_len > GOPHER_MAX_AVG_WORD_LENGTH:
        return "gopher_quality:gopher_above_avg_threshold"
    if text.count("#") / n_tokens > GOPHER_MAX_SYMBOL_WORD_RATIO:
        return "gopher_quality:gopher_too_many_hashes"
    if (text.count("...") + text.count("…")) / n_tokens > GOPHER_MAX_SYMBOL_WORD_RATIO:
        return "gopher_quality:gopher_too_many_ellipsis"
    lines = text.splitlines()
    bullets = sum(line.lstrip().startswith(("•", "-")) for line in lines)
    if bullets / len(lines) > GOPHER_MAX_BULLET_LINES_RATIO:
        return "gopher_quality:gopher_too_many_bullets"
    ellipsis_lines = sum(line.rstrip().endswith(("...", "…")) for line in lines)
    if ellipsis_lines / len(lines) > GOPHER_MAX_ELLIPSIS_LINES_RATIO:
        return "gopher_quality:gopher_too_many_end_ellipsis"
    alpha = sum(any(map(str.isalpha, w)) for w in tokens)  # words with a letter, as datatrove counts them
    if alpha / n_tokens < GOPHER_MIN_ALPHA_WORDS_RATIO:
        return "gopher_quality:gopher_below_alpha_threshold"
    # Gopher's "at least two of" these words: distinct ones, as datatrove counts them (a set intersection); datatrove
    # compares case-sensitively and names this reason "enough" although it means "too few".
    if len(GOPHER_STOP_WORDS.intersection(tokens)) < GOPHER_MIN_STOP_WORDS:
        return "gopher_quality:gopher_enough_stop_words"
    return ""


def _find_duplicates(items: list[str]) -> tuple[int, int]:
    """(number of repeated items, characters in the repeats), counting every occurrence after the first."""
    seen: set[str] = set()
    n_dup = chars = 0
    for item in items:
        if item in seen:
            n_dup += 1
            chars += len(item)
        else:
            seen.add(item)
    return n_dup, chars


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (wrapping arithmetic): a bijection that spreads bits."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def ngram_keys(ids: np.ndarray, n: int) -> np.ndarray:
    """64-bit keys [L - n + 1] of the n-grams of `ids` [L] uint64; distinct n-grams collide with probability ~2^-64."""
    keys = mix64(ids + np.uint64(1))
    for k in range(1, n):
        keys = mix64(keys[:-1] ^ ids[k:])
    return keys


def _repeated_chars(keys: list[int], gram_len: list[int], n: int, start: int) -> int:
    """datatrove's find_all_duplicate: characters in repeated n-grams, jumping past each repeat (no double count).

    `start` is the first position whose n-gram occurred before; all earlier ones are new and seen in bulk.
    """
    seen = set(keys[:start])
    add = seen.add
    repeated, idx, end = 0, start, len(keys)
    while idx < end:
        key = keys[idx]
        if key in seen:
            repeated += gram_len[idx]
            idx += n
        else:
            add(key)
            idx += 1
    return repeated


def gopher_repetition(text: str) -> str:
    """Gopher's repetition heuristics: duplicated paragraphs/lines and the share of characters in repeated n-grams."""
    if not text.strip():
        return ""
    n_chars = len(text)
    paragraphs = re.split(r"\n{2,}", text.strip())
    n_dup, dup_chars = _find_duplicates(paragraphs)
    if n_dup / len(paragraphs) > REP_DUP_PARA_FRAC:
        return "gopher_repetition:dup_para_frac"
    if dup_chars / n_chars > REP_DUP_PARA_CHAR_FRAC:
        return "gopher_repetition:dup_para_char_frac"
    lines = re.split(r"\n+", text)
    n_dup, dup_chars = _find_duplicates(lines)
    if n_dup / len(lines) > REP_DUP_LINE_FRAC:
        return "gopher_repetition:dup_line_frac"
    if dup_chars / n_chars > REP_DUP_LINE_CHAR_FRAC:
        return "gopher_repetition:dup_line_char_frac"

    tokens = tokenize(text)
    vocab: dict[str, int] = {}
    ids = np.array([vocab.setdefault(t, len(vocab)) for t in tokens], dtype=np.uint64)
    # cum_len[i] = characters in tokens[:i]; an n-gram's characters are a difference of two entries.
    cum_len = np.concatenate([[0], np.cumsum(list(map(len, tokens)), dtype=np.int64)])
    top, dup = dict(REP_TOP_N_GRAMS), dict(REP_DUP_N_GRAMS)
    keys = mix64(ids + np.uint64(1))
    for n in range(2, max(top | dup) + 1):
        if len(tokens) < n:
            break
        keys = mix64(keys[:-1] ^ ids[n - 1 :])  # the n-grams' keys from the (n-1)-grams' (see ngram_keys)
        _, first, counts = np.unique(keys, return_index=True, return_counts=True)
        if n in top:
            # Counter.most_common(1): the most frequent n-gram, ties going to the one seen first.
            best = np.flatnonzero(counts == counts.max())
            start = first[best[np.argmin(first[best])]]
            joined_len = cum_len[start + n] - cum_len[start] + (n - 1)  # " ".join(n-gram)
            if joined_len * counts.max() / n_chars > top[n]:
                return f"gopher_repetition:top_{n}_gram"
        if n in dup:
            gram_len = cum_len[n:] - cum_len[:-n]  # "".join(n-gram), as datatrove counts it
            # Only non-first occurrences can count, so their total bounds the exact (sequential) count.
            later = np.ones(len(keys), bool)
            later[first] = False
            if gram_len[later].sum() / n_chars <= dup[n]:
                continue
            start = int(np.argmax(later))
            if _repeated_chars(keys.tolist(), gram_len.tolist(), n, start) / n_chars > dup[n]:
                return f"gopher_repetition:duplicated_{n}_n_grams"
    return ""


def c4_quality(text: str, drop_lines: bool) -> tuple[str, str]:
    """C4's line and page rules. Returns (reason, text); with `drop_lines` the kept text is C4's surviving lines.

    Lines are dropped for a word over 1000 characters, no terminal punctuation (or an ellipsis ending), fewer than
    3 words, "javascript" or cookie/terms-of-use phrases; citations like "[1]" are removed. The page is dropped for
    "lorem ipsum", a curly bracket, or fewer than 5 sentences in the surviving lines.
    """
    kept: list[str] = []
    n_sentences = 0
    for line in text.splitlines():
        line = line.strip()
        words = line.split()
        if any(len(w) > C4_MAX_WORD_LENGTH for w in words):
            continue
        line = C4_CITATION_RE.sub("", line)
        if not line.endswith(C4_END_PUNCTUATION) or line.endswith("..."):
            continue
        if len(words) < C4_MIN_WORDS_PER_LINE:
            continue
        lower = line.lower()
        if "lorem ipsum" in lower:
            return "c4:lorem_ipsum", text
        if "javascript" in lower:
            continue
        if "{" in line:
            return "c4:curly_bracket", text
        if any(p in lower for p in C4_POLICY_SUBSTRINGS):
            continue
        n_sentences += len(_SENTENCE_END_RE.findall(line)) + 1
        kept.append(line)
    if n_sentences < C4_MIN_NUM_SENTENCES:
        return "c4:too_few_sentences", text
    return "", "\n".join(kept).strip() if drop_lines else text


def fineweb_quality(text: str) -> str:
    """FineWeb's heuristics: lines ending in punctuation, short lines, duplicated lines, newline density."""
    lines = text.split("\n")
    if sum(line.endswith(FW_STOP_CHARS) for line in lines) / len(lines) <= FW_LINE_PUNCT_THR:
        return "fineweb:line_punct_ratio"
    if sum(len(line) <= FW_SHORT_LINE_LENGTH for line in lines) / len(lines) >= FW_SHORT_LINE_THR:
        return "fineweb:short_line_ratio"
    n_chars = len(text) - text.count("\n")
    _, dup_chars = _find_duplicates([line for line in lines if line.strip()])
    if n_chars == 0 or dup_chars / n_chars >= FW_CHAR_DUPLICATES_RATIO:
        return "fineweb:char_dup_ratio"
    n_tokens = len(tokenize(text))
    if n_tokens == 0 or text.count("\n") / n_tokens > FW_NEW_LINE_RATIO:
        return "fineweb:list_ratio"
    return ""


def enabled(cfg: CurateConfig) -> list[tuple[str, Callable[[str], tuple[str, str]]]]:
    """The switched-on filters of a `CurateConfig` as (name, text -> (reason, text)), applied in this order.

    datatrove's FineWeb pipeline runs Gopher repetition before Gopher quality; both read the same text, so swapping
    them keeps the same documents and only changes which reason a document failing both gets. Quality goes first:
    it is cheaper and rejects most of what repetition would.
    """
    keep_text = lambda fn: lambda text: (fn(text), text)
    chain = [
        ("gopher_quality", cfg.gopher_quality, keep_text(gopher_quality)),
        ("gopher_repetition", cfg.gopher_repetition, keep_text(gopher_repetition)),
        ("c4", cfg.c4_filters, lambda text: c4_quality(text, cfg.c4_drop_lines)),
        ("fineweb", cfg.fineweb_filters, keep_text(fineweb_quality)),
    ]
    return [(name, fn) for name, on, fn in chain if on]


# --- PII ------------------------------------------------------------------------------------------------------
# E-mail: datatrove's PIIFormatter pattern (RFC 5322-ish local part, dotted domain or bracketed IPv4), case-insensitive.
_EMAIL_RE = re.compile(
    r"\b[a-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*@"
    r"(?:(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.)+[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
    r"|\[(?:(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?)\.){3}(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?)])",
    re.IGNORECASE,
)
# IPv4: maximal runs of dot-separated digits (so versions like 1.2.3.4.5 are left alone) that parse as an address.
_IPV4_RE = re.compile(r"\d+(?:\.\d+)+")
# Phones: international (+CC then 2-5 groups split by space, dot or dash, optional (area)), or North American
# (NNN) NNN-NNNN / NNN-NNN-NNNN / NNN.NNN.NNNN with one consistent separator, optionally after a 1. 7-15 digits
# (E.164 allows 15), not inside a longer word or number. The left boundary is checked in `scrub_pii`: a leading
# lookbehind would stop `re` from skipping ahead to the possible first characters.
_PHONE_RE = re.compile(
    r"(?:\+\d{1,3}(?:[ .-]?\(\d{1,4}\))?(?:[ .-]\d{1,5}){2,5}"
    r"|(?:1[ ]?)?\(\d{3}\)[ ]?\d{3}[-.]\d{4}"
    r"|(?:1[-. ])?\d{3}([-.])\d{3}\1\d{4}"
    r")(?![\w-]|\.\d)"
)

EMAIL, IP, PHONE = "<EMAIL>", "<IP>", "<PHONE>"
PII_KINDS = ("email", "ip", "phone")


def scrub_pii(text: str) -> tuple[str, tuple[int, int, int]]:
    """Replaces e-mails, public IPv4 addresses and phone numbers; returns the text and (emails, ips, phones)."""
    n_email = n_ip = n_phone = 0
    if "@" in text:
        text, n_email = _EMAIL_RE.subn(EMAIL, text)

    def ip(match: re.Match) -> str:
        nonlocal n_ip
        try:
            address = ipaddress.IPv4Address(match.group(0))
        except ValueError:  # not four octets of 0-255 without leading zeros
            return match.group(0)
        # `is_global` is False for private, loopback, link-local, shared (CGNAT), documentation and reserved ranges.
        if not address.is_global:
            return match.group(0)
        n_ip += 1
        return IP

    def phone(match: re.Match) -> str:
        nonlocal n_phone
        before = match.string[match.start() - 1] if match.start() else " "
        if before.isalnum() or before in "_+.-" or not 7 <= sum(c.isdigit() for c in match.group(0)) <= 15:
            return match.group(0)
        n_phone += 1
        return PHONE

    text = _PHONE_RE.sub(phone, _IPV4_RE.sub(ip, text))
    return text, (n_email, n_ip, n_phone)
