"""Grain input pipelines of the stages that start from a prompt: preference pairs (DPO, reward model),
unpaired preference (KTO) and RL prompts (GRPO, PPO). The LM and SFT pipelines are in `jaxalign.data.pipelines`.

Shapes: B = this process's rows (global batch / process count), T = `seq_len`, P = `max_prompt_length`.

Preference batches (`preference_loader`), one pair per row, right-padded, each [B, T] (weights float32):
  chosen_inputs, chosen_targets, chosen_weights, chosen_positions, chosen_segment_ids
  rejected_inputs, rejected_targets, rejected_weights, rejected_positions, rejected_segment_ids
  `weights` are 1.0 on completion targets only; `segment_ids` are 1 on real tokens, 0 on padding. Chosen and rejected
  share the prompt; `concatenated(batch)` stacks them into an LM-style batch of 2B rows (chosen first).

RL prompt batches (`rl_loader`):
  prompt_ids          int32 [B, P], left-padded with pad_id (generation continues from the last column)
  prompt_mask         int32 [B, P], 1 on real tokens
  prompt_positions    int32 [B, P], 0, 1, ... over the real tokens (0 on padding)
  extras              a Python list of B dicts: every column of the record (e.g. `prompt`, `answer`), for rewards
                      (TRL's reward functions get the prompts and the dataset's columns the same way)

Records are conversational (`prompt`/`chosen`/`rejected`/`completion` as message lists, rendered with a chat
template) or plain strings, as in TRL's dataset types. A loader's `pattern` is a glob, or a
`jaxalign.data.mixture.Mixture` of globs and weights (`data.mixture`). The shared machinery (sharding over
processes, workers, the checkpointable `Loader`) is in `jaxalign.data.loader`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxalign.data import chat
from jaxalign.data.loader import (
    Loader,
    assemble,
    continuation_fields,
    is_conversational,
    messages_field,
    stacked,
    string_field,
)
from jaxalign.data.mixture import Mixture
from jaxalign.data.pipelines import _cut_to
from jaxalign.data.tokenizer import Tokenizer
from jaxalign.errors import ConfigError, DataError

# --- prompts (preference and RL) ----------------------------------------------------------------------------------


def _prompt_ids(tokenizer: Tokenizer, template: str, record: dict[str, Any], where: str) -> list[int]:
    """A prompt's ids: a message list rendered with the assistant header appended, or [bos] + a string's ids."""
    if is_conversational(record.get("prompt")):
        messages = messages_field(record, "prompt", where, last="user")
        ids, _ = chat.render(tokenizer, messages, template, add_generation_prompt=True)
        return ids
    prompt = string_field(record, "prompt", where)
    if not prompt.strip():
        raise DataError(f"{where}: field 'prompt' is empty")
    return [tokenizer.bos_id, *tokenizer.encode(prompt)]


def _cut_prompt(
    ids: list[int], limit: int, truncation_mode: str, overlong: str, where: str
) -> tuple[list[int], bool]:
    if len(ids) <= limit:
        return ids, False
    if overlong == "reject":
        raise DataError(
            f"{where}: the prompt has {len(ids)} tokens, over data.max_prompt_length={limit} (data.overlong='reject')"
        )
    return (ids[-limit:] if truncation_mode == "keep_end" else ids[:limit]), True


def _check_prompt_options(max_prompt_length: int, truncation_mode: str) -> None:
    if max_prompt_length <= 0:
        raise ConfigError(f"data.max_prompt_length={max_prompt_length} must be > 0")
    if truncation_mode not in ("keep_end", "keep_start"):
        raise ConfigError(
            f"data.truncation_mode={truncation_mode!r} is not one of ['keep_end', 'keep_start']"
        )


# --- preference ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _PreferenceEncode:
    """A pair as two right-padded rows that share the prompt."""

    tokenizer: Tokenizer
    seq_len: int
    max_prompt_length: int
    template: str
    truncation_mode: str
    overlong: str
    # A numeric record field copied to the row as `margin` (reward models), or "".
    margin_field: str = ""
    # Cached reference log-probs by record location ("file:line" -> (chosen, rejected)): copied to the row as
    # `ref_chosen_logps`/`ref_rejected_logps`.
    reference: Any = None
    # Keep the record's "file:line" in the row as `where` (a string; for the reference pass).
    with_where: bool = False

    def _completion(self, record: dict[str, Any], field: str, where: str) -> tuple[list[int], list[int]]:
        """(ids, mask) of a completion as it follows the prompt."""
        tok = self.tokenizer
        if is_conversational(record.get(field)):
            if not is_conversational(record.get("prompt")):
                raise DataError(f"{where}: field {field!r} is a message list but 'prompt' is not")
            prompt, messages = continuation_fields(record, field, where)
            if not "".join(m["content"] for m in messages).strip():
                raise DataError(f"{where}: field {field!r} is empty")
            _, ids, mask = chat.render_continuation(tok, prompt, messages, self.template)
            return ids, mask
        text = string_field(record, field, where)
        if not text.strip():
            raise DataError(f"{where}: field {field!r} is empty")
        ids = [*tok.encode(text), tok.eos_id]
        return ids, [1] * len(ids)

    def _row(
        self, prompt_ids: list[int], ids: list[int], mask: list[int], prefix: str
    ) -> dict[str, np.ndarray]:
        seq = np.asarray(prompt_ids + ids, np.int32)
        weight = np.asarray([0] * len(prompt_ids) + mask, np.float32)
        n = len(seq) - 1  # real targets
        row = {
            "inputs": np.full(self.seq_len, self.tokenizer.pad_id, np.int32),
            "targets": np.full(self.seq_len, self.tokenizer.pad_id, np.int32),
            "weights": np.zeros(self.seq_len, np.float32),
            "positions": np.zeros(self.seq_len, np.int32),
            "segment_ids": np.zeros(self.seq_len, np.int32),
        }
        row["inputs"][:n], row["targets"][:n], row["weights"][:n] = seq[:-1], seq[1:], weight[1:]
        row["positions"][:n], row["segment_ids"][:n] = np.arange(n), 1
        return {f"{prefix}_{k}": v for k, v in row.items()}

    def __call__(self, record: dict[str, Any], where: str) -> tuple[list[dict], int]:
        for field in ("prompt", "chosen", "rejected"):
            if record.get(field) is None:
                present = sorted(k for k in record if k != "_where")
                raise DataError(f"{where}: missing field {field!r} (has {present})")
        if record["chosen"] == record["rejected"]:
            raise DataError(f"{where}: 'chosen' and 'rejected' are identical")
        prompt_ids = _prompt_ids(self.tokenizer, self.template, record, where)
        prompt_ids, truncated = _cut_prompt(
            prompt_ids, self.max_prompt_length, self.truncation_mode, self.overlong, where
        )
        out: dict[str, np.ndarray] = {}
        for side in ("chosen", "rejected"):
            ids, mask = self._completion(record, side, where)
            # prompt + completion may hold seq_len + 1 tokens (seq_len next-token targets).
            ids, mask, cut = _cut_to(
                ids, mask, self.seq_len + 1 - len(prompt_ids), self.overlong, where, f"{side!r}"
            )
            truncated |= cut
            if not any(mask):
                raise DataError(f"{where}: {side!r} has no trained token left after truncation")
            out.update(self._row(prompt_ids, ids, mask, side))
        if self.margin_field:
            margin = record.get(self.margin_field)
            if isinstance(margin, bool) or not isinstance(margin, (int, float)):
                raise DataError(f"{where}: field {self.margin_field!r} must be a number, got {margin!r}")
            out["margin"] = np.float32(margin)
        if self.reference is not None:
            if where not in self.reference:
                raise DataError(
                    f"{where}: no cached reference log-probs for this record (the data changed since they were "
                    "computed: delete the reference_logps directory of the workdir to recompute them)"
                )
            out["ref_chosen_logps"], out["ref_rejected_logps"] = (
                np.float32(x) for x in self.reference[where]
            )
        if self.with_where:
            out["where"] = where
        return [out], int(truncated)


def preference_loader(
    pattern: str | Mixture,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    max_prompt_length: int,
    truncation_mode: str = "keep_end",
    chat_template: str = "chatml",
    shuffle: bool = True,
    num_workers: int = 0,
    on_error: str = "error",
    overlong: str = "truncate",
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    shards: int = 0,
    shard_by: str = "record",
    margin_field: str = "",
    reference: Any = None,
) -> Loader:
    """Preference batches (`chosen_*`, `rejected_*`, module doc), one pair per row of `seq_len` targets.

    `margin_field` adds `margin` [B] from that record field; `reference` (file:line -> (chosen, rejected) reference
    log-probs, see `preference_encoder`) adds `ref_chosen_logps`/`ref_rejected_logps` [B].

    A prompt over `max_prompt_length` tokens keeps its end (`truncation_mode="keep_end"`, as TRL) or its start; a
    completion that does not fit after the prompt keeps its start. With `overlong="reject"` either is a bad record.
    """
    _check_prompt_options(max_prompt_length, truncation_mode)
    chat.check_template(tokenizer, chat_template)
    if max_prompt_length >= seq_len:
        raise ConfigError(
            f"data.max_prompt_length={max_prompt_length} must be smaller than train.seq_len={seq_len} "
            "(the completion needs room)"
        )
    encode = _PreferenceEncode(
        tokenizer,
        seq_len,
        max_prompt_length,
        chat_template,
        truncation_mode,
        overlong,
        margin_field,
        reference,
    )
    return assemble(
        pattern,
        encode,
        stacked(),
        kind="preference",
        seq_len=seq_len,
        packing=False,
        global_batch_size=global_batch_size,
        seed=seed,
        shuffle=shuffle,
        num_workers=num_workers,
        on_error=on_error,
        overlong=overlong,
        num_epochs=num_epochs,
        process_index=process_index,
        process_count=process_count,
        shards=shards,
        shard_by=shard_by,
    )


def preference_encoder(
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    max_prompt_length: int,
    truncation_mode: str = "keep_end",
    chat_template: str = "chatml",
    overlong: str = "truncate",
) -> Callable[[dict[str, Any], str], tuple[list[dict], int]]:
    """The preference rows of one record, `encode(record, "file:line") -> ([row], truncated)`, with the row's
    `where`: for a pass over every record outside a loader (the DPO reference pass)."""
    _check_prompt_options(max_prompt_length, truncation_mode)
    chat.check_template(tokenizer, chat_template)
    return _PreferenceEncode(
        tokenizer, seq_len, max_prompt_length, chat_template, truncation_mode, overlong, with_where=True
    )


# --- unpaired preference (KTO) ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _KtoEncode(_PreferenceEncode):
    """Unpaired examples: `prompt`/`completion`/`label` (TRL's unpaired preference type) as one example, or a paired
    `prompt`/`chosen`/`rejected` record as two (chosen desirable, rejected not: TRL's `unpair_preference_dataset`).
    An example keeps its prompt and completion apart, so the batch can pair prompts with other completions."""

    def __call__(self, record: dict[str, Any], where: str) -> tuple[list[dict], int]:
        if record.get("prompt") is None:
            present = sorted(k for k in record if k != "_where")
            raise DataError(f"{where}: missing field 'prompt' (has {present})")
        if "completion" in record:
            label = record.get("label")
            if not isinstance(label, bool):
                raise DataError(f"{where}: field 'label' must be true or false, got {label!r}")
            sides = [("completion", label)]
        elif "chosen" in record and "rejected" in record:
            if record["chosen"] == record["rejected"]:
                raise DataError(f"{where}: 'chosen' and 'rejected' are identical")
            sides = [("chosen", True), ("rejected", False)]
        else:
            present = sorted(k for k in record if k != "_where")
            raise DataError(
                f"{where}: expected 'completion' and 'label', or 'chosen' and 'rejected' (has {present})"
            )
        prompt_ids = _prompt_ids(self.tokenizer, self.template, record, where)
        prompt_ids, truncated = _cut_prompt(
            prompt_ids, self.max_prompt_length, self.truncation_mode, self.overlong, where
        )
        out = []
        for field, label in sides:
            ids, mask = self._completion(record, field, where)
            ids, mask, cut = _cut_to(
                ids, mask, self.seq_len + 1 - len(prompt_ids), self.overlong, where, repr(field)
            )
            truncated |= cut
            if not any(mask):
                raise DataError(f"{where}: {field!r} has no trained token left after truncation")
            out.append(
                {
                    "prompt": np.asarray(prompt_ids, np.int32),
                    "completion": np.asarray(ids, np.int32),
                    "mask": np.asarray(mask, np.int32),
                    "label": label,
                    "record": where,
                }
            )
        return out, int(truncated)


@dataclasses.dataclass(frozen=True)
class _KtoBatch:
    """B examples -> the rows `inputs`, `targets`, `weights`, `positions`, `segment_ids` [B, T], `desirable` [B], and
    the same five `kl_*` rows pairing prompt i with the completion of the nearest earlier row (cyclically) of another
    record: TRL's rotation by one (`completions[-1:] + completions[:-1]`), skipping the other half of a pair."""

    seq_len: int
    pad_id: int

    def _row(self, prompt: np.ndarray, completion: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        completion, mask = (
            completion[: self.seq_len + 1 - len(prompt)],
            mask[: self.seq_len + 1 - len(prompt)],
        )
        seq = np.concatenate([prompt, completion])
        weight = np.concatenate([np.zeros(len(prompt), np.float32), mask.astype(np.float32)])
        n = len(seq) - 1
        T = self.seq_len
        row = {
            "inputs": np.full(T, self.pad_id, np.int32),
            "targets": np.full(T, self.pad_id, np.int32),
            "weights": np.zeros(T, np.float32),
            "positions": np.zeros(T, np.int32),
            "segment_ids": np.zeros(T, np.int32),
        }
        row["inputs"][:n], row["targets"][:n], row["weights"][:n] = seq[:-1], seq[1:], weight[1:]
        row["positions"][:n], row["segment_ids"][:n] = np.arange(n), 1
        return row

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
        B = len(examples)
        rows = [self._row(e["prompt"], e["completion"], e["mask"]) for e in examples]
        kl_rows = []
        for i, e in enumerate(examples):
            j = next(
                ((i - d) % B for d in range(1, B) if examples[(i - d) % B]["record"] != e["record"]),
                (i - 1) % B,
            )
            kl_rows.append(self._row(e["prompt"], examples[j]["completion"], examples[j]["mask"]))
        batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        batch.update({f"kl_{k}": np.stack([r[k] for r in kl_rows]) for k in kl_rows[0]})
        batch["desirable"] = np.asarray([e["label"] for e in examples], np.float32)
        return batch


def kto_loader(
    pattern: str | Mixture,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    max_prompt_length: int,
    truncation_mode: str = "keep_end",
    chat_template: str = "chatml",
    shuffle: bool = True,
    num_workers: int = 0,
    on_error: str = "error",
    overlong: str = "truncate",
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    shards: int = 0,
    shard_by: str = "record",
) -> Loader:
    """KTO batches (`_KtoBatch`): unpaired examples, one per row, with their mismatched KL rows. Paired records are
    unpaired (module doc of `_KtoEncode`)."""
    _check_prompt_options(max_prompt_length, truncation_mode)
    chat.check_template(tokenizer, chat_template)
    if max_prompt_length >= seq_len:
        raise ConfigError(
            f"data.max_prompt_length={max_prompt_length} must be smaller than train.seq_len={seq_len} "
            "(the completion needs room)"
        )
    encode = _KtoEncode(tokenizer, seq_len, max_prompt_length, chat_template, truncation_mode, overlong)
    return assemble(
        pattern,
        encode,
        stacked(_KtoBatch(seq_len, tokenizer.pad_id)),
        kind="kto",
        seq_len=seq_len,
        packing=False,
        global_batch_size=global_batch_size,
        seed=seed,
        shuffle=shuffle,
        num_workers=num_workers,
        on_error=on_error,
        overlong=overlong,
        num_epochs=num_epochs,
        process_index=process_index,
        process_count=process_count,
        shards=shards,
        shard_by=shard_by,
    )


def concatenated(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A preference batch as LM keys over [2B, T]: rows [0, B) are the chosen, rows [B, 2B) the rejected."""
    keys = ("inputs", "targets", "weights", "positions", "segment_ids")
    return {k: np.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]]) for k in keys}


# --- RL prompts ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _RlEncode:
    """A prompt, left-padded, with the other columns of its record."""

    tokenizer: Tokenizer
    max_prompt_length: int
    template: str
    truncation_mode: str
    overlong: str
    columns: tuple[str, ...]

    def __call__(self, record: dict[str, Any], where: str) -> tuple[list[dict], int]:
        if record.get("prompt") is None:
            present = sorted(k for k in record if k != "_where")
            raise DataError(f"{where}: missing field 'prompt' (has {present})")
        for column in self.columns:
            if record.get(column) is None:
                present = sorted(k for k in record if k != "_where")
                raise DataError(f"{where}: missing field {column!r} for the reward functions (has {present})")
        ids = _prompt_ids(self.tokenizer, self.template, record, where)
        ids, truncated = _cut_prompt(ids, self.max_prompt_length, self.truncation_mode, self.overlong, where)
        P, n = self.max_prompt_length, len(ids)
        prompt_ids = np.full(P, self.tokenizer.pad_id, np.int32)
        prompt_mask = np.zeros(P, np.int32)
        positions = np.zeros(P, np.int32)
        prompt_ids[P - n :], prompt_mask[P - n :], positions[P - n :] = ids, 1, np.arange(n)
        extras = {k: v for k, v in record.items() if k != "_where"}
        return [
            {
                "prompt_ids": prompt_ids,
                "prompt_mask": prompt_mask,
                "prompt_positions": positions,
                "extras": extras,
            }
        ], int(truncated)


def _rl_batch(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    batch = {k: np.stack([r[k] for r in rows]) for k in ("prompt_ids", "prompt_mask", "prompt_positions")}
    batch["extras"] = [r["extras"] for r in rows]
    return batch


def rl_loader(
    pattern: str | Mixture,
    tokenizer: Tokenizer,
    *,
    global_batch_size: int,
    seed: int,
    max_prompt_length: int,
    truncation_mode: str = "keep_end",
    chat_template: str = "chatml",
    columns: Sequence[str] = (),
    shuffle: bool = True,
    num_workers: int = 0,
    on_error: str = "error",
    overlong: str = "truncate",
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    shards: int = 0,
    shard_by: str = "record",
) -> Loader:
    """RL prompt batches (`prompt_ids`, `prompt_mask`, `prompt_positions`, `extras`; module doc).

    `global_batch_size` counts prompts. `columns` names extra fields every record must have (e.g. ("answer",)); all
    fields (`prompt` included) are passed through in `extras` either way.
    """
    _check_prompt_options(max_prompt_length, truncation_mode)
    chat.check_template(tokenizer, chat_template)
    encode = _RlEncode(tokenizer, max_prompt_length, chat_template, truncation_mode, overlong, tuple(columns))
    return assemble(
        pattern,
        encode,
        stacked(_rl_batch),
        kind="rl",
        seq_len=max_prompt_length,
        packing=False,
        global_batch_size=global_batch_size,
        seed=seed,
        shuffle=shuffle,
        num_workers=num_workers,
        on_error=on_error,
        overlong=overlong,
        num_epochs=num_epochs,
        process_index=process_index,
        process_count=process_count,
        shards=shards,
        shard_by=shard_by,
    )
