"""build-pairs end to end: a generated crawl with planted junk, duplicates and an over-cap query.

The crawl is built so that every record has exactly one known fate; the report must match it
count for count, and the output must not depend on --workers or on interruptions.
"""

import base64
import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import opencc
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import data_tools.engines
from data_tools.config import config_from_dict
from data_tools.pipeline import BuildOptions, build_pairs
from data_tools.split import parse_splits

QUERIES = ["红色连衣裙", "可爱小猫", "山水风景", "复古台灯", "运动跑鞋", "青花瓷碗", "机械键盘", "绿植盆栽", "双肩背包", "木质餐桌"]
GOOD_PER_QUERY = 12
CAP_QUERY, CAP_HITS, CAP = "毛绒玩具", 30, 20
TAR_QUERY, TAR_HITS = "陶瓷花瓶", 15
FILTERS = {"text": {"max_chars": 32}, "image": {"min_side": 32, "max_side": 64}}


def smooth_image(seed: int, size=(64, 64)) -> Image.Image:
    """A distinct, smooth picture: near-duplicate detection must see re-encodes of it as the same."""
    cells = np.random.default_rng(seed).integers(0, 255, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(cells).resize(size, Image.Resampling.BICUBIC)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


class CrawlBuilder:
    """Writes a crawl dump and remembers what the pipeline must do with each record."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "images").mkdir(parents=True)
        self.lines: list[bytes] = []
        self.expected: Counter[str] = Counter()
        self.kept = 0
        self.next_seed = 0

    def image_file(self, data: bytes, suffix: str) -> str:
        name = f"images/{len(list((self.root / 'images').iterdir())):04d}.{suffix}"
        (self.root / name).write_bytes(data)
        return name

    def new_image(self, kind: int = 0) -> tuple[str, Image.Image]:
        """A fresh picture as a PNG file, a JPEG file or inline base64, by `kind`."""
        image = smooth_image(self.next_seed)
        self.next_seed += 1
        if kind % 3 == 0:
            return self.image_file(encode(image, "PNG"), "png"), image
        if kind % 3 == 1:
            return self.image_file(encode(image, "JPEG", quality=92), "jpg"), image
        return base64.b64encode(encode(image, "JPEG", quality=92)).decode(), image

    def add(self, fate: str | None, record: dict | bytes) -> None:
        """`fate` None means the record must be kept."""
        raw = record if isinstance(record, bytes) else json.dumps(record, ensure_ascii=False).encode()
        self.lines.append(raw)
        if fate is None:
            self.kept += 1
        else:
            self.expected[fate] += 1

    def write_jsonl(self, name: str) -> None:
        (self.root / name).write_bytes(b"\n".join(self.lines) + b"\n")


def good_caption(query: str, k: int, i: int) -> dict:
    """Caption variants that all survive cleaning: plain, boilerplate alt + good title, Traditional, web debris."""
    if k % 4 == 0:
        return {"alt": f"{query}第{k}款"}
    if k % 4 == 1:
        return {"alt": f"IMG_{i:04d}.jpg", "title": f"{query} 款式{k}"}
    if k % 4 == 2:
        return {"alt": opencc.OpenCC("s2t").convert(f"{query}精选第{k}款")}
    return {"alt": f"【{query}】第{k}款😀！！ https://shop.example.com/{i}", "context": "联系客服"}


def build_jsonl_dump(builder: CrawlBuilder) -> None:
    originals = []  # (query, path, image, caption) of the first good record of each query
    for q_index, query in enumerate(QUERIES):
        for k in range(GOOD_PER_QUERY):
            i = q_index * GOOD_PER_QUERY + k
            image_ref, image = builder.new_image(kind=i)
            caption = good_caption(query, k, i)
            builder.add(None, {"query": query, "url": f"https://img.example.com/{i}.jpg", "image": image_ref,
                               "page_url": f"https://shop.example.com/{i}", "shop_id": i, **caption})
            if k == 0:
                originals.append((query, image_ref, image, caption))

    for j, (query, image_ref, image, caption) in enumerate(originals[:5]):
        builder.add("duplicate_image", {"query": query, "image": image_ref, "alt": f"{query}另一款{j}"})
        near = builder.image_file(encode(image, "JPEG", quality=75), "jpg")
        builder.add("near_duplicate_image", {"query": query, "image": near, "alt": f"{query}相似款{j}"})
    for query, _, _, caption in originals[5:9]:
        builder.add("duplicate_text", {"query": query, "image": builder.new_image()[0], **caption})

    q = QUERIES[0]
    good = {"query": q, "alt": f"{q}问题款"}
    builder.add("malformed_json", '{"query": "红色连衣裙", "alt": '.encode())
    builder.add("malformed_json", b"not json at all")
    builder.add("not_an_object", b"[1, 2, 3]")
    builder.add("not_an_object", b'"a string"')
    builder.add("invalid_utf8", b'{"query": "\xe7\xba", "alt": "x"}')
    builder.add("nul_byte", b'{"query": "q\x00", "alt": "x"}')
    builder.add("bad_field_type", {"query": 42, "alt": "红色连衣裙"})
    builder.add("bad_field_type", {"query": q, "alt": ["红色连衣裙"]})
    builder.add("missing_query", {"alt": f"{q}无查询", "image": builder.new_image()[0]})
    builder.add("missing_query", {"query": "  😀 ", "alt": f"{q}空查询", "image": builder.new_image()[0]})
    builder.add("bad_url", {**good, "url": "ftp://img.example.com/a.jpg", "image": builder.new_image()[0]})
    builder.add("bad_url", {**good, "url": "javascript:void(0)", "image": builder.new_image()[0]})
    builder.add("no_image", {**good, "url": "https://img.example.com/only-url.jpg"})
    builder.add("no_image", {**good, "url": "https://img.example.com/only-url2.jpg", "image": None})
    builder.add("no_image", {**good, "image": "https://img.example.com/a.jpg"})
    outside = builder.root.parent / "outside.png"
    outside.write_bytes(encode(smooth_image(10_000), "PNG"))
    os.symlink(outside, builder.root / "link.png")
    builder.add("unsafe_image_path", {**good, "image": str(outside)})
    builder.add("unsafe_image_path", {**good, "image": "../outside.png"})
    builder.add("unsafe_image_path", {**good, "image": "link.png"})
    builder.add("image_missing", {**good, "image": "images/nope.png"})
    builder.add("image_missing", {**good, "image": "images"})
    for alt in ("IMG_2023.jpg", "图片", "商品图", "DSC_0001.JPG"):
        builder.add("boilerplate_text", {"query": q, "alt": alt, "image": builder.new_image()[0]})
    builder.add("text_too_short", {"query": "可爱小猫", "alt": "小猫", "image": builder.new_image()[0]})
    builder.add("text_too_short", {"query": "复古台灯", "alt": "台灯", "image": builder.new_image()[0]})
    builder.add("text_too_long", {"query": q, "alt": q * 8, "image": builder.new_image()[0]})
    builder.add("text_too_long", {"query": q, "title": "很长的" * 12 + q, "image": builder.new_image()[0]})
    builder.add("low_chinese_ratio", {"query": "机械键盘", "alt": "Cherry MX Keyboard 键盘", "image": builder.new_image()[0]})
    builder.add("low_chinese_ratio", {"query": "运动跑鞋", "alt": "Nike Air Zoom Pegasus 跑鞋", "image": builder.new_image()[0]})
    builder.add("irrelevant_text", {"query": "木质餐桌", "alt": "可爱的小猫咪一只", "image": builder.new_image()[0]})
    builder.add("irrelevant_text", {"query": "双肩背包", "alt": "图片", "title": "山水风景画作品", "image": builder.new_image()[0]})
    builder.add("irrelevant_text", {"query": "可爱小猫", "alt": "熊猫在吃竹子", "image": builder.new_image()[0]})
    builder.add("no_text", {"query": q, "image": builder.new_image()[0]})
    builder.add("no_text", {"query": q, "alt": "😀😀", "title": "", "image": builder.new_image()[0]})
    truncated = encode(smooth_image(10_001, (200, 200)), "JPEG")
    builder.add("undecodable_image", {**good, "image": builder.image_file(truncated[: len(truncated) // 2], "jpg")})
    builder.add("undecodable_image", {**good, "image": builder.image_file(b"<html>404</html>", "jpg")})
    builder.add("image_too_small", {**good, "image": builder.image_file(encode(smooth_image(10_002, (20, 20)), "PNG"), "png")})
    builder.add("image_too_small", {**good, "image": builder.image_file(encode(smooth_image(10_003, (31, 90)), "PNG"), "png")})
    builder.add("extreme_aspect_ratio", {**good, "image": builder.image_file(encode(smooth_image(10_004, (200, 40)), "PNG"), "png")})
    builder.add("extreme_aspect_ratio", {**good, "image": builder.image_file(encode(smooth_image(10_005, (40, 130)), "PNG"), "png")})
    builder.add("image_too_large", {**good, "image": builder.image_file(png_bomb_header(), "png")})
    builder.write_jsonl("a.jsonl")


def png_bomb_header() -> bytes:
    """IHDR claims 100000 x 100000 pixels; there is no image data."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def build_parquet_dump(builder: CrawlBuilder) -> None:
    rows = []
    for k in range(CAP_HITS):
        image = base64.b64encode(encode(smooth_image(20_000 + k), "JPEG")).decode()
        rows.append({"query": CAP_QUERY, "alt": f"{CAP_QUERY}第{k}号", "image": image, "likes": k})
    rows.append({"query": CAP_QUERY, "alt": f"{CAP_QUERY}无图", "image": None, "likes": -1})
    rows.append({"query": CAP_QUERY, "alt": "图片", "image": rows[0]["image"], "likes": -2})
    pq.write_table(pa.Table.from_pylist(rows), builder.root / "b.parquet", row_group_size=8)
    builder.kept += CAP
    builder.expected.update({"query_cap": CAP_HITS - CAP, "no_image": 1, "boilerplate_text": 1})


def build_tar_dump(builder: CrawlBuilder) -> None:
    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(builder.root / "c.tar", "w") as tar:
        for k in range(TAR_HITS):
            key = f"{k:06d}"
            add(tar, f"{key}.jpg", encode(smooth_image(30_000 + k), "JPEG"))
            add(tar, f"{key}.txt", f"{TAR_QUERY}第{k}件".encode())
            add(tar, f"{key}.json", json.dumps({"query": TAR_QUERY, "url": f"https://img.example.com/v{k}.jpg"}).encode())
        add(tar, "000100.txt", f"{TAR_QUERY}没有图".encode())
        add(tar, "000100.json", json.dumps({"query": TAR_QUERY}).encode())
        add(tar, "000101.jpg", encode(smooth_image(30_101), "JPEG"))
        add(tar, "000101.txt", b"\xff\xfe broken")
        add(tar, "000101.json", json.dumps({"query": TAR_QUERY}).encode())
    builder.kept += TAR_HITS
    builder.expected.update({"no_image": 1, "invalid_utf8": 1})


@pytest.fixture(scope="module")
def crawl(tmp_path_factory):
    builder = CrawlBuilder(tmp_path_factory.mktemp("crawl") / "dump")
    build_jsonl_dump(builder)
    build_parquet_dump(builder)
    build_tar_dump(builder)
    return builder


def options(crawl: CrawlBuilder, out: Path, **overrides) -> BuildOptions:
    values = dict(
        inputs=(str(crawl.root),), out=out, config=config_from_dict(FILTERS), per_query_cap=CAP,
        splits=parse_splits("0.8,0.1,0.1"), shard_size=16, progress=False,
    )
    values.update(overrides)
    return BuildOptions(**values)


def output_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def single(crawl, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    result = build_pairs(options(crawl, out))
    return out, result


def test_report_accounts_for_every_record(crawl, single):
    out, result = single
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report == result.report
    assert report["kept"] == crawl.kept == 155
    assert report["rejected"] == dict(sorted(crawl.expected.items()))
    assert report["records_read"] == report["kept"] + sum(report["rejected"].values()) == crawl.kept + sum(crawl.expected.values())
    for counts in report["per_file"].values():
        assert counts["read"] == counts["kept"] + sum(counts["rejected"].values())
    assert list(report["per_file"]) == [str(crawl.root / name) for name in ("a.jsonl", "b.parquet", "c.tar")]
    assert report["per_file"][str(crawl.root / "c.tar")] == {"read": 17, "kept": 15, "rejected": {"invalid_utf8": 1, "no_image": 1}}
    assert report["per_query"][CAP_QUERY] == {"read": 32, "kept": 20, "rejected": 12, "capped": 10}
    assert report["per_query"]["可爱小猫"]["kept"] == GOOD_PER_QUERY
    assert sum(report["splits"].values()) == report["kept"]
    assert report["input_errors"] == []


def test_report_examples_point_at_file_and_line(crawl, single):
    report = single[1].report
    a = crawl.root / "a.jsonl"
    first_bad_line = crawl.kept - CAP - TAR_HITS + 5 * 2 + 4 + 1  # after the good records and the duplicates
    assert report["examples"]["malformed_json"][0].startswith(f"{a}:{first_bad_line}: ")
    assert report["examples"]["nul_byte"] == [f"{a}:{first_bad_line + 5}: NUL byte in line"]
    assert report["examples"]["query_cap"] == [f"query '{CAP_QUERY}': 10 pairs over the cap of 20"]
    assert all(len(examples) <= 5 for examples in report["examples"].values())


def read_cnclip(out: Path, split: str):
    images = {}
    for line in (out / f"{split}_imgs.tsv").read_text().splitlines():
        image_id, data = line.split("\t")
        images[int(image_id)] = base64.urlsafe_b64decode(data)
    texts = [json.loads(line) for line in (out / f"{split}_texts.jsonl").read_text(encoding="utf-8").splitlines()]
    return images, texts


def test_cnclip_layout_is_valid(single):
    out, result = single
    seen_images, seen_texts, pixels = set(), set(), {}
    for split in ("train", "valid", "test"):
        images, texts = read_cnclip(out, split)
        assert len(images) == len(texts) == result.report["splits"][split]
        for text in texts:
            assert set(text) == {"text_id", "text", "image_ids"} and text["image_ids"][0] in images
            assert text["text_id"] not in seen_texts
            seen_texts.add(text["text_id"])
        for image_id, data in images.items():
            image = Image.open(io.BytesIO(data))
            assert image.format == "JPEG" and image.mode == "RGB" and max(image.size) <= 64
            assert image_id not in seen_images
            seen_images.add(image_id)
            pixels[image.tobytes()] = split
    assert len(pixels) == len(seen_images)  # no image appears twice, so none in two splits
    train_texts = {t["text"] for t in read_cnclip(out, "train")[1]}
    all_texts = train_texts | {t["text"] for s in ("valid", "test") for t in read_cnclip(out, s)[1]}
    assert "红色连衣裙第0款" in all_texts and "红色连衣裙精选第2款" in all_texts  # Traditional converted back
    assert not any("http" in t or "😀" in t or "IMG_" in t for t in all_texts)


def test_workers_do_not_change_the_output(crawl, single, tmp_path):
    out, _ = single
    parallel = tmp_path / "parallel"
    build_pairs(options(crawl, parallel, workers=2))
    assert output_files(parallel) == output_files(out)


def test_rerun_reuses_finished_shards(crawl, tmp_path):
    out = tmp_path / "out"
    first = build_pairs(options(crawl, out))
    expected = output_files(out)
    shards = sorted((out / ".work" / "shards").iterdir())
    assert first.shards_computed == first.shards_total == len(shards) > 10
    stamps = {p: p.stat().st_mtime_ns for p in shards}

    again = build_pairs(options(crawl, out))
    assert again.shards_computed == 0
    assert {p: p.stat().st_mtime_ns for p in shards} == stamps
    assert output_files(out) == expected

    shards[3].unlink()  # as if the run had been interrupted before this shard finished
    resumed = build_pairs(options(crawl, out))
    assert resumed.shards_computed == 1
    assert output_files(out) == expected


def test_interrupted_run_resumes_to_identical_output(crawl, single, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real, calls = data_tools.engines.process_shard, []

    def crash_on_the_fifth(task, processor):
        calls.append(task)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(task, processor)

    monkeypatch.setattr(data_tools.engines, "process_shard", crash_on_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        build_pairs(options(crawl, out))
    assert not (out / "report.json").exists() and not list(out.glob("*.tsv"))
    monkeypatch.setattr(data_tools.engines, "process_shard", real)
    resumed = build_pairs(options(crawl, out))
    assert resumed.shards_computed == resumed.shards_total - 4
    assert output_files(out) == output_files(single[0])


def test_global_settings_reuse_all_per_record_work(crawl, single, tmp_path):
    out = tmp_path / "out"
    build_pairs(options(crawl, out))
    rerun = build_pairs(options(crawl, out, per_query_cap=5, seed=7, format="pairs"))
    assert rerun.shards_computed == 0
    assert rerun.report["per_query"][CAP_QUERY]["kept"] == 5
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["report.json", "test_pairs.jsonl", "train_pairs.jsonl", "valid_pairs.jsonl"]
    changed = build_pairs(options(crawl, out, config=config_from_dict({**FILTERS, "text": {"min_chars": 6, "max_chars": 32}})))
    assert changed.shards_computed == changed.shards_total  # per-record settings changed: recomputed


def test_pairs_and_webdataset_formats_hold_the_same_pairs(crawl, single, tmp_path):
    _, result = single
    cnclip_texts = {t["text"] for s in ("train", "valid", "test") for t in read_cnclip(single[0], s)[1]}
    pairs_out, wds_out = tmp_path / "pairs", tmp_path / "wds"
    build_pairs(options(crawl, pairs_out, format="pairs"))
    lines = [json.loads(line) for s in ("train", "valid", "test") for line in (pairs_out / f"{s}_pairs.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {line["text"] for line in lines} == cnclip_texts
    assert set(lines[0]) == {"id", "image", "text", "query", "meta"}
    assert Image.open(io.BytesIO(base64.urlsafe_b64decode(lines[0]["image"]))).format == "JPEG"
    assert lines[0]["meta"]["extra"] == {"shop_id": 0} and lines[0]["meta"]["url"] == "https://img.example.com/0.jpg"

    build_pairs(options(crawl, wds_out, format="webdataset"))
    texts = set()
    for shard in sorted(wds_out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            names = tar.getnames()
            assert len(names) % 3 == 0 and all(n.endswith((".jpg", ".txt", ".json")) for n in names)
            texts |= {tar.extractfile(n).read().decode() for n in names if n.endswith(".txt")}
    assert texts == cnclip_texts
    assert sorted(p.name for p in wds_out.glob("*.tar")) == ["test-00000.tar", "train-00000.tar", "valid-00000.tar"]


def test_unreadable_file_is_reported_and_the_rest_is_built(tmp_path):
    dump = tmp_path / "dump"
    dump.mkdir()
    (dump / "cat.png").write_bytes(encode(smooth_image(1), "PNG"))
    (dump / "a.jsonl").write_text(json.dumps({"query": "小猫", "image": "cat.png", "alt": "一只可爱的小猫"}) + "\n")
    (dump / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    result = build_pairs(BuildOptions(inputs=(str(dump),), out=tmp_path / "out", config=config_from_dict(FILTERS), progress=False))
    assert result.report["kept"] == result.report["records_read"] == 1
    (error,) = result.report["input_errors"]
    assert error.startswith(f"{dump / 'broken.parquet'}: ")
    assert result.report["per_file"][str(dump / "broken.parquet")] == {"read": 0, "kept": 0, "rejected": {}}
