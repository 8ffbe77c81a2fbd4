"""Curation: dedup, quality filters, PII, determinism across workers, resume, bad input, and the real CLI."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import pathlib
import random
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from jaxalign import config as config_lib
from jaxalign.data import curate, curate_minhash
from jaxalign.data import curate_filters as filters
from jaxalign.errors import ConfigError, DataError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# A small English-like vocabulary: stop words are frequent, as in prose.
STOP = ["the", "of", "and", "to", "that", "with", "have", "be"]
CONTENT = (
    "river market winter garden letter station doctor village harbour museum bridge teacher lantern orchard "
    "engine valley kitchen forest painter window meadow island castle captain farmer library mountain sailor "
    "student theatre bakery tunnel canyon desert glacier harvest journey machine needle ocean pepper quarter "
    "rabbit saddle timber uncle vessel wagon yellow zipper anchor basket candle dragon feather gravel hammer "
    "ivory jacket kettle ladder mirror napkin oyster pillow quilt ribbon silver tomato umbrella velvet walnut"
).split()
VERBS = "carried found opened painted watched crossed built repaired visited described".split()


def sentence(rng: random.Random) -> str:
    words = []
    for _ in range(rng.randint(3, 5)):
        words += [rng.choice(STOP), rng.choice(CONTENT), rng.choice(VERBS), rng.choice(CONTENT)]
    return " ".join(words).capitalize() + "."


def document(rng: random.Random, paragraphs: int = 3) -> str:
    """Prose that passes every quality filter: several lines of several sentences each."""
    return "\n".join(" ".join(sentence(rng) for _ in range(4)) for _ in range(paragraphs))


def edit_one_word(text: str, index: int) -> str:
    words = text.split(" ")
    words[index] = "zeppelin"
    return " ".join(words)


def write_jsonl(path, records, gz: bool = False) -> str:
    lines = [r if isinstance(r, (str, bytes)) else json.dumps(r) for r in records]
    data = b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines)
    path = f"{path}.gz" if gz else str(path)
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(data)
    return path


def load_job_config(arg: str | None = None):
    spec = importlib.util.spec_from_file_location(
        "curate_job_config", os.path.join(ROOT, "configs", "curate.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def make_config(input_glob: str, workdir, workers: int = 1, on_error: str = "error", **curate_overrides):
    """The real job config, pointed at test data; single-process unless asked."""
    cd = load_job_config()
    cd.workdir = str(workdir)
    cd.data.input = input_glob
    cd.data.on_error = on_error
    cd.curate.num_workers = workers
    cd.curate.update(curate_overrides)
    return config_lib.from_config_dict(cd)


def run(input_glob: str, workdir, **kwargs) -> tuple[dict, dict, dict]:
    """Runs curation; returns (kept records by id, removed entries by id, report)."""
    curate.run(make_config(input_glob, workdir, **kwargs))
    kept = {}
    for name in sorted(os.listdir(os.path.join(workdir, "curated"))):
        with open(os.path.join(workdir, "curated", name)) as f:
            for line in f:
                record = json.loads(line)
                kept[record["id"]] = record
    with open(os.path.join(workdir, "removed.jsonl")) as f:
        removed = {e["id"]: e for e in map(json.loads, f)}
    with open(os.path.join(workdir, "curate_report.json")) as f:
        return kept, removed, json.load(f)


def outputs(workdir) -> dict[str, bytes]:
    names = ["removed.jsonl"] + [
        os.path.join("curated", n) for n in os.listdir(os.path.join(workdir, "curated"))
    ]
    return {n: pathlib.Path(workdir, n).read_bytes() for n in sorted(names)}


# --- dedup ----------------------------------------------------------------------------------------------------------
def test_exact_copies_and_case_whitespace_variants_point_at_the_first_occurrence(tmp_path):
    rng = random.Random(0)
    a, b = document(rng), document(rng)
    variants = [a, a.upper(), re.sub(" ", "  ", a).replace("\n", " \n\t"), "  " + a.swapcase() + "\n"]
    write_jsonl(tmp_path / "0.jsonl", [{"id": "a", "text": a, "lang": "en"}, {"id": "b", "text": b}])
    write_jsonl(tmp_path / "1.jsonl", [{"id": f"v{i}", "text": t} for i, t in enumerate(variants)], gz=True)
    kept, removed, report = run(str(tmp_path / "*.jsonl*"), tmp_path / "w")

    assert set(kept) == {"a", "b"} and kept["a"]["lang"] == "en" and kept["a"]["text"] == a
    assert removed == {
        f"v{i}": {"id": f"v{i}", "reason": "exact_duplicate", "duplicate_of": "a"} for i in range(4)
    }
    assert report["removed_by_reason"] == {"exact_duplicate": 4}
    assert report["records"] == {"input": 6, "bad": 0, "kept": 2, "removed": 4}


def test_near_duplicates_are_removed_and_unrelated_documents_kept(tmp_path):
    rng = random.Random(1)
    docs = [document(rng) for _ in range(30)]
    near = {f"near{i}": edit_one_word(docs[i], 7 + i) for i in range(6)}  # ~180 words: Jaccard ~0.95
    write_jsonl(tmp_path / "a.jsonl", [{"id": f"doc{i}", "text": t} for i, t in enumerate(docs[:15])])
    write_jsonl(tmp_path / "b.jsonl", [{"id": k, "text": t} for k, t in near.items()])
    write_jsonl(tmp_path / "c.jsonl", [{"id": f"doc{i + 15}", "text": t} for i, t in enumerate(docs[15:])])
    kept, removed, report = run(str(tmp_path / "*.jsonl"), tmp_path / "w")

    assert set(kept) == {f"doc{i}" for i in range(30)}
    assert removed == {
        f"near{i}": {"id": f"near{i}", "reason": "near_duplicate", "duplicate_of": f"doc{i}"}
        for i in range(6)
    }
    assert report["stages"]["near_dedup"]["docs"] == 36


def test_minhash_estimates_jaccard_and_components_match_union_find():
    rng = random.Random(2)
    base = document(rng, 6).split(" ")
    a_K, b_K = curate_minhash.permutations(256, seed=0)
    docs = [" ".join(base)]
    for rate in (0.02, 0.05, 0.1, 0.2, 0.4):
        words = [w if rng.random() > rate else rng.choice(CONTENT) for w in base]
        docs.append(" ".join(words))
    x_S, doc_S = curate_minhash.shingles([curate_minhash.word_bytes(d.casefold()) for d in docs], 5)
    sig = curate_minhash.minhash(x_S, doc_S, len(docs), a_K, b_K)
    grams = [{tuple(w[i : i + 5]) for i in range(len(w) - 4)} for w in map(curate_minhash.words, docs)]
    for k in range(1, len(docs)):
        true = len(grams[0] & grams[k]) / len(grams[0] | grams[k])
        estimate = (sig[0] == sig[k]).mean()
        assert abs(estimate - true) < 4 * np.sqrt(true * (1 - true) / 256) + 0.02, (k, true, estimate)

    n, pairs = 200, np.array([(i, j) for i, j in (sorted(rng.sample(range(200), 2)) for _ in range(150))])
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for i, j in pairs:
        ri, rj = find(i), find(j)
        parent[max(ri, rj)] = min(ri, rj)
    assert curate_minhash.components(n, pairs).tolist() == [find(x) for x in range(n)]


# --- quality filters --------------------------------------------------------------------------------------------------
NORMAL = document(random.Random(3))
CRAFTED = {  # filter family -> (document failing it, expected reason)
    "gopher_quality": ("Fine words here. " * 3, "gopher_quality:gopher_short_doc"),
    "gopher_repetition": (
        "\n".join([sentence(random.Random(4))] * 4 + [NORMAL]),
        "gopher_repetition:dup_line_frac",
    ),
    "c4": (NORMAL + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit.", "c4:lorem_ipsum"),
    "fineweb": (NORMAL + "".join(f"\nItem {k} of the list." for k in range(12)), "fineweb:short_line_ratio"),
}


@pytest.mark.parametrize("family", sorted(CRAFTED))
def test_each_filter_rejects_its_crafted_document_and_keeps_prose(family):
    cfg = config_lib.CurateConfig(**{k: k.startswith(family) or k == "c4_drop_lines" for k in FLAGS})
    chain = dict(filters.enabled(cfg))
    assert list(chain) == [family]
    text, reason = CRAFTED[family]
    assert chain[family](text)[0] == reason
    assert chain[family](NORMAL) == ("", NORMAL)


FLAGS = ("gopher_quality", "gopher_repetition", "c4_filters", "fineweb_filters", "c4_drop_lines")


def test_filter_details_follow_datatrove():
    prose = document(random.Random(5), paragraphs=2)
    assert filters.gopher_quality("# " * 40 + prose) == "gopher_quality:gopher_too_many_hashes"
    no_stop = " ".join(w for w in prose.split() if w.lower().strip(".") not in STOP)
    assert filters.gopher_quality(no_stop) == "gopher_quality:gopher_enough_stop_words"
    numbers = " ".join(str(k) for k in range(100, 200))
    assert filters.gopher_quality(f"{prose}\n{numbers}") == "gopher_quality:gopher_below_alpha_threshold"
    assert filters.c4_quality(prose + "\nx = {1: 2}.", drop_lines=True)[0] == "c4:curly_bracket"
    # C4 line rules drop short, unpunctuated, javascript and cookie lines and citations; the page stays.
    cited = "The bridge was built in the year 1900.[2]"
    noisy = (
        f"Menu\n{prose}\n  {cited}\nPlease enable JavaScript to view this page.\nThis site uses cookies.[1]"
    )
    assert filters.c4_quality(noisy, drop_lines=True) == ("", prose + "\n" + cited.replace("[2]", ""))
    assert filters.c4_quality(noisy, drop_lines=False) == ("", noisy)
    assert filters.c4_quality("Short line.\nAnother one here.", drop_lines=True)[0] == "c4:too_few_sentences"
    assert filters.fineweb_quality(prose.replace(".", "")) == "fineweb:line_punct_ratio"
    assert filters.fineweb_quality(prose + "\n" + prose.split("\n")[0]) == "fineweb:char_dup_ratio"


def _datatrove_repetition(text: str) -> str:
    """A literal transcription of datatrove's GopherRepetitionFilter.filter (with our tokenizer): the oracle."""
    paragraphs = re.split(r"\n{2,}", text.strip())
    counts = Counter()
    seen_p, dup_p, chars_p = set(), 0, 0
    for p in paragraphs:
        if p in seen_p:
            dup_p, chars_p = dup_p + 1, chars_p + len(p)
        seen_p.add(p)
    if dup_p / len(paragraphs) > 0.3:
        return "gopher_repetition:dup_para_frac"
    if chars_p / len(text) > 0.2:
        return "gopher_repetition:dup_para_char_frac"
    lines = re.split(r"\n+", text)
    seen_l, dup_l, chars_l = set(), 0, 0
    for line in lines:
        if line in seen_l:
            dup_l, chars_l = dup_l + 1, chars_l + len(line)
        seen_l.add(line)
    if dup_l / len(lines) > 0.3:
        return "gopher_repetition:dup_line_frac"
    if chars_l / len(text) > 0.2:
        return "gopher_repetition:dup_line_char_frac"
    words = filters.tokenize(text)
    for n, frac in ((2, 0.2), (3, 0.18), (4, 0.16)):
        grams = [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
        if grams:
            counts = Counter(grams)
            top = counts.most_common(1)[0]
            if len(top[0]) * top[1] / len(text) > frac:
                return f"gopher_repetition:top_{n}_gram"
    for n, frac in ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)):
        unique, repeated, idx = set(), 0, 0
        while idx < len(words) - n + 1:
            gram = "".join(words[idx : idx + n])
            if gram in unique:
                repeated, idx = repeated + len(gram), idx + n
            else:
                unique.add(gram)
                idx += 1
        if repeated / len(text) > frac:
            return f"gopher_repetition:duplicated_{n}_n_grams"
    return ""


def test_vectorised_gopher_repetition_matches_datatrove_transcription():
    rng = random.Random(6)
    texts = []
    for k in range(300):
        words = [rng.choice(CONTENT[: rng.randint(3, 40)] + STOP) for _ in range(rng.randint(5, 300))]
        loop = words[: rng.randint(2, 12)] * rng.randint(0, 8)
        texts.append(" ".join(words[:100] + loop + words[100:]) + ("\n\n" + sentence(rng)) * (k % 3))
    reasons = Counter()
    for text in texts:
        expected = _datatrove_repetition(text)
        assert filters.gopher_repetition(text) == expected, text
        reasons[expected.split(":")[-1].split("_")[0]] += 1
    assert {"", "top", "duplicated"} <= set(reasons), reasons  # the sample reaches every kind of decision


# --- PII ------------------------------------------------------------------------------------------------------------
def test_pii_placeholders_keep_private_addresses():
    text = (
        "Write to Jane.Doe+news@Example.co.uk or ops@host.io. Server 8.8.4.4 and 93.184.216.34 answered; "
        "192.168.1.20, 10.0.0.7, 172.16.5.4, 127.0.0.1, 100.64.1.1 and 203.0.113.9 are not public. "
        "Version 1.2.3.4.5 stays. Call +44 20 7946 0958, (415) 555-0132 or 415-555-0199; order 2024-01-15 and 1234567."
    )
    scrubbed, counts = filters.scrub_pii(text)
    assert counts == (2, 2, 3)
    assert scrubbed == (
        "Write to <EMAIL> or <EMAIL>. Server <IP> and <IP> answered; "
        "192.168.1.20, 10.0.0.7, 172.16.5.4, 127.0.0.1, 100.64.1.1 and 203.0.113.9 are not public. "
        "Version 1.2.3.4.5 stays. Call <PHONE>, <PHONE> or <PHONE>; order 2024-01-15 and 1234567."
    )


def test_curated_text_is_scrubbed_and_counted(tmp_path):
    rng = random.Random(7)
    texts = [document(rng) + f" Mail me at person{i}@mail.com or call 212-555-01{i:02d}." for i in range(3)]
    write_jsonl(tmp_path / "in.jsonl", [{"id": i, "text": t} for i, t in enumerate(texts)])
    kept, removed, report = run(str(tmp_path / "in.jsonl"), tmp_path / "w")
    assert removed == {} and sorted(kept) == [0, 1, 2]
    for i, record in kept.items():
        assert record["text"] == texts[i].replace(f"person{i}@mail.com", "<EMAIL>").replace(
            f"212-555-01{i:02d}", "<PHONE>"
        )
    assert report["pii_replacements"] == {"email": 3, "ip": 0, "phone": 3}


# --- workers, resume ------------------------------------------------------------------------------------------------
def corpus(tmp_path, shards: int = 3, docs: int = 12) -> str:
    rng = random.Random(8)
    base = [document(rng) for _ in range(shards * docs)]
    for s in range(shards):
        records = [{"id": f"s{s}-{k}", "text": base[s * docs + k]} for k in range(docs)]
        records.append(
            {"id": f"s{s}-copy", "text": base[(s * docs + 5) % len(base)].lower()}
        )  # crosses shards
        records.append({"id": f"s{s}-near", "text": edit_one_word(base[(s * docs + 17) % len(base)], 3)})
        records.append({"id": f"s{s}-junk", "text": CRAFTED["gopher_repetition"][0]})
        write_jsonl(tmp_path / f"part{s}.jsonl", records, gz=s == 1)
    return str(tmp_path / "part*")


def test_one_and_two_workers_write_identical_files(tmp_path):
    pattern = corpus(tmp_path)
    _, removed, report1 = run(pattern, tmp_path / "w1", workers=1)
    _, _, report2 = run(pattern, tmp_path / "w2", workers=2)
    assert outputs(tmp_path / "w1") == outputs(tmp_path / "w2")
    assert report1["removed_by_reason"] == report2["removed_by_reason"]
    # Per shard a lower-cased copy, a one-word edit and a junk document (all junk documents are the same text).
    assert Counter(e["reason"] for e in removed.values()) == {
        "exact_duplicate": 3 + 2,
        "near_duplicate": 3,
        "gopher_repetition:dup_line_frac": 1,
    }


def test_resume_redoes_only_the_shard_whose_output_is_gone(tmp_path):
    pattern, workdir = corpus(tmp_path), tmp_path / "w"
    run(pattern, workdir)
    first = outputs(workdir)
    curated = sorted(os.listdir(workdir / "curated"))
    mtimes = {n: os.stat(workdir / "curated" / n).st_mtime_ns for n in curated}

    os.remove(workdir / "curated" / curated[1])
    _, _, report = run(pattern, workdir)
    assert report["shards"] == {"total": 3, "mapped": 0, "written": 1}
    assert outputs(workdir) == first
    for n in (curated[0], curated[2]):
        assert os.stat(workdir / "curated" / n).st_mtime_ns == mtimes[n]

    os.remove(workdir / "curate_work" / (curated[2][: -len(".jsonl")] + ".npz"))  # an incomplete map output
    _, _, report = run(pattern, workdir)
    assert report["shards"]["mapped"] == 1 and report["stages"]["read"]["docs"] == 15
    assert outputs(workdir) == first


# --- bad input ------------------------------------------------------------------------------------------------------
GOOD = {"id": "ok", "text": NORMAL}


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"id": "x", "text": "unterminated', "invalid JSON"),
        ('{"text": "no id"}', "missing field 'id'"),
        ('{"id": "y"}', "missing field 'text'"),
        ('{"id": "z", "text": 7}', "field 'text' must be a string"),
        (b'{"id": "w", "text": "caf\xe9"}', "invalid UTF-8"),
    ],
)
def test_bad_record_names_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, "", line])
    with pytest.raises(DataError, match=re.escape(f"{path}:3: ") + ".*" + re.escape(message)):
        curate.run(make_config(path, tmp_path / "w"))


def test_skip_counts_bad_records_and_keeps_the_rest(tmp_path):
    good2 = {"id": "ok2", "text": document(random.Random(9))}
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [GOOD, "[1, 2]", b"\xff\xfe", '{"id": 1}', '{"id": 2, "te', good2, {"id": "ok", "text": "again"}],
    )
    kept, removed, report = run(path, tmp_path / "w", on_error="skip")
    assert set(kept) == {"ok", "ok2"} and removed == {}
    assert report["records"] == {"input": 7, "bad": 5, "kept": 2, "removed": 0}
    assert [b.split(": ")[0] for b in report["bad_records"]] == [f"{path}:{k}" for k in (2, 3, 4, 5, 7)]


def test_a_repeated_id_names_both_lines(tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", [GOOD])
    second = write_jsonl(tmp_path / "b.jsonl", ["", {"id": "ok", "text": "other"}])
    with pytest.raises(DataError, match=re.escape(f"{second}:2: duplicate id 'ok' (first at {first}:1)")):
        curate.run(make_config(str(tmp_path / "*.jsonl"), tmp_path / "w"))


def test_missing_input_is_a_one_line_error(tmp_path):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "nothing-*.jsonl"))):
        curate.run(make_config(str(tmp_path / "nothing-*.jsonl"), tmp_path / "w"))
    (tmp_path / "table.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'table.parquet'}: curation reads JSONL")):
        curate.run(make_config(str(tmp_path / "*.parquet"), tmp_path / "w"))
    with pytest.raises(ConfigError, match="--config.data.input"):
        curate.run(make_config("", tmp_path / "w"))


def test_runner_choice_errors_are_one_line(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"id": 1, "text": "fine"}])
    with pytest.raises(ConfigError, match=r"curate\.runner='spark'"):
        make_config(str(tmp_path / "a.jsonl"), tmp_path / "w", runner="spark")
    if importlib.util.find_spec("apache_beam") is None:  # the main environment: the extra is not installed
        with pytest.raises(
            ConfigError, match=r"^curate\.runner='beam' needs Apache Beam .*jaxalign\[beam\]'$"
        ):
            curate.run(make_config(str(tmp_path / "a.jsonl"), tmp_path / "w", runner="beam"))


# --- the real command line ------------------------------------------------------------------------------------------
def test_cli_curates_a_generated_corpus(tmp_path):
    pattern = corpus(tmp_path)
    args = [
        "--config=configs/curate.py",
        f"--config.data.input={pattern}",
        f"--config.workdir={tmp_path / 'w'}",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "jaxalign.main", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "w" / "config.json").read_text())["curate"]["num_workers"] == 2
    first = outputs(tmp_path / "w")
    kept, removed, report = run(pattern, tmp_path / "w")  # in-process with 1 worker: resumes everything
    assert report["shards"] == {"total": 3, "mapped": 0, "written": 0} and outputs(tmp_path / "w") == first
    assert len(kept) == 36 and len(removed) == 9 and report["records"]["input"] == 45

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxalign.main",
            "--config=configs/curate.py",
            f"--config.workdir={tmp_path / 'x'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
        "ConfigError: data.input is empty"
    )
    smoke = load_job_config("smoke")
    smoke.workdir = str(tmp_path / "s")
    assert config_lib.from_config_dict(smoke).curate.num_workers == 1
