"""Hostile inputs on the training side: recipes, Chinese-CLIP data files and images.

Each case ends in a clear message naming the input, or a counted skip; never a traceback, never
a silently lost record. (Crawl dumps for build-pairs: tests/test_hostile_crawl.py.)
"""

import base64
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cnclip.data import ImageTransform, decode_base64_image, load_split, read_texts
from cnclip.errors import DataError
from cnclip.skiplog import SkipLog
from cnclip.images import decode_rgb
from cnclip.models import ImagePreprocess
from cnclip.errors import ConfigError
from cnclip.recipe import load_recipe

from conftest import DEMO_RECIPE, image_bytes, write_split

# ------------------------------------------------------------------ recipes

RECIPE_CASES = {
    "unknown key": ("data: {root: d, generate: demo}\ntrain: {lrr: 1}\n", "unknown recipe key 'train.lrr'"),
    # PWNED: a path inside the test's tmp_path, which the payload would create if it ran.
    "python tag": ("run_dir: !!python/object/apply:os.system ['touch PWNED']\n", "not a valid YAML recipe"),
    "custom tag": ("run_dir: !secret x\n", "not a valid YAML recipe"),
    "list at top": ("- 1\n- 2\n", "must be a mapping"),
    "section not a mapping": ("train: 5\ndata: {root: d, generate: demo}\n", "'train': expected a mapping"),
    "wrong type": ("data: {root: d, generate: demo}\ntrain: {epochs: [1]}\n", "'train.epochs': expected int"),
    "bool as int": ("data: {root: d, generate: demo}\ntrain: {epochs: true}\n", "'train.epochs': expected int"),
    "empty file": ("", "'data.root' is required"),
    "not utf-8": (b"\xff\xfe\x00garbage", "not a valid YAML recipe"),
    "unknown generator": ("data: {root: d, generate: cats}\n", "'data.generate'"),
}


@pytest.mark.parametrize("case", sorted(RECIPE_CASES))
def test_hostile_recipe(tmp_path, case):
    text, message = RECIPE_CASES[case]
    path = tmp_path / "recipe.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.replace("PWNED", str(tmp_path / "pwned")).encode())
    with pytest.raises(ConfigError, match=message):
        load_recipe(path)
    assert not (tmp_path / "pwned").exists()


def test_the_python_tag_payload_would_really_run(tmp_path):
    """The check above can fail: an unsafe loader runs this very payload and creates the file."""
    import yaml

    text = RECIPE_CASES["python tag"][0].replace("PWNED", str(tmp_path / "pwned"))
    yaml.unsafe_load(text)
    assert (tmp_path / "pwned").exists()


def test_hostile_override_without_equals():
    with pytest.raises(ConfigError, match="must look like key=value"):
        load_recipe(DEMO_RECIPE, ["train.lr"])


def test_hostile_recipe_through_cli_has_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_dir: !!python/name:os.system\n")
    proc = subprocess.run([sys.executable, "-m", "cnclip.finetune", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and str(bad) in proc.stderr


# ------------------------------------------------------------------ Chinese-CLIP data files

GOOD = {"text_id": 1, "text": "一个红色的圆形", "image_ids": [1]}
TEXT_LINE_CASES = {
    "invalid utf-8": b'{"text_id": 2, "text": "\xc3\x28", "image_ids": [1]}',
    "nul byte": b'{"text_id": 2, "text": "a\x00b", "image_ids": [1]}',
    "not an object": b'["text_id", 2]',
    "string id": b'{"text_id": "2", "text": "x", "image_ids": [1]}',
    "bool id": b'{"text_id": true, "text": "x", "image_ids": [1]}',
    "image_ids not a list": b'{"text_id": 2, "text": "x", "image_ids": 1}',
    "blank text": b'{"text_id": 2, "text": "   ", "image_ids": [1]}',
    "truncated json": b'{"text_id": 2, "text": "x"',
    "duplicate text id": b'{"text_id": 1, "text": "again", "image_ids": [1]}',
}


@pytest.mark.parametrize("case", sorted(TEXT_LINE_CASES))
def test_hostile_text_line_is_counted_with_its_line(tmp_path, case):
    path = tmp_path / "train_texts.jsonl"
    path.write_bytes(json.dumps(GOOD, ensure_ascii=False).encode() + b"\n" + TEXT_LINE_CASES[case] + b"\n")
    skips = SkipLog()
    records = read_texts(path, skips)
    assert [r.text_id for r in records] == [1]
    assert skips.total == 1
    assert any(e.startswith(f"{path}:2") for examples in skips.examples.values() for e in examples)


def test_hostile_gigantic_caption_is_read_and_truncated_by_the_tokenizer(tmp_path, tiny_model_dir):
    from cnclip.data import tokenize
    from cnclip.models import load_tokenizer

    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"text_id": 1, "text": "红" * 200_000, "image_ids": []}) + "\n")
    (record,) = read_texts(path, SkipLog())
    tokens = tokenize(load_tokenizer(str(tiny_model_dir)), [record.text], 16)
    assert tokens["input_ids"].shape == (1, 16)


TSV_CASES = {
    "non-integer id": b"abc\tAAAA",
    "no tab": b"12345",
    "empty payload": b"7\t",
    "duplicate id": b"1\t" + base64.urlsafe_b64encode(image_bytes((0, 0, 0))),
}


@pytest.mark.parametrize("case", sorted(TSV_CASES))
def test_hostile_tsv_line_is_counted(tmp_path, case):
    write_split(tmp_path, "train", {1: image_bytes()}, [GOOD])
    with open(tmp_path / "train_imgs.tsv", "ab") as fh:
        fh.write(TSV_CASES[case] + b"\n")
    skips = SkipLog()
    split = load_split(tmp_path, "train", skips)
    assert split.images.ids == [1] and skips.total == 1
    assert "train_imgs.tsv:2" in next(iter(skips.examples.values()))[0]


def test_hostile_zero_byte_texts_file_names_the_split(tmp_path):
    write_split(tmp_path, "valid", {1: image_bytes()}, [])
    with pytest.raises(DataError, match="valid_texts.jsonl"):
        load_split(tmp_path, "valid", SkipLog())


def test_hostile_texts_pointing_only_at_missing_images(tmp_path):
    write_split(tmp_path, "train", {1: image_bytes()}, [{"text_id": 1, "text": "x", "image_ids": [404]}])
    with pytest.raises(DataError, match="no text refers to an image that exists"):
        load_split(tmp_path, "train", SkipLog())


# ------------------------------------------------------------------ images


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png(width=100_000, height=100_000) -> bytes:
    """A valid PNG header claiming a huge image, with one tiny data chunk."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b"")


def _exif_rotated_jpeg() -> bytes:
    img = Image.new("RGB", (60, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    return buf.getvalue()


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    return buf.getvalue()


def _cmyk_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(buf, format="JPEG")  # red in CMYK
    return buf.getvalue()


def _sixteen_bit_png() -> bytes:
    return _png(Image.fromarray(np.linspace(0, 65535, 100).astype(np.uint16).reshape(10, 10)))  # mode I;16


REJECTED_IMAGES = {
    "truncated jpeg": image_bytes(fmt="JPEG")[:150],
    "zero bytes": b"",
    "text file named like an image": "这不是图片".encode(),
    "decompression bomb png": _bomb_png(),
    "bomb just over our limit": _bomb_png(10_000, 9_000),
}


@pytest.mark.parametrize("case", sorted(REJECTED_IMAGES))
def test_hostile_image_is_refused_with_a_reason(case):
    with pytest.raises(ValueError, match="undecodable image|image too large"):
        decode_rgb(REJECTED_IMAGES[case])


def test_hostile_invalid_base64_payload():
    with pytest.raises(ValueError, match="invalid base64|undecodable"):
        decode_base64_image(b"!!!not base64!!!")


def test_hostile_cmyk_jpeg_becomes_rgb_red():
    r, g, b = decode_rgb(_cmyk_jpeg()).getpixel((10, 10))
    assert r > 200 and g < 60 and b < 60


def test_hostile_sixteen_bit_png_is_scaled_not_clipped():
    arr = np.asarray(decode_rgb(_sixteen_bit_png()))
    assert arr.dtype == np.uint8 and arr[0, 0, 0] == 0 and arr[-1, -1, 0] == 255
    assert 100 < arr[5, 0, 0] < 160  # mid-range stays mid-grey instead of saturating to white


def test_hostile_animated_gif_uses_first_frame():
    assert decode_rgb(_animated_gif()).getpixel((5, 5)) == (255, 0, 0)


def test_hostile_exif_rotation_is_applied():
    assert decode_rgb(_exif_rotated_jpeg()).size == (20, 60)


def test_hostile_one_by_twenty_thousand_image_is_squashed_like_the_checkpoint():
    transform = ImageTransform(ImagePreprocess.from_dict({"size": {"height": 32, "width": 32},
                                                           "do_center_crop": False}))
    img = decode_rgb(_png(Image.new("RGB", (1, 20000), (0, 255, 0))))
    pixels = transform([img])
    assert pixels.shape == (1, 3, 32, 32) and torch.isfinite(pixels).all()


def test_hostile_one_by_twenty_thousand_image_under_a_shortest_edge_config_is_bounded():
    """shortest_edge 224 would resize 1x20000 to 224x4,480,000 (3 GB); only the centre crop is made."""
    import tracemalloc

    from cnclip.data import MAX_RESIZED_PIXELS

    transform = ImageTransform(ImagePreprocess.from_dict({"size": {"shortest_edge": 224},
                                                           "crop_size": {"height": 224, "width": 224}}))
    img = decode_rgb(_png(Image.new("RGB", (1, 20000), (0, 255, 0))))
    tracemalloc.start()
    try:
        pixels = transform([img])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert pixels.shape == (1, 3, 224, 224)
    assert peak < 50e6 < 224 * 4_480_000 * 3
    green = transform([Image.new("RGB", (224, 224), (0, 255, 0))])
    assert (pixels - green).abs().max().item() < 1e-5
    no_crop = ImageTransform(ImagePreprocess.from_dict({"size": {"shortest_edge": 224}, "do_center_crop": False}))
    with pytest.raises(ValueError, match=f"image too elongated: 1x20000 .*limit {MAX_RESIZED_PIXELS}"):
        no_crop([img])


def test_hostile_bounded_resize_stays_close_to_the_full_resize(monkeypatch):
    """Past the limit only the crop's region is resized: the same image, up to filter rounding."""
    import cnclip.images

    transform = ImageTransform(ImagePreprocess.from_dict({"size": {"shortest_edge": 36},
                                                           "crop_size": {"height": 32, "width": 32}}))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in ((33, 120), (500, 375))]
    full = transform(images)
    monkeypatch.setattr(cnclip.images, "MAX_RESIZED_PIXELS", 100)  # the PIL part lives there
    bounded = transform(images)
    level = 1 / 255 / 0.26
    assert (bounded - full).abs().mean().item() < 1.5 * level and (bounded - full).abs().max().item() < 20 * level


@pytest.mark.parametrize("prefix", ["", "data:image/png;base64,", "data:image/jpeg;base64,", "data:,"])
@pytest.mark.parametrize("cut", [0, 1, 2, 3])
def test_hostile_from_hf_base64_cell_padding_is_the_payloads(prefix, cut):
    """from-hf image cells: base64 with its padding stripped, bare or as a data: URI of any length."""
    from data_tools.hf_dataset import image_bytes_of

    raw = image_bytes() + b"x" * cut  # payload lengths of every remainder mod 3
    text = prefix + base64.b64encode(raw).decode().rstrip("=")
    assert image_bytes_of(text, None) == raw


def test_hostile_corrupt_images_in_a_split_are_counted_during_caching(tmp_path, tiny_model_dir):
    from cnclip.runtime import pick_runtime
    from cnclip.image_cache import split_image_features
    from cnclip.models import image_tower_fingerprint, load_clip, load_image_preprocess

    images = {1: image_bytes(), 2: REJECTED_IMAGES["truncated jpeg"], 3: _bomb_png(), 4: _cmyk_jpeg()}
    write_split(tmp_path, "train", images, [{"text_id": 1, "text": "x", "image_ids": [1, 2, 3, 4]}])
    skips = SkipLog()
    split = load_split(tmp_path, "train", skips)
    clip = load_clip(str(tiny_model_dir)).eval()
    features = split_image_features(split.images, clip, ImageTransform(load_image_preprocess(str(tiny_model_dir))),
                                    image_tower_fingerprint(clip), pick_runtime("cpu", "fp32"), str(tmp_path / "c"),
                                    8, 0, skips)
    assert features.ids == [1, 4]
    assert skips.counts == {"undecodable image": 2}
    assert set(features.bad) == {2, 3}
