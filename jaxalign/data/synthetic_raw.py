"""The raw, noisy corpus of the synthetic world, for curation: clean documents about the world's people next to
planted exact duplicates, case/whitespace variants, near duplicates at known word-edit rates, boilerplate, junk
(symbol spam, repeated lines) and PII, each record labelled with what it is (see `raw_corpus`).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re

import numpy as np

from jaxalign.data.synthetic import CITIES, PERSON_TEMPLATES, PROFESSIONS, Person, World, WorldSizes

FILLER_SENTENCES = (
    "The notes below were collected by the city archive and checked against the records of the registry.",
    "Most of these entries were written by hand and later typed up by volunteers of the local history society.",
    "Readers who have more information about any of these people are invited to write to the archive.",
    "The archive keeps short biographies of people from many cities, and new entries are added every month.",
    "Some of the dates in older entries have been corrected with the help of church books and school lists.",
    "Each entry gives the place and the year of birth together with the work that the person is known for.",
    "Several of the families mentioned here have kept letters and photographs that they shared with the museum.",
    "The volunteers would like to thank everyone who took the time to answer their questions with such patience.",
    "A longer version of this collection is available to visitors in the reading room of the old library.",
    "It is worth remembering that the records of small towns were often kept with less care than those of cities.",
    "This page is part of a series that tries to describe ordinary lives with the same care as famous ones.",
    "Corrections are always welcome, and every change to an entry is noted with the date and the source.",
)
EDIT_WORDS = (
    "apple bridge candle forest silver window meadow copper thunder velvet harbor lantern orchard pebble quiet "
    "river saddle timber violet willow"
).split()
NEAR_DUPLICATE_RATES = (0.02, 0.05, 0.1, 0.2, 0.4)
BOILERPLATE_BLOCKS = (
    (
        "This website uses cookies to give you the best experience.",
        "By continuing to browse the {site} site you agree to our use of cookies.",
        "Read our privacy policy and terms of use.",
        "Accept all",
        "Manage settings",
    ),
    (
        "Home",
        "About us",
        "News",
        "Contact",
        "Login",
        "Register",
        "Share on social media",
        "© {year} {site}. All rights reserved.",
    ),
    (
        "Please enable JavaScript in your browser to view {site}.",
        "Your browser is not supported.",
        "Skip to content",
    ),
    (
        "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore et "
        "dolore magna aliqua.",
        "Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris nisi ut aliquip ex ea commodo consequat.",
    ),
    (
        "Subscribe to our newsletter",
        "Enter your e-mail address",
        "Sign up",
        "Follow {site} for daily updates",
    ),
)
SPAM_LINES = (
    "Buy cheap flights to {city} now and save big on every booking!!!",
    "Click here to win a free {profession} starter kit today!",
    "Best {profession} deals in {city}, limited offer, act fast!",
)
SYMBOLS = "#$%&*@!~^+=|<>"
PUBLIC_FIRST_OCTETS = (31, 45, 62, 77, 84, 91, 109, 145, 178, 185, 193, 213)


def _archive_entry(people: list[Person], rng: np.random.Generator, extra: str = "") -> str:
    """A clean document: two filler sentences, one paraphrase per person (no template twice), a closing filler."""
    fillers = [FILLER_SENTENCES[i] for i in rng.choice(len(FILLER_SENTENCES), size=3, replace=False)]
    templates = rng.choice(
        len(PERSON_TEMPLATES), size=len(people), replace=len(people) > len(PERSON_TEMPLATES)
    )
    facts = " ".join(
        PERSON_TEMPLATES[t].format(**dataclasses.asdict(p)) for t, p in zip(templates, people, strict=True)
    )
    closing = fillers[2] + (" " + extra if extra else "")
    return f"{fillers[0]} {fillers[1]} {facts}\n\n{closing}"


def _pii(p: Person, rng: np.random.Generator) -> tuple[str, list[str]]:
    """A sentence with an e-mail address and a phone number or a public IPv4 address; (sentence, planted strings)."""
    first, last = p.name.lower().split()
    email = f"{first}.{last}@{rng.choice(['example.org', 'mail.example.com', 'archive.example.net'])}"
    if rng.random() < 0.5:
        digits = [int(x) for x in rng.integers(0, 10, size=10)]
        if rng.random() < 0.5:
            phone = (
                f"+{rng.choice([31, 44, 49, 351])} {digits[0] + 1}{digits[1]} {''.join(map(str, digits[2:6]))} "
                + "".join(map(str, digits[6:]))
            )
        else:
            phone = f"({2 + digits[0] % 8}{digits[1]}{digits[2]}) 555-{''.join(map(str, digits[3:7]))}"
        return f"Relatives who want to reach the family can write to {email} or call {phone}.", [email, phone]
    while True:
        ip = ".".join(
            [str(rng.choice(PUBLIC_FIRST_OCTETS)), *(str(int(x)) for x in rng.integers(1, 255, size=3))]
        )
        if ipaddress.IPv4Address(ip).is_global:
            break
    return f"Questions about this entry go to {email}, and the scans are kept on the server at {ip}.", [
        email,
        ip,
    ]


def _edit_words(text: str, rate: float, rng: np.random.Generator) -> str:
    """Exactly round(rate x words) word edits at distinct positions; each substitutes, deletes or inserts a word."""
    words = re.split(r"(?<=\S) (?=\S)", text)
    k = max(1, int(round(rate * len(words))))
    for pos in sorted(rng.choice(len(words), size=k, replace=False), reverse=True):
        op = int(rng.integers(3))
        new = str(rng.choice(EDIT_WORDS))
        if op == 0:
            words[pos] = new
        elif op == 1 and len(words) > 1:
            del words[pos]
        else:
            words.insert(int(pos), new)
    return " ".join(words)


def _variant(text: str, rng: np.random.Generator) -> str:
    """The same text in another letter case and with other spacing."""
    text = text.lower() if rng.random() < 0.5 else text.upper()
    words = text.split(" ")
    spaced = [w + (" " * int(rng.integers(1, 3)) if rng.random() < 0.3 else " ") for w in words]
    return "".join(spaced).rstrip(" ") + " " * int(rng.integers(0, 3))


def _boilerplate(rng: np.random.Generator) -> str:
    site = f"{rng.choice(CITIES)} {rng.choice(['Daily', 'News', 'Portal', 'Market', 'Times'])}"
    blocks = rng.choice(len(BOILERPLATE_BLOCKS), size=2, replace=False)
    lines = [line for b in blocks for line in BOILERPLATE_BLOCKS[b]]
    return "\n".join(line.format(site=site, year=int(rng.integers(2005, 2025))) for line in lines)


def _junk_symbols(rng: np.random.Generator) -> str:
    runs = [
        "".join(rng.choice(list(SYMBOLS), size=int(rng.integers(2, 8))))
        for _ in range(int(rng.integers(40, 90)))
    ]
    for i in rng.choice(len(runs), size=len(runs) // 8, replace=False):
        runs[i] = str(rng.choice(EDIT_WORDS))
    return " ".join(runs)


def _junk_repeated(rng: np.random.Generator) -> str:
    line = str(rng.choice(SPAM_LINES)).format(city=rng.choice(CITIES), profession=rng.choice(PROFESSIONS))
    return "\n".join([line] * int(rng.integers(10, 30)))


def raw_corpus(world: World, sizes: WorldSizes) -> list[dict]:
    """Web-like records `{"id", "text", "kind", "duplicate_of", "edit_rate", "pii"}` (kinds in the module doc)."""
    rng = np.random.default_rng([world.seed, 19])
    people = list(world.people)
    originals: list[dict] = []
    for _ in range(sizes.raw_mentions_per_person):
        order = rng.permutation(len(people))
        for start in range(0, len(order), 4):
            group = [people[i] for i in order[start : start + 4]]
            originals.append({"text": _archive_entry(group, rng), "kind": "clean", "pii": []})
    n_clean = len(originals)

    def count(fraction: float, minimum: int = 1) -> int:
        """Planted documents of one kind: at least `minimum` (unless raw_noise is 0)."""
        return max(minimum, int(round(n_clean * fraction * sizes.raw_noise))) if sizes.raw_noise > 0 else 0

    for _ in range(count(1 / 15)):
        group = [people[i] for i in rng.choice(len(people), size=3, replace=False)]
        sentence, planted = _pii(group[0], rng)
        originals.append({"text": _archive_entry(group, rng, extra=sentence), "kind": "pii", "pii": planted})
    for kind, make, fraction in (
        ("boilerplate", _boilerplate, 1 / 20),
        ("junk_symbols", _junk_symbols, 1 / 30),
        ("junk_repeated", _junk_repeated, 1 / 30),
    ):
        originals += [{"text": make(rng), "kind": kind, "pii": []} for _ in range(count(fraction))]
    originals = [originals[i] for i in rng.permutation(len(originals))]
    for i, r in enumerate(originals):
        r.update(id=f"raw-o{i:06d}", duplicate_of="", edit_rate=0.0)

    clean = [i for i, r in enumerate(originals) if r["kind"] == "clean"]
    copies: list[tuple[int, dict]] = []  # (index of the original, record)
    for kind, fraction in (
        ("exact_duplicate", 1 / 10),
        ("variant_duplicate", 1 / 20),
        ("near_duplicate", 1 / 10),
    ):
        minimum = len(NEAR_DUPLICATE_RATES) if kind == "near_duplicate" else 1
        for j, i in enumerate(rng.choice(clean, size=count(fraction, minimum), replace=True)):
            text, rate = originals[i]["text"], 0.0
            if kind == "variant_duplicate":
                text = _variant(text, rng)
            elif kind == "near_duplicate":
                rate = NEAR_DUPLICATE_RATES[j % len(NEAR_DUPLICATE_RATES)]
                text = _edit_words(text, rate, rng)
            copies.append(
                (
                    int(i),
                    {
                        "text": text,
                        "kind": kind,
                        "pii": [],
                        "duplicate_of": originals[i]["id"],
                        "edit_rate": rate,
                    },
                )
            )
    # Each copy lands at a uniformly random place after its original.
    keys = [float(i) for i in range(len(originals))] + [
        float(rng.uniform(i + 0.5, len(originals))) for i, _ in copies
    ]
    records = originals + [c for _, c in copies]
    out = []
    for n, k in enumerate(np.argsort(keys, kind="stable")):
        r = records[k]
        out.append(
            {
                "id": f"raw-{n:06d}",
                "text": r["text"],
                "kind": r["kind"],
                "duplicate_of": r["duplicate_of"],
                "edit_rate": r["edit_rate"],
                "pii": r["pii"],
                "_old": r["id"] if k < len(originals) else "",
            }
        )
    new_id = {r["_old"]: r["id"] for r in out if r["_old"]}
    for r in out:
        r["duplicate_of"] = new_id.get(r["duplicate_of"], "")
        del r["_old"]
    return out
