"""Reward functions for RL stages: `f(completions: list[str], extras: list[dict]) -> list[float]`.

`completions[i]` is the decoded text of completion i without its stop token; `extras[i]` holds the columns of its
prompt's record (`prompt` itself, as in TRL, and e.g. `answer`) plus what the stage adds for every completion:
  prompt_ids       list[int], the prompt's token ids (no padding)
  completion_ids   list[int], the sampled ids up to and including the stop token
  stopped          bool, the completion ended with a stop id (end-of-turn / EOS) within the length budget

Built in (`REWARD_FUNCS`, names for `grpo.reward_funcs`):
  answer        1.0 if `extract_answer(completion) == str(extras["answer"])`, else 0.0 (the synthetic world's exact
                answers: arithmetic results, cities, years, professions)
  format        1.0 if the completion stopped (emitted the end of turn) and has at most `FORMAT_MAX_WORDS` words
  restate       for the world's arithmetic prompts ("What is a op b? ..."), the share of a, op and b that the
                completion's shown work "x op y = ..." restates in place (1/3 each); 0.0 for other prompts
  reward_model  a trained reward model's score of prompt + completion ids (`reward_model_fn`, `grpo.reward_model`)

`RewardSet` combines several into a weighted sum and turns a function that raises, returns the wrong number of
values or a non-finite one into a one-line `RewardError` naming it (or, with `on_error="skip"`, a mask of the
completions whose rewards are to be ignored).
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxalign.errors import ConfigError, DataError

RewardFn = Callable[[list[str], list[dict[str, Any]]], Sequence[float]]

# A completion "short enough" for the format reward: the synthetic world's answers are one to a few words.
FORMAT_MAX_WORDS = 8


class RewardError(DataError):
    """A reward function failed (raised, or returned a wrong length or a non-finite value)."""


def extract_answer(completion: str) -> str:
    """The final answer of a completion: the text after its last '=' (all of it if none), whitespace-stripped,
    without one trailing '.'. "17", "17." and "12 + 5 = 17." all give "17"; "Paris." gives "Paris"."""
    text = completion.rsplit("=", 1)[-1].strip()
    return text[:-1].rstrip() if text.endswith(".") else text


def answer_reward(completions: list[str], extras: list[dict[str, Any]]) -> list[float]:
    """1.0 where `extract_answer(completion)` equals the record's `answer` exactly (as a string), else 0.0."""
    out = []
    for i, (text, extra) in enumerate(zip(completions, extras, strict=True)):
        if "answer" not in extra:
            raise KeyError(f"completion {i}: its record has no 'answer' column (has {sorted(extra)})")
        out.append(float(extract_answer(text) == str(extra["answer"]).strip()))
    return out


def format_reward(completions: list[str], extras: list[dict[str, Any]]) -> list[float]:
    """1.0 where the completion ended with a stop id and has at most FORMAT_MAX_WORDS words, else 0.0."""
    return [
        float(bool(extra["stopped"]) and len(text.split()) <= FORMAT_MAX_WORDS)
        for text, extra in zip(completions, extras, strict=True)
    ]


# The world's arithmetic question (jaxalign.data.synthetic) and a completion's shown work in its SFT answer format.
_ARITH_QUESTION = re.compile(r"What is (-?\d+) ([-+*]) (-?\d+)\?")
_SHOWN_WORK = re.compile(r"\s*(-?\d+) ([-+*]) (-?\d+) =")


def _user_text(prompt: Any) -> str:
    """The last user message of a conversational prompt, or a plain-text prompt itself."""
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
    return users[-1] if users else ""


def restate_reward(completions: list[str], extras: list[dict[str, Any]]) -> list[float]:
    """Partial credit for the first step of an arithmetic answer: restating the question. For a prompt asking
    "What is a op b?", the share of a, op and b (1/3 each) that the completion's leading "x op y =" repeats in
    place; 0.0 for a completion without that shape and for every other prompt (a constant within a prompt's group,
    so it leaves those groups' advantages alone). A dense, verifiable signal for what small models get wrong:
    on the quickstart's SFT policy 6% of sampled answers restate the problem, and 75% of those are right,
    against 8% of the others."""
    out = []
    for i, (text, extra) in enumerate(zip(completions, extras, strict=True)):
        if "prompt" not in extra:
            raise KeyError(f"completion {i}: its record has no 'prompt' column (has {sorted(extra)})")
        question = _ARITH_QUESTION.search(_user_text(extra["prompt"]))
        work = _SHOWN_WORK.match(text)
        if question is None or work is None:
            out.append(0.0)
            continue
        out.append(sum(q == w for q, w in zip(question.groups(), work.groups(), strict=True)) / 3.0)
    return out


def reward_model_fn(scorer: Any) -> RewardFn:
    """A learned reward model (`models.heads.RewardScorer`, e.g. `stages.reward.load_scorer(dir)`) as a reward
    function: the score of each `prompt_ids + completion_ids` (the rows it was trained on: rendered prompt,
    completion, end of turn)."""

    def reward_model(completions: list[str], extras: list[dict[str, Any]]) -> list[float]:
        rows = [list(e["prompt_ids"]) + list(e["completion_ids"]) for e in extras]
        return [float(x) for x in scorer.score(rows)]

    return reward_model


REWARD_FUNCS: dict[str, RewardFn] = {
    "answer": answer_reward,
    "format": format_reward,
    "restate": restate_reward,
}
ALL_NAMES = (*REWARD_FUNCS, "reward_model")


class RewardSet:
    """Named reward functions and their weights: `__call__` returns the weighted sum [N], each function's
    rewards {name: [N]} and a mask [N] of the completions whose rewards are valid (all True unless
    `on_error="skip"` dropped some). `on_error="error"` raises `RewardError` naming the function instead."""

    def __init__(self, funcs: dict[str, RewardFn], weights: Sequence[float] = (), on_error: str = "error"):
        if not funcs:
            raise ConfigError("grpo.reward_funcs is empty; name at least one of " + str(list(ALL_NAMES)))
        if weights and len(weights) != len(funcs):
            raise ConfigError(
                f"grpo.reward_weights={tuple(weights)} has {len(weights)} values for {len(funcs)} reward "
                f"functions {list(funcs)}; give one weight per function or none (all 1.0)"
            )
        self.funcs = dict(funcs)
        self.weights = tuple(float(w) for w in weights) if weights else (1.0,) * len(funcs)
        self.on_error = on_error

    def __call__(
        self, completions: list[str], extras: list[dict[str, Any]]
    ) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
        n = len(completions)
        total = np.zeros(n, np.float64)
        valid = np.ones(n, bool)
        per_func = {}
        for (name, fn), weight in zip(self.funcs.items(), self.weights, strict=True):
            values = self._call(name, fn, completions, extras)
            if values is None:  # skipped: the whole call failed
                values = np.zeros(n)
                valid[:] = False
            else:
                bad = ~np.isfinite(values)
                if bad.any():
                    if self.on_error != "skip":
                        i = int(np.argmax(bad))
                        raise RewardError(
                            f"reward function {name!r} returned {values[i]} for completion {i} "
                            f"({completions[i][:40]!r}); rewards must be finite (data.on_error='skip' ignores "
                            "the group)"
                        )
                    valid &= ~bad
                    values = np.where(bad, 0.0, values)
            per_func[name] = values
            total += weight * values
        return total, per_func, valid

    def _call(self, name, fn, completions, extras) -> np.ndarray | None:
        try:
            values = fn(completions, extras)
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence | np.ndarray):
                raise TypeError(f"returned {type(values).__name__}, not a list of floats")
            if len(values) != len(completions):
                raise ValueError(f"returned {len(values)} values for {len(completions)} completions")
            if not all(isinstance(v, numbers.Real) for v in values):
                raise TypeError(f"returned non-numbers: {list(values)[:4]}")
            return np.asarray([float(v) for v in values], np.float64)
        except Exception as e:
            if self.on_error == "skip":
                return None
            message = " ".join(str(e).split()) or type(e).__name__
            raise RewardError(f"reward function {name!r} failed: {type(e).__name__}: {message}") from e


def overlong_penalty(lengths_N: np.ndarray, max_length: int, buffer: int, factor: float = 1.0) -> np.ndarray:
    """DAPO's soft overlong punishment [N]: 0 up to `max_length - buffer` tokens, then falling linearly to
    `-factor` at `max_length` (and `-factor` beyond)."""
    if buffer <= 0:
        return np.zeros(len(lengths_N))
    expected = max_length - buffer
    lengths_N = np.asarray(lengths_N, np.float64)
    return np.where(
        lengths_N <= expected,
        0.0,
        np.maximum((expected - lengths_N) / buffer * factor, -factor),
    )


def check_names(names: Sequence[str]) -> None:
    for name in names:
        if name not in ALL_NAMES:
            raise ConfigError(f"grpo.reward_funcs has {name!r}; accepted: {list(ALL_NAMES)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"grpo.reward_funcs={tuple(names)} names a function twice")


__all__ = [
    "ALL_NAMES",
    "REWARD_FUNCS",
    "RewardError",
    "RewardSet",
    "answer_reward",
    "check_names",
    "extract_answer",
    "format_reward",
    "overlong_penalty",
    "restate_reward",
    "reward_model_fn",
]
