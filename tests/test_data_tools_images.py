"""Image stage (data_tools.images): every Pillow mode, broken files, bombs, unsafe paths."""

import base64
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools.config import ImageConfig
from data_tools.images import check_image_reference, is_base64_image, process_image, read_image_bytes
from data_tools.records import Reason, Record, Rejected

CONFIG = ImageConfig(min_side=16, max_aspect_ratio=3.0, max_pixels=1_000_000, max_side=64)


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def smooth_rgb(seed: int = 0, size=(48, 40)) -> Image.Image:
    small = np.random.default_rng(seed).integers(0, 255, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def rejection(data: bytes, config: ImageConfig = CONFIG) -> Reason:
    with pytest.raises(Rejected) as caught:
        process_image(data, config)
    return caught.value.reason


def sixteen_bit_gray(value: int, size=(40, 30)) -> Image.Image:
    return Image.frombytes("I;16", size, np.full(size[::-1], value, dtype="<u2").tobytes())


MODES = {
    "RGB": lambda: encode(smooth_rgb()),
    "RGBA": lambda: encode(smooth_rgb().convert("RGBA")),
    "P": lambda: encode(smooth_rgb().convert("P")),
    "CMYK": lambda: encode(smooth_rgb().convert("CMYK"), "JPEG"),
    "L": lambda: encode(smooth_rgb().convert("L")),
    "LA": lambda: encode(smooth_rgb().convert("LA")),
    "1": lambda: encode(smooth_rgb().convert("1")),
    "I;16": lambda: encode(sixteen_bit_gray(40000)),
    "I": lambda: encode(smooth_rgb().convert("I"), "TIFF"),
    "F": lambda: encode(smooth_rgb().convert("F"), "TIFF"),
    "webp": lambda: encode(smooth_rgb(), "WEBP"),
    "gif": lambda: encode(smooth_rgb(), "GIF"),
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_mode_becomes_an_rgb_jpeg(mode):
    data = MODES[mode]()
    result = process_image(data, CONFIG)
    image = decoded(result.jpeg)
    assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (48, 40) if mode != "I;16" else (40, 30))
    assert len(result.sha) == 16
    # pHash sees the picture's luminance: the same picture in a mode that keeps it (no palette, no
    # dithering) is a near duplicate of the RGB original; the flat 16-bit image is another picture.
    distance = (result.phash ^ process_image(MODES["RGB"](), CONFIG).phash).bit_count()
    if mode in ("RGBA", "CMYK", "L", "LA", "I", "F", "webp"):
        assert distance <= 4, distance
    elif mode == "I;16":
        assert distance > 16, distance


def test_transparency_is_flattened_onto_white():
    image = Image.new("RGBA", (32, 32), (255, 0, 0, 0))  # fully transparent red
    out = decoded(process_image(encode(image), CONFIG).jpeg)
    assert np.asarray(out).min() > 245


def test_sixteen_bit_is_scaled_not_clipped():
    out = decoded(process_image(encode(sixteen_bit_gray(32768)), CONFIG).jpeg)
    assert 120 < np.asarray(out).mean() < 135  # mid-grey, not saturated white


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (60, 40), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    result = process_image(encode(image, "JPEG", exif=exif), CONFIG)
    assert (result.width, result.height) == (40, 60)


def test_resized_to_max_side_keeping_aspect_ratio():
    result = process_image(encode(smooth_rgb(size=(300, 200)), "JPEG"), CONFIG)
    assert (result.width, result.height) == (64, 43)
    kept = process_image(encode(smooth_rgb(size=(300, 200))), ImageConfig(min_side=16, max_side=0))
    assert (kept.width, kept.height) == (300, 200)


def test_same_pixels_in_different_formats_share_the_exact_hash():
    image = smooth_rgb()
    assert process_image(encode(image, "PNG"), CONFIG).sha == process_image(encode(image, "BMP"), CONFIG).sha
    jpeg_copy = process_image(encode(image, "JPEG", quality=70), CONFIG)
    original = process_image(encode(image, "PNG"), CONFIG)
    assert jpeg_copy.sha != original.sha
    assert (jpeg_copy.phash ^ original.phash).bit_count() <= 4  # but a near duplicate


def test_truncated_jpeg():
    data = encode(smooth_rgb(size=(200, 150)), "JPEG")
    assert rejection(data[: len(data) // 2]) is Reason.UNDECODABLE_IMAGE


def test_garbage_bytes():
    assert rejection(b"definitely not an image") is Reason.UNDECODABLE_IMAGE


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with no pixel data at all."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def test_png_bomb_header_is_rejected_before_decoding():
    assert rejection(png_header_only(100_000, 100_000)) is Reason.IMAGE_TOO_LARGE  # Pillow's own bomb limit
    assert rejection(png_header_only(2_000, 2_000)) is Reason.IMAGE_TOO_LARGE  # our max_pixels


def test_size_rules():
    assert rejection(encode(smooth_rgb(size=(10, 40)))) is Reason.IMAGE_TOO_SMALL
    assert rejection(encode(smooth_rgb(size=(200, 40)))) is Reason.EXTREME_ASPECT_RATIO


def record_with(image, base_dir=Path("."), url=None) -> Record:
    return Record(location="dump.jsonl:1", base_dir=base_dir, query="q", image=image, url=url)


@pytest.mark.parametrize(
    "path",
    ["/etc/passwd", "../secret.png", "images/../../secret.png", "..\\secret.png", "C:\\images\\a.png", "C:a.png"],
)
def test_unsafe_paths_are_rejected_without_touching_the_disk(path):
    with pytest.raises(Rejected) as caught:
        check_image_reference(record_with(path))
    assert caught.value.reason is Reason.UNSAFE_IMAGE_PATH


def test_symlink_escaping_the_dump_is_rejected(tmp_path):
    dump, outside = tmp_path / "dump", tmp_path / "outside.png"
    dump.mkdir()
    outside.write_bytes(encode(smooth_rgb()))
    os.symlink(outside, dump / "link.png")
    record = record_with("link.png", base_dir=dump)
    check_image_reference(record)  # looks harmless...
    with pytest.raises(Rejected) as caught:
        read_image_bytes(record, CONFIG)  # ...but resolves outside
    assert caught.value.reason is Reason.UNSAFE_IMAGE_PATH


def test_relative_path_inside_the_dump(tmp_path):
    (tmp_path / "images").mkdir()
    data = encode(smooth_rgb())
    (tmp_path / "images" / "a.png").write_bytes(data)
    assert read_image_bytes(record_with("images/a.png", base_dir=tmp_path), CONFIG) == data
    with pytest.raises(Rejected) as caught:
        read_image_bytes(record_with("images/missing.png", base_dir=tmp_path), CONFIG)
    assert caught.value.reason is Reason.IMAGE_MISSING


def test_file_size_limit(tmp_path):
    (tmp_path / "big.png").write_bytes(b"\0" * 2048)
    with pytest.raises(Rejected) as caught:
        read_image_bytes(record_with("big.png", base_dir=tmp_path), ImageConfig(max_file_bytes=1024))
    assert caught.value.reason is Reason.IMAGE_TOO_LARGE


@pytest.mark.parametrize("encoder", [base64.b64encode, base64.urlsafe_b64encode])
def test_base64_images(encoder):
    data = encode(smooth_rgb(), "JPEG")
    text = encoder(data).decode()
    assert is_base64_image(text) and not is_base64_image("images/a.jpg")
    assert read_image_bytes(record_with(text), CONFIG) == data
    assert read_image_bytes(record_with("data:image/jpeg;base64," + text), CONFIG) == data


def test_missing_image_or_only_a_url():
    for image in (None, "", "https://example.com/a.jpg"):
        with pytest.raises(Rejected) as caught:
            check_image_reference(record_with(image, url="https://example.com/a.jpg"))
        assert caught.value.reason is Reason.NO_IMAGE
