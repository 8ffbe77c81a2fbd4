"""Decontamination: planted leaks found exactly (world questions and a user benchmark), flag vs drop, the n-gram
length, bad input, and the eval job's clean-subset scores."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from jaxalign import config as config_lib
from jaxalign.data import curate, decontam, synthetic
from jaxalign.errors import ConfigError, DataError
from jaxalign.eval import evaluate, mc, metrics
from tests.data.test_curate import make_config, outputs
from tests.data.test_curate import run as run_curate

# 15 words: long enough to have 13-grams and 8-grams.
LONG_ITEM = "Which painter crossed the frozen harbour at dawn carrying seven silver lanterns for the village"
SHORT_ITEM = "Who repaired the old tower clock"  # 6 words < n: matched whole
# Shares only 12 consecutive words with the corpus plant below (a 13-gram never matches, an 8-gram does).
NEAR_ITEM = "The orchard keeper counted the apples twice before the market opened again today in town"
NEAR_PLANT = "The orchard keeper counted the apples twice before the market opened again while"


def mc_records() -> list[dict]:
    rows = [LONG_ITEM + "?", SHORT_ITEM + "?", NEAR_ITEM + "?"]
    rows += [
        f"Which of these {w} facts about lighthouses and rivers is true" for w in ("odd", "plain", "rare")
    ]
    out = [{"question": q, "choices": ["yes", "no", "maybe"], "answer": k % 3} for k, q in enumerate(rows)]
    out[0]["id"] = "bench-long"  # the others are named by decontam.item_id(question)
    return out


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """The world's raw corpus (40 people) with a held-out question, two benchmark items and a 12-word near miss
    planted into three clean documents; returns paths and the planted facts."""
    root = tmp_path_factory.mktemp("decon")
    paths = synthetic.write_world(str(root / "data"), 40, seed=0)
    raw = [json.loads(line) for line in open(paths["raw"])]
    clean = [r for r in raw if r["kind"] == "clean"]
    world = decontam.world_items(str(root / "data"))
    leaked_q_id, leaked_q = world[3]
    plants = {
        clean[0]["id"]: f" Readers often ask: {leaked_q} The archive answers it below.",
        # Exactly the item's words 1..13: one shared 13-gram.
        clean[1][
            "id"
        ]: f" {' '.join(LONG_ITEM.split()[1:14])} is an old story. {SHORT_ITEM} remains unknown.",
        clean[2]["id"]: f" {NEAR_PLANT} the rain stopped.",
    }
    for r in raw:
        if r["id"] in plants:
            first, rest = r["text"].split(". ", 1)
            r["text"] = f"{first}.{plants[r['id']]} {rest}"
    corpus = (
        root / "corpus" / "raw.jsonl"
    )  # outside the world directory: the world benchmark comes from a symlink
    corpus.parent.mkdir()
    corpus.write_text("".join(json.dumps(r) + "\n" for r in raw))
    bench = root / "bench.jsonl"
    bench.write_text("".join(json.dumps(r) + "\n" for r in mc_records()))
    for name in ("world.json", "sft_eval.jsonl"):
        os.symlink(os.path.join(root, "data", name), corpus.parent / name)
    return {
        "root": root,
        "input": str(corpus),
        "bench": str(bench),
        "world_items": world,
        "leaked_q_id": leaked_q_id,
        "plant_ids": [clean[0]["id"], clean[1]["id"], clean[2]["id"]],
    }


def _ids(records: list[dict]) -> list[str]:
    return [r.get("id") or decontam.item_id(r["question"]) for r in records]


@pytest.mark.parametrize("n", [13, 8])
def test_flag_finds_exactly_the_planted_leaks(planted, tmp_path, n):
    spec = f"mybench={planted['bench']}"
    kept_off, removed_off, _ = run_curate(planted["input"], tmp_path / "off")
    kept, removed, report = run_curate(
        planted["input"], tmp_path / "flag", decontam="flag", decontam_n=n, decontam_benchmarks=spec
    )
    assert kept == kept_off and removed == removed_off  # flag changes no output
    content = json.loads((tmp_path / "flag" / "contamination.json").read_text())
    ids = _ids(mc_records())
    leaked_bench = {ids[0], ids[1]} | ({ids[2]} if n == 8 else set())
    assert set(content["benchmarks"]["world_qa"]["contaminated_ids"]) == {planted["leaked_q_id"]}
    assert set(content["benchmarks"]["mybench"]["contaminated_ids"]) == leaked_bench
    world_items = len(planted["world_items"])
    section = report["decontamination"]
    assert section["world_qa"]["items"] == world_items
    assert section["world_qa"]["contaminated_fraction"] == pytest.approx(1 / world_items)
    assert section["mybench"]["contaminated_fraction"] == pytest.approx(len(leaked_bench) / 6)
    flagged = {r["id"]: r["benchmarks"] for r in content["flagged_records"]}
    p0, p1, p2 = planted["plant_ids"]
    assert flagged == {p0: ["world_qa"], p1: ["mybench"], **({p2: ["mybench"]} if n == 8 else {})}
    assert section["world_qa"]["records_flagged"] == 1 and section["mybench"]["records_dropped"] == 0


def test_drop_removes_the_contaminated_records_only(planted, tmp_path):
    spec = f"mybench={planted['bench']}"
    # Three shards in the world's directory (symlinked files): 1 and 2 workers write identical files.
    lines = open(planted["input"]).read().splitlines(keepends=True)
    shards = tmp_path / "shards"
    shards.mkdir()
    for k in range(3):
        (shards / f"raw{k}.jsonl").write_text("".join(lines[k::3]))
    for name in ("world.json", "sft_eval.jsonl"):
        os.symlink(os.path.join(os.path.dirname(planted["input"]), name), shards / name)
    glob = str(shards / "raw*.jsonl")
    kept_off, _, _ = run_curate(glob, tmp_path / "off")
    run_curate(glob, tmp_path / "drop1", decontam="drop", decontam_benchmarks=spec, workers=1)
    kept, removed, report = run_curate(
        glob, tmp_path / "drop", decontam="drop", decontam_benchmarks=spec, workers=2
    )
    assert outputs(tmp_path / "drop1") == outputs(tmp_path / "drop")
    contamination = [(tmp_path / w / "contamination.json").read_bytes() for w in ("drop1", "drop")]
    assert contamination[0] == contamination[1]
    # Decontamination off again: the stale contamination.json goes.
    run_curate(glob, tmp_path / "drop1", workers=1)
    assert not (tmp_path / "drop1" / "contamination.json").exists()
    p0, p1, _ = planted["plant_ids"]
    assert removed[p0]["reason"] == "decontam:world_qa" and removed[p1]["reason"] == "decontam:mybench"
    assert set(kept_off) - set(kept) == {p0, p1} and set(kept) <= set(kept_off)
    assert all(kept[k] == kept_off[k] for k in kept)
    assert report["removed_by_reason"]["decontam:world_qa"] == 1
    assert report["decontamination"]["mybench"]["records_dropped"] == 1
    # The eval items found are the same whether their records are dropped or flagged.
    content = json.loads((tmp_path / "drop" / "contamination.json").read_text())
    assert content["benchmarks"]["world_qa"]["contaminated_ids"] == [planted["leaked_q_id"]]


def test_benchmark_match_is_by_word_ngram():
    bench = decontam.build(4, [("b", [("x", "Alpha beta, GAMMA delta epsilon"), ("y", "tiny item")])])
    assert bench.match("zz ALPHA   beta gamma-delta zz") == {0: [0]}  # casefolded \w+ words, 4-gram
    assert bench.match("alpha beta gamma zz delta epsilon") == {}
    assert bench.match("a tiny item here") == {0: [1]}  # shorter than n: the whole item
    assert bench.match("tiny items") == {}
    # What a benchmark record's text is: the MC question, a prompt (string or messages) or a text.
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a river."}]
    assert decontam.item_text({"question": "Q?", "choices": ["a", "b"], "answer": 0}, "f:1") == "Q?"
    assert decontam.item_text({"prompt": messages}, "f:1") == "Be brief.\nName a river."
    assert decontam.item_text({"text": "T"}, "f:1") == "T"


def test_bad_benchmark_input_is_one_line(tmp_path):
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"question": "ok?", "choices": ["a", "b"], "answer": 0}\n{"choices": ["a"]}\n')
    with pytest.raises(DataError, match=rf"{bad}:2: a benchmark record needs"):
        decontam.read_benchmark(str(bad))
    with pytest.raises(ConfigError, match="is not name=glob"):
        decontam.parse_spec(f"{bad}")
    with pytest.raises(ConfigError, match="curate.decontam_n=0 must be > 0"):
        make_config(str(bad), tmp_path, decontam="flag", decontam_n=0)
    plain = tmp_path / "plain.jsonl"
    plain.write_text('{"id": 1, "text": "hello there"}\n')
    with pytest.raises(ConfigError, match="nothing to check against"):
        curate.run(make_config(str(plain), tmp_path / "w", decontam="flag"))


def test_eval_clean_subset_equals_the_score_over_clean_items(planted, small_world, tmp_path):
    run_curate(
        planted["input"],
        tmp_path / "cur",
        decontam="flag",
        decontam_n=8,
        decontam_benchmarks=f"b={planted['bench']}",
    )
    contamination = str(tmp_path / "cur" / "contamination.json")
    cd = config_lib.defaults()
    cd.job, cd.workdir, cd.seed = "eval", str(tmp_path / "ev"), 3
    cd.model.update(vocab_size=512, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64)
    cd.data.tokenizer = small_world["tokenizer"]
    cd.eval.update(world=False, mc_input=planted["bench"], contamination=contamination, batch_size=8)
    config = config_lib.from_config_dict(cd)
    result = evaluate.run(config)

    records = mc.read_records(planted["bench"])
    dirty = set(json.loads(open(contamination).read())["benchmarks"]["b"]["contaminated_ids"])
    assert len(dirty) == 3
    clean = [r for r in records if r["id"] not in dirty]
    from flax import nnx

    from jaxalign.parallel.mesh import Rules
    from jaxalign.stages import common, model_init

    # The same config and seed: the same random model the job evaluated.
    model = nnx.merge(*model_init.init_params(config, Rules.from_config(config), adapters=False))
    tok = common.load_tokenizer(small_world["tokenizer"])
    expected = mc.evaluate(model, tok, clean, 8)
    full = mc.evaluate(model, tok, records, 8)
    assert result["mc_count_clean"] == 3 and result["mc_count"] == 6
    assert (
        result["mc_acc_clean"] == expected["mc_acc"]
        and result["mc_acc_norm_clean"] == expected["mc_acc_norm"]
    )
    assert result["mc_acc"] == full["mc_acc"]


def test_clean_qa_is_exact_match_over_the_clean_items():
    answers = ["Lisbon it is", "Oslo", "no idea", "Paris", "Rome"]
    golds = ["Lisbon", "Bergen", "Lima", "Paris", "Rome"]
    ids = ["a", "b", "c", "d", "e"]
    out = evaluate.clean_qa(answers, golds, ids, {"a", "d"})
    assert out["qa_count_clean"] == 3
    assert out["qa_exact_match_clean"] == metrics.qa_exact_match(
        ["Oslo", "no idea", "Rome"], ["Bergen", "Lima", "Rome"]
    )
    assert out["qa_exact_match_clean"] == pytest.approx(1 / 3)
    assert np.isnan(evaluate.clean_qa(answers, golds, ids, set(ids))["qa_exact_match_clean"])


def test_a_changed_benchmark_file_invalidates_finished_shards(planted, tmp_path):
    bench = tmp_path / "bench.jsonl"
    bench.write_text(open(planted["bench"]).read())
    kwargs = dict(decontam="drop", decontam_benchmarks=f"b={bench}")
    _, removed, _ = run_curate(planted["input"], tmp_path / "w", **kwargs)
    p1 = planted["plant_ids"][1]
    assert removed[p1]["reason"] == "decontam:b"
    bench.write_text("".join(json.dumps(r) + "\n" for r in mc_records()[2:]))  # without the two leaked items
    kept, removed, report = run_curate(planted["input"], tmp_path / "w", **kwargs)
    assert p1 in kept and p1 not in removed
    assert report["shards"]["mapped"] == 1 and report["decontamination"]["b"]["contaminated_items"] == 0
