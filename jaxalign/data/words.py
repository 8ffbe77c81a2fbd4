"""English words as datatrove's English word tokenizer gives them: a port of spaCy's rule-based tokenizer.

datatrove 0.10's English word tokenizer is `spacy.blank("en")` (no trained model) with whitespace tokens dropped and
tokens stripped (datatrove/utils/word_tokenizers.py SpaCyTokenizer.word_tokenize). The Gopher, C4 and FineWeb filters
count these words, so ours must be the same for their decisions to be.

Ported (spacy/tokenizer.pyx, spaCy 3.8), in Python:
- `Tokenizer._tokenize_affixes`: the text is cut at whitespace (`str.isspace`, as spaCy); whitespace runs become
  tokens in spaCy that datatrove then drops, so here whitespace only separates chunks.
- a chunk that is a tokenizer exception ("don't" -> "do" "n't", "e.g.", ":)") is its exception's tokens;
- `_split_affixes`: otherwise a prefix and a suffix are stripped off repeatedly (stopping as soon as what is left, or
  what is left without the prefix or the suffix just found, is an exception);
- `_attach_tokens`: the rest is an exception, a URL (URL_MATCH), or cut at its infix matches (skipping one at
  position 0), and the suffixes follow in reverse order of stripping;
- `_apply_special_cases` (the special-case PhraseMatcher, `faster_heuristics` on): exceptions that contain a prefix,
  suffix or infix are also found as token sequences (their own tokenization without exceptions, e.g. "'" "'") and
  replaced by their tokens ("''"): longest first, then leftmost, skipping any that touch a token already covered.
The data is spaCy's own: its compiled prefix / suffix / infix regexes and URL_MATCH (Python `re` patterns, so every
match is the same) and its 1,343 exceptions, in word_rules.json, written from the installed spaCy by
tests/fixtures/make_word_rules.py, so spaCy is not a dependency of the core.

Simplified: spaCy runs the special-case matcher over the whole document; here it runs inside each whitespace-free
chunk. A match across whitespace never applies in spaCy (the rule is looked up by the span's text, spaces included),
but it could in principle claim a token first and hide an overlapping match inside the chunk; no such case occurs in
the test corpus (tests/data/test_words.py compares every token of 644 documents). Token attributes (NORM, `spacy`
flags, offsets) are not kept: only the texts.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from typing import NamedTuple

from etils import epath

RULES_PATH = epath.Path(__file__).parent / "word_rules.json"
# Speed only (the result is the same): spaCy's suffix regex is ~100 alternatives ending in "$" that `search` tries at
# every position, and its infix regex is scanned everywhere. A suffix can only be found when the text ends in
# something other than an ASCII letter or digit, ends in 's ('S, ’s, ’S), or holds a digit (units and currencies
# follow one); an infix needs one of its characters (. + - * ^ , ~ : < > = /) or a non-ASCII one (… – — and
# symbols). These are read off spacy/lang/punctuation.py; tests/data/test_words.py checks every token of 644
# documents against spaCy.
_MAYBE_SUFFIX = re.compile(r"[^A-Za-z0-9]\Z|['’][sS]\Z|[0-9]").search
_MAYBE_INFIX = re.compile(r"[.+\-*^,~:<>=/]|[^\x00-\x7f]").search
_CACHE_SIZE = 100_000  # chunks whose tokens are remembered (~20 MB; spaCy caches too): most chunks repeat


class _Rules(NamedTuple):
    prefix: Callable  # re.Pattern.match (every alternative is anchored at the start)
    suffix: Callable  # re.Pattern.search; the pattern is anchored at the end
    infix: Callable  # re.Pattern.finditer
    url: Callable  # re.Pattern.match
    exceptions: dict[str, tuple[str, ...]]
    phrases: dict[tuple[str, ...], str]  # an exception's tokens without exceptions -> the exception
    max_phrase: int
    phrase_starts: frozenset[str]  # the first tokens of `phrases`
    punctuation: frozenset[str]
    cache: dict[str, tuple[str, ...]]


@functools.cache
def rules() -> _Rules:
    """spaCy's English tokenizer rules and datatrove's punctuation set, read once from word_rules.json."""
    data = json.loads(RULES_PATH.read_text(encoding="utf-8"))
    # spaCy calls prefix_search, but every alternative starts with "^" (compile_prefix_regex), so `match` is the
    # same and does not try every position.
    prefix = re.compile(data["prefix"]).match
    suffix = re.compile(data["suffix"]).search
    infix = re.compile(data["infix"]).finditer
    exceptions = {k: tuple(v) for k, v in data["exceptions"].items()}
    partial = _Rules(
        prefix, suffix, infix, re.compile(data["url"]).match, {}, {}, 0, frozenset(), frozenset(), {}
    )
    phrases = {}
    for chunk in exceptions:
        # spaCy's add_special_case: only exceptions with an affix or infix go to the matcher.
        if _length(prefix(chunk)) or _length(suffix(chunk)) or any(True for _ in infix(chunk)):
            phrases[_split(partial, chunk)] = chunk
    return _Rules(
        prefix,
        suffix,
        infix,
        partial.url,
        exceptions,
        phrases,
        max(map(len, phrases), default=0),
        frozenset(p[0] for p in phrases),
        frozenset(data["punctuation"]),
        {},
    )


def _length(match) -> int:
    return match.end() - match.start() if match is not None else 0


def _split(r: _Rules, s: str) -> tuple[str, ...]:
    """The tokens of one whitespace-free chunk `s` by spaCy's affix and infix rules and `r.exceptions`."""
    exc = r.exceptions
    if s in exc:
        return exc[s]
    prefixes: list[str] = []
    suffixes: list[str] = []
    last = -1
    while s and len(s) != last:  # _split_affixes
        if s in exc:
            break
        last = len(s)
        pre_len = _length(r.prefix(s))
        if pre_len and s[pre_len:] in exc:
            prefixes.append(s[:pre_len])
            s = s[pre_len:]
            break
        rest = s[pre_len:]
        suf_len = _length(r.suffix(rest)) if _MAYBE_SUFFIX(rest) else 0
        if suf_len and s[:-suf_len] in exc:
            suffixes.append(s[-suf_len:])
            s = s[:-suf_len]
            break
        if pre_len and suf_len and pre_len + suf_len <= len(s):
            prefixes.append(s[:pre_len])
            suffixes.append(s[-suf_len:])
            s = s[pre_len:-suf_len]
        elif pre_len:
            prefixes.append(s[:pre_len])
            s = s[pre_len:]
        elif suf_len:
            suffixes.append(s[-suf_len:])
            s = s[:-suf_len]
    tokens = prefixes
    if s:  # _attach_tokens
        if s in exc:
            tokens.extend(exc[s])
        elif r.url(s):
            tokens.append(s)
        elif not _MAYBE_INFIX(s):
            tokens.append(s)
        else:
            start = 0
            for m in r.infix(s):
                a, b = m.span()
                if a == 0:  # spaCy skips an infix at the very start
                    continue
                if a != start:
                    tokens.append(s[start:a])
                if a != b:
                    tokens.append(s[a:b])
                start = b
            if s[start:]:
                tokens.append(s[start:])
    tokens.extend(reversed(suffixes))
    return tuple(tokens)


def _apply_special_cases(r: _Rules, tokens: tuple[str, ...]) -> tuple[str, ...]:
    """spaCy's special-case matcher on one chunk's tokens: token runs that spell an exception become its tokens."""
    if r.phrase_starts.isdisjoint(tokens):  # most chunks: no phrase can start here
        return tokens
    n = len(tokens)
    spans = [
        (i, i + k)
        for i in range(n)
        for k in range(1, min(r.max_phrase, n - i) + 1)
        if tokens[i : i + k] in r.phrases
    ]
    if not spans:
        return tokens
    # _filter_special_spans: longest first, ties to the leftmost; a span is kept unless its first or last token is
    # covered by a span seen before (kept or not).
    spans.sort(key=lambda span: (span[0] - span[1], span[0]))
    seen: set[int] = set()
    kept = []
    for a, b in spans:
        if a not in seen and b - 1 not in seen:
            kept.append((a, b))
        seen.update(range(a, b))
    out: list[str] = []
    i = 0
    for a, b in sorted(kept):
        out.extend(tokens[i:a])
        out.extend(r.exceptions["".join(tokens[a:b])])
        i = b
    out.extend(tokens[i:])
    return tuple(out)


def chunk_words(chunk: str) -> tuple[str, ...]:
    """The tokens spaCy's English tokenizer gives a whitespace-free chunk (cached)."""
    r = rules()
    tokens = r.cache.get(chunk)
    if tokens is None:
        if chunk.isalpha():
            # Letters only: every prefix, suffix and infix pattern needs a digit or a non-letter, so only an
            # exception ("cannot", "dont") splits it; the most common chunk skips the regexes.
            tokens = r.exceptions.get(chunk, (chunk,))
        else:
            tokens = _split(r, chunk)
        if len(tokens) > 1 and r.max_phrase:
            tokens = _apply_special_cases(r, tokens)
        if len(r.cache) < _CACHE_SIZE:
            r.cache[chunk] = tokens
    return tokens


def words(text: str) -> list[str]:
    """The words of `text` as datatrove's English word tokenizer (spaCy's `blank("en")`, whitespace dropped) has them."""
    cache = rules().cache
    out: list[str] = []
    for chunk in text.split():
        tokens = cache.get(chunk)
        out.extend(tokens if tokens is not None else chunk_words(chunk))
    return out


def punctuation() -> frozenset[str]:
    """datatrove's PUNCTUATION_SET: a word made only of these is a symbol, which Gopher quality does not count."""
    return rules().punctuation
