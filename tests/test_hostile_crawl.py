"""build-pairs against hostile crawl dumps: one test per attack.

Every case runs the real command line (`data_tools.cli.main`) on a dump holding one good record
plus the hostile input. The run must finish without a traceback, keep the good record, account
for every record read (kept + sum(rejected) == records read) and give the hostile record the
expected outcome: a rejection with the right reason, or, for images that are odd but valid
(CMYK, 16-bit, animated, EXIF-rotated), a kept pair in the normalised form. Inputs that make the
whole command unusable (no dumps, a FIFO, a bad or unsafe filter file) are a one-line CLI error
naming the input, exit status 2.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import struct
import tarfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_tools.cli import main

DATA_TOOLS = Path(__file__).resolve().parent.parent / "data_tools"
QUERY = "可爱小猫"
FILTERS = {"image": {"min_side": 16, "max_side": 64, "max_file_bytes": 8 * 2**20}}


def picture(seed: int, size=(48, 40), mode: str = "RGB") -> Image.Image:
    cells = np.random.default_rng(seed).integers(0, 255, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(cells).resize(size, Image.Resampling.BICUBIC).convert(mode)


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def record(n: int, **fields) -> dict:
    """A record that passes every rule unless `fields` break it; `n` keeps captions apart."""
    return {"query": QUERY, "alt": f"一只可爱的小猫第{n}号", **fields}


def png_header(width: int, height: int, bit_depth: int = 8) -> bytes:
    """A PNG whose IHDR claims width x height; no pixel data follows."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def sixteen_bit_png() -> bytes:
    values = np.linspace(0, 65535, 48 * 40, dtype="<u2").reshape(40, 48)
    return encode(Image.frombytes("I;16", (48, 40), values.tobytes()))


def animated_gif() -> bytes:
    red, blue = Image.new("RGB", (48, 40), (255, 0, 0)), Image.new("RGB", (48, 40), (0, 0, 255))
    return encode(red, "GIF", save_all=True, append_images=[blue], duration=100, loop=0)


def exif_rotated_jpeg(size: tuple[int, int]) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    return encode(picture(77, size), "JPEG", exif=exif.tobytes())


def deep_json(depth: int) -> bytes:
    return b'{"query": "\xe5\x8f\xaf\xe7\x88\xb1\xe5\xb0\x8f\xe7\x8c\xab", "x": ' + b"[" * depth + b"]" * depth + b"}"


def tar_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def tar_sample(key: str, seed: int) -> dict[str, bytes]:
    return {f"{key}.jpg": encode(picture(seed), "JPEG"), f"{key}.txt": f"一只可爱的小猫第{seed}号".encode(),
            f"{key}.json": json.dumps({"query": QUERY}).encode()}


def wrong_type_parquet() -> bytes:
    table = pa.table({"query": pa.array([1, 2], pa.int64()), "alt": pa.array([["猫"], ["狗"]]), "image": pa.array([b"x", b"y"])})
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    return buffer.getvalue().to_pybytes()


@dataclass
class Case:
    """One hostile input: extra lines for dump/a.jsonl, files in the dump, and the expected outcome."""

    lines: list[dict | bytes] = field(default_factory=list)
    files: dict[str, bytes | Callable[[Path], None]] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    kept: int = 0  # hostile records expected to be kept (besides the good one)
    filters: dict = field(default_factory=dict)  # merged into FILTERS
    check: Callable[[Path, dict], None] | None = None  # extra assertions on the output and report


def only_pair(out: Path, text_contains: str) -> tuple[Image.Image, dict, dict]:
    """The kept pair whose text contains `text_contains`: its image, text line and meta line."""
    images = dict(line.split("\t") for line in (out / "train_imgs.tsv").read_text().splitlines())
    texts = [json.loads(line) for line in (out / "train_texts.jsonl").read_text(encoding="utf-8").splitlines()]
    metas = [json.loads(line, parse_constant=_no_constants) for line in (out / "train_meta.jsonl").read_text(encoding="utf-8").splitlines()]
    (text,) = [t for t in texts if text_contains in t["text"]]
    (meta,) = [m for m in metas if m["text_id"] == text["text_id"]]
    image = Image.open(io.BytesIO(base64.urlsafe_b64decode(images[str(text["text_id"])])))
    return image, text, meta


def _no_constants(name: str):
    raise AssertionError(f"output holds {name}, which is not JSON")


def first_frame_used(out: Path, report: dict) -> None:
    image, _, _ = only_pair(out, "第105号")
    r, g, b = np.asarray(image.convert("RGB"), dtype=float).mean(axis=(0, 1))
    assert r > 200 and b < 60  # frame 1 is red, frame 2 blue


def rotated(expected: tuple[int, int], n: int) -> Callable[[Path, dict], None]:
    def check(out: Path, report: dict) -> None:
        image, _, meta = only_pair(out, f"第{n}号")
        assert image.size == expected and (meta["width"], meta["height"]) == expected
    return check


def normalised_rgb(n: int) -> Callable[[Path, dict], None]:
    def check(out: Path, report: dict) -> None:
        image, _, _ = only_pair(out, f"第{n}号")
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (48, 40))
    return check


def nan_became_null(out: Path, report: dict) -> None:
    _, _, meta = only_pair(out, "第120号")
    assert meta["extra"] == {"score": None, "likes": 3}


def nul_stripped(out: Path, report: dict) -> None:
    _, text, _ = only_pair(out, "第121号")
    assert "\x00" not in text["text"] and text["text"] == "一只可爱的小猫第121号"


def tar_wrote_nothing(out: Path, report: dict) -> None:
    assert not list(out.parent.rglob("evil*"))  # members are read in memory, never extracted


def symlink(target: str | Callable[[Path], Path]) -> Callable[[Path], None]:
    """A file-maker for Case.files: a symlink (named by the files key) to `target`."""
    def make(link: Path) -> None:
        os.symlink(target(link) if callable(target) else target, link)
    return make


def outside_file(link: Path) -> Path:
    outside = link.parent.parent / "outside.png"
    outside.write_bytes(encode(picture(999)))
    return outside


def fifo(path: Path) -> None:
    os.mkfifo(path)


def directory(path: Path) -> None:
    path.mkdir()


TRUNCATED = encode(picture(3, (200, 160)), "JPEG")

CASES: dict[str, Case] = {
    # ------------------------------------------------------------------ image files
    "truncated_jpeg": Case([record(1, image="t.jpg")], {"t.jpg": TRUNCATED[: len(TRUNCATED) // 2]}, {"undecodable_image": 1}),
    "zero_byte_image": Case([record(2, image="z.jpg")], {"z.jpg": b""}, {"undecodable_image": 1}),
    "html_named_jpg": Case([record(3, image="h.jpg")], {"h.jpg": b"<html><body>404 Not Found</body></html>"}, {"undecodable_image": 1}),
    "svg_named_png": Case([record(4, image="s.png")], {"s.png": b'<svg xmlns="http://www.w3.org/2000/svg"/>'}, {"undecodable_image": 1}),
    "decompression_bomb_png": Case([record(5, image="bomb.png")], {"bomb.png": png_header(100_000, 100_000)}, {"image_too_large": 1}),
    "tall_1x20000": Case([record(6, image="tall.png")], {"tall.png": encode(Image.new("RGB", (1, 20_000), (9, 9, 9)))}, {"image_too_small": 1}),
    "thin_20x2000": Case([record(7, image="thin.png")], {"thin.png": encode(Image.new("RGB", (20, 2000), (9, 9, 9)))}, {"extreme_aspect_ratio": 1}),
    "cmyk_jpeg": Case([record(101, image="cmyk.jpg")], {"cmyk.jpg": encode(picture(101, mode="CMYK"), "JPEG")}, kept=1, check=normalised_rgb(101)),
    "sixteen_bit_png": Case([record(102, image="deep.png")], {"deep.png": sixteen_bit_png()}, kept=1, check=normalised_rgb(102)),
    "animated_gif_first_frame": Case([record(105, image="anim.gif")], {"anim.gif": animated_gif()}, kept=1, check=first_frame_used),
    "exif_rotated_jpeg": Case([record(106, image="rot.jpg")], {"rot.jpg": exif_rotated_jpeg((48, 32))}, kept=1, check=rotated((32, 48), 106)),
    "exif_rotated_downscaled_jpeg": Case([record(107, image="rot2.jpg")], {"rot2.jpg": exif_rotated_jpeg((128, 64))}, kept=1, check=rotated((32, 64), 107)),
    "image_is_a_directory": Case([record(8, image="folder.jpg")], {"folder.jpg": directory}, {"image_missing": 1}),
    "image_is_a_fifo": Case([record(9, image="pipe.jpg")], {"pipe.jpg": fifo}, {"image_missing": 1}),
    "image_symlink_loop": Case([record(10, image="loop.jpg")], {"loop.jpg": symlink("loop.jpg")}, {"image_unreadable": 1}),
    "image_name_too_long": Case([record(11, image="a" * 300 + ".jpg")], {}, {"image_unreadable": 1}),
    "image_file_over_size_limit": Case([record(12, image="big.png")], {"big.png": encode(picture(12)) + b"\x00" * 300_000},
                                       {"image_too_large": 1}, filters={"image": {"max_file_bytes": 262_144}}),
    # ------------------------------------------------------------------ base64 images
    "base64_garbage_data_uri": Case([record(13, image="data:image/png;base64,@@@@not-base64@@@@")], {}, {"undecodable_image": 1}),
    "base64_bad_length": Case([record(14, image="A" * 65)], {}, {"undecodable_image": 1}),
    "base64_of_a_non_image": Case([record(15, image=base64.b64encode(b"MZ\x90\x00 this is an executable, not a picture" * 3).decode())], {},
                                  {"undecodable_image": 1}),
    # ------------------------------------------------------------------ paths out of the dump
    "dotdot_path": Case([record(16, image="../../etc/passwd")], {}, {"unsafe_image_path": 1}),
    "absolute_path": Case([record(17, image="/etc/passwd")], {}, {"unsafe_image_path": 1}),
    "windows_paths": Case([record(18, image="C:\\Windows\\win.ini"), record(19, image="..\\..\\secret.png")], {}, {"unsafe_image_path": 2}),
    "symlink_out_of_the_dump": Case([record(20, image="link.png")], {"link.png": symlink(outside_file)}, {"unsafe_image_path": 1}),
    "symlink_to_dev_zero": Case([record(21, image="zero.jpg")], {"zero.jpg": symlink("/dev/zero")}, {"unsafe_image_path": 1}),
    "file_and_ftp_url_as_image": Case([record(22, image="file:///etc/passwd"), record(23, image="ftp://example.com/a.jpg")], {},
                                      {"unsafe_image_path": 2}),
    # ------------------------------------------------------------------ bytes and JSON
    "invalid_utf8": Case([b'{"query": "\xe5\x8f", "alt": "\xff\xfe"}'], {}, {"invalid_utf8": 1}),
    "raw_nul_byte": Case([b'{"query": "\xe5\x8f\xaf\xe7\x88\xb1\x00", "alt": "x"}'], {}, {"nul_byte": 1}),
    "escaped_nul_in_caption_is_stripped": Case([record(121, image="n.png", alt="一只可爱的\u0000小猫第121号")], {"n.png": encode(picture(121))},
                                               kept=1, check=nul_stripped),
    "lone_surrogate_escape": Case([b'{"query": "\\u53ef\\u7231\\u5c0f\\u732b", "alt": "\\ud800\\u732b\\u732b\\u732b\\u732b"}'], {}, {"invalid_utf8": 1}),
    "json_array": Case([b'[{"query": "\xe7\x8c\xab"}]'], {}, {"not_an_object": 1}),
    "json_scalars": Case([b'"just a string"', b"42", b"null"], {}, {"not_an_object": 3}),
    "truncated_json": Case([b'{"query": "\xe7\x8c\xab", "alt": '], {}, {"malformed_json": 1}),
    "nesting_100000_deep": Case([deep_json(100_000)], {}, {"malformed_json": 1}),
    "integer_of_5000_digits": Case([b'{"query": "\xe7\x8c\xab", "n": ' + b"9" * 5000 + b"}"], {}, {"malformed_json": 1}),
    "query_is_a_list": Case([record(24, query=["可爱小猫"])], {}, {"bad_field_type": 1}),
    "alt_is_a_number": Case([record(25, alt=12345)], {}, {"bad_field_type": 1}),
    "image_is_an_object": Case([record(26, image={"path": "a.png"})], {}, {"bad_field_type": 1}),
    "nan_in_unknown_field_becomes_null": Case([b'{"query": "\xe5\x8f\xaf\xe7\x88\xb1\xe5\xb0\x8f\xe7\x8c\xab", "alt": "'
                                               + "一只可爱的小猫第120号".encode() + b'", "image": "nan.png", "score": NaN, "likes": 3}'],
                                              {"nan.png": encode(picture(120))}, kept=1, check=nan_became_null),
    # ------------------------------------------------------------------ size
    "alt_of_10_mb": Case([record(27, image="x.png", alt="猫" * (10 * 2**20 // 3))], {"x.png": encode(picture(27))}, {"field_too_long": 1}),
    "line_over_the_record_limit": Case([b'{"query": "q", "blob": "' + b"A" * (2 * 2**20) + b'"}'], {}, {"record_too_large": 1},
                                       filters={"image": {"max_file_bytes": 262_144}}),
    # ------------------------------------------------------------------ URLs
    "url_schemes_other_than_http": Case([record(28, url="file:///etc/passwd"), record(29, url="javascript:alert(1)"),
                                         record(30, url="ftp://example.com/a.jpg")], {}, {"bad_url": 3}),
    "javascript_page_url": Case([record(31, page_url="javascript:alert(document.cookie)")], {}, {"bad_url": 1}),
    # ------------------------------------------------------------------ duplicates and empty files
    "duplicate_record": Case([record(0, image="good.png")], {}, {"duplicate_image": 1}),
    "empty_input_file": Case([], {"empty.jsonl": b""}),
    # ------------------------------------------------------------------ tar and Parquet dumps
    "tar_member_path_traversal": Case([], {"w.tar": tar_bytes({**tar_sample("../../evil", 40), **tar_sample("000001", 41)})},
                                      {"unsafe_image_path": 1}, kept=1, check=tar_wrote_nothing),
    "tar_member_absolute_name": Case([], {"w.tar": tar_bytes(tar_sample("/tmp/evil", 42))}, {"unsafe_image_path": 1}),
    "tar_metadata_member_over_the_limit": Case([], {"w.tar": tar_bytes({"k.txt": b"x" * (2**20 + 1), "k.json": b"{}"})},
                                               {"record_too_large": 1}, filters={"image": {"max_file_bytes": 16_384}}),
    "parquet_wrong_column_types": Case([], {"p.parquet": wrong_type_parquet()}, {"bad_field_type": 2}),
}


def build(tmp_path: Path, case: Case) -> tuple[Path, dict, str]:
    dump, out = tmp_path / "dump", tmp_path / "out"
    dump.mkdir()
    (dump / "good.png").write_bytes(encode(picture(0)))
    lines = [record(0, image="good.png"), *case.lines]
    (dump / "a.jsonl").write_bytes(b"\n".join(line if isinstance(line, bytes) else json.dumps(line, ensure_ascii=False).encode() for line in lines) + b"\n")
    for name, content in case.files.items():
        if callable(content):
            content(dump / name)
        else:
            (dump / name).write_bytes(content)
    filters = {**FILTERS, **{k: {**FILTERS.get(k, {}), **v} for k, v in case.filters.items()}}
    (tmp_path / "filters.json").write_text(json.dumps(filters))  # JSON is YAML
    code = main(["build-pairs", str(dump), "--out", str(out), "--config", str(tmp_path / "filters.json"), "--splits", "1,0,0", "--no-progress"])
    assert code == 0
    return out, json.loads((out / "report.json").read_text(encoding="utf-8")), str(dump)


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_record_is_counted_never_fatal(name, tmp_path, capsys):
    case = CASES[name]
    started = time.monotonic()
    out, report, dump = build(tmp_path, case)
    assert time.monotonic() - started < 10
    assert "Traceback" not in capsys.readouterr().err
    assert report["rejected"] == case.rejected
    assert report["kept"] == 1 + case.kept  # the good record survives its hostile neighbour
    assert report["records_read"] == report["kept"] + sum(report["rejected"].values())
    assert report["input_errors"] == []
    for reason in case.rejected:  # the report says where and why
        assert report["examples"][reason] and all(e.startswith(dump) for e in report["examples"][reason])
    if case.check:
        case.check(out, report)


def test_empty_file_is_listed_with_zero_records(tmp_path):
    _, report, dump = build(tmp_path, CASES["empty_input_file"])
    assert report["per_file"][f"{dump}/empty.jsonl"] == {"read": 0, "kept": 0, "rejected": {}}


def test_unexpected_exception_in_a_stage_is_counted_and_the_run_goes_on(tmp_path, monkeypatch):
    """The last line of defence: an exception no stage foresaw costs one record, not the run."""
    import data_tools.stages

    real, planted = data_tools.stages.process_image, encode(picture(1))

    def explode_on_planted(data, config):
        if data == planted:
            raise ZeroDivisionError("planted bug")
        return real(data, config)

    monkeypatch.setattr(data_tools.stages, "process_image", explode_on_planted)
    out, report, dump = build(tmp_path, Case([record(1, image="p.png")], {"p.png": planted}))
    assert report["rejected"] == {"unexpected_error": 1} and report["kept"] == 1
    assert report["examples"]["unexpected_error"] == [f"{dump}/a.jsonl:2: ZeroDivisionError: planted bug"]


# ---------------------------------------------------------------------- whole-command errors


def cli_error(capsys, *args: str) -> str:
    assert main(["build-pairs", *args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_directory_without_dumps_is_a_cli_error(tmp_path, capsys):
    (tmp_path / "dump").mkdir()
    (tmp_path / "dump" / "notes.txt").write_text("no records here")
    err = cli_error(capsys, str(tmp_path / "dump"), "--out", str(tmp_path / "out"))
    assert f"error: no .jsonl, .parquet or .tar files in directory: {tmp_path / 'dump'}" in err


def test_fifo_as_input_is_a_cli_error_not_a_hang(tmp_path, capsys):
    os.mkfifo(tmp_path / "crawl.jsonl")
    err = cli_error(capsys, str(tmp_path / "crawl.jsonl"), "--out", str(tmp_path / "out"))
    assert f"error: input is not a regular file or directory: {tmp_path / 'crawl.jsonl'}" in err


def test_out_under_a_file_is_a_clean_error(tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    (tmp_path / "a.jsonl").write_text("{}\n")
    assert main(["build-pairs", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "file" / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"error: Not a directory: {tmp_path / 'file' / 'out'}" in err and "Traceback" not in err


@pytest.fixture()
def good_dump(tmp_path) -> Path:
    (tmp_path / "good.png").write_bytes(encode(picture(0)))
    (tmp_path / "a.jsonl").write_text(json.dumps(record(0, image="good.png"), ensure_ascii=False) + "\n", encoding="utf-8")
    return tmp_path / "a.jsonl"


def test_filter_file_with_unknown_key_names_it(good_dump, tmp_path, capsys):
    (tmp_path / "filters.yaml").write_text("text:\n  max_char: 10\n")
    err = cli_error(capsys, str(good_dump), "--out", str(tmp_path / "out"), "--config", str(tmp_path / "filters.yaml"))
    assert "unknown filter config key 'text.max_char'" in err and str(tmp_path / "filters.yaml") in err


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system", "!!python/object/new:os.system", "!!python/name:os.system"])
def test_filter_file_with_python_tags_is_refused_and_runs_nothing(good_dump, tmp_path, capsys, tag):
    marker = tmp_path / "pwned"
    (tmp_path / "filters.yaml").write_text(f"text:\n  min_chars: {tag} [\"touch {marker}\"]\n")
    err = cli_error(capsys, str(good_dump), "--out", str(tmp_path / "out"), "--config", str(tmp_path / "filters.yaml"))
    assert "not a valid YAML filter config" in err and "python/" in err and "constructor" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_filter_file_alias_bomb_is_refused(good_dump, tmp_path, capsys):
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"] + [f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]" for i in range(8)]
    (tmp_path / "filters.yaml").write_text("\n".join(lines) + "\ntext:\n  fields: *i\n")
    err = cli_error(capsys, str(good_dump), "--out", str(tmp_path / "out"), "--config", str(tmp_path / "filters.yaml"))
    assert "unknown filter config key 'a'" in err


# ---------------------------------------------------------------------- safe loading


def test_data_tools_loads_nothing_that_can_run_code():
    """YAML only through safe_load; tar members read in memory (never extract/extractall); no pickle, eval or exec on data."""
    forbidden = re.compile(r"\bimport pickle\b|\bpickle\.|\bmarshal\.|\bshelve\.|yaml\.(?:load|unsafe_load|full_load)\(|"
                           r"\.extractall\(|\.extract\(|\beval\(|\bexec\(|yaml\.Loader\b|yaml\.UnsafeLoader\b")
    offenders = [f"{path.name}: {match.group()}" for path in sorted(DATA_TOOLS.glob("*.py"))
                 for match in forbidden.finditer(path.read_text(encoding="utf-8"))]
    assert offenders == []
    assert "yaml.safe_load(" in (DATA_TOOLS.parent / "cnclip" / "typed_config.py").read_text(encoding="utf-8")
