"""seqio Tasks and Mixtures as a stage's input (`data.input="seqio:<name>"`, the `seqio` extra): the loader feeds
exactly the Task's examples, two processes read a partition of them, a restored loader continues at the same
example, a seqio Task mixes with files under `data.mixture` in exact proportions, and bad inputs are one-line errors.

The Tasks (tests/fixtures/seqio_tasks.py) hold in-memory RL prompt records, registered through `data.seqio_module`.
"""

import collections
import json
import subprocess
import sys

import pytest

pytest.importorskip("seqio")

from jaxalign import config as config_lib  # noqa: E402
from jaxalign.data import mixture, prompt_pipelines  # noqa: E402
from jaxalign.data.tokenizer import train_sentencepiece  # noqa: E402
from jaxalign.errors import ConfigError  # noqa: E402
from jaxalign.stages import common  # noqa: E402

MODULE = "tests.fixtures.seqio_tasks"


def _config(tmp_path, **data):
    return config_lib.from_config_dict({"workdir": str(tmp_path), "data": {"seqio_module": MODULE, **data}})


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """Registers the Tasks the way a stage does (`common.inputs` imports `data.seqio_module`)."""
    cfg = _config(tmp_path_factory.mktemp("w"), input="seqio:jaxalign_test_sums")
    assert common.inputs(cfg, "rl") == ("seqio:jaxalign_test_sums", "")
    from tests.fixtures import seqio_tasks

    return seqio_tasks


@pytest.fixture(scope="module")
def tok(tasks, tmp_path_factory):
    texts = [e[k] for t in ("sums", "products") for e in tasks.examples(t) for k in ("prompt", "answer")]
    return train_sentencepiece(texts, str(tmp_path_factory.mktemp("tok") / "sp.model"), 400)


def _rl(pattern, tok, **kw):
    return prompt_pipelines.rl_loader(
        pattern, tok, max_prompt_length=32, **{"global_batch_size": 4, "seed": 0, **kw}
    )


def _rows(batch):
    """(idx, answer, prompt ids) of every row."""
    return [
        (e["idx"], e["answer"], tuple(batch["prompt_ids"][r][batch["prompt_mask"][r] == 1]))
        for r, e in enumerate(batch["extras"])
    ]


def test_the_loader_feeds_the_tasks_examples(tasks, tok):
    loader = _rl("seqio:jaxalign_test_sums", tok, shuffle=False, num_epochs=1)
    got = [row for batch in loader for row in _rows(batch)]
    expected = [
        (e["idx"], e["answer"], (tok.bos_id, *tok.encode(e["prompt"]))) for e in tasks.examples("sums")
    ]
    assert (
        got == expected
    )  # every example, in the Task's order, its prompt tokenized as a JSONL record's would be


def test_two_processes_read_a_partition_of_the_task(tasks, tok):
    seen = []
    for p in range(2):
        loader = _rl(
            "seqio:jaxalign_test_sums", tok, shuffle=False, num_epochs=1, process_index=p, process_count=2
        )
        seen.append([idx for batch in loader for idx, _, _ in _rows(batch)])
    assert len(seen[0]) == len(seen[1]) == 20
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == [e["idx"] for e in tasks.examples("sums")]


@pytest.mark.parametrize("name", ["jaxalign_test_sums", "jaxalign_test_arith"])
def test_restored_loader_continues_at_the_same_example(tasks, tok, name):
    make = lambda: _rl(f"seqio:{name}", tok, seed=7)  # shuffled by seqio, repeated forever
    loader = make()
    for _ in range(5):
        next(loader)
    state = loader.get_state()
    assert json.loads(state)["layout"]["files"] == [f"seqio:{name}"]
    expected = [_rows(next(loader)) for _ in range(6)]
    resumed = make()
    resumed.set_state(state)
    assert [_rows(next(resumed)) for _ in range(6)] == expected
    fresh = make()
    assert [_rows(next(fresh)) for _ in range(6)] != expected  # the restore really skipped ahead
    for x in (loader, resumed, fresh):
        x.close()


def test_a_seqio_mixture_yields_examples_of_its_tasks(tasks, tok):
    known = {(e["idx"], e["answer"]) for t in ("sums", "products") for e in tasks.examples(t)}
    loader = _rl("seqio:jaxalign_test_arith", tok, seed=1)
    rows = [row for _ in range(50) for row in _rows(next(loader))]
    assert all((idx, answer) in known for idx, answer, _ in rows)
    share = sum(idx < 1000 for idx, _, _ in rows) / len(rows)
    assert 0.6 < share < 0.9  # seqio samples the tasks at rates 3 : 1
    loader.close()


def test_data_mixture_mixes_a_task_with_files_exactly(tasks, tok, tmp_path):
    path = tmp_path / "sums.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in tasks.examples("sums")))
    parts = mixture.Mixture((("seqio:jaxalign_test_products", 1.0), (str(path), 3.0)))
    loader = _rl(parts, tok, global_batch_size=8, seed=2)
    counts = collections.Counter(idx >= 1000 for _ in range(50) for idx, _, _ in _rows(next(loader)))
    assert (counts[True], counts[False]) == (100, 300)  # Grain proportions 100 : 300 over 400 examples
    loader.close()


@pytest.mark.parametrize(
    "data, message",
    [
        (
            {"input": "seqio:nope"},
            "data.input='seqio:nope': no seqio Task or Mixture named 'nope' is registered (set data.seqio_module "
            "to the module that registers it)",
        ),
        (
            {"input": "seqio:jaxalign_test_sums:validation"},
            "data.input='seqio:jaxalign_test_sums:validation': 'jaxalign_test_sums' has no split 'validation'; "
            "it has ['train']",
        ),
        (
            {"input": "seqio:jaxalign_test_sums", "num_workers": 2},
            "data.num_workers=2 must be 0 with a seqio input (tf.data has its own threads)",
        ),
    ],
)
def test_bad_seqio_inputs_are_one_line_config_errors(tasks, tok, tmp_path, data, message):
    cfg = _config(tmp_path, **data)
    with pytest.raises(ConfigError) as e:
        train, _ = common.inputs(cfg, "rl")
        _rl(train, tok, num_workers=cfg.data.num_workers)
    assert str(e.value) == message


def test_a_module_that_does_not_import(tmp_path):
    cfg = _config(tmp_path, input="seqio:x", seqio_module="no_such_module_here")
    with pytest.raises(
        ConfigError, match=r"^data.seqio_module='no_such_module_here' cannot be imported \(No module"
    ):
        common.inputs(cfg, "rl")


def test_the_core_does_not_import_seqio_or_tensorflow():
    code = (
        "import sys; import jaxalign.main, jaxalign.stages.sft, jaxalign.data.loader; "
        "print(sorted(m for m in ('seqio', 'tensorflow') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"
