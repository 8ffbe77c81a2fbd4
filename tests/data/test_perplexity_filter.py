"""The perplexity filter: batched jitted scores equal one-document-at-a-time NLL, percentile buckets, and a measured
effect (gibberish lands in the tail and is removed by curation with a reference LM trained on world text)."""

from __future__ import annotations

import json
import random

import jax
import numpy as np
import pytest
from flax import nnx

from jaxalign import config as config_lib
from jaxalign.config import ModelConfig
from jaxalign.data import perplexity_filter, synthetic
from jaxalign.errors import ConfigError
from jaxalign.models.transformer import Transformer
from jaxalign.parallel.mesh import Rules
from jaxalign.stages import common, model_init
from tests.data.test_curate import make_config, outputs

TINY = dict(vocab_size=512, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64)


def test_batched_scores_equal_one_document_at_a_time(small_world, tmp_path):
    tok = common.load_tokenizer(small_world["tokenizer"])
    cd = config_lib.defaults()
    cd.workdir = str(tmp_path)
    cd.model.update(TINY, max_seq_len=256)
    config = config_lib.from_config_dict(cd)
    rules = Rules.from_config(config)
    model = nnx.merge(*model_init.init_params(config, rules, adapters=False))  # sharded over the 8 devices
    texts = [json.loads(line)["text"] for line in open(small_world["pretrain_train"])][:9]
    texts += [
        "Short.",
        "x " * 300,
    ]  # the last is cut to max_seq_len tokens (the model's length wins over 1000)
    scorer = perplexity_filter.Scorer(model, tok, rules, batch_size=8, max_tokens=1000)
    nll_N, count_N = scorer.score(texts)
    # Rows are sorted by length and each batch padded to the power of two above its longest: two shapes here.
    assert len(scorer.widths) == 2 and max(scorer.widths) == 256

    # The reference: the same weights on one device without rules, each document alone and unpadded.
    plain = nnx.eval_shape(
        lambda: Transformer(ModelConfig(**{**TINY, "max_seq_len": 256}), nnx.Rngs(0), None)
    )
    nnx.update(plain, jax.device_get(nnx.state(model)))
    graphdef, params = nnx.split(plain)
    forward = jax.jit(lambda p, x: (lambda m: m.logits(m.hidden(x)))(nnx.merge(graphdef, p)))
    for text, nll, count in zip(texts, nll_N, count_N, strict=True):
        ids = [tok.bos_id, *tok.encode(text)][: 256 + 1]  # 256 scored tokens: inputs fill max_seq_len
        assert count == len(ids) - 1
        logits = np.asarray(forward(params, np.array([ids[:-1]], np.int32)), np.float64)  # [T, V]
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        expected = -logp[np.arange(len(ids) - 1), ids[1:]].mean()
        np.testing.assert_allclose(nll, expected, rtol=1e-5)


def test_buckets_follow_the_percentile_cut_points():
    ppl = np.array([5.0, 1.0, 3.0, 2.0, 4.0, 6.0, np.inf])
    buckets, cuts = perplexity_filter.buckets_of(ppl, [33, 67])
    np.testing.assert_allclose(cuts, np.percentile(ppl[:-1], [33, 67]))
    assert list(buckets) == ["tail", "head", "middle", "head", "middle", "tail", "tail"]


def test_bad_keys_are_one_line_errors(tmp_path):
    for key, value, message in (
        ("perplexity_cuts", "67,33", "curate.perplexity_cuts='67,33' must be two increasing percentiles"),
        ("perplexity_keep", "head,top", "curate.perplexity_keep='head,top' must be a comma-separated subset"),
        ("perplexity_model", "/m", "curate.perplexity_model='/m' must be"),
    ):
        with pytest.raises(ConfigError, match=message):
            make_config("x", tmp_path, **{key: value})


def _gibberish(texts: list[str], rng: random.Random) -> list[str]:
    """Half with each word's characters shuffled, half random words drawn from the corpus's vocabulary."""
    vocab = sorted({w for t in texts for w in t.split()})
    out = []
    for k, t in enumerate(texts):
        if k % 2:
            out.append(" ".join("".join(rng.sample(w, len(w))) for w in t.split()))
        else:
            out.append(" ".join(rng.choice(vocab) for _ in t.split()))
    return out


def test_a_reference_lm_sends_gibberish_to_the_tail(tmp_path):
    paths = synthetic.write_world(str(tmp_path / "data"), 120, seed=0)
    clean = [json.loads(line) for line in open(paths["raw"])]
    clean = [{"id": r["id"], "text": r["text"]} for r in clean if r["kind"] == "clean"]
    # The reference split (as CCNet's Wikipedia): half of the world's clean archive entries and its pretraining text;
    # the corpus: the other half, and a quarter as many gibberish documents made from them.
    reference, world_docs = clean[::2], clean[1::2]
    (tmp_path / "reference.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reference))
    rng = random.Random(0)
    junk = _gibberish([r["text"] for r in rng.sample(world_docs, len(world_docs) // 4)], rng)
    records = world_docs + [{"id": f"junk-{k}", "text": t} for k, t in enumerate(junk)]
    rng.shuffle(records)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in records))

    cd_overrides = dict(
        perplexity_reference=f"{tmp_path / 'reference.jsonl'},{paths['pretrain_train']}",
        perplexity_batch_size=16,
        perplexity_max_tokens=128,
        # Only the perplexity filter acts: the quality filters would reject shuffled characters already.
        **dict.fromkeys(("exact_dedup", "near_dedup", "gopher_quality", "gopher_repetition"), False),
        **dict.fromkeys(("c4_filters", "fineweb_filters", "pii"), False),
    )
    cd = make_config(str(corpus), tmp_path / "w", **cd_overrides)
    config = config_lib.replace(
        cd,
        model={**TINY, "max_seq_len": 128},
        train={"steps": 120, "batch_size": 16, "seq_len": 128, "eval_every": 0, "log_every": 40},
        optim={"lr": 3e-3, "warmup_steps": 10},
        checkpoint={"every_steps": 120, "async_save": False},
        mesh={"data": 1, "fsdp": -1, "tensor": 1, "stage": 1},
    )
    from jaxalign.data import curate

    curate.run(config)
    removed = {
        json.loads(line)["id"]: json.loads(line)["reason"] for line in open(tmp_path / "w" / "removed.jsonl")
    }
    report = json.loads((tmp_path / "w" / "curate_report.json").read_text())["perplexity_filter"]
    junk_ids = {f"junk-{k}" for k in range(len(junk))}
    junk_removed = len(junk_ids & set(removed)) / len(junk_ids)
    world_kept = 1 - len(set(removed) - junk_ids) / len(world_docs)
    print(f"gibberish removed {junk_removed:.3f}, world kept {world_kept:.3f}, {report}")
    assert all(removed[i] == "perplexity:tail" for i in junk_ids & set(removed))
    assert report["documents"] == len(records) and report["removed"] == len(removed)
    assert report["buckets"]["tail"] == len(removed)
    assert junk_removed == 1.0  # every planted gibberish document is in the tail
    # The tail is a third of the corpus and gibberish a fifth of it: the rest of the tail is world text.
    assert world_kept >= 0.8

    # A re-run reuses the finished reference LM (no new checkpoint step) and decides the same.
    steps = lambda: sorted(
        p.name for p in (tmp_path / "w" / "curate_ref_lm" / "checkpoints" / "pretrain").iterdir()
    )
    before, first = steps(), outputs(tmp_path / "w")
    curate.run(config)
    assert steps() == before and outputs(tmp_path / "w") == first

    # The same LM exported to Hugging Face format and given as perplexity_model="hf:DIR" decides the same.
    from jaxalign.models import hf

    hf.save(perplexity_filter.load_model(config)[0], str(tmp_path / "hf"))
    hf_config = config_lib.replace(
        config,
        workdir=str(tmp_path / "w_hf"),
        curate={"perplexity_reference": "", "perplexity_model": f"hf:{tmp_path / 'hf'}"},
        data={"tokenizer": str(tmp_path / "w" / "curate_ref_lm" / "tokenizer.model")},
    )
    curate.run(hf_config)
    assert outputs(tmp_path / "w_hf") == first
