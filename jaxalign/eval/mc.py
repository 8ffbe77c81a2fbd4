"""Multiple-choice log-likelihood scoring over user JSONL, as lm-eval's multiple-choice tasks.

One record a line: `{"question": str, "choices": [str, ...], "answer": index or the text of a choice, "id"?}`
(an item without `id` is named by `decontam.item_id(question)`, as curation's decontamination names it). Each choice
is scored as a continuation of the question: context = [bos] + ids(question), continuation = ids(" " + choice),
score = the sum of the continuation tokens' log-probs. Reported, as lm-eval:
  mc_acc       share of questions whose highest-scoring choice is the answer;
  mc_acc_norm  the same with each score divided by the choice's length in UTF-8 bytes (lm-eval's acc_norm), which
               removes the bias towards short choices.
  mc_*_clean   with `contaminated` ids (curation's W/contamination.json), the same over the other records only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxalign import storage
from jaxalign.data import decontam
from jaxalign.errors import DataError
from jaxalign.eval import metrics


def read_records(pattern: str) -> list[dict[str, Any]]:
    """Records of every file matching `pattern` (a path or glob), checked; `answer` becomes a choice index.
    A malformed record raises a DataError naming file:line."""
    path = storage.path(pattern)
    files = sorted(path.parent.glob(path.name)) if any(c in path.name for c in "*?[") else [path]
    if not files or not all(f.exists() for f in files):
        raise DataError(f"eval.mc_input={pattern!r}: no such file")
    out = []
    for f in files:
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                out.append(_check(line, f"{f}:{n}"))
    if not out:
        raise DataError(f"eval.mc_input={pattern!r}: no records")
    return out


def _check(line: str, where: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with question, choices, answer")
    question, choices, answer = record.get("question"), record.get("choices"), record.get("answer")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: 'question' must be a non-empty string, got {question!r:.80}")
    if (
        not isinstance(choices, list)
        or len(choices) < 2
        or not all(isinstance(c, str) and c.strip() for c in choices)
    ):
        raise DataError(f"{where}: 'choices' must be a list of >= 2 non-empty strings, got {choices!r:.80}")
    if isinstance(answer, str) and answer in choices:
        answer = choices.index(answer)
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise DataError(
            f"{where}: 'answer' must be an index in [0, {len(choices)}) or the text of one of the choices, "
            f"got {answer!r:.80}"
        )
    raw_id = record.get("id")
    item = decontam.item_id(question) if raw_id is None else str(raw_id)
    return {"question": question, "choices": choices, "answer": answer, "id": item}


def choice_pairs(tokenizer: Any, record: dict[str, Any]) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) of each choice of a record."""
    context = [tokenizer.bos_id, *tokenizer.encode(record["question"])]
    return [(context, tokenizer.encode(" " + c)) for c in record["choices"]]


def score(records: Sequence[dict[str, Any]], choice_logps: Sequence[Sequence[float]]) -> dict[str, float]:
    """mc_acc and mc_acc_norm from each record's summed choice log-probs (nats, one per choice)."""
    acc, acc_norm = [], []
    for record, logps in zip(records, choice_logps, strict=True):
        lengths = [len(c.encode("utf-8")) for c in record["choices"]]
        acc.append(metrics.mc_pick(logps) == record["answer"])
        acc_norm.append(metrics.mc_pick(logps, lengths) == record["answer"])
    return {
        "mc_acc": float(np.mean(acc)),
        "mc_acc_norm": float(np.mean(acc_norm)),
        "mc_count": float(len(acc)),
    }


def evaluate(
    model: Any,
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    batch_size: int,
    contaminated: set[str] | None = None,
) -> dict[str, float]:
    """Scores every record's choices with the model (`policy.continuation_logps`) and returns `score(...)`; with
    `contaminated` (a set of ids) also `score(...)` of the other records as mc_acc_clean, mc_acc_norm_clean and
    mc_count_clean (0 and NaN scores when every record is contaminated)."""
    from jaxalign.eval.policy import continuation_logps

    pairs, owner = [], []
    for i, record in enumerate(records):
        for pair in choice_pairs(tokenizer, record):
            pairs.append(pair)
            owner.append(i)
    logps = continuation_logps(model, pairs, batch_size, tokenizer.pad_id)
    per_record: list[list[float]] = [[] for _ in records]
    for i, lp in zip(owner, logps, strict=True):
        per_record[i].append(float(lp.sum(dtype=np.float64)))
    out = score(records, per_record)
    if contaminated is not None:
        clean = [k for k, r in enumerate(records) if r["id"] not in contaminated]
        if clean:
            sub = score([records[k] for k in clean], [per_record[k] for k in clean])
        else:
            sub = {"mc_acc": float("nan"), "mc_acc_norm": float("nan"), "mc_count": 0.0}
        out.update({f"{k}_clean": v for k, v in sub.items()})
    return out
