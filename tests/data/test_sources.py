"""Record sources: every format reads the same records, and every bad input is one line naming file:line."""

import gzip
import json
import pickle
import sys

import pytest

from jaxalign.data import sources
from jaxalign.errors import DataError

RECORDS = [
    {"id": i, "text": f"document {i}", "score": i / 2, "messages": [{"role": "user", "content": f"q{i}"}]}
    for i in range(7)
]


def _strip(record):
    return {k: v for k, v in record.items() if k != "_where"}


def write_jsonl(path, records, blank_lines=False):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n" + ("\n  \n" if blank_lines else ""))
    return str(path)


def write_parquet(path, records, row_group_size=3):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), str(path), row_group_size=row_group_size)
    return str(path)


def write_array_record(path, records):
    from array_record.python import array_record_module

    writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
    for r in records:
        writer.write(json.dumps(r).encode())
    writer.close()
    return str(path)


@pytest.fixture
def files(tmp_path):
    plain = write_jsonl(tmp_path / "a.jsonl", RECORDS, blank_lines=True)
    gz = tmp_path / "b.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in RECORDS))
    return {
        "jsonl": plain,
        "jsonl.gz": str(gz),
        "parquet": write_parquet(tmp_path / "c.parquet", RECORDS),
        "array_record": write_array_record(tmp_path / "d.array_record", RECORDS),
    }


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "parquet", "array_record"])
def test_every_format_reads_the_same_records(files, kind):
    source = sources.open_source(files[kind])
    assert len(source) == len(RECORDS)
    # Random access in any order.
    for i in [5, 0, 6, 2, 3, 1, 4]:
        assert _strip(source[i]) == RECORDS[i]
    assert pickle.loads(pickle.dumps(source))[4] == source[4]


def test_where_names_file_and_line_or_record(files):
    # Blank lines are skipped but counted: record i sits on line 3i + 1.
    assert sources.open_source(files["jsonl"])[2]["_where"] == f"{files['jsonl']}:7"
    assert sources.open_source(files["parquet"])[4]["_where"] == f"{files['parquet']}:record 5"
    assert sources.open_source(files["array_record"])[0]["_where"] == f"{files['array_record']}:record 1"


def test_comma_separated_globs_mix_formats_in_order(files, tmp_path):
    pattern = f"{tmp_path}/*.parquet,{tmp_path}/*.jsonl,{tmp_path}/*.array_record,{tmp_path}/*.jsonl"
    source = sources.open_source(pattern)
    assert source.files == [files["parquet"], files["jsonl"], files["array_record"]]  # de-duplicated
    assert [_strip(source[i]) for i in range(len(source))] == RECORDS * 3
    assert source[len(RECORDS)]["_where"] == f"{files['jsonl']}:1"


def test_sharded_array_record_names_are_recognised(tmp_path):
    path = write_array_record(tmp_path / "data.array_record-00000-of-00002", RECORDS[:2])
    assert [_strip(r) for r in sources.open_source(f"{tmp_path}/data.array_record-*")] == RECORDS[:2]
    assert sources.file_format(path) == "array_record"


def test_a_glob_matching_nothing_is_named(tmp_path, files):
    with pytest.raises(DataError, match=r"data glob '.*/missing\*\.jsonl' matches no files"):
        sources.open_source(f"{files['jsonl']},{tmp_path}/missing*.jsonl")


def test_unknown_extension(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"x\.csv: unknown data file type"):
        sources.open_source(str(tmp_path / "x.csv"))


@pytest.mark.parametrize(
    "line, message",
    [
        (b'{"text": "a"', "invalid JSON"),
        (b'{"text": NaN}', "non-finite number literal NaN"),
        (b'{"x": -Infinity}', "non-finite number literal -Infinity"),
        (b'{"text": "caf\xe9"}', "invalid UTF-8 at byte 13"),
        (b'["a list"]', "expected a JSON object, got list"),
    ],
)
def test_bad_jsonl_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n\n' + line + b'\n{"text": "also ok"}\n')
    source = sources.open_source(str(path))
    with pytest.raises(DataError) as e:
        source[1]
    assert str(e.value).startswith(f"{path}:3: ") and message in str(e.value)
    assert "\n" not in str(e.value)

    skipping = sources.open_source(str(path), on_error="skip")
    assert [r and r["text"] for r in skipping] == ["ok", None, "also ok"]
    assert skipping.skipped == 1


def test_bad_array_record_is_named(tmp_path):
    path = tmp_path / "bad.array_record"
    from array_record.python import array_record_module

    writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
    writer.write(b'{"text": "ok"}')
    writer.write(b"not json")
    writer.close()
    with pytest.raises(DataError, match=rf"{path}:record 2: invalid JSON"):
        sources.open_source(str(path))[1]


def test_parquet_nan_is_named(tmp_path):
    path = write_parquet(
        tmp_path / "nan.parquet", [{"text": "a", "score": 1.0}, {"text": "b", "score": float("nan")}]
    )
    source = sources.open_source(path)
    assert source[0]["score"] == 1.0
    with pytest.raises(DataError, match=rf"{path}:record 2: field 'score' is nan"):
        source[1]


def test_not_a_parquet_file(tmp_path):
    path = tmp_path / "fake.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=rf"{path}: cannot read Parquet"):
        sources.open_source(str(path))


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "c.parquet", RECORDS)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # makes `import pyarrow.parquet` fail
    with pytest.raises(DataError, match=r"c\.parquet: reading Parquet needs pyarrow \(pip install pyarrow\)"):
        sources.open_source(path)


def _reference_index(data: bytes):
    """The non-empty lines of `data` by a plain split: ([start, end) offsets, 1-based line numbers)."""
    offsets, numbers, start = [], [], 0
    for number, line in enumerate(data.split(b"\n"), start=1):
        if line.strip(b" \t\r\n\f\v"):
            offsets.append((start, start + len(line)))
            numbers.append(number)
        start += len(line) + 1
    return offsets, numbers


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 1 << 22])
def test_streaming_index_equals_a_whole_file_split(monkeypatch, chunk):
    """Indexing reads fixed-size chunks (memory O(records + chunk)); lines, blank and whitespace-only lines, CRLF and
    a last line without a newline that straddle chunk borders index exactly as a split of the whole file."""
    import io
    import random

    rng = random.Random(chunk)
    pieces = [b"", b"  ", b"\t\r", b'{"a": 1}', b'{"text": "x y"}\r', b" {} ", b"\xc3\xa9"]
    data = b"\n".join(rng.choice(pieces) for _ in range(300)) + b'\n{"last": true}'
    monkeypatch.setattr(sources, "_INDEX_CHUNK", chunk)
    offsets, numbers = sources.index_lines(io.BytesIO(data))
    want_offsets, want_numbers = _reference_index(data)
    assert offsets.tolist() == [list(o) for o in want_offsets] and numbers.tolist() == want_numbers
    assert sources.index_lines(io.BytesIO(b""))[0].shape == (0, 2)


def test_gzip_source_reads_from_a_local_copy_and_workers_get_no_file_contents(files, tmp_path):
    source = sources.open_source(files["jsonl.gz"])
    assert [_strip(source[i]) for i in range(len(source))] == RECORDS
    state = pickle.dumps(source)  # what a Grain worker receives: offsets and paths only
    assert len(state) < 4096 and b"document 3" not in state
    worker = pickle.loads(state)
    assert _strip(worker[3]) == RECORDS[3]
    copy = source._local[0]
    del worker  # a worker's copy does not remove the directory it did not make
    assert sources.os.path.exists(copy)
    del source
    import gc

    gc.collect()
    assert not sources.os.path.exists(copy)
