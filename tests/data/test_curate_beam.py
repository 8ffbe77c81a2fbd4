"""The Beam runner (`curate.runner="beam"`) writes byte-identical files to the local runner's (DirectRunner)."""

from __future__ import annotations

import json
import os
import re

import pytest

pytest.importorskip("apache_beam")

from jaxalign.data import curate, synthetic  # noqa: E402
from jaxalign.errors import ConfigError, DataError  # noqa: E402
from tests.data.test_curate import edit_one_word, make_config, outputs, write_jsonl  # noqa: E402

# The engine the DirectRunner runs batch pipelines on, named so that it does not first try to download Prism.
LOCAL = "--runner=FnApiRunner"
# Two worker processes: every step is pickled and run outside the test process, as on a real runner.
MULTI = f"{LOCAL} --direct_num_workers=2 --direct_running_mode=multi_processing"


def report(workdir) -> dict:
    with open(os.path.join(workdir, "curate_report.json")) as f:
        return json.load(f)


def run_both(pattern: str, tmp_path, on_error: str = "error", beam_options: str = LOCAL, **overrides):
    """Curates `pattern` with the local runner and the Beam runner; returns both reports after comparing files."""
    local, beam = tmp_path / "local", tmp_path / "beam"
    curate.run(make_config(pattern, local, on_error=on_error, **overrides))
    curate.run(
        make_config(pattern, beam, on_error=on_error, runner="beam", beam_options=beam_options, **overrides)
    )
    assert outputs(beam) == outputs(local)
    a, b = report(local), report(beam)
    assert (a["runner"], b["runner"]) == ("local", "beam")
    for key in ("records", "removed_by_reason", "pii_replacements", "bad_records"):
        assert b[key] == a[key], key
    assert b["shards"]["total"] == a["shards"]["total"]
    return a, b


@pytest.fixture(scope="module")
def raw_records(tmp_path_factory) -> list[str]:
    """The synthetic world's raw web-like corpus (planted exact / variant / near duplicates, junk, PII)."""
    paths = synthetic.write_world(str(tmp_path_factory.mktemp("world")), 60, seed=3)
    with open(paths["raw"], encoding="utf-8") as f:
        return f.read().splitlines()


def shards_of(records: list, tmp_path, n: int = 3) -> str:
    """`records` cut into n contiguous files (the middle one gzipped); returns their glob."""
    size = -(-len(records) // n)
    for s in range(n):
        write_jsonl(tmp_path / f"raw{s}.jsonl", records[s * size : (s + 1) * size], gz=s == 1)
    return str(tmp_path / "raw*")


@pytest.mark.parametrize(
    "stages", [{}, {"exact_dedup": False}, {"near_dedup": False}], ids=["all", "near", "exact"]
)
def test_beam_matches_local_on_the_world_raw_corpus(raw_records, tmp_path, stages):
    local, _ = run_both(shards_of(raw_records, tmp_path), tmp_path, **stages)
    removed = local["removed_by_reason"]
    # Not vacuous: the corpus exercises every enabled stage.
    for stage, reason in (("exact_dedup", "exact_duplicate"), ("near_dedup", "near_duplicate")):
        assert (removed.get(reason, 0) > 0) == stages.get(stage, True), reason
    assert sum(n for r, n in removed.items() if not r.endswith("duplicate")) > 0
    assert sum(local["pii_replacements"].values()) > 0


@pytest.mark.parametrize("mode", ["flag", "drop"])
def test_beam_decontaminates_as_the_local_runner(raw_records, tmp_path, mode):
    """Decontamination on Beam: the same curated/ and removed.jsonl, contamination.json and report section, with
    benchmark items planted from records of every file (one of them also an exact duplicate) and one not planted."""
    records = [json.loads(r) for r in raw_records]
    clean = [r for r in records if r["kind"] == "clean"]
    planted = [clean[0], clean[len(clean) // 2], clean[-1]]
    items = [{"id": f"q{k}", "question": " ".join(r["text"].split()[:20])} for k, r in enumerate(planted)]
    items.append(
        {"id": "unseen", "question": "which colour is the sky over a planet that nobody has ever seen"}
    )
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps(i) + "\n" for i in items))
    records.insert(
        5, {**planted[-1], "id": "copy-of-last"}
    )  # exact duplicate of a contaminated record, first
    pattern = shards_of([json.dumps(r) for r in records], tmp_path)
    local, beam = run_both(pattern, tmp_path, decontam=mode, decontam_benchmarks=f"mine={bench}")
    section = local["decontamination"]["mine"]
    assert section["items"] == 4 and section["contaminated_items"] == 3, section
    assert (local["removed_by_reason"].get("decontam:mine", 0) > 0) == (mode == "drop"), local[
        "removed_by_reason"
    ]
    assert (section["records_flagged"] > 0) == (mode == "flag"), section
    assert beam["decontamination"] == local["decontamination"]
    contamination = [(tmp_path / side / "contamination.json").read_bytes() for side in ("local", "beam")]
    assert contamination[0] == contamination[1]
    assert json.loads(contamination[0])["benchmarks"]["mine"]["contaminated_ids"] == ["q0", "q1", "q2"]


def test_beam_matches_local_with_duplicates_across_files_and_bad_records(raw_records, tmp_path):
    records = [json.loads(r) for r in raw_records]
    clean = [r for r in records if r["kind"] == "clean"]
    third = -(-len(records) // 3)
    late, later = clean[-1], clean[-2]  # both in the last file
    assert records.index(late) >= 2 * third and records.index(later) >= 2 * third
    # File 0 gets, first of all, a one-word edit of a record of the last file, and file 1 an exact (re-cased) copy
    # of that record. In input order the file-0 record comes first and stays: near dedup removes the file-1 copy, and
    # the original in the last file, an exact copy of the file-1 record, then points at the file-0 record too.
    first_near = {"id": "inj-near", "text": edit_one_word(late["text"], 3)}
    copy_of_removed = {"id": "inj-copy", "text": late["text"].upper()}
    copy_of_kept = {"id": "inj-copy2", "text": "  " + later["text"].lower()}
    repeated_id = {"id": records[0]["id"], "text": "A record whose id repeats the first record's id."}
    shards = [records[:third], records[third : 2 * third], records[2 * third :]]
    shards[0] = [first_near] + shards[0]
    shards[1] = shards[1][:5] + [copy_of_removed, copy_of_kept, repeated_id, "{not json"] + shards[1][5:]
    for s, shard in enumerate(shards):
        write_jsonl(tmp_path / f"part{s}.jsonl", shard)

    local, beam = run_both(str(tmp_path / "part*"), tmp_path, on_error="skip", beam_options=MULTI)
    with open(tmp_path / "beam" / "removed.jsonl") as f:
        removed = {e["id"]: e for e in map(json.loads, f)}
    assert removed["inj-copy"] == {"id": "inj-copy", "reason": "near_duplicate", "duplicate_of": "inj-near"}
    assert removed[late["id"]] == {"id": late["id"], "reason": "exact_duplicate", "duplicate_of": "inj-near"}
    assert removed[later["id"]] == {
        "id": later["id"],
        "reason": "exact_duplicate",
        "duplicate_of": "inj-copy2",
    }
    assert "inj-near" not in removed and "inj-copy2" not in removed
    assert beam["records"]["bad"] == len(beam["bad_records"]) == 2
    assert any("duplicate id" in b for b in beam["bad_records"])


def test_beam_raises_the_first_bad_record_and_writes_no_curated_file(tmp_path):
    write_jsonl(
        tmp_path / "a.jsonl", [{"id": 1, "text": "fine"}, "{not json", {"id": 2}, {"id": 1, "text": "x"}]
    )
    pattern = str(tmp_path / "a.jsonl")
    with pytest.raises(DataError) as local:
        curate.run(make_config(pattern, tmp_path / "local"))
    with pytest.raises(DataError, match=r"a\.jsonl:2: ") as beam:
        curate.run(make_config(pattern, tmp_path / "w", runner="beam", beam_options=LOCAL))
    assert str(beam.value) == str(local.value)
    assert os.listdir(tmp_path / "w" / "curated") == []


@pytest.mark.parametrize(
    "flags, message",
    [
        ("--runner=NoSuch", "Unexpected pipeline runner: NoSuch"),
        (f"{MULTI}x", "argument --direct_running_mode: invalid choice: 'multi_processingx'"),
    ],
)
def test_bad_beam_options_are_one_line_config_errors(tmp_path, flags, message):
    write_jsonl(tmp_path / "a.jsonl", [{"id": 1, "text": "fine"}])
    config = make_config(str(tmp_path / "a.jsonl"), tmp_path / "w", runner="beam", beam_options=flags)
    pattern = rf"^curate\.beam_options={re.escape(repr(flags))}: {re.escape(message)}[^\n]*$"
    with pytest.raises(ConfigError, match=pattern):
        curate.run(config)
