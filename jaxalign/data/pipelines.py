"""Grain input pipelines of the LM-style stages (pretraining, SFT), which feed the training loop a `Loader`.

Shapes: B = this process's rows (global batch / process count), T = `seq_len`.

LM and SFT batches (`lm_loader`, `sft_loader`), packed: all int32 [B, T] except `weights`, float32 [B, T]
  inputs, targets     next-token pairs; a target never crosses an example boundary
  segment_ids         1, 2, ... per packed example, 0 on padding (attention stays within a segment)
  positions           position within the example (RoPE restarts per example)
  weights             1.0 where the target is trained on, else 0.0 (LM: every real target; SFT: the loss mask of
                      the target token: completion or assistant tokens)

Records are conversational (`messages`; `prompt`/`completion` as message lists, rendered with a chat template) or
plain strings (`text`; `prompt`/`completion`), as in TRL's dataset types.

A loader's `pattern` is a glob, or a `jaxalign.data.mixture.Mixture` of globs and weights (`data.mixture`).

The pipelines of the stages that start from a prompt (preference pairs, KTO, RL prompts) are in
`jaxalign.data.prompt_pipelines`. The shared machinery (sharding over processes, workers, packing, the
checkpointable `Loader`) is in `jaxalign.data.loader`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxalign.data import chat
from jaxalign.data.loader import (
    Loader,
    assemble,
    continuation_fields,
    is_conversational,
    messages_field,
    packed,
    shifted,
    string_field,
)
from jaxalign.data.mixture import Mixture
from jaxalign.data.tokenizer import Tokenizer
from jaxalign.errors import DataError

# --- LM -----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _LmEncode:
    """A document as [bos, ..., eos], cut into next-token chunks of at most `seq_len` targets."""

    tokenizer: Tokenizer
    seq_len: int
    text_field: str
    max_chunks: int
    overlong: str

    def __call__(self, record: dict[str, Any], where: str) -> tuple[list[dict], int]:
        text = string_field(record, self.text_field, where)
        tok = self.tokenizer
        ids = np.asarray([tok.bos_id, *tok.encode(text), tok.eos_id], np.int32)
        limit = self.seq_len * self.max_chunks + 1
        truncated = len(ids) > limit
        if truncated and self.overlong == "reject":
            raise DataError(
                f"{where}: {len(ids)} tokens exceed max_chunks_per_doc x seq_len + 1 = {limit} (data.overlong='reject')"
            )
        # A chunk of seq_len targets needs seq_len + 1 tokens; consecutive chunks overlap by one token so that every
        # next-token pair of the document is trained on exactly once.
        ids = ids[:limit]
        pieces = [ids[s : s + self.seq_len + 1] for s in range(0, len(ids) - 1, self.seq_len)]
        return [
            {"inputs": p[:-1], "targets": p[1:], "weights": np.ones(len(p) - 1, np.float32)} for p in pieces
        ], int(truncated)


def lm_loader(
    pattern: str | Mixture,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_workers: int = 0,
    on_error: str = "error",
    overlong: str = "truncate",
    text_field: str = "text",
    num_epochs: int | None = None,
    max_chunks_per_doc: int = 64,
    process_index: int | None = None,
    process_count: int | None = None,
    shards: int = 0,
    shard_by: str = "record",
) -> Loader:
    """Tokenized, packed LM batches of this process's share of `global_batch_size` rows of `seq_len` tokens.

    Documents longer than `max_chunks_per_doc` rows are over-long (cut or rejected by `overlong`).
    """
    encode = _LmEncode(tokenizer, seq_len, text_field, max_chunks_per_doc, overlong)
    return assemble(
        pattern,
        encode,
        packed(seq_len, packing=True),
        kind="lm",
        seq_len=seq_len,
        packing=True,
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


# --- SFT ----------------------------------------------------------------------------------------------------------


def _cut_to(ids: list[int], mask: list[int], limit: int, overlong: str, where: str, what: str):
    """`ids`/`mask` cut to `limit` tokens (keeping the start); (ids, mask, truncated)."""
    if len(ids) <= limit:
        return ids, mask, False
    if overlong == "reject":
        raise DataError(
            f"{where}: {what} has {len(ids)} tokens, over the maximum {limit} (data.overlong='reject')"
        )
    return ids[:limit], mask[:limit], True


@dataclasses.dataclass(frozen=True)
class _SftEncode:
    """`messages`, or `prompt` + `completion` (strings, or message lists), as ids with a loss mask."""

    tokenizer: Tokenizer
    seq_len: int
    template: str
    overlong: str
    completion_only_loss: bool
    assistant_only_loss: bool

    def ids_and_mask(self, record: dict[str, Any], where: str) -> tuple[list[int], list[int]]:
        """The whole example's ids and loss mask (before any truncation)."""
        tok = self.tokenizer
        if "messages" in record:
            messages = messages_field(record, "messages", where)
            for i, m in enumerate(messages):
                if m["role"] == "assistant" and not m["content"].strip():
                    raise DataError(f"{where}: message {i} (assistant) has empty content")
            ids, mask = chat.render(tok, messages, self.template)
            if not self.assistant_only_loss:
                mask = [1] * len(ids)
            return ids, mask
        if "prompt" not in record or "completion" not in record:
            present = sorted(k for k in record if k != "_where")
            raise DataError(f"{where}: missing field 'messages' or 'prompt' and 'completion' (has {present})")
        if is_conversational(record["prompt"]) or is_conversational(record["completion"]):
            prompt, completion = continuation_fields(record, "completion", where)
            if not "".join(m["content"] for m in completion).strip():
                raise DataError(f"{where}: field 'completion' is empty")
            prompt_ids, ids, mask = chat.render_continuation(tok, prompt, completion, self.template)
            prompt_mask = [0 if self.completion_only_loss else 1] * len(prompt_ids)
            return prompt_ids + ids, prompt_mask + (mask if self.completion_only_loss else [1] * len(ids))
        prompt, completion = string_field(record, "prompt", where), string_field(record, "completion", where)
        if not completion.strip():
            raise DataError(f"{where}: field 'completion' is empty")
        prompt_ids = [tok.bos_id, *tok.encode(prompt)]
        completion_ids = [*tok.encode(completion), tok.eos_id]
        mask = [0 if self.completion_only_loss else 1] * len(prompt_ids) + [1] * len(completion_ids)
        return prompt_ids + completion_ids, mask

    def __call__(self, record: dict[str, Any], where: str) -> tuple[list[dict], int]:
        ids, mask = self.ids_and_mask(record, where)
        ids, mask, truncated = _cut_to(ids, mask, self.seq_len + 1, self.overlong, where, "the example")
        if not any(mask[1:]):
            after = f" after truncation to train.seq_len + 1 = {self.seq_len + 1} tokens" if truncated else ""
            raise DataError(f"{where}: no token is trained on{after} (no assistant/completion tokens)")
        if "messages" in record:
            # Checked after the loss tokens, so a conversation with no assistant turn at all says that first.
            messages_field(record, "messages", where, last="assistant")
        return [shifted(ids, mask)], int(truncated)


def sft_loader(
    pattern: str | Mixture,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    chat_template: str = "chatml",
    completion_only_loss: bool = True,
    assistant_only_loss: bool = True,
    packing: bool = True,
    shuffle: bool = True,
    num_workers: int = 0,
    on_error: str = "error",
    overlong: str = "truncate",
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    shards: int = 0,
    shard_by: str = "record",
    replay: tuple[str, float] | None = None,
    text_field: str = "text",
) -> Loader:
    """SFT batches with the LM keys (module doc); `weights` are the loss mask of each target token.

    `replay=(pattern, fraction)` mixes pretraining documents (`text_field`, encoded as `lm_loader` does, every
    target trained on) into the examples: `fraction` of the examples, by count, before packing.

    `messages` records train on assistant turns (`assistant_only_loss`, else every token); `prompt`/`completion`
    records train on the completion (`completion_only_loss`, else every token). Examples over `seq_len + 1` tokens
    are cut at the end or rejected (`overlong`). `packing=False` puts one example per row.
    """
    chat.check_template(tokenizer, chat_template)
    encode = _SftEncode(
        tokenizer, seq_len, chat_template, overlong, completion_only_loss, assistant_only_loss
    )
    mixture = ()
    if replay is not None and replay[1] > 0:
        mixture = ((replay[0], _LmEncode(tokenizer, seq_len, text_field, 64, overlong), replay[1]),)
    return assemble(
        pattern,
        encode,
        packed(seq_len, packing),
        mixture=mixture,
        kind="sft",
        seq_len=seq_len,
        packing=packing,
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
