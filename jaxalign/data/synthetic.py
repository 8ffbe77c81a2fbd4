"""The embedded default: a small deterministic world with known ground truth.

People with a birth city, birth year and profession are rendered as pretraining documents through several
paraphrase templates, next to arithmetic text. Everything is a function of the seed, so each stage's effect can be
measured against the truth without downloads.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

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
    pairs = [(f, l) for f in FIRST_NAMES for l in LAST_NAMES]
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


def arithmetic_documents(count: int, rng: np.random.Generator, per_doc: int = 4) -> list[str]:
    """Short documents of exact additions, subtractions and multiplications of small numbers."""
    docs = []
    for _ in range(count):
        lines = []
        for _ in range(per_doc):
            a, b = (int(x) for x in rng.integers(0, 100, size=2))
            op = rng.choice(["+", "-", "*"])
            result = a + b if op == "+" else a - b if op == "-" else a * b
            lines.append(f"{a} {op} {b} = {result}")
        docs.append("\n".join(lines))
    return docs


def pretraining_corpus(num_people: int, seed: int) -> list[dict]:
    """Records `{"id", "text"}` of the pretraining corpus, shuffled deterministically."""
    world = make_world(num_people, seed)
    rng = np.random.default_rng(seed + 1)
    docs = person_documents(world, rng) + arithmetic_documents(2 * num_people, rng)
    order = rng.permutation(len(docs))
    return [{"id": f"pt-{i:06d}", "text": docs[j]} for i, j in enumerate(order)]


def write_jsonl(path: str, records: list[dict]) -> None:
    """Writes records atomically (a temporary file, then rename)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_pretraining(directory: str, num_people: int, seed: int, eval_fraction: float = 0.05) -> dict[str, str]:
    """Writes `pretrain_train.jsonl` and `pretrain_eval.jsonl` under `directory` (once); returns their paths."""
    paths = {split: os.path.join(directory, f"pretrain_{split}.jsonl") for split in ("train", "eval")}
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    records = pretraining_corpus(num_people, seed)
    n_eval = max(1, int(len(records) * eval_fraction))
    write_jsonl(paths["eval"], records[:n_eval])
    write_jsonl(paths["train"], records[n_eval:])
    return paths
