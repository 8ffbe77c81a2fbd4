"""The perplexity filter and exact-substring dedup on the Beam runner write byte-identical files to the local runner's."""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest

pytest.importorskip("apache_beam")

from flax import nnx  # noqa: E402

from jaxalign import config as config_lib  # noqa: E402
from jaxalign.data import curate, decontam, synthetic  # noqa: E402
from jaxalign.parallel.mesh import Rules  # noqa: E402
from jaxalign.stages import model_init  # noqa: E402
from tests.data.test_curate import document, make_config, outputs  # noqa: E402
from tests.data.test_curate_beam import LOCAL, MULTI, report, shards_of  # noqa: E402
from tests.data.test_perplexity_filter import TINY  # noqa: E402

TIMINGS = ("seconds", "docs_per_s", "setup_seconds")


@pytest.fixture(scope="module")
def world_records(tmp_path_factory) -> list[dict]:
    """The synthetic world's raw web-like corpus (planted exact / variant / near duplicates, junk, PII)."""
    paths = synthetic.write_world(str(tmp_path_factory.mktemp("world")), 60, seed=3)
    with open(paths["raw"], encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def scoring_lm(small_world, tmp_path_factory) -> dict:
    """A tiny randomly initialised LM exported as a Hugging Face directory, and the world's tokenizer: curate
    overrides and config sections that score with it (`perplexity_model="hf:..."`)."""
    from jaxalign.models import hf

    directory = tmp_path_factory.mktemp("scoring_lm")
    cd = config_lib.defaults()
    cd.workdir = str(directory)
    cd.model.update(TINY, max_seq_len=128)
    cd.train.seq_len = 128
    config = config_lib.from_config_dict(cd)
    model = nnx.merge(*model_init.init_params(config, Rules.from_config(config), adapters=False))
    hf.save(model, str(directory / "hf"))
    return {
        "curate": {"perplexity_model": f"hf:{directory / 'hf'}", "perplexity_max_tokens": 128},
        "model": {**TINY, "max_seq_len": 128},
        "data": {"tokenizer": small_world["tokenizer"]},
        "train": {"seq_len": 128},
    }


def planted_repeats(records: list[dict]) -> list[dict]:
    """The world corpus with repeated spans planted: whole earlier texts glued together (left with nothing new:
    dropped), an earlier paragraph inside new prose, and a repeat next to multi-byte characters."""
    rng = random.Random(0)
    clean = [r for r in records if r["kind"] == "clean"]
    out = list(records)
    out.insert(len(out) // 2, {"id": "glued", "text": clean[0]["text"] + "\n" + clean[1]["text"]})
    piece = clean[2]["text"][40:400]
    out.append({"id": "quoted", "text": document(rng) + "\n" + piece + "\n" + document(rng)})
    out.insert(len(out) // 3, {"id": "accented", "text": document(rng) + " éèü€ " + piece[:250] + " ü€ "})
    out.append({"id": "requoted", "text": document(rng) + "\n\n" + piece[100:] + "\n" + document(rng)})
    return out


def run_both(pattern: str, tmp_path, beam_options: str = LOCAL, sections: dict | None = None, **overrides):
    """Curates `pattern` with both runners (curate `overrides`, other config `sections`); compares every output
    file, the report's counts and the stage sections but their timings; returns the local report."""
    sections = sections or {}
    reports = []
    for side, runner in (("local", {}), ("beam", {"runner": "beam", "beam_options": beam_options})):
        if side == "beam" and overrides.get(
            "perplexity_reference"
        ):  # reused, not trained again: a few seconds
            shutil.copytree(tmp_path / "local" / "curate_ref_lm", tmp_path / "beam" / "curate_ref_lm")
        config = make_config(pattern, tmp_path / side, **overrides, **sections.get("curate", {}), **runner)
        curate.run(config_lib.replace(config, **{k: v for k, v in sections.items() if k != "curate"}))
        reports.append(report(tmp_path / side))
    assert outputs(tmp_path / "beam") == outputs(tmp_path / "local")
    if overrides.get("decontam"):
        contamination = [(tmp_path / side / "contamination.json").read_bytes() for side in ("local", "beam")]
        assert contamination[0] == contamination[1]
    local, beam = reports
    assert (local["runner"], beam["runner"]) == ("local", "beam")
    for key in ("records", "removed_by_reason", "pii_replacements", "bad_records"):
        assert beam[key] == local[key], key
    for key in ("perplexity_filter", "substring_dedup", "decontamination"):
        assert (key in beam) == (key in local), key
        if key in local:
            strip = lambda section: {
                k: v.replace("/beam/", "/local/") if k == "model" else v
                for k, v in section.items()
                if k not in TIMINGS
            }
            assert strip(beam[key]) == strip(local[key]), key
    return local


def test_beam_substring_dedup_matches_local(world_records, tmp_path):
    records = planted_repeats(world_records)
    local = run_both(
        shards_of([json.dumps(r) for r in records], tmp_path), tmp_path, substring_dedup_tokens=50
    )
    section = local["substring_dedup"]
    # Not vacuous: the glued record is dropped, the quoting ones are cut (one next to multi-byte characters).
    assert local["removed_by_reason"]["substring_dup"] >= 1, local["removed_by_reason"]
    assert section["docs_edited"] >= 3 and section["bytes_removed"] > 0, section
    with open(tmp_path / "beam" / "removed.jsonl") as f:
        assert {"id": "glued", "reason": "substring_dup"} in list(map(json.loads, f))


def test_beam_perplexity_filter_matches_local_on_ties(world_records, scoring_lm, tmp_path):
    """Every stage on but dedup; 32 identical texts (a record and 31 copies under other ids, in every file) of 61
    documents cover the median's rank, so the 50th-percentile cut point IS their perplexity: all of them must land
    in the same bucket (the tail, at or above the cut) on both runners although they are scored in different
    batches and files."""
    clean = [r for r in world_records if r["kind"] == "clean"][:30]
    copies = [{"id": f"copy-{k}", "text": clean[0]["text"]} for k in range(31)]
    records = [r for pair in zip(clean + [clean[0]], copies, strict=True) for r in pair]
    records = [r for k, r in enumerate(records) if k != 60]  # 61 documents: clean[0] once more would be 62
    pattern = shards_of([json.dumps(r) for r in records], tmp_path)
    local = run_both(
        pattern,
        tmp_path,
        sections=scoring_lm,
        exact_dedup=False,
        near_dedup=False,
        perplexity_cuts="10,50",
        perplexity_batch_size=8,
    )
    section = local["perplexity_filter"]
    assert section["documents"] >= 59 and section["buckets"]["tail"] >= 32, section
    with open(tmp_path / "local" / "removed.jsonl") as f:
        removed = {e["id"]: e["reason"] for e in map(json.loads, f)}
    same = [clean[0]["id"]] + [f"copy-{k}" for k in range(31)]
    assert all(removed.get(i) == "perplexity:tail" for i in same), removed


def test_beam_runs_every_stage_together_as_the_local_runner(world_records, scoring_lm, tmp_path):
    """Dedup, filters, decontamination, PII, the perplexity filter and substring dedup at once, on two worker
    processes (every step pickled and run outside the test process)."""
    records = planted_repeats(world_records)
    clean = [r for r in records if r.get("kind") == "clean"]
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"id": "q0", "question": " ".join(clean[5]["text"].split()[:20])}) + "\n")
    local = run_both(
        shards_of([json.dumps(r) for r in records], tmp_path),
        tmp_path,
        beam_options=MULTI,
        sections=scoring_lm,
        substring_dedup_tokens=50,
        decontam="flag",
        decontam_benchmarks=f"mine={bench}",
    )
    removed = local["removed_by_reason"]
    for reason in ("exact_duplicate", "near_duplicate", "perplexity:tail"):
        assert removed.get(reason, 0) > 0, (reason, removed)
    assert local["substring_dedup"]["docs_edited"] > 0, local["substring_dedup"]
    assert local["decontamination"]["mine"]["contaminated_items"] == 1
    # A contaminated record the perplexity filter removed is not listed as flagged (its final reason on Beam comes
    # from the write step's "later" decisions).
    with open(tmp_path / "beam" / "removed.jsonl") as f:
        reasons = {e["id"]: e["reason"] for e in map(json.loads, f)}
    matcher = decontam.load("flag", 13, f"mine={bench}", [])
    hit = {r["id"] for r in records if matcher.match(r["text"])}
    assert any(reasons.get(i, "").startswith("perplexity:") for i in hit), hit
    assert sum(local["pii_replacements"].values()) > 0


def test_beam_trains_the_reference_lm_in_the_driver_as_the_local_runner(world_records, small_world, tmp_path):
    """perplexity_reference: the local runner trains the reference LM (a few steps) into its workdir; the Beam
    driver, given a copy of that run, resumes it (finished: no step) before the pipeline and its workers load the
    checkpoint it names, deciding as the local runner."""
    clean = [{"id": r["id"], "text": r["text"]} for r in world_records if r["kind"] == "clean"]
    (tmp_path / "reference.jsonl").write_text("".join(json.dumps(r) + "\n" for r in clean[::2]))
    sections = {
        "model": {**TINY, "max_seq_len": 64},
        "data": {"tokenizer": small_world["tokenizer"]},
        "train": {"steps": 3, "batch_size": 8, "seq_len": 64, "eval_every": 0, "log_every": 1},
        "checkpoint": {"every_steps": 3, "async_save": False},
        "mesh": {"data": 1, "fsdp": -1, "tensor": 1, "stage": 1},
    }
    local = run_both(
        shards_of([json.dumps(r) for r in clean[1::2]], tmp_path),
        tmp_path,
        sections=sections,
        perplexity_reference=str(tmp_path / "reference.jsonl"),
        perplexity_max_tokens=64,
        perplexity_batch_size=8,
    )
    assert local["perplexity_filter"]["model"].startswith(f"ckpt:{tmp_path / 'local' / 'curate_ref_lm'}")
    assert local["removed_by_reason"]["perplexity:tail"] > 0
    steps = [
        sorted(os.listdir(tmp_path / s / "curate_ref_lm" / "checkpoints" / "pretrain"))
        for s in ("local", "beam")
    ]
    assert steps[0] == steps[1] and len(steps[0]) == 1, steps  # the Beam driver trained no further step
