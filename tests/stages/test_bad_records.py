"""Bad records through the real SFT, preference and RL loaders: with `on_error="error"` one line naming file:line and
what is wrong; with `on_error="skip"` the record is dropped and counted, and every good record still arrives.

Each file holds a good record, a blank line, the bad record (line 3) and another good record.
"""

import json

import pytest

from jaxalign.data import pipelines, prompt_pipelines
from jaxalign.data.tokenizer import SentencePieceTokenizer
from jaxalign.errors import DataError

USER = {"role": "user", "content": "Where was Ada born?"}
ASSISTANT = {"role": "assistant", "content": "Ada was born in Oslo."}
SYSTEM = {"role": "system", "content": "Answer briefly."}
GOOD = {
    "sft": {"messages": [SYSTEM, USER, ASSISTANT]},
    "preference": {
        "prompt": [USER],
        "chosen": [ASSISTANT],
        "rejected": [{**ASSISTANT, "content": "In Rome."}],
    },
    "rl": {"prompt": [USER], "answer": "Oslo"},
}
LONG = " ".join(["word"] * 60)  # well over the 32 prompt tokens allowed below

CASES = {
    # SFT: empty completions and no loss token.
    "sft empty completion": ("sft", {"prompt": "Q?", "completion": "  "}, "field 'completion' is empty"),
    "sft empty assistant": (
        "sft",
        {"prompt": [USER], "completion": [{"role": "assistant", "content": ""}]},
        "field 'completion' is empty",
    ),
    "sft no loss token": ("sft", {"messages": [SYSTEM, USER]}, "no token is trained on"),
    # SFT: turns out of order.
    "sft assistant first": (
        "sft",
        {"messages": [ASSISTANT, USER, ASSISTANT]},
        "field 'messages': message 0 has role 'assistant'; the conversation must start with a user turn",
    ),
    "sft two user turns": (
        "sft",
        {"messages": [USER, USER, ASSISTANT]},
        "field 'messages': message 1 has role 'user' like message 0; user and assistant turns must alternate",
    ),
    "sft two assistant turns": (
        "sft",
        {"messages": [USER, ASSISTANT, ASSISTANT]},
        "field 'messages': message 2 has role 'assistant' like message 1",
    ),
    "sft system not first": (
        "sft",
        {"messages": [USER, SYSTEM, ASSISTANT]},
        "field 'messages': message 1 has role 'system'; only the first message may be a system message",
    ),
    "sft ends with user": (
        "sft",
        {"messages": [USER, ASSISTANT, USER]},
        "field 'messages': the last message (message 2) has role 'user'; expected 'assistant'",
    ),
    "sft completion is a user turn": (
        "sft",
        {"prompt": [USER], "completion": [USER]},
        "fields 'prompt' + 'completion': message 1 has role 'user' like message 0",
    ),
    "sft prompt ends with the assistant": (
        "sft",
        {"prompt": [USER, ASSISTANT], "completion": [ASSISTANT]},
        "field 'prompt': the last message (message 1) has role 'assistant'; expected 'user'",
    ),
    # Preference pairs.
    "chosen == rejected": (
        "preference",
        {"prompt": [USER], "chosen": [ASSISTANT], "rejected": [ASSISTANT]},
        "'chosen' and 'rejected' are identical",
    ),
    "empty chosen": (
        "preference",
        {"prompt": "Q?", "chosen": " ", "rejected": " no"},
        "field 'chosen' is empty",
    ),
    "empty rejected turn": (
        "preference",
        {"prompt": [USER], "chosen": [ASSISTANT], "rejected": [{"role": "assistant", "content": " "}]},
        "field 'rejected' is empty",
    ),
    "preference prompt too long": (
        "preference",
        {"prompt": LONG, "chosen": " yes", "rejected": " no"},
        "tokens, over data.max_prompt_length=32 (data.overlong='reject')",
    ),
    "preference prompt out of order": (
        "preference",
        {"prompt": [ASSISTANT, USER], "chosen": [ASSISTANT], "rejected": [{**ASSISTANT, "content": "No."}]},
        "field 'prompt': message 0 has role 'assistant'; the conversation must start with a user turn",
    ),
    "chosen is a user turn": (
        "preference",
        {"prompt": [USER], "chosen": [USER], "rejected": [ASSISTANT]},
        "fields 'prompt' + 'chosen': message 1 has role 'user' like message 0",
    ),
    # RL prompts.
    "rl prompt too long": (
        "rl",
        {"prompt": LONG},
        "tokens, over data.max_prompt_length=32",
    ),
    "rl system not first": (
        "rl",
        {"prompt": [USER, SYSTEM]},
        "field 'prompt': message 1 has role 'system'; only the first message may be a system message",
    ),
}


@pytest.fixture(scope="module")
def tok(small_world):
    return SentencePieceTokenizer(small_world["tokenizer"])


def make_loader(kind, path, tok, on_error):
    common = dict(
        global_batch_size=1, seed=0, shuffle=False, num_epochs=1, on_error=on_error, overlong="reject"
    )
    if kind == "sft":
        return pipelines.sft_loader(path, tok, seq_len=128, packing=False, **common)
    if kind == "preference":
        return prompt_pipelines.preference_loader(path, tok, seq_len=64, max_prompt_length=32, **common)
    return prompt_pipelines.rl_loader(path, tok, max_prompt_length=32, **common)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_record_is_one_line_or_skipped_and_counted(tmp_path, tok, case):
    kind, bad, message = CASES[case]
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join([json.dumps(GOOD[kind]), "", json.dumps(bad), json.dumps(GOOD[kind])]) + "\n")

    strict = make_loader(kind, str(path), tok, "error")
    with pytest.raises(DataError) as e:
        list(strict)
    assert str(e.value).startswith(f"{path}:3: ") and message in str(e.value), str(e.value)
    assert "\n" not in str(e.value)

    skipping = make_loader(kind, str(path), tok, "skip")
    batches = list(skipping)
    assert skipping.counts["skipped"] == 1 and skipping.counts["examples"] == 2
    assert len(batches) == 2  # one record per batch: both good records, nothing from the bad one


def test_the_synthetic_world_passes_every_check(small_world, tok):
    """The turn-order checks reject nothing the synthetic world writes (every record arrives, nothing is cut)."""
    common = dict(global_batch_size=1, seed=0, shuffle=False, num_epochs=1, overlong="reject")
    loaders = {
        "sft_train": lambda path: pipelines.sft_loader(path, tok, seq_len=128, packing=False, **common),
        "preference_train": lambda path: prompt_pipelines.preference_loader(
            path, tok, seq_len=192, max_prompt_length=64, **common
        ),
        "rl_train": lambda path: prompt_pipelines.rl_loader(path, tok, max_prompt_length=64, **common),
    }
    for name, make in loaders.items():
        loader = make(small_world[name])
        with open(small_world[name], encoding="utf-8") as f:
            records = sum(1 for line in f if line.strip())
        assert len(list(loader)) == records and loader.counts["examples"] == records, name
