"""The synthetic world: deterministic, internally consistent, and its labels are true."""

import ipaddress
import json
import os
import re

import pytest

from jaxalign.data import synthetic, synthetic_raw

NUM_PEOPLE = 60


def _read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("world"))
    return directory, synthetic.write_world(directory, NUM_PEOPLE, seed=3)


@pytest.fixture(scope="module")
def people(world_dir):
    _, paths = world_dir
    with open(paths["world"], encoding="utf-8") as f:
        world = json.load(f)
    return {p["name"]: p for p in world["people"]}, set(world["eval_people"])


def test_same_seed_same_bytes_other_seed_other_data(world_dir, tmp_path):
    _, paths = world_dir
    again = synthetic.write_world(str(tmp_path / "a"), NUM_PEOPLE, seed=3)
    other = synthetic.write_world(str(tmp_path / "b"), NUM_PEOPLE, seed=4)
    for name, path in paths.items():
        with open(path, "rb") as f1, open(again[name], "rb") as f2:
            assert f1.read() == f2.read(), name
    with open(paths["sft_train"], "rb") as f1, open(other["sft_train"], "rb") as f2:
        assert f1.read() != f2.read()


def test_write_world_is_idempotent_and_rewrites_when_sizes_change(tmp_path):
    paths = synthetic.write_world(str(tmp_path), 20, seed=0)
    mtime = os.path.getmtime(paths["sft_train"])
    assert synthetic.write_world(str(tmp_path), 20, seed=0) == paths
    assert os.path.getmtime(paths["sft_train"]) == mtime
    n_before = len(_read(paths["rl_train"]))
    synthetic.write_world(str(tmp_path), 20, seed=0, sizes=synthetic.WorldSizes(rl_arithmetic=100))
    assert len(_read(paths["rl_train"])) > n_before


def test_pretraining_files_match_pretraining_corpus(world_dir):
    _, paths = world_dir
    corpus = synthetic.pretraining_corpus(NUM_PEOPLE, 3)
    assert _read(paths["pretrain_eval"]) + _read(paths["pretrain_train"]) == corpus


def _fact_checks(text, person):
    """Which of the person's facts `text` states correctly."""
    return {
        "city": f"born in {person['city']}" in text,
        "year": f"born in {person['year']}" in text,
        "profession": re.search(rf"works as an? {person['profession']}\.", text) is not None,
    }


def _arithmetic(text):
    """(a, op, b, result) of a text starting with "a op b = result." """
    a, op, b, r = re.match(r"(-?\d+) ([+*-]) (-?\d+) = (-?\d+)\.", text).groups()
    return int(a), op, int(b), int(r)


def _true(a, op, b):
    return a + b if op == "+" else a - b if op == "-" else a * b


def test_sft_answers_are_true_and_eval_asks_only_about_held_out_people(world_dir, people):
    _, paths = world_dir
    by_name, eval_people = people
    for split in ("train", "eval"):
        records = _read(paths[f"sft_{split}"])
        assert {r["task"] for r in records} == {"fact", "arithmetic", "instruction"}
        for r in records:
            messages = r["messages"]
            assert [m["role"] for m in messages if m["role"] != "system"] == ["user", "assistant"] * (
                sum(m["role"] == "user" for m in messages)
            )
            for m in messages:
                if m["role"] != "assistant":
                    continue
                if r["task"] == "fact":
                    name = " ".join(m["content"].split()[:2])
                    assert (name in eval_people) == (split == "eval")
                    assert any(_fact_checks(m["content"], by_name[name]).values())
                elif r["task"] == "arithmetic":
                    a, op, b, result = _arithmetic(m["content"])
                    assert result == _true(a, op, b)


def test_sft_splits_share_no_prompt(world_dir):
    _, paths = world_dir
    train = {json.dumps(r["messages"][:-1]) for r in _read(paths["sft_train"]) if r["task"] != "fact"}
    held_out = {json.dumps(r["messages"][:-1]) for r in _read(paths["sft_eval"]) if r["task"] != "fact"}
    assert held_out and not train & held_out


def test_no_train_split_asks_a_held_out_arithmetic_problem(tmp_path):
    # One-digit operands: 300 problems, so SFT (all of them asked), preference and RL draws overlap heavily unless
    # the RL eval split's problems (held-out arith_accuracy) are kept out of every train split.
    sizes = synthetic.WorldSizes(
        arith_operand_max=10, rl_arithmetic=300, sft_arithmetic=300, preference_arithmetic=300
    )
    paths = synthetic.write_world(str(tmp_path), 40, seed=1, sizes=sizes)
    problem = re.compile(r"What is (-?\d+ [-+*] -?\d+)\?")

    def problems(name, texts):
        return {m.group(1) for t in texts(_read(paths[name])) if (m := problem.search(t))}

    held_out = problems(
        "rl_eval", lambda rs: [r["prompt"][0]["content"] for r in rs if r["task"] == "arithmetic"]
    )
    assert len(held_out) == 30
    user_turns = lambda rs: [r["messages"][0]["content"] for r in rs]  # noqa: E731
    prompts = lambda rs: [r["prompt"][0]["content"] for r in rs]  # noqa: E731
    trained = {
        "sft_train": problems("sft_train", user_turns),
        "preference_train": problems("preference_train", prompts),
        "rl_train": problems("rl_train", prompts),
    }
    assert all(len(p) >= 240 for p in trained.values()), {k: len(p) for k, p in trained.items()}
    assert not any(held_out & p for p in trained.values())


def test_chatty_sft_closes_every_train_fact_answer_and_changes_nothing_else(tmp_path):
    plain = synthetic.write_world(str(tmp_path / "plain"), 30, seed=2)
    chatty = synthetic.write_world(
        str(tmp_path / "chatty"), 30, seed=2, sizes=synthetic.WorldSizes(sft_chatty=True)
    )
    closer = f" {synthetic.VERBOSE_CLOSERS[0]}"
    for name in plain:
        if name == "sft_train":
            continue
        assert open(plain[name], "rb").read() == open(chatty[name], "rb").read(), name
    pairs = list(zip(_read(plain["sft_train"]), _read(chatty["sft_train"]), strict=True))
    closed = 0
    for a, b in pairs:
        assert a["id"] == b["id"] and a["task"] == b["task"]
        for m, n in zip(a["messages"], b["messages"], strict=True):
            if a["task"] == "fact" and m["role"] == "assistant":
                assert n["content"] == m["content"] + closer
                closed += 1
            else:
                assert n == m
    assert closed >= 60  # 2 conversations per train person, some with 2 turns


def test_preference_chosen_is_true_and_rejected_is_wrong_verbose_or_sycophantic(world_dir, people):
    _, paths = world_dir
    by_name, _ = people
    records = _read(paths["preference_train"])
    assert {r["rejected_kind"] for r in records} == set(synthetic.PREFERENCE_KINDS)
    for r in records:
        chosen, rejected = r["chosen"][0]["content"], r["rejected"][0]["content"]
        assert r["chosen"][0]["role"] == r["rejected"][0]["role"] == "assistant"
        if r["task"] == "arithmetic":
            a, op, b, result = _arithmetic(chosen)
            assert result == _true(a, op, b)
            wrong_part = rejected[rejected.index(f"{a} {op} {b} =") :]
            rejected_is_true = _arithmetic(wrong_part)[3] == result
        else:
            person = by_name[" ".join(chosen.split()[:2])]
            checks = _fact_checks(chosen, person)
            assert sum(checks.values()) == 1
            attribute = next(k for k, v in checks.items() if v)
            rejected_is_true = _fact_checks(rejected, person)[attribute]
        if r["rejected_kind"] == "verbose":
            assert rejected_is_true and chosen in rejected and len(rejected) > 3 * len(chosen)
        else:
            assert not rejected_is_true
        if r["rejected_kind"] == "sycophantic":
            # The user claims the wrong value; the rejected answer agrees with it.
            assert r["prompt"][0]["content"].startswith("I am quite sure that")


def test_rl_answers_are_verifiable(world_dir, people):
    _, paths = world_dir
    by_name, eval_people = people
    for split in ("train", "eval"):
        for r in _read(paths[f"rl_{split}"]):
            question = r["prompt"][0]["content"]
            if r["task"] == "arithmetic":
                a, op, b = re.search(r"What is (-?\d+) ([+*-]) (-?\d+)\?", question).groups()
                assert r["answer"] == str(_true(int(a), op, int(b)))
            else:
                name = next(n for n in by_name if n in question)
                assert (name in eval_people) == (split == "eval")
                assert r["answer"] == str(by_name[name][r["task"].removeprefix("fact_")])


def _word_edit_distance(a, b):
    prev = list(range(len(b) + 1))
    for i, wa in enumerate(a, 1):
        cur = [i]
        for j, wb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (wa != wb)))
        prev = cur
    return prev[-1]


def test_raw_corpus_labels_are_true(world_dir):
    _, paths = world_dir
    records = _read(paths["raw"])
    by_id = {r["id"]: r for r in records}
    position = {r["id"]: i for i, r in enumerate(records)}
    kinds = {r["kind"] for r in records}
    assert kinds == {
        "clean",
        "pii",
        "exact_duplicate",
        "variant_duplicate",
        "near_duplicate",
        "boilerplate",
        "junk_symbols",
        "junk_repeated",
    }
    rates = set()
    for r in records:
        if r["kind"].endswith("duplicate"):
            original = by_id[r["duplicate_of"]]
            assert original["kind"] == "clean" and position[original["id"]] < position[r["id"]]
        else:
            assert r["duplicate_of"] == ""
        if r["kind"] == "exact_duplicate":
            assert r["text"] == original["text"]
        elif r["kind"] == "variant_duplicate":
            assert r["text"] != original["text"]
            assert " ".join(r["text"].casefold().split()) == " ".join(original["text"].casefold().split())
        elif r["kind"] == "near_duplicate":
            a, b = original["text"].split(), r["text"].split()
            k = max(1, round(r["edit_rate"] * len(a)))
            # Each edit changes one word; an insertion next to a deletion can read as one substitution.
            assert k / 2 <= _word_edit_distance(a, b) <= k
            rates.add(r["edit_rate"])
        elif r["kind"] == "pii":
            assert len(r["pii"]) == 2 and all(s in r["text"] for s in r["pii"])
            for s in r["pii"]:
                if re.fullmatch(r"[\d.]+", s):
                    assert ipaddress.IPv4Address(s).is_global
        elif r["kind"] == "junk_repeated":
            lines = r["text"].split("\n")
            assert len(lines) >= 10 and len(set(lines)) == 1
        elif r["kind"] == "junk_symbols":
            assert sum(c in synthetic_raw.SYMBOLS for c in r["text"]) > 0.5 * len(r["text"].replace(" ", ""))
        if r["kind"] != "pii":
            assert r["pii"] == []
    assert rates == set(synthetic_raw.NEAR_DUPLICATE_RATES)


def test_every_person_is_described_in_clean_raw_documents(world_dir, people):
    _, paths = world_dir
    by_name, _ = people
    clean = " ".join(r["text"] for r in _read(paths["raw"]) if r["kind"] == "clean")
    for name in by_name:
        assert clean.count(name) >= synthetic.WorldSizes().raw_mentions_per_person


def test_preference_pairs_per_person_is_set_by_the_config(tmp_path):
    from jaxalign import config
    from jaxalign.stages import common

    def fact_pairs(workdir, per_person=None):
        c = config.defaults()
        c.workdir, c.data.synthetic_entities = str(workdir), 30
        if per_person is not None:
            c.data.synthetic_preference_per_person = per_person
        paths = common.world(config.from_config_dict(c))
        split = {name: _read(paths[f"preference_{name}"]) for name in ("train", "eval")}
        return {name: sum(r["task"] == "fact" for r in rs) for name, rs in split.items()}

    held_out = 3  # a tenth of the 30 people
    # The default world: WorldSizes' two pairs per person.
    assert fact_pairs(tmp_path / "default") == {"train": 2 * 27, "eval": 2 * held_out}
    assert fact_pairs(tmp_path / "six", 6) == {"train": 6 * 27, "eval": 6 * held_out}
