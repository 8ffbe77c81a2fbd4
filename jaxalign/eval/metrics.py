"""Pure metric functions over decoded completions and log-probs (no model): exact match, arithmetic accuracy,
length, perplexity, KL estimates and multiple-choice picks.

Definitions (what the numbers in `eval.json` mean):
  normalize_answer(s)    SQuAD's normalisation: lower case, punctuation removed, the articles a/an/the removed,
                         whitespace collapsed.
  exact_match(p, g)      1.0 if normalize_answer(p) == normalize_answer(g) (SQuAD EM).
  contains_match(p, g)   1.0 if the normalised gold's words appear as a contiguous run of whole words in the
                         normalised prediction ("Ada Abbott was born in Lisbon." contains "Lisbon"; "Lisbonne" does
                         not); an empty gold never matches.
  qa_exact_match         mean contains_match over the held-out fact questions: a chat model answers in a sentence,
                         and the world's gold values (a city, a year, a profession) are whole words.
  arith_answer(p)        the first integer after the last "=" of the completion (of all of it when it has none):
                         "17", "17." and "12 + 5 = 17." all give 17, as the GRPO answer reward reads them.
  arith_accuracy         mean [arith_answer(completion) == int(answer)].
  mean_length            mean completion length in tokens, the end-of-turn token included when emitted.
  perplexity             exp(sum of token NLL / number of tokens) (token-weighted, not a mean of per-text values).

Shape legend: B rows, C completion tokens.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

import numpy as np

from jaxalign.errors import ConfigError

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_INT = re.compile(r"-?\d+")


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's `normalize_answer`: lower-case, drop punctuation, drop articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    """SQuAD exact match: 1.0 when the normalised strings are equal."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def contains_match(prediction: str, gold: str) -> float:
    """1.0 when the normalised gold is a contiguous run of whole words of the normalised prediction."""
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not g:
        return 0.0
    return float(any(p[i : i + len(g)] == g for i in range(len(p) - len(g) + 1)))


def _check_pairs(name: str, predictions: Sequence, golds: Sequence) -> None:
    if len(predictions) != len(golds) or not golds:
        raise ConfigError(
            f"{name}: {len(predictions)} predictions for {len(golds)} gold answers (need equal, > 0)"
        )


def qa_exact_match(completions: Sequence[str], golds: Sequence[str], *, strict: bool = False) -> float:
    """Mean `contains_match` (or SQuAD `exact_match` with `strict`) of the completions against their golds."""
    _check_pairs("qa_exact_match", completions, golds)
    match = exact_match if strict else contains_match
    return float(np.mean([match(c, g) for c, g in zip(completions, golds, strict=True)]))


def arith_answer(completion: str) -> int | None:
    """The first integer after the last "=" of `completion` (of all of it without "="); None if there is none."""
    found = _INT.search(completion.rsplit("=", 1)[-1])
    return int(found.group()) if found else None


def arith_accuracy(completions: Sequence[str], answers: Sequence[str | int]) -> float:
    """Share of completions whose `arith_answer` equals the integer answer."""
    _check_pairs("arith_accuracy", completions, answers)
    return float(np.mean([arith_answer(c) == int(a) for c, a in zip(completions, answers, strict=True)]))


def mean_length(mask_BxC: np.ndarray) -> float:
    """Mean completion length in tokens from a sampler mask (1 up to and including the end-of-turn token)."""
    return float(np.mean(np.sum(np.asarray(mask_BxC), axis=-1)))


def perplexity(nll_sum: float, tokens: float) -> float:
    """exp(total negative log-likelihood in nats / number of tokens)."""
    if tokens <= 0:
        raise ConfigError(f"perplexity: no tokens to score (got {tokens})")
    return float(np.exp(nll_sum / tokens))


KL_ESTIMATORS = ("k1", "k3")


def sequence_kl(
    logps_BxC: np.ndarray, ref_logps_BxC: np.ndarray, mask_BxC: np.ndarray, estimator: str
) -> np.ndarray:
    """Per-sequence KL(pi || pi_ref) estimate [B] on tokens sampled from pi: the sum over completion tokens of
    Schulman's k1 = log pi - log pi_ref or k3 = r - 1 - log r (r = pi_ref / pi; >= 0), in nats."""
    if estimator not in KL_ESTIMATORS:
        raise ConfigError(f"eval.kl_estimator={estimator!r} is not one of {list(KL_ESTIMATORS)}")
    logps, ref, mask = (np.asarray(x, np.float64) for x in (logps_BxC, ref_logps_BxC, mask_BxC))
    d = ref - logps
    per_token = -d if estimator == "k1" else np.expm1(d) - d
    return np.sum(per_token * (mask > 0), axis=-1)


def mc_pick(choice_logps: Sequence[float], choice_lengths: Sequence[int] | None = None) -> int:
    """Index of the most likely choice: max summed log-prob, or with `choice_lengths` (lm-eval's acc_norm: the
    choice's length in UTF-8 bytes) max log-prob per byte. Ties go to the first choice (as numpy's argmax)."""
    scores = np.asarray(choice_logps, np.float64)
    if choice_lengths is not None:
        scores = scores / np.maximum(np.asarray(choice_lengths, np.float64), 1.0)
    return int(np.argmax(scores))
