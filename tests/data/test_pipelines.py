"""Input pipelines: packed == unpacked per token, masks on exactly the trained tokens, resume == uninterrupted,
N workers == 0 workers, per-process shards, and one-line errors naming file:line for every kind of bad input."""

import json

import numpy as np
import pytest

from jaxalign.data import chat, pipelines, prompt_pipelines
from jaxalign.errors import CheckpointError, ConfigError, DataError

SEQ = 192  # fits every synthetic conversation with this small vocabulary


def _records(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _write(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def _all_batches(loader):
    return list(loader)


def _segments(batch, keys=("inputs", "targets", "weights")):
    """Every packed example of a batch: {key: array} per (row, segment)."""
    out = []
    for row in range(batch["segment_ids"].shape[0]):
        seg = batch["segment_ids"][row]
        for s in range(1, seg.max() + 1):
            out.append(
                {k: batch[k][row][seg == s] for k in keys} | {"positions": batch["positions"][row][seg == s]}
            )
    return out


def _check_packed_layout(batch):
    """Segments are contiguous blocks 1, 2, ... then padding 0; positions restart at 0 in each segment; padding has
    zero weight. Only the last batch of a finite input may have empty rows."""
    for row in range(batch["segment_ids"].shape[0]):
        seg, pos = batch["segment_ids"][row], batch["positions"][row]
        real = seg[seg > 0]
        if not len(real):
            continue
        assert np.all(np.diff(real) >= 0) and np.all(np.diff(np.unique(real)) == 1) and real[0] == 1
        assert np.all(seg[len(real) :] == 0)
        for s in np.unique(real):
            np.testing.assert_array_equal(pos[seg == s], np.arange(np.sum(seg == s)))
        assert np.all(batch["weights"][row][seg == 0] == 0)


# --- LM ------------------------------------------------------------------------------------------------------------


def test_lm_packed_rows_hold_exactly_the_documents_chunks(world, tok):
    loader = pipelines.lm_loader(
        world["pretrain_eval"], tok, seq_len=16, global_batch_size=4, seed=0, shuffle=False, num_epochs=1
    )
    expected = {}
    for r in _records(world["pretrain_eval"]):
        ids = [tok.bos_id, *tok.encode(r["text"]), tok.eos_id]
        for s in range(0, len(ids) - 1, 16):
            expected[tuple(ids[s : s + 17])] = 0
    for batch in _all_batches(loader):
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
            k: ((4, 16), np.float32 if k == "weights" else np.int32)
            for k in ("inputs", "targets", "segment_ids", "positions", "weights")
        }
        _check_packed_layout(batch)
        for s in _segments(batch):
            assert np.all(s["weights"] == 1.0)
            np.testing.assert_array_equal(s["inputs"][1:], s["targets"][:-1])  # never crosses a boundary
            chunk = (*s["inputs"].tolist(), int(s["targets"][-1]))
            expected[chunk] += 1  # KeyError: content not from one document chunk
    assert set(expected.values()) == {1}  # every chunk exactly once (the last batch is padded, not dropped)
    assert loader.counts["examples"] == len(expected)


def test_lm_overlong_documents_are_cut_or_rejected(tmp_path, tok):
    path = _write(tmp_path / "long.jsonl", [{"text": "short"}, {"text": " ".join(["word"] * 200)}])
    loader = pipelines.lm_loader(
        path, tok, seq_len=16, global_batch_size=2, seed=0, shuffle=False, num_epochs=1, max_chunks_per_doc=2
    )
    batches = _all_batches(loader)
    assert loader.counts["truncated"] == 1 and sum(b["weights"].sum() for b in batches) <= 16 * 3
    strict = pipelines.lm_loader(
        path,
        tok,
        seq_len=16,
        global_batch_size=2,
        seed=0,
        shuffle=False,
        max_chunks_per_doc=2,
        overlong="reject",
    )
    with pytest.raises(DataError, match=rf"^{path}:2: \d+ tokens exceed .*data.overlong='reject'"):
        next(strict)


# --- SFT -----------------------------------------------------------------------------------------------------------


def _assistant_text(messages, eot="<|im_end|>"):
    """What decoding an SFT example's trained targets gives (each turn starts a new word)."""
    return " ".join(m["content"] + eot for m in messages if m["role"] == "assistant")


@pytest.mark.parametrize("packing", [True, False])
def test_sft_packed_and_unpacked_examples_equal_the_conversations(world, tok, packing):
    records = _records(world["sft_train"])
    by_inputs = {}
    for r in records:
        ids, mask = chat.render(tok, r["messages"])
        by_inputs[tuple(ids[:-1])] = (ids, mask, r)
    loader = pipelines.sft_loader(
        world["sft_train"], tok, seq_len=SEQ, global_batch_size=4, seed=0, packing=packing, num_epochs=1
    )
    seen = set()
    for batch in _all_batches(loader):
        _check_packed_layout(batch)
        if not packing:
            assert set(batch["segment_ids"].max(axis=1).tolist()) <= {0, 1}
        for s in _segments(batch):
            ids, mask, record = by_inputs[tuple(s["inputs"].tolist())]
            np.testing.assert_array_equal(s["targets"], ids[1:])
            np.testing.assert_array_equal(s["weights"], mask[1:])
            # The trained targets are exactly the assistant turns and their end-of-turn markers.
            assert tok.decode(s["targets"][s["weights"] > 0]) == _assistant_text(record["messages"])
            seen.add(record["id"])
    assert seen == {r["id"] for r in records}


def test_sft_prompt_completion_trains_on_the_completion_only(tmp_path, tok):
    conversational = {
        "prompt": [{"role": "user", "content": "What is 2 + 2?"}],
        "completion": [{"role": "assistant", "content": "2 + 2 = 4."}],
    }
    path = _write(
        tmp_path / "pc.jsonl", [{"prompt": "Where was Ada born?", "completion": " In Oslo."}, conversational]
    )
    kwargs = dict(seq_len=SEQ, global_batch_size=2, seed=0, shuffle=False, packing=False)
    batch = next(pipelines.sft_loader(path, tok, **kwargs))
    plain, conv = _segments(batch)
    np.testing.assert_array_equal(
        plain["targets"][plain["weights"] > 0], [*tok.encode(" In Oslo."), tok.eos_id]
    )
    assert tok.decode(conv["targets"][conv["weights"] > 0]) == "2 + 2 = 4.<|im_end|>"
    everything = _segments(next(pipelines.sft_loader(path, tok, completion_only_loss=False, **kwargs)))
    assert all(np.all(s["weights"] == 1.0) for s in everything)


def test_sft_assistant_only_loss_off_trains_every_token(world, tok):
    batch = next(
        pipelines.sft_loader(
            world["sft_eval"], tok, seq_len=SEQ, global_batch_size=2, seed=0, assistant_only_loss=False
        )
    )
    np.testing.assert_array_equal(batch["weights"], (batch["segment_ids"] > 0).astype(np.float32))


@pytest.mark.parametrize("template", ["llama3", "gemma"])
def test_sft_other_templates(world, tok, template):
    eot = chat.TEMPLATES[template].end_of_turn
    records = {
        tuple(chat.render(tok, r["messages"], template)[0][:-1]): r for r in _records(world["sft_eval"])
    }
    batch = next(
        pipelines.sft_loader(
            world["sft_eval"], tok, seq_len=SEQ, global_batch_size=2, seed=0, chat_template=template
        )
    )
    for s in _segments(batch):
        record = records[tuple(s["inputs"].tolist())]
        assert tok.decode(s["targets"][s["weights"] > 0]) == _assistant_text(record["messages"], eot)


# --- preference ----------------------------------------------------------------------------------------------------


def test_preference_rows_share_the_prompt_and_train_on_completions(world, tok):
    records = {r["id"]: r for r in _records(world["preference_eval"])}
    prompts = {
        tuple(chat.render(tok, r["prompt"], add_generation_prompt=True)[0]): r for r in records.values()
    }
    loader = prompt_pipelines.preference_loader(
        world["preference_eval"], tok, seq_len=SEQ, global_batch_size=4, seed=0, max_prompt_length=80
    )
    batch = next(loader)
    assert sorted(batch) == sorted(
        f"{side}_{k}"
        for side in ("chosen", "rejected")
        for k in ("inputs", "targets", "weights", "positions", "segment_ids")
    )
    for row in range(4):
        n_prompt = int(np.argmax(batch["chosen_weights"][row] > 0)) + 1  # the first trained target follows it
        prompt = tuple(batch["chosen_inputs"][row][:n_prompt].tolist())
        record = prompts[prompt]
        np.testing.assert_array_equal(batch["rejected_inputs"][row][:n_prompt], prompt)
        for side in ("chosen", "rejected"):
            real = batch[f"{side}_segment_ids"][row] > 0
            np.testing.assert_array_equal(batch[f"{side}_positions"][row][real], np.arange(real.sum()))
            np.testing.assert_array_equal(
                batch[f"{side}_inputs"][row][1:][real[1:]], batch[f"{side}_targets"][row][real][:-1]
            )
            trained = batch[f"{side}_targets"][row][batch[f"{side}_weights"][row] > 0]
            assert tok.decode(trained) == record[side][0]["content"] + "<|im_end|>"
            assert np.all(batch[f"{side}_weights"][row][~real] == 0)
    both = prompt_pipelines.concatenated(batch)
    assert both["inputs"].shape == (8, SEQ)
    np.testing.assert_array_equal(both["weights"][4:], batch["rejected_weights"])


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_preference_prompt_truncation(tmp_path, tok, mode):
    prompt = " ".join(f"w{i}" for i in range(30))
    path = _write(tmp_path / "p.jsonl", [{"prompt": prompt, "chosen": " yes", "rejected": " no"}])
    loader = prompt_pipelines.preference_loader(
        path,
        tok,
        seq_len=SEQ,
        global_batch_size=1,
        seed=0,
        max_prompt_length=8,
        truncation_mode=mode,
        num_epochs=1,
    )
    batch = next(loader)
    full = [tok.bos_id, *tok.encode(prompt)]
    kept = full[-8:] if mode == "keep_end" else full[:8]
    np.testing.assert_array_equal(batch["chosen_inputs"][0][:8], kept)
    np.testing.assert_array_equal(
        batch["chosen_targets"][0][7 : 7 + len(tok.encode(" yes")) + 1], [*tok.encode(" yes"), tok.eos_id]
    )
    assert loader.counts["truncated"] == 1
    strict = prompt_pipelines.preference_loader(
        path, tok, seq_len=SEQ, global_batch_size=1, seed=0, max_prompt_length=8, overlong="reject"
    )
    with pytest.raises(
        DataError, match=rf"^{path}:1: the prompt has {len(full)} tokens, over data.max_prompt_length=8"
    ):
        next(strict)


def test_preference_completion_is_cut_to_fit(tmp_path, tok):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": " a" * 100, "rejected": " b"}])
    loader = prompt_pipelines.preference_loader(
        path, tok, seq_len=16, global_batch_size=1, seed=0, max_prompt_length=8, num_epochs=1
    )
    batch = next(loader)
    assert batch["chosen_segment_ids"][0].sum() == 16 and loader.counts["truncated"] == 1
    assert batch["rejected_segment_ids"][0].sum() < 16


def test_preference_max_prompt_length_must_leave_room(world, tok):
    with pytest.raises(ConfigError, match="data.max_prompt_length=64 must be smaller than train.seq_len=64"):
        prompt_pipelines.preference_loader(
            world["preference_eval"], tok, seq_len=64, global_batch_size=1, seed=0, max_prompt_length=64
        )


# --- RL ------------------------------------------------------------------------------------------------------------


def test_rl_prompts_are_left_padded_with_their_columns(world, tok):
    records = {r["id"]: r for r in _records(world["rl_eval"])}
    loader = prompt_pipelines.rl_loader(
        world["rl_eval"], tok, global_batch_size=4, seed=0, max_prompt_length=64, columns=("answer",)
    )
    batch = next(loader)
    assert batch["prompt_ids"].shape == batch["prompt_mask"].shape == (4, 64) and len(batch["extras"]) == 4
    for row, extras in enumerate(batch["extras"]):
        record = records[extras["id"]]
        assert extras == record
        ids, _ = chat.render(tok, record["prompt"], add_generation_prompt=True)
        mask = batch["prompt_mask"][row]
        assert mask.tolist() == [0] * (64 - len(ids)) + [1] * len(ids)
        np.testing.assert_array_equal(batch["prompt_ids"][row][mask > 0], ids)
        np.testing.assert_array_equal(batch["prompt_positions"][row][mask > 0], np.arange(len(ids)))
        assert np.all(batch["prompt_ids"][row][mask == 0] == tok.pad_id)


def test_rl_required_columns(tmp_path, tok):
    path = _write(tmp_path / "rl.jsonl", [{"prompt": "What is 1 + 1?", "answer": "2"}, {"prompt": "Hi"}])
    loader = prompt_pipelines.rl_loader(
        path, tok, global_batch_size=2, seed=0, max_prompt_length=16, shuffle=False, columns=("answer",)
    )
    with pytest.raises(DataError, match=rf"^{path}:2: missing field 'answer' for the reward functions"):
        next(loader)


# --- order, state, shards, workers ---------------------------------------------------------------------------------

# Train files: Grain's index shuffle is slow on tiny files (~10 ms a record for 10 records).
LOADERS = {
    "lm": lambda w, t, **kw: pipelines.lm_loader(w["pretrain_train"], t, seq_len=SEQ, **kw),
    "sft": lambda w, t, **kw: pipelines.sft_loader(w["sft_train"], t, seq_len=SEQ, **kw),
    "preference": lambda w, t, **kw: prompt_pipelines.preference_loader(
        w["preference_train"], t, seq_len=SEQ, max_prompt_length=80, **kw
    ),
    "rl": lambda w, t, **kw: prompt_pipelines.rl_loader(w["rl_train"], t, max_prompt_length=80, **kw),
}


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if k == "extras":
            assert a[k] == b[k]
        else:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("kind", sorted(LOADERS))
def test_restored_state_gives_identical_later_batches(world, tok, kind):
    make = LOADERS[kind]
    loader = make(world, tok, global_batch_size=4, seed=3)
    for _ in range(5):
        next(loader)
    state = loader.get_state()
    expected = [next(loader) for _ in range(6)]
    resumed = make(world, tok, global_batch_size=4, seed=3)
    resumed.set_state(state)
    for a in expected:
        _same(a, next(resumed))


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(seed=4), "seed: checkpoint has 3, this run has 4"),
        (dict(global_batch_size=2), "global_batch_size: checkpoint has 4, this run has 2"),
        (dict(shuffle=False), "shuffle: checkpoint has True"),
        (dict(process_count=2, process_index=1), "process_count: checkpoint has 1, this run has 2"),
    ],
)
def test_restoring_under_another_layout_names_the_field(world, tok, change, field):
    state = LOADERS["sft"](world, tok, global_batch_size=4, seed=3).get_state()
    other = LOADERS["sft"](world, tok, **(dict(global_batch_size=4, seed=3) | change))
    with pytest.raises(CheckpointError, match=field):
        other.set_state(state)


def test_worker_count_is_part_of_the_layout(world, tok):
    state = json.loads(LOADERS["rl"](world, tok, global_batch_size=4, seed=3).get_state())
    state["layout"]["num_workers"] = 2
    with pytest.raises(CheckpointError, match="num_workers: checkpoint has 2, this run has 0"):
        LOADERS["rl"](world, tok, global_batch_size=4, seed=3).set_state(json.dumps(state).encode())


def _ids(loader):
    return [e["id"] for batch in loader for e in batch["extras"]]


def test_shuffle_is_seeded_and_changes_every_epoch(world, tok):
    n = len(_records(world["rl_train"]))
    kwargs = dict(global_batch_size=1, num_epochs=2)
    first = _ids(LOADERS["rl"](world, tok, seed=0, **kwargs))
    assert first == _ids(LOADERS["rl"](world, tok, seed=0, **kwargs))
    assert first != _ids(LOADERS["rl"](world, tok, seed=1, **kwargs))
    assert sorted(first[:n]) == sorted(first[n:]) and first[:n] != first[n:]
    unshuffled = _ids(LOADERS["rl"](world, tok, seed=0, shuffle=False, **kwargs))
    assert unshuffled[:n] == [r["id"] for r in _records(world["rl_train"])]


@pytest.mark.parametrize("kind", ["rl", "preference"])
def test_processes_read_disjoint_shards_with_equal_batch_counts(world, tok, kind):
    n = len(_records(world[f"{kind}_train"]))
    per_process = []
    for index in range(3):
        loader = LOADERS[kind](
            world, tok, global_batch_size=3, seed=5, num_epochs=1, process_index=index, process_count=3
        )
        batches = list(loader)
        assert all(
            b[next(iter(b))].shape[0] == 1 for b in batches
        )  # this process's share of the global batch
        if kind == "rl":
            per_process.append([e["id"] for b in batches for e in b["extras"]])
        else:
            per_process.append([b["chosen_inputs"][0].tobytes() for b in batches])
    assert len({len(p) for p in per_process}) == 1 and len(per_process[0]) == n // 3
    flat = [x for p in per_process for x in p]
    assert len(set(flat)) == len(flat)  # disjoint


def test_workers_yield_the_same_batches_as_the_main_process(tmp_path, world, tok):
    # A small file (worker processes take seconds to start), with two bad records that travel back from the workers.
    records = _records(world["sft_eval"])[:24]
    records[5] = '{"messages": ['
    records[9] = {"messages": [{"role": "user", "content": "no answer"}]}
    path = _write(tmp_path / "small.jsonl", records)

    def make(workers, on_error="skip"):
        return pipelines.sft_loader(
            path, tok, seq_len=SEQ, global_batch_size=2, seed=0, num_workers=workers, on_error=on_error
        )

    reference = make(0)
    expected = [next(reference) for _ in range(8)]
    parallel = make(2)
    try:
        for a in expected[:4]:
            _same(a, next(parallel))
        assert json.loads(parallel.get_state())["layout"]["num_workers"] == 2
        for a in expected[4:]:
            _same(a, next(parallel))
        assert parallel.counts["skipped"] >= 2
    finally:
        parallel.close()
    strict = make(2, on_error="error")
    try:
        with pytest.raises(DataError, match=rf"^{path}:\d+: (invalid JSON|no token is trained on)"):
            for _ in range(20):
                next(strict)
    finally:
        strict.close()


# --- bad input -----------------------------------------------------------------------------------------------------

GOOD_SFT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
GOOD_PREF = {"prompt": "Q?", "chosen": " yes", "rejected": " no"}


@pytest.mark.parametrize(
    "kind, bad, message",
    [
        ("sft", '{"messages": [', "invalid JSON"),
        ("sft", b'{"prompt": "caf\xe9", "completion": "x"}', "invalid UTF-8"),
        ("sft", '{"prompt": "a", "completion": NaN}', "non-finite number literal NaN"),
        ("sft", {"text": "no conversation"}, "missing field 'messages' or 'prompt' and 'completion'"),
        ("sft", {"prompt": "a", "completion": " "}, "field 'completion' is empty"),
        (
            "sft",
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]},
            "message 1 (assistant) has empty content",
        ),
        ("sft", {"messages": [{"role": "user", "content": "only a question"}]}, "no token is trained on"),
        (
            "sft",
            {"messages": [{"role": "robot", "content": "x"}]},
            "field 'messages': message 0 has role 'robot'",
        ),
        (
            "preference",
            {"prompt": "Q?", "chosen": " same", "rejected": " same"},
            "'chosen' and 'rejected' are identical",
        ),
        ("preference", {"prompt": "Q?", "chosen": " yes"}, "missing field 'rejected'"),
        ("preference", {"prompt": "Q?", "chosen": "", "rejected": " no"}, "field 'chosen' is empty"),
        ("lm", {"body": "x"}, "missing field 'text'"),
        ("lm", {"text": 3}, "field 'text' must be a string, got int"),
    ],
)
def test_bad_records_are_one_line_errors_naming_file_and_line(tmp_path, tok, kind, bad, message):
    good = GOOD_PREF if kind == "preference" else GOOD_SFT if kind == "sft" else {"text": "fine"}
    path = tmp_path / "bad.jsonl"
    lines = [
        json.dumps(good).encode(),
        b"",
        bad if isinstance(bad, bytes) else (bad if isinstance(bad, str) else json.dumps(bad)).encode(),
        json.dumps(good).encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    make = {
        "sft": lambda **kw: pipelines.sft_loader(str(path), tok, seq_len=SEQ, **kw),
        "preference": lambda **kw: prompt_pipelines.preference_loader(
            str(path), tok, seq_len=SEQ, max_prompt_length=8, **kw
        ),
        "lm": lambda **kw: pipelines.lm_loader(str(path), tok, seq_len=SEQ, **kw),
    }[kind]
    with pytest.raises(DataError) as e:
        list(make(global_batch_size=1, seed=0, shuffle=False, num_epochs=1))
    assert str(e.value).startswith(f"{path}:3: ") and message in str(e.value), str(e.value)
    assert "\n" not in str(e.value)

    skipping = make(global_batch_size=1, seed=0, shuffle=False, num_epochs=1, on_error="skip")
    assert len(list(skipping)) >= 1 and skipping.counts["skipped"] == 1 and skipping.counts["examples"] == 2


@pytest.mark.parametrize("overlong", ["truncate", "reject"])
def test_sft_overlong_examples(tmp_path, tok, overlong):
    long = {"prompt": "Q", "completion": " ".join(["word"] * 100)}
    path = _write(tmp_path / "long.jsonl", [GOOD_SFT, long])
    loader = pipelines.sft_loader(
        path,
        tok,
        seq_len=48,
        global_batch_size=1,
        seed=0,
        shuffle=False,
        num_epochs=1,
        overlong=overlong,
        packing=False,
    )
    if overlong == "reject":
        with pytest.raises(DataError, match=rf"^{path}:2: the example has \d+ tokens, over the maximum 49"):
            list(loader)
    else:
        batches = list(loader)
        assert loader.counts["truncated"] == 1 and batches[1]["segment_ids"].sum() == 48


def test_truncation_that_leaves_no_trained_token_is_an_error(tmp_path, tok):
    path = _write(tmp_path / "p.jsonl", [{"prompt": " ".join(["word"] * 40), "completion": " answer"}])
    loader = pipelines.sft_loader(path, tok, seq_len=16, global_batch_size=1, seed=0)
    with pytest.raises(
        DataError, match=rf"^{path}:1: no token is trained on after truncation to train.seq_len"
    ):
        next(loader)


def test_a_glob_matching_nothing(tmp_path, tok):
    with pytest.raises(DataError, match=r"data glob '.*nothing\*\.jsonl' matches no files"):
        pipelines.sft_loader(f"{tmp_path}/nothing*.jsonl", tok, seq_len=SEQ, global_batch_size=1, seed=0)


def test_batch_must_split_over_processes(world, tok):
    with pytest.raises(
        ConfigError, match="train.batch_size=3 must be a positive multiple of the 2 processes"
    ):
        LOADERS["rl"](world, tok, global_batch_size=3, seed=0, process_count=2, process_index=0)


class _OwnTemplate:
    """A tokenizer with its own chat template (what Hugging Face tokenizers have): ChatML here."""

    def __init__(self, tok):
        self.tok = tok
        self.vocab_size, self.bos_id, self.eos_id, self.pad_id = (
            tok.vocab_size,
            tok.bos_id,
            tok.eos_id,
            tok.pad_id,
        )
        self.encode, self.decode, self.token_id = tok.encode, tok.decode, tok.token_id

    def encode_chat(self, messages, add_generation_prompt=False):
        return chat.render(self.tok, messages, "chatml", add_generation_prompt=add_generation_prompt)


def test_the_tokenizers_own_template_feeds_every_loader(world, tok):
    for kind in ("sft", "preference", "rl"):
        a = LOADERS[kind](world, tok, global_batch_size=2, seed=0)
        b = LOADERS[kind](world, _OwnTemplate(tok), global_batch_size=2, seed=0, chat_template="tokenizer")
        _same(next(a), next(b))
