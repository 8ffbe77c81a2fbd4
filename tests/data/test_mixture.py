"""Weighted mixtures (`data.mixture`): exact per-source counts over a run (Grain's documented integer rounding),
resume == uninterrupted, the mixture in the checkpointed layout, SFT from two files, and one-line config errors."""

import collections
import json

import numpy as np
import pytest

from jaxalign import config as config_lib
from jaxalign.data import mixture, pipelines, prompt_pipelines
from jaxalign.data.pipelines import _LmEncode, _SftEncode
from jaxalign.data.tokenizer import SentencePieceTokenizer
from jaxalign.errors import CheckpointError, ConfigError
from jaxalign.stages import common


def _read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _write(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tok(small_world):
    return SentencePieceTokenizer(small_world["tokenizer"])


@pytest.fixture(scope="module")
def rl_sources(small_world, tmp_path_factory):
    """Three RL prompt files cut from the world's, each record tagged with its file in `src` (an RL extra)."""
    records = _read(small_world["rl_train"])
    directory = tmp_path_factory.mktemp("rl_sources")
    return [
        _write(directory / f"{name}.jsonl", [{**r, "src": name} for r in records[i::3]])
        for i, name in enumerate("abc")
    ]


def _rl_loader(parts, tok, batch, **kw):
    return prompt_pipelines.rl_loader(
        mixture.Mixture(tuple(parts)), tok, global_batch_size=batch, seed=5, max_prompt_length=80, **kw
    )


@pytest.mark.parametrize(
    "weights, batch, batches",
    [
        ((0.75, 0.25), 8, 50),  # Grain proportions 300/100: 400 examples
        ((0.7, 0.3), 9, 37),  # 233/100 (Grain truncates 0.7 / 0.3 * 100): 333 examples
        ((0.5, 0.3, 0.2), 10, 50),  # 250/150/100: 500 examples
    ],
)
def test_per_source_counts_equal_the_weights_exactly(rl_sources, tok, weights, batch, batches):
    proportions = mixture.grain_proportions(weights)
    total = sum(proportions)
    assert batch * batches == total  # one whole period of Grain's mixture
    names = "abc"[: len(weights)]
    loader = _rl_loader(zip(rl_sources, weights, strict=False), tok, batch)
    counts = collections.Counter()
    seen = 0
    for _ in range(batches):
        counts.update(e["src"] for e in next(loader)["extras"])
        seen += batch
        for name, p in zip(names, proportions, strict=True):
            # Every prefix of the run is within one example of each source's share (two or three sources).
            assert abs(counts[name] - seen * p / total) < 1.01, (seen, counts)
    assert [counts[n] for n in names] == proportions
    # The sources really were cycled through (epochs repeat): more examples than records in the smallest file.
    assert counts[names[-1]] > len(_read(rl_sources[len(weights) - 1]))
    loader.close()


@pytest.mark.parametrize("shards", [1, 2])
def test_resumed_mixture_yields_the_same_later_batches(small_world, tok, tmp_path, shards):
    records = _read(small_world["sft_train"])
    parts = mixture.Mixture(
        (
            (_write(tmp_path / "a.jsonl", records[::2]), 0.6),
            (_write(tmp_path / "b.jsonl", records[1::2]), 0.4),
        )
    )
    kw = dict(seq_len=128, global_batch_size=4, seed=3, shards=shards)
    loader = pipelines.sft_loader(parts, tok, **kw)
    for _ in range(7):
        next(loader)
    state = loader.get_state()
    saved = json.loads(state)
    assert [w for _, w in saved["layout"]["mixture"]] == [0.4]  # the second source and its share
    expected = [next(loader) for _ in range(6)]
    resumed = pipelines.sft_loader(parts, tok, **kw)
    resumed.set_state(state)
    for a in expected:
        b = next(resumed)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # Other weights are another data order: a restore refuses them, naming the field.
    other = pipelines.sft_loader(mixture.Mixture(((parts.globs[0], 0.5), (parts.globs[1], 0.5))), tok, **kw)
    with pytest.raises(CheckpointError, match="mixture: checkpoint has"):
        other.set_state(state)
    for x in (loader, resumed, other):
        x.close()


def test_sft_stage_input_mixes_two_files(small_world, tok, tmp_path):
    """SFT from two files through the stage's input (`common.inputs`): every row is one conversation of one file,
    in the weights' proportion."""
    records = _read(small_world["sft_train"])
    files = [_write(tmp_path / "a.jsonl", records[::2]), _write(tmp_path / "b.jsonl", records[1::2])]
    cfg = config_lib.from_config_dict(
        {"workdir": str(tmp_path / "w"), "data": {"mixture": ((files[0], 3), (files[1], 1))}}
    )
    train, evaluation = common.inputs(cfg, "sft")
    assert train == mixture.Mixture(((files[0], 3.0), (files[1], 1.0))) and evaluation == ""
    # The oracle: each file's conversations encoded on their own.
    encode = _SftEncode(tok, 128, "chatml", "truncate", True, True)
    oracle = [{tuple(encode(r, "?")[0][0]["inputs"]) for r in records[i::2]} for i in range(2)]
    assert not oracle[0] & oracle[1]
    loader = pipelines.sft_loader(train, tok, seq_len=128, global_batch_size=4, seed=0, packing=False)
    counts = [0, 0]
    for _ in range(25):  # 100 examples: Grain proportions 300/100
        batch = next(loader)
        for row in range(4):
            inputs = tuple(batch["inputs"][row][batch["segment_ids"][row] == 1])
            (source,) = [i for i in range(2) if inputs in oracle[i]]
            counts[source] += 1
    assert counts == [75, 25]
    loader.close()


def test_sft_replay_takes_its_share_of_a_mixture(small_world, tok, tmp_path):
    """`sft.replay_fraction` over a `data.mixture`: the replayed text keeps its fraction, the mixture's sources share
    the rest in their weights' proportion (0.25 / 0.25 / 0.5: Grain proportions 100 / 100 / 200)."""
    records = _read(small_world["sft_train"])
    files = [_write(tmp_path / "a.jsonl", records[::2]), _write(tmp_path / "b.jsonl", records[1::2])]
    encode = _SftEncode(tok, 128, "chatml", "truncate", True, True)
    oracle = [{tuple(encode(r, "?")[0][0]["inputs"]) for r in records[i::2]} for i in range(2)]
    lm = _LmEncode(tok, 128, "text", 64, "truncate")
    oracle.append({tuple(c["inputs"]) for r in _read(small_world["pretrain_train"]) for c in lm(r, "?")[0]})
    loader = pipelines.sft_loader(
        mixture.Mixture(((files[0], 1.0), (files[1], 1.0))),
        tok,
        seq_len=128,
        global_batch_size=4,
        seed=1,
        packing=False,
        replay=(small_world["pretrain_train"], 0.5),
    )
    counts = [0, 0, 0]
    for _ in range(100):  # 400 examples
        batch = next(loader)
        for row in range(4):
            inputs = tuple(batch["inputs"][row][batch["segment_ids"][row] == 1])
            (source,) = [i for i in range(3) if inputs in oracle[i]]
            counts[source] += 1
    assert counts == [100, 100, 200]
    loader.close()


@pytest.mark.parametrize(
    "data, message",
    [
        (
            {"input": "x/*.jsonl", "mixture": (("a/*.jsonl", 1.0),)},
            "data.input='x/*.jsonl' and data.mixture=(('a/*.jsonl', 1.0),) are exclusive: set one of them",
        ),
        ({"mixture": (("a/*.jsonl", 0.0),)}, "data.mixture[0]: the weight 0.0 of 'a/*.jsonl' must be > 0"),
        ({"mixture": (("a/*.jsonl", -1),)}, "data.mixture[0]: the weight -1.0 of 'a/*.jsonl' must be > 0"),
        ({"mixture": (("", 1.0),)}, "data.mixture[0]: the glob '' must be a non-empty string"),
        (
            {"mixture": (("a", 1.0), ("a", 2.0))},
            "data.mixture: the glob 'a' appears twice (give it one weight)",
        ),
        ({"mixture": ("a/*.jsonl:0.7",)}, "data.mixture[0] must be a sequence, got 'a/*.jsonl:0.7'"),
        ({"mixture": (("a/*.jsonl", "x"),)}, "data.mixture[0][1]='x' must be a number"),
    ],
)
def test_bad_mixtures_are_one_line_config_errors(data, message):
    with pytest.raises(ConfigError) as e:
        config_lib.from_config_dict({"data": data})
    assert str(e.value) == message
