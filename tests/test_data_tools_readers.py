"""Crawl dump readers (data_tools.readers): JSONL, Parquet, webdataset tars, malformed input."""

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cnclip.errors import UsageError
from data_tools.readers import InputReadError, discover_inputs, iter_items, parse_item
from data_tools.records import Reason, Rejected

LIMIT = 1 << 20


def items_of(path):
    (source,) = discover_inputs([str(path)])
    return source, list(iter_items(source, LIMIT))


def outcome(source, item):
    try:
        return parse_item(item, source.kind, source.base_dir)
    except Rejected as rejection:
        return rejection.reason


def test_jsonl_records_and_malformed_lines(tmp_path):
    good = {"query": "小猫", "url": "https://a.cn/1.jpg", "image": "1.jpg", "alt": "可爱小猫", "shop": "猫店", "score": 3}
    lines = [
        "\ufeff" + json.dumps(good, ensure_ascii=False),  # byte order mark on the first line
        "",  # blank lines are not records
        "{not json",
        "[1, 2]",
        '"just a string"',
        json.dumps({"query": 123, "alt": "x"}),
        json.dumps({"query": "猫", "alt": ["a", "b"]}),
    ]
    raw = "\n".join(lines).encode() + b"\n" + b'{"query": "\xff\xfe"}\n' + b'{"query": "a\x00b"}\n'
    (tmp_path / "dump.jsonl").write_bytes(raw)
    source, items = items_of(tmp_path / "dump.jsonl")
    assert [item.location for item in items] == [f"{tmp_path / 'dump.jsonl'}:{n}" for n in (1, 3, 4, 5, 6, 7, 8, 9)]
    results = [outcome(source, item) for item in items]
    record = results[0]
    assert (record.query, record.url, record.image, record.candidates) == ("小猫", "https://a.cn/1.jpg", "1.jpg", {"alt": "可爱小猫"})
    assert record.meta == {"shop": "猫店", "score": 3}  # unknown fields are kept
    assert record.base_dir == tmp_path
    assert results[1:] == [
        Reason.MALFORMED_JSON,
        Reason.NOT_AN_OBJECT,
        Reason.NOT_AN_OBJECT,
        Reason.BAD_FIELD_TYPE,
        Reason.BAD_FIELD_TYPE,
        Reason.INVALID_UTF8,
        Reason.NUL_BYTE,
    ]


def test_parquet_rows_stream_in_order(tmp_path):
    table = pa.table({
        "query": ["猫", "狗", None],
        "alt": ["可爱小猫", None, "x"],
        "image": [b"\x89PNG...", None, None],
        "likes": [1, 2, 3],
    })
    pq.write_table(table, tmp_path / "dump.parquet", row_group_size=2)
    source, items = items_of(tmp_path / "dump.parquet")
    assert [item.location.rsplit(":", 1)[1] for item in items] == ["row 1", "row 2", "row 3"]
    first = outcome(source, items[0])
    assert first.image == b"\x89PNG..." and first.meta == {"likes": 1}


def test_parquet_wrong_column_type(tmp_path):
    pq.write_table(pa.table({"query": [1, 2], "alt": ["a", "b"]}), tmp_path / "dump.parquet")
    source, items = items_of(tmp_path / "dump.parquet")
    assert [outcome(source, item) for item in items] == [Reason.BAD_FIELD_TYPE] * 2


def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset_tar_samples(tmp_path):
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        add(tar, "000001.jpg", b"JPEGDATA")
        add(tar, "000001.txt", "可爱的小猫".encode())
        add(tar, "000001.json", json.dumps({"query": "小猫", "url": "https://a.cn/1.jpg", "status": "success"}).encode())
        add(tar, "000002.json", json.dumps({"query": "小狗", "caption": "小狗在跑"}).encode())
        add(tar, "000003.txt", b"\xff\xfe")
        add(tar, "000004.json", b"{broken")
    source, items = items_of(tmp_path / "shard.tar")
    assert [item.location.rsplit(":", 1)[1] for item in items] == ["000001", "000002", "000003", "000004"]
    first, second, third, fourth = (outcome(source, item) for item in items)
    assert (first.query, first.image, first.candidates, first.meta) == ("小猫", b"JPEGDATA", {"alt": "可爱的小猫"}, {"status": "success"})
    assert (second.candidates, second.image) == ({"alt": "小狗在跑"}, None)
    assert (third, fourth) == (Reason.INVALID_UTF8, Reason.MALFORMED_JSON)


def test_oversized_tar_member_is_not_read(tmp_path):
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        add(tar, "a.png", b"\0" * 4096)
        add(tar, "a.json", b'{"query": "q"}')
    (source,) = discover_inputs([str(tmp_path / "shard.tar")])
    (item,) = iter_items(source, max_member_bytes=1024)
    assert outcome(source, item) is Reason.IMAGE_TOO_LARGE


def test_truncated_tar_raises_after_the_readable_samples(tmp_path):
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        add(tar, "a.txt", b"x" * 600)
        add(tar, "b.txt", b"y" * 5000)
    data = (tmp_path / "shard.tar").read_bytes()
    (tmp_path / "shard.tar").write_bytes(data[:2500])
    (source,) = discover_inputs([str(tmp_path / "shard.tar")])
    seen = []
    with pytest.raises(InputReadError, match="shard.tar"):
        for item in iter_items(source, LIMIT):
            seen.append(item)
    assert [item.location.rsplit(":", 1)[1] for item in seen] == ["a"]


def test_directory_discovery(tmp_path):
    for name in ("b/2.jsonl", "a.parquet", "c.tar", "notes.txt", ".hidden/x.jsonl", "out/pairs.jsonl"):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    found = discover_inputs([str(tmp_path), str(tmp_path / "a.parquet")], exclude=tmp_path / "out")
    assert [f.path.relative_to(tmp_path).as_posix() for f in found] == ["a.parquet", "b/2.jsonl", "c.tar"]
    assert [f.kind for f in found] == ["parquet", "jsonl", "tar"]


def test_input_errors_name_the_path(tmp_path):
    with pytest.raises(UsageError, match="input not found: .*missing.jsonl"):
        discover_inputs([str(tmp_path / "missing.jsonl")])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UsageError, match="unsupported input file.*notes.txt"):
        discover_inputs([str(tmp_path / "notes.txt")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no .jsonl, .parquet or .tar files in directory: .*empty"):
        discover_inputs([str(tmp_path / "empty")])
