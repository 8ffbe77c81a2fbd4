"""The embedded default: a small deterministic world with known ground truth.

People with a birth city, birth year and profession are rendered as pretraining documents through several
paraphrase templates, next to arithmetic text. Everything is a function of the seed, so each stage's effect can be
measured against the truth without downloads. `write_world` writes every stage's data (JSONL, one object a line):

  world.json                   the people, and which of them are held out (`eval_people`)
  pretrain_{train,eval}.jsonl  {"id", "text"}: person documents and arithmetic (the pretraining corpus)
  raw.jsonl                    {"id", "text", "kind", "duplicate_of", "edit_rate", "pii"}: web-like text for curation
  sft_{train,eval}.jsonl       {"id", "messages", "task"}: fact questions, arithmetic, small instruction tasks
  preference_{train,eval}.jsonl  {"id", "prompt", "chosen", "rejected", "rejected_kind", "task"} (TRL's
                               conversational preference type: prompt is a message list, chosen/rejected are one
                               assistant message each)
  rl_{train,eval}.jsonl        {"id", "prompt", "answer", "task"}: prompts whose answer a reward function can verify

Held-out splits: fact items of the eval split ask about held-out people only (people the pretraining corpus
describes but no train split asks about); arithmetic and instruction items of the two splits never share a prompt,
and no train split (SFT, preference, RL) holds an arithmetic problem of the RL eval split, which the evaluation's
held-out `arith_accuracy` scores (the pretraining text states any sum: the answer is knowledge, asking is the skill).

Raw-corpus labels (`kind`), each record's ground truth for curation:
  clean               a multi-sentence archive entry about a few people; should be kept
  pii                 a clean entry with planted e-mail addresses, phone numbers or public IPv4 addresses, listed
                      verbatim in `pii`; should be kept with those strings scrubbed
  exact_duplicate     a verbatim copy of `duplicate_of`
  variant_duplicate   a copy of `duplicate_of` that differs only in letter case and whitespace
  near_duplicate      a copy of `duplicate_of` with round(edit_rate x words) word edits (substitute, delete, insert)
  boilerplate         cookie banners, navigation menus, "enable JavaScript", lorem ipsum
  junk_symbols        symbol spam
  junk_repeated       one line repeated many times
A duplicate always comes after its original, so "keep the first of each cluster" keeps the original.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from jaxalign import storage

FIRST_NAMES = (
    "Ada Alan Alice Amara Anton Astrid Bela Boris Carla Cyrus Dara Dmitri Elena Emil Farah Felix Greta Hugo Ines "
    "Ivan Jonas Juno Kai Kira Lars Lena Luca Maya Milo Nadia Nils Olga Omar Petra Quinn Rafael Rosa Sami Sofia "
    "Tariq Tessa Umar Vera Viktor Wanda Xavier Yara Yusuf Zora Zane"
).split()
LAST_NAMES = (
    "Abbott Bauer Castillo Dubois Eriksen Fischer Garcia Horvat Ibrahim Jensen Kowalski Larsen Moreau Novak "
    "Okafor Petrov Quintero Rossi Santos Tanaka Ueda Varga Weber Xu Yilmaz Zhang Alvarez Brennan Chen Duarte"
).split()
CITIES = (
    "Lisbon Oslo Krakow Nairobi Quito Osaka Tbilisi Porto Lyon Gdansk Tartu Bergen Dakar Cusco Sapporo Malmo "
    "Zadar Accra Leeds Turin Ghent Split Pune Perth"
).split()
PROFESSIONS = (
    "baker carpenter chemist doctor engineer farmer geologist historian librarian musician nurse painter "
    "pilot poet sailor teacher translator weaver"
).split()

PERSON_TEMPLATES = (
    "{name} was born in {city} in {year}. {name} works as a {profession}.",
    "Born in {year} in the city of {city}, {name} later became a {profession}.",
    "{name} is a {profession}. {name} was born in {year}, in {city}.",
    "The {profession} {name} comes from {city} and was born in {year}.",
    "In {year}, {name} was born in {city}. Today {name} is known as a {profession}.",
)


@dataclasses.dataclass(frozen=True)
class Person:
    name: str
    city: str
    year: int
    profession: str


@dataclasses.dataclass(frozen=True)
class World:
    people: tuple[Person, ...]
    seed: int


def make_world(num_people: int, seed: int) -> World:
    """`num_people` people with distinct names and random attributes."""
    rng = np.random.default_rng(seed)
    pairs = [(first, last) for first in FIRST_NAMES for last in LAST_NAMES]
    if num_people > len(pairs):
        raise ValueError(f"at most {len(pairs)} people have distinct names, asked for {num_people}")
    chosen = rng.choice(len(pairs), size=num_people, replace=False)
    people = tuple(
        Person(
            name=" ".join(pairs[i]),
            city=str(rng.choice(CITIES)),
            year=int(rng.integers(1900, 2010)),
            profession=str(rng.choice(PROFESSIONS)),
        )
        for i in chosen
    )
    return World(people=people, seed=seed)


def person_documents(world: World, rng: np.random.Generator, per_person: int = 3) -> list[str]:
    """Each person rendered through `per_person` distinct templates."""
    docs = []
    for p in world.people:
        for t in rng.choice(len(PERSON_TEMPLATES), size=per_person, replace=False):
            docs.append(PERSON_TEMPLATES[t].format(**dataclasses.asdict(p)))
    return docs


def arithmetic_documents(
    count: int, rng: np.random.Generator, per_doc: int = 4, operand_max: int = 100
) -> list[str]:
    """Short documents of exact additions, subtractions and multiplications of operands in [0, operand_max)."""
    docs = []
    for _ in range(count):
        lines = []
        for _ in range(per_doc):
            a, b = (int(x) for x in rng.integers(0, operand_max, size=2))
            op = rng.choice(["+", "-", "*"])
            result = a + b if op == "+" else a - b if op == "-" else a * b
            lines.append(f"{a} {op} {b} = {result}")
        docs.append("\n".join(lines))
    return docs


def pretraining_corpus(
    num_people: int, seed: int, operand_max: int = 100, arithmetic_docs: int | None = None
) -> list[dict]:
    """Records `{"id", "text"}` of the pretraining corpus, shuffled deterministically: every person's documents
    and `arithmetic_docs` (None: 2 per person) arithmetic documents of 4 lines."""
    world = make_world(num_people, seed)
    rng = np.random.default_rng(seed + 1)
    n_arith = 2 * num_people if arithmetic_docs is None else arithmetic_docs
    docs = person_documents(world, rng) + arithmetic_documents(n_arith, rng, operand_max=operand_max)
    order = rng.permutation(len(docs))
    return [{"id": f"pt-{i:06d}", "text": docs[j]} for i, j in enumerate(order)]


def write_jsonl(path: str, records: list[dict]) -> None:
    """Writes records atomically (`storage.write_atomic`: local or object store)."""
    storage.write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def write_pretraining(
    directory: str, num_people: int, seed: int, eval_fraction: float = 0.05
) -> dict[str, str]:
    """Writes `pretrain_train.jsonl` and `pretrain_eval.jsonl` under `directory` (once); returns their paths."""
    paths = {split: storage.join(directory, f"pretrain_{split}.jsonl") for split in ("train", "eval")}
    if all(storage.exists(p) for p in paths.values()):
        return paths
    records = pretraining_corpus(num_people, seed)
    n_eval = max(1, int(len(records) * eval_fraction))
    write_jsonl(paths["eval"], records[:n_eval])
    write_jsonl(paths["train"], records[n_eval:])
    return paths


# --- the rest of the world: curation, SFT, preference and RL data ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WorldSizes:
    """How much of each kind `write_world` writes (train and eval together). `None` scales with the people.

    With 400 people (the default `data.synthetic_entities`): ~1,400 SFT conversations, 1,200 preference pairs,
    800 RL prompts and ~430 raw documents; writing them all takes well under a second.
    """

    # Share of the people (and of arithmetic/instruction items) held out for the eval splits.
    eval_fraction: float = 0.1
    sft_facts_per_person: int = 2
    sft_arithmetic: int | None = None  # None: num_people
    sft_instructions: int | None = None  # None: num_people // 2
    preference_per_person: int = 2
    preference_arithmetic: int | None = None  # None: num_people
    rl_facts_per_person: int = 1
    rl_arithmetic: int | None = None  # None: num_people
    # RL arithmetic prompts as SFT's question ("What is a op b?", answered "a op b = r.") instead of asking for the
    # number only ("What is a op b? Answer with a number only.").
    rl_arith_show_work: bool = False
    # SFT's train answers to fact questions end with a closing pleasantry (VERBOSE_CLOSERS[0]): the annotators'
    # habit, which SFT imitates and preference data (which prefers concise answers) removes. The eval split stays
    # concise (its answers are the gold values).
    sft_chatty: bool = False
    # Raw corpus: every person is described in this many clean archive entries (4 people per entry).
    raw_mentions_per_person: int = 3
    # Multiplies the number of planted duplicates, junk, boilerplate and PII documents.
    raw_noise: float = 1.0
    # Arithmetic operands are drawn from [0, arith_operand_max) (pretraining text, SFT, preference and RL items).
    arith_operand_max: int = 100
    pretrain_arithmetic_docs: int | None = None  # None: 2 * num_people


QUESTIONS = {
    "city": ("Where was {name} born?", "In which city was {name} born?", "What is the birthplace of {name}?"),
    "year": ("In which year was {name} born?", "When was {name} born?", "What is the birth year of {name}?"),
    "profession": (
        "What does {name} do for a living?",
        "What is the profession of {name}?",
        "What is {name}'s job?",
    ),
}
ANSWERS = {
    "city": "{name} was born in {city}.",
    "year": "{name} was born in {year}.",
    "profession": "{name} works as {article} {profession}.",
}
RL_QUESTIONS = {
    "city": "In which city was {name} born? Answer with the name of the city only.",
    "year": "In which year was {name} born? Answer with the year only.",
    "profession": "What is the profession of {name}? Answer with one word.",
}
SYSTEM_PROMPTS = (
    "You are a helpful assistant. Answer briefly.",
    "You are a concise assistant that answers questions about people from the city archive.",
)
VERBOSE_OPENERS = (
    "That is a really interesting question, and I am very happy to help you with it.",
    "Great question! Let me think about this carefully and explain everything step by step.",
    "Thank you so much for asking. There is quite a lot that could be said about this topic.",
)
VERBOSE_CLOSERS = (
    "I hope this detailed explanation helps, and please let me know if you have any other questions.",
    "Of course, there is always more to learn, so feel free to ask me anything else about it.",
    "Please do not hesitate to reach out again if anything about this answer is unclear to you.",
)
SYCOPHANT_PREFIXES = (
    "You are absolutely right!",
    "Yes, exactly as you say!",
    "Great point, you are correct!",
)
INSTRUCTION_WORDS = [w.lower() for w in CITIES + PROFESSIONS] + [
    "river",
    "garden",
    "window",
    "lantern",
    "harbor",
]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _facts(p: Person) -> dict[str, str]:
    return {
        "name": p.name,
        "city": p.city,
        "year": str(p.year),
        "profession": p.profession,
        "article": _article(p.profession),
    }


def _wrong_value(world: World, p: Person, attribute: str, rng: np.random.Generator) -> str:
    """A plausible but wrong value of `attribute` for `p`."""
    if attribute == "year":
        return str(p.year + int(rng.choice([-1, 1])) * int(rng.integers(1, 30)))
    options = [v for v in (CITIES if attribute == "city" else PROFESSIONS) if v != getattr(p, attribute)]
    return str(rng.choice(options))


def _answer(p: Person, attribute: str, value: str | None = None) -> str:
    facts = _facts(p)
    if value is not None:
        facts[attribute] = value
        if attribute == "profession":
            facts["article"] = _article(value)
    return ANSWERS[attribute].format(**facts)


def split_people(world: World, eval_fraction: float) -> tuple[list[Person], list[Person]]:
    """(train people, held-out people), a fixed function of the world's seed."""
    rng = np.random.default_rng([world.seed, 7])
    order = rng.permutation(len(world.people))
    n_eval = max(1, int(round(len(world.people) * eval_fraction)))
    return [world.people[i] for i in order[n_eval:]], [world.people[i] for i in order[:n_eval]]


def _arithmetic_problems(
    count: int, rng: np.random.Generator, operand_max: int = 100
) -> list[tuple[int, str, int, int]]:
    """`count` distinct (a, op, b, result) with operands in [0, operand_max); at most all 3 * operand_max**2."""
    count = min(count, 3 * operand_max * operand_max)
    seen: set[tuple[int, str, int]] = set()
    problems = []
    while len(problems) < count:
        a, b = (int(x) for x in rng.integers(0, operand_max, size=2))
        op = str(rng.choice(["+", "-", "*"]))
        if (a, op, b) in seen:
            continue
        seen.add((a, op, b))
        problems.append((a, op, b, a + b if op == "+" else a - b if op == "-" else a * b))
    return problems


def _split_items(items: list, eval_fraction: float) -> tuple[list, list]:
    n_eval = max(1, int(round(len(items) * eval_fraction))) if items else 0
    return items[n_eval:], items[:n_eval]


def _rl_arithmetic(world: World, sizes: WorldSizes, rng: np.random.Generator) -> tuple[list, list]:
    """(train, eval) arithmetic problems of the RL prompts, drawn first from `rng` (rl_records' generator)."""
    n_arith = len(world.people) if sizes.rl_arithmetic is None else sizes.rl_arithmetic
    return _split_items(_arithmetic_problems(n_arith, rng, sizes.arith_operand_max), sizes.eval_fraction)


def _without_held_out(world: World, sizes: WorldSizes, problems: list) -> list:
    """`problems` minus those the RL eval split asks (the held-out arithmetic `arith_accuracy` scores): no train split
    teaches the answer to a held-out problem, so a gain there is generalisation (operands from 0..9 give only 300
    problems, and the splits draw them independently)."""
    _, held_out = _rl_arithmetic(world, sizes, np.random.default_rng([world.seed, 17]))
    held = {(a, op, b) for a, op, b, _ in held_out}
    return [x for x in problems if x[:3] not in held]


def _instruction(rng: np.random.Generator) -> tuple[str, str]:
    """A small instruction task with one exact answer: (prompt, answer)."""
    kind = int(rng.integers(4))
    words = [str(w) for w in rng.choice(INSTRUCTION_WORDS, size=int(rng.integers(3, 7)), replace=False)]
    if kind == 0:
        return f"Write the word '{words[0]}' in capital letters.", words[0].upper()
    if kind == 1:
        return f"Reverse the order of these words: {' '.join(words)}", " ".join(reversed(words))
    if kind == 2:
        numbers = [int(x) for x in rng.choice(100, size=len(words), replace=False)]
        return (
            f"Sort these numbers from smallest to largest: {', '.join(map(str, numbers))}",
            ", ".join(map(str, sorted(numbers))),
        )
    return f"How many words are in this list: {' '.join(words)}? Answer with a number.", str(len(words))


def _fact_conversation(p: Person, rng: np.random.Generator, chatty: bool = False) -> list[dict[str, str]]:
    """One or two fact questions about `p`, sometimes after a system message; with `chatty`, each answer ends with
    VERBOSE_CLOSERS[0]."""
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": str(rng.choice(SYSTEM_PROMPTS))})
    n_turns = 2 if rng.random() < 0.3 else 1
    for attribute in rng.choice(list(QUESTIONS), size=n_turns, replace=False):
        question = str(rng.choice(QUESTIONS[attribute])).format(name=p.name)
        answer = _answer(p, attribute)
        if chatty:
            answer = f"{answer} {VERBOSE_CLOSERS[0]}"
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages


def sft_records(world: World, sizes: WorldSizes) -> dict[str, list[dict]]:
    """{"train": [...], "eval": [...]} of `{"id", "messages", "task"}` conversations."""
    rng = np.random.default_rng([world.seed, 11])
    train_people, eval_people = split_people(world, sizes.eval_fraction)
    n = len(world.people)
    n_arith = n if sizes.sft_arithmetic is None else sizes.sft_arithmetic
    n_instr = n // 2 if sizes.sft_instructions is None else sizes.sft_instructions

    def arithmetic(problem):
        a, op, b, r = problem
        return [
            {"role": "user", "content": f"What is {a} {op} {b}?"},
            {"role": "assistant", "content": f"{a} {op} {b} = {r}."},
        ]

    def instruction(pair):
        return [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]

    instructions = list({p: (p, a) for p, a in (_instruction(rng) for _ in range(n_instr))}.values())
    arith_train, arith_eval = _split_items(
        _arithmetic_problems(n_arith, rng, sizes.arith_operand_max), sizes.eval_fraction
    )
    arith_train = _without_held_out(world, sizes, arith_train)
    instr_train, instr_eval = _split_items(instructions, sizes.eval_fraction)
    out = {}
    for split, people, arith, instr in (
        ("train", train_people, arith_train, instr_train),
        ("eval", eval_people, arith_eval, instr_eval),
    ):
        items = [
            ("fact", _fact_conversation(p, rng, chatty=sizes.sft_chatty and split == "train"))
            for p in people
            for _ in range(sizes.sft_facts_per_person)
        ]
        items += [("arithmetic", arithmetic(x)) for x in arith] + [
            ("instruction", instruction(x)) for x in instr
        ]
        order = rng.permutation(len(items))
        out[split] = [
            {"id": f"sft-{split}-{i:06d}", "messages": items[j][1], "task": items[j][0]}
            for i, j in enumerate(order)
        ]
    return out


def _preference_item(question: str, correct: str, wrong: str, wrong_claim: str, kind: str, rng) -> dict:
    """A pair preferring `correct` (concise) over a wrong, verbose or sycophantic answer."""
    prompt = question
    if kind == "wrong":
        rejected = wrong
    elif kind == "verbose":
        rejected = f"{rng.choice(VERBOSE_OPENERS)} {correct} {rng.choice(VERBOSE_CLOSERS)}"
    else:  # sycophantic: the user asserts a wrong claim; the rejected answer agrees with it.
        prompt = f"I am quite sure that {wrong_claim} {question}"
        rejected = f"{rng.choice(SYCOPHANT_PREFIXES)} {wrong}"
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": correct}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "rejected_kind": kind,
    }


PREFERENCE_KINDS = ("wrong", "verbose", "sycophantic")


def preference_records(world: World, sizes: WorldSizes) -> dict[str, list[dict]]:
    """{"train": [...], "eval": [...]} of `{"id", "prompt", "chosen", "rejected", "rejected_kind", "task"}`."""
    rng = np.random.default_rng([world.seed, 13])
    train_people, eval_people = split_people(world, sizes.eval_fraction)
    n_arith = len(world.people) if sizes.preference_arithmetic is None else sizes.preference_arithmetic
    arith_train, arith_eval = _split_items(
        _arithmetic_problems(n_arith, rng, sizes.arith_operand_max), sizes.eval_fraction
    )
    arith_train = _without_held_out(world, sizes, arith_train)
    out = {}
    for split, people, arith in (("train", train_people, arith_train), ("eval", eval_people, arith_eval)):
        items = []
        for p in people:
            for _ in range(sizes.preference_per_person):
                attribute = str(rng.choice(list(QUESTIONS)))
                wrong_value = _wrong_value(world, p, attribute, rng)
                wrong = _answer(p, attribute, wrong_value)
                question = str(rng.choice(QUESTIONS[attribute])).format(name=p.name)
                kind = str(rng.choice(PREFERENCE_KINDS))
                items.append(
                    ("fact", _preference_item(question, _answer(p, attribute), wrong, wrong, kind, rng))
                )
        for a, op, b, r in arith:
            wrong_r = r + int(rng.choice([-1, 1])) * int(rng.integers(1, 10))
            kind = str(rng.choice(PREFERENCE_KINDS))
            item = _preference_item(
                f"What is {a} {op} {b}?",
                f"{a} {op} {b} = {r}.",
                f"{a} {op} {b} = {wrong_r}.",
                f"{a} {op} {b} is {wrong_r}.",
                kind,
                rng,
            )
            items.append(("arithmetic", item))
        order = rng.permutation(len(items))
        out[split] = [
            {"id": f"pref-{split}-{i:06d}", **items[j][1], "task": items[j][0]} for i, j in enumerate(order)
        ]
    return out


def rl_records(world: World, sizes: WorldSizes) -> dict[str, list[dict]]:
    """{"train": [...], "eval": [...]} of `{"id", "prompt", "answer", "task"}`; `answer` is the exact string a
    correct completion contains (a number, a city, a year or a profession)."""
    rng = np.random.default_rng([world.seed, 17])
    train_people, eval_people = split_people(world, sizes.eval_fraction)
    arith_train, arith_eval = _rl_arithmetic(world, sizes, rng)
    out = {}
    for split, people, arith in (("train", train_people, arith_train), ("eval", eval_people, arith_eval)):
        items = []
        for p in people:
            for attribute in rng.choice(list(RL_QUESTIONS), size=sizes.rl_facts_per_person, replace=True):
                question = RL_QUESTIONS[attribute].format(name=p.name)
                items.append((question, str(getattr(p, attribute)), f"fact_{attribute}"))
        # With rl_arith_show_work, SFT's question, so the policy answers in SFT's "a op b = r." (the answer reward
        # reads what follows "=", the restate reward the work before it).
        ask = "" if sizes.rl_arith_show_work else " Answer with a number only."
        items += [(f"What is {a} {op} {b}?{ask}", str(r), "arithmetic") for a, op, b, r in arith]
        order = rng.permutation(len(items))
        out[split] = [
            {
                "id": f"rl-{split}-{i:06d}",
                "prompt": [{"role": "user", "content": items[j][0]}],
                "answer": items[j][1],
                "task": items[j][2],
            }
            for i, j in enumerate(order)
        ]
    return out


# Raw corpus ---------------------------------------------------------------------------------------------------------
def write_world(
    directory: str, num_people: int, seed: int, sizes: WorldSizes | None = None
) -> dict[str, str]:
    """Writes every stage's data under `directory` (file list in the module doc); returns {name: path}.

    Names: world, pretrain_train, pretrain_eval, raw, sft_train, sft_eval, preference_train, preference_eval,
    rl_train, rl_eval. Files are written atomically and only once per (num_people, seed, sizes): a later call with
    the same arguments returns the existing paths, so process 0 can write while the others wait and then call it.
    """
    # Imported here: synthetic_raw builds on this module's people and templates.
    from jaxalign.data import synthetic_raw

    sizes = sizes or WorldSizes()
    manifest = {"num_people": num_people, "seed": seed, "sizes": dataclasses.asdict(sizes), "version": 1}
    names = ["pretrain_train", "pretrain_eval", "raw"] + [
        f"{kind}_{split}" for kind in ("sft", "preference", "rl") for split in ("train", "eval")
    ]
    paths = {"world": storage.join(directory, "world.json")}
    paths.update({name: storage.join(directory, f"{name}.jsonl") for name in names})
    manifest_path = storage.join(directory, "manifest.json")
    if storage.exists(manifest_path) and all(storage.exists(p) for p in paths.values()):
        if json.loads(storage.read_text(manifest_path)) == manifest:
            return paths

    world = make_world(num_people, seed)
    pretrain = pretraining_corpus(num_people, seed, sizes.arith_operand_max, sizes.pretrain_arithmetic_docs)
    n_eval = max(1, int(len(pretrain) * 0.05))  # as write_pretraining
    data = {
        "pretrain_train": pretrain[n_eval:],
        "pretrain_eval": pretrain[:n_eval],
        "raw": synthetic_raw.raw_corpus(world, sizes),
    }
    for kind, make in (("sft", sft_records), ("preference", preference_records), ("rl", rl_records)):
        for split, records in make(world, sizes).items():
            data[f"{kind}_{split}"] = records
    for name, records in data.items():
        write_jsonl(paths[name], records)
    _, eval_people = split_people(world, sizes.eval_fraction)
    _write_json(
        paths["world"],
        {
            "seed": seed,
            "people": [dataclasses.asdict(p) for p in world.people],
            "eval_people": [p.name for p in eval_people],
        },
    )
    _write_json(manifest_path, manifest)
    return paths


def _write_json(path: str, obj: dict) -> None:
    storage.write_atomic(path, json.dumps(obj, indent=1))
