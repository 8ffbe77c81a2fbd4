"""`data.shard_by="file"`: the shards' spans hold every record exactly once; a process opens and reads only its
shards' files and byte ranges (1/P of the bytes); one process running 2 shards == 2 processes running 1 each;
resume == uninterrupted; mid-file records report their byte offset; finite epochs and empty shards are refused."""

import gzip
import json

import numpy as np
import pytest

from jaxalign import config as config_lib
from jaxalign import storage
from jaxalign.data import file_shards, pipelines, prompt_pipelines, sources
from jaxalign.errors import CheckpointError, ConfigError, DataError
from tests import object_store

SEQ = 192


def _corpus(tmp_path, with_gzip: bool) -> list[str]:
    """Plain JSONL files of uneven line lengths, with blank lines, CRLF endings and a last line without a newline,
    and optionally a .gz and a Parquet file (whole units; the Parquet file of another format, between them)."""
    rng = np.random.default_rng(0)
    paths = []
    for k, n in enumerate([37, 3, 61]):
        lines = []
        for i in range(n):
            lines.append(json.dumps({"id": f"{k}-{i}", "text": "x" * int(rng.integers(0, 400))}))
            if rng.random() < 0.1:
                lines.append("  \t")
        end = "\r\n" if k == 1 else "\n"
        text = end.join(lines) + ("" if k == 2 else end)
        paths.append(str(tmp_path / f"part{k}.jsonl"))
        (tmp_path / f"part{k}.jsonl").write_bytes(text.encode())
    if with_gzip:
        paths.append(str(tmp_path / "part3.jsonl.gz"))
        with gzip.open(paths[-1], "wt") as f:
            f.writelines(json.dumps({"id": f"3-{i}", "text": "y" * 50}) + "\n" for i in range(40))
        pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
        paths.insert(2, str(tmp_path / "part1b.parquet"))
        table = pa.table({"id": [f"p-{i}" for i in range(30)], "text": ["w" * i for i in range(30)]})
        pq.write_table(table, paths[2], row_group_size=7)
    return paths


def _ids(source):
    return [source[i]["id"] for i in range(len(source))]


@pytest.mark.parametrize("with_gzip", [False, True])
@pytest.mark.parametrize("shards", [1, 2, 3, 7])
def test_shards_hold_every_record_exactly_once(tmp_path, shards, with_gzip):
    paths = _corpus(tmp_path, with_gzip)
    spans = file_shards.plan(paths, shards)
    per_shard = [_ids(file_shards.open_spans(s, "error")) for s in spans]
    # In order, the shards' records are the records of the files.
    assert [i for ids in per_shard for i in ids] == _ids(sources.open_source(paths))
    if not with_gzip:  # byte-balanced: each shard holds its share of the bytes, give or take one line
        sizes = [sum(len(storage.read_bytes(p)) for p in paths)]
        owned = [sum(s.end - s.start for s in spans_k) for spans_k in spans]
        assert sum(owned) == sizes[0] and max(owned) - min(owned) <= 1


def test_shards_on_an_object_store_hold_every_record_exactly_once(tmp_path):
    # Sizes by stat, ranges by seek + read through the gs:// code path (tests/object_store.py).
    local = _corpus(tmp_path, with_gzip=True)
    with object_store.install():
        remote = []
        for path in local:
            remote.append("gs://bucket/corpus/" + path.rsplit("/", 1)[1])
            storage.write_atomic(remote[-1], storage.read_bytes(path))
        expected = _ids(sources.open_source(remote))
        for shards in (2, 5):
            spans = file_shards.plan(remote, shards)
            assert [i for s in spans for i in _ids(file_shards.open_spans(s, "error"))] == expected
            assert any(not span.whole and span.start > 0 for s in spans for span in s)


def test_mid_file_records_report_their_byte_offset_and_whole_files_their_line(tmp_path):
    lines = [json.dumps({"id": i, "text": "z" * 30}) for i in range(40)]
    lines[3] = lines[30] = '{"id": broken'
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    first, second = file_shards.plan([str(path)], 2)
    assert second[0].start > 0
    with pytest.raises(DataError, match=rf"^{path}:4: invalid JSON"):  # the range starting at byte 0: line 4
        [file_shards.open_spans(first, "error")[i] for i in range(20)]
    offset = len("\n".join(lines[:30])) + 1  # where line 31 starts
    source = file_shards.open_spans(second, "error")
    with pytest.raises(DataError, match=rf"^{path}:byte {offset}: invalid JSON"):
        [source[i] for i in range(len(source))]
    assert storage.read_bytes(str(path))[offset:].startswith(b'{"id": broken')


_OPEN_BINARY = storage.open_binary


def test_a_parquet_file_splits_at_row_groups_with_true_record_numbers(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    path = str(tmp_path / "rows.parquet")
    score = [float(i) for i in range(1200)]
    score[947] = float("nan")
    table = pa.table(
        {"id": list(range(1200)), "score": score, "text": [f"row {i} " * 4 for i in range(1200)]}
    )
    pq.write_table(table, path, row_group_size=200)  # the footer is a small part of the file
    spans = file_shards.plan([path], 3)
    shards = [file_shards.open_spans(s, "skip") for s in spans]
    # Each shard has whole row groups (6 of 200 rows), in order, together every row once; the bad row is skipped.
    ids = [[r["id"] for r in (src[i] for i in range(len(src))) if r is not None] for src in shards]
    assert [i for part in ids for i in part] == [i for i in range(1200) if i != 947]
    assert all(len(src) % 200 == 0 and len(src) for src in shards)
    last = file_shards.open_spans(spans[2], "error")
    with pytest.raises(
        DataError, match=rf"^{path}:record 948: field 'score' is nan"
    ):  # its number in the file
        [last[i] for i in range(len(last))]


class _Reads:
    """Wraps `storage.open_binary` (the real one) to count the bytes read per file."""

    def __init__(self, monkeypatch):
        self.bytes: dict[str, int] = {}
        reads = self

        class Counting:
            def __init__(self, f, path):
                self.f, self.path = f, path

            def read(self, n=-1):
                data = self.f.read(n)
                reads.bytes[self.path] += len(data)
                return data

            def seek(self, *a):
                return self.f.seek(*a)

            def __enter__(self):
                return self

            def close(self):
                self.f.close()

            def __exit__(self, *exc):
                self.f.close()

        def open_binary(p, random_access=False):
            self.bytes.setdefault(str(p), 0)
            return Counting(_OPEN_BINARY(p, random_access), str(p))

        monkeypatch.setattr(storage, "open_binary", open_binary)


def test_a_process_opens_and_reads_only_its_shards(tmp_path, tok, monkeypatch):
    # Four equal files, each split into byte ranges by eight shards on four processes: 2 shards, 1 file each.
    monkeypatch.setattr(sources, "_INDEX_CHUNK", 512)  # reads stop within a few chunks of a range's end
    texts = [f"document {i:04d} " + "word " * 40 for i in range(400)]  # equal files: a cut at each file's end
    paths = []
    for k in range(4):
        paths.append(str(tmp_path / f"c{k}.jsonl"))
        (tmp_path / f"c{k}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[k::4]))
    total = sum(len(storage.read_bytes(p)) for p in paths)
    kw = dict(seq_len=64, global_batch_size=8, seed=0, shards=8, process_count=4)
    per_process = []
    for index in range(4):
        reads = _Reads(monkeypatch)
        loader = pipelines.lm_loader(
            str(tmp_path / "c*.jsonl"), tok, process_index=index, shard_by="file", **kw
        )
        next(loader)
        loader.close()
        per_process.append(reads.bytes)
        assert list(reads.bytes) == [paths[index]]  # only its own file was opened
        assert total / 4 <= reads.bytes[paths[index]] <= total / 4 + 4 * 512
    reads = _Reads(monkeypatch)
    pipelines.lm_loader(str(tmp_path / "c*.jsonl"), tok, process_index=0, **kw).close()
    # shard_by="record": every process reads every file whole.
    assert sorted(reads.bytes) == paths and sum(reads.bytes.values()) == total


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if k == "extras":
            assert a[k] == b[k]
        else:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _concat(parts):
    return {
        k: (np.concatenate([p[k] for p in parts]) if k != "extras" else [x for p in parts for x in p[k]])
        for k in parts[0]
    }


LOADERS = {
    "lm": lambda w, t, **kw: pipelines.lm_loader(w["pretrain_train"], t, seq_len=SEQ, **kw),
    "rl": lambda w, t, **kw: prompt_pipelines.rl_loader(w["rl_train"], t, max_prompt_length=80, **kw),
    "sft+replay": lambda w, t, **kw: pipelines.sft_loader(
        w["sft_train"], t, seq_len=SEQ, replay=(w["pretrain_train"], 0.25), **kw
    ),
}


@pytest.mark.parametrize("kind", sorted(LOADERS))
def test_one_process_running_two_shards_equals_two_processes(world, tok, kind):
    kw = dict(global_batch_size=4, seed=3, shards=2, shard_by="file")
    one = LOADERS[kind](world, tok, process_index=0, process_count=1, **kw)
    two = [LOADERS[kind](world, tok, process_index=i, process_count=2, **kw) for i in range(2)]
    for _ in range(12):  # past the end of the smaller shard's first epoch for rl
        _same(next(one), _concat([next(two[0]), next(two[1])]))
    # Each process really has only its own half: one file split into two byte ranges, no record in both.
    if kind == "rl":
        halves = [{e["id"] for _ in range(12) for e in next(loader)["extras"]} for loader in two]
        assert halves[0] and halves[1] and not halves[0] & halves[1]


def test_resume_is_bitwise_and_every_epoch_reshuffles(world, tok):
    kw = dict(global_batch_size=2, seed=3, shards=2, shard_by="file", process_index=0, process_count=2)
    shard = file_shards.open_spans(file_shards.plan([world["rl_train"]], 2)[0], "error")
    n = len(shard)
    loader = LOADERS["rl"](world, tok, **kw)
    ids = [e["id"] for _ in range(2 * n) for e in next(loader)["extras"]]
    assert sorted(ids[:n]) == sorted(ids[n:]) == sorted(r["id"] for r in (shard[i] for i in range(n)))
    assert ids[:n] != ids[n:]  # a new order every epoch
    for kind, before in [("rl", n - 2), ("lm", 5)]:  # rl: across an epoch boundary
        loader = LOADERS[kind](world, tok, **kw)
        for _ in range(before):
            next(loader)
        state = loader.get_state()
        expected = [next(loader) for _ in range(6)]
        resumed = LOADERS[kind](world, tok, **kw)
        resumed.set_state(state)
        for a in expected:
            _same(a, next(resumed))
    with pytest.raises(CheckpointError, match="shard_by: checkpoint has 'file', this run has 'record'"):
        LOADERS["rl"](world, tok, **{**kw, "shard_by": "record"}).set_state(state)


def test_finite_epochs_and_empty_shards_are_refused(world, tok, tmp_path):
    with pytest.raises(
        ConfigError, match=r"^data.shard_by='file' needs infinite epochs \(num_epochs=None, got 1\)"
    ):
        LOADERS["rl"](world, tok, global_batch_size=2, seed=0, shard_by="file", num_epochs=1)
    paths = []
    for k in range(2):
        paths.append(str(tmp_path / f"g{k}.jsonl.gz"))
        with gzip.open(paths[-1], "wt") as f:
            f.write(json.dumps({"text": "a b c"}) + "\n")
    with pytest.raises(
        ConfigError, match=r"shard \d of data.shards=4 gets no part of .*2 files.*2 of them .gz"
    ):
        pipelines.lm_loader(
            str(tmp_path / "g*.jsonl.gz"),
            tok,
            seq_len=64,
            global_batch_size=4,
            seed=0,
            shards=4,
            shard_by="file",
        )
    with pytest.raises(ConfigError, match=r"^data.shard_by='bytes' is not one of \['record', 'file'\]"):
        LOADERS["rl"](world, tok, global_batch_size=2, seed=0, shard_by="bytes")
    with pytest.raises(ConfigError, match=r"^data.shard_by='bytes' is not one of \['record', 'file'\]"):
        config_lib.from_config_dict({"data": {"shard_by": "bytes"}})
    # Bytes but no line starting in them: the second half of one long line.
    (tmp_path / "long.jsonl").write_text(json.dumps({"text": "a " * 500}) + "\n")
    with pytest.raises(
        DataError, match=r"shard 1 of data.shards=2 of .* holds no record \(.*long.jsonl bytes \["
    ):
        pipelines.lm_loader(
            str(tmp_path / "long.jsonl"),
            tok,
            seq_len=64,
            global_batch_size=2,
            seed=0,
            shards=2,
            shard_by="file",
        )


def test_worker_processes_yield_the_same_batches(world, tok):
    # The byte ranges travel to the workers with the (pickled) source.
    kw = dict(seq_len=SEQ, global_batch_size=4, seed=3, shards=2, shard_by="file")
    expected = pipelines.sft_loader(world["sft_train"], tok, **kw)
    parallel = pipelines.sft_loader(world["sft_train"], tok, num_workers=2, **kw)
    try:
        for _ in range(4):
            _same(next(expected), next(parallel))
    finally:
        parallel.close()
