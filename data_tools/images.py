"""Image stage: find the bytes safely, check the header, decode, normalise to RGB JPEG, hash.

Crawl dumps are untrusted: `image` may point outside the dump (`../../etc/passwd`), a PNG header
may claim 100000x100000 pixels (a decompression bomb), a JPEG may be truncated. Everything that
can be decided without decoding (path, file size, header dimensions) is decided first.
"""

from __future__ import annotations

import binascii
import io
import re
import warnings
from dataclasses import dataclass
from hashlib import blake2b
from pathlib import Path, PurePosixPath, PureWindowsPath

import imagehash
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cnclip.images import decode_base64, to_rgb  # the same RGB conversion training applies to its own images
from data_tools.config import ImageConfig
from data_tools.records import Reason, Record, Rejected

_DATA_URI = re.compile(r"data:image/[\w.+-]+;base64,", re.IGNORECASE)
_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]+:")  # two letters at least: "C:" is a drive, checked first
_BASE64_TEXT = re.compile(r"[A-Za-z0-9+/_\-=\s]+")
_PHASH_SIDE = 32  # imagehash.phash: hash_size 8 x highfreq_factor 4
_MIN_BASE64_CHARS = 64  # no real image encodes shorter; paths this long without a dot are implausible
COLOUR_GRID = 4  # the colour signature is the mean chroma of each cell of a 4x4 grid
COLOUR_SIGNATURE_BYTES = COLOUR_GRID * COLOUR_GRID * 2


@dataclass(frozen=True)
class ProcessedImage:
    """What the writers and the dedup stage need from an accepted image."""

    jpeg: bytes
    sha: bytes  # content hash of the normalised image: exact duplicates regardless of file encoding
    phash: int
    colour: bytes  # colour_signature: pHash sees only luminance
    width: int
    height: int


def is_base64_image(value: str) -> bool:
    """`image` strings are either base64 (optionally a data: URI) or a relative path."""
    if _DATA_URI.match(value):
        return True
    return len(value) >= _MIN_BASE64_CHARS and "." not in value and _BASE64_TEXT.fullmatch(value) is not None


def check_image_reference(record: Record) -> None:
    """Cheap checks before any work: is there an image at all, and is its path safe to open?"""
    image = record.image
    if image is None or image == "" or image == b"":
        raise Rejected(Reason.NO_IMAGE, "only a URL; pass --download to fetch it" if record.url else "")
    if isinstance(image, bytes) or is_base64_image(image):
        return
    if image.lower().startswith(("http://", "https://")):
        raise Rejected(Reason.NO_IMAGE, "image is a URL; pass --download to fetch it")
    if PurePosixPath(image).is_absolute() or PureWindowsPath(image).drive or PureWindowsPath(image).is_absolute():
        raise Rejected(Reason.UNSAFE_IMAGE_PATH, f"absolute path: {image}")
    if ".." in re.split(r"[\\/]", image) or "\x00" in image:
        raise Rejected(Reason.UNSAFE_IMAGE_PATH, f"path escapes the dump directory: {image}")
    if scheme := _URL_SCHEME.match(image):  # file://, ftp://, javascript:, data:text/...
        raise Rejected(Reason.UNSAFE_IMAGE_PATH, f"{scheme.group().lower()} URL, not a path inside the dump: {image[:200]}")


def read_image_bytes(record: Record, config: ImageConfig) -> bytes:
    """The encoded image: decoded base64, raw bytes, or a file inside the dump's directory."""
    image = record.image
    if isinstance(image, bytes):
        data = image
    elif is_base64_image(image):
        data = _decode_base64(image, config.max_file_bytes)
    else:
        data = _read_inside(record.base_dir, image, config.max_file_bytes)
    if len(data) > config.max_file_bytes:
        raise Rejected(Reason.IMAGE_TOO_LARGE, f"{len(data)} bytes > {config.max_file_bytes}")
    return data


def _decode_base64(text: str, max_bytes: int) -> bytes:
    payload = _DATA_URI.sub("", text, count=1)
    payload = "".join(payload.split())
    if len(payload) * 3 // 4 > max_bytes:
        raise Rejected(Reason.IMAGE_TOO_LARGE, f"base64 of about {len(payload) * 3 // 4} bytes > {max_bytes}")
    try:
        return decode_base64(payload)
    except (binascii.Error, ValueError) as err:
        raise Rejected(Reason.UNDECODABLE_IMAGE, f"bad base64: {err}") from None


def _read_inside(base_dir: Path, relative: str, max_bytes: int) -> bytes:
    try:
        root = base_dir.resolve()
        path = (root / relative).resolve()
        if not path.is_relative_to(root):  # a symlink pointing out of the dump
            raise Rejected(Reason.UNSAFE_IMAGE_PATH, f"resolves outside the dump directory: {relative}")
        if not path.is_file():  # also directories, FIFOs and devices: never opened
            raise Rejected(Reason.IMAGE_MISSING, relative)
        size = path.stat().st_size
        if size > max_bytes:
            raise Rejected(Reason.IMAGE_TOO_LARGE, f"{relative}: {size} bytes > {max_bytes}")
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)  # bounded even if the file grew since stat
    except (OSError, RuntimeError) as err:  # permissions, name too long, symlink loop (RuntimeError before 3.13)
        raise Rejected(Reason.IMAGE_UNREADABLE, f"{relative[:200]}: {getattr(err, 'strerror', None) or err}") from None
    if len(data) > max_bytes:
        raise Rejected(Reason.IMAGE_TOO_LARGE, f"{relative}: more than {max_bytes} bytes")
    return data


def process_image(data: bytes, config: ImageConfig) -> ProcessedImage:
    """Decode, check and normalise one image; the returned JPEG is what training will read."""
    image = _open_checked(data, config)
    target = _target_size(image.size, config.max_side)
    try:
        if image.format == "JPEG" and target != image.size:
            image.draft(image.mode, target)  # let libjpeg decode at 1/2, 1/4 or 1/8 scale: much faster
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # without in_place, an unrotated image is copied whole
        rgb = to_rgb(image)
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, struct.error... on bad data
        raise Rejected(Reason.UNDECODABLE_IMAGE, f"{type(err).__name__}: {err}") from None
    if rgb.size != _target_size(rgb.size, config.max_side):
        # Area averaging (BOX), the downscale img2dataset applies to LAION (OpenCV INTER_AREA): alias-free
        # like bicubic, at half its cost, which is the largest single cost of a downloaded record.
        rgb = rgb.resize(_target_size(rgb.size, config.max_side), Image.Resampling.BOX)
    jpeg = encode_jpeg(rgb, config.jpeg_quality)
    return ProcessedImage(jpeg=jpeg, sha=content_hash(jpeg), phash=perceptual_hash(rgb), colour=colour_signature(rgb),
                          width=rgb.width, height=rgb.height)


def _open_checked(data: bytes, config: ImageConfig) -> Image.Image:
    """Open lazily (header only) and apply the size rules before a single pixel is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit below decides
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise Rejected(Reason.IMAGE_TOO_LARGE, str(err)) from None
    except UnidentifiedImageError:  # its message holds a memory address: keep reports reproducible
        raise Rejected(Reason.UNDECODABLE_IMAGE, "not a recognised image format") from None
    except Exception as err:  # header parsers' own errors
        raise Rejected(Reason.UNDECODABLE_IMAGE, f"{type(err).__name__}: {err}") from None
    width, height = image.size
    if width * height > config.max_pixels:
        raise Rejected(Reason.IMAGE_TOO_LARGE, f"{width}x{height} > {config.max_pixels} pixels")
    if min(width, height) < config.min_side:
        raise Rejected(Reason.IMAGE_TOO_SMALL, f"{width}x{height}, min side {config.min_side}")
    if max(width, height) / min(width, height) > config.max_aspect_ratio:
        raise Rejected(Reason.EXTREME_ASPECT_RATIO, f"{width}x{height}")
    return image


def _target_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    width, height = size
    if not max_side or max(width, height) <= max_side:
        return size
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def content_hash(jpeg: bytes) -> bytes:
    """Exact-duplicate key of the normalised pixels, whatever file format carried them.

    The JPEG encoder is deterministic, so equal normalised pixels give equal JPEG bytes; hashing
    those (~10x smaller than the raw pixels) is measurably cheaper than hashing the pixels.
    """
    return blake2b(jpeg, digest_size=16).digest()


def perceptual_hash(image: Image.Image) -> int:
    """64-bit DCT pHash as an int, so Hamming distance is `(a ^ b).bit_count()`.

    The 32x32 grey thumbnail pHash works on is made with Pillow's reducing_gap (box-reduce by an
    integer factor, then Lanczos): 5x cheaper than Lanczos from full size, and within 0-2 of the 64
    bits of it on photos (near-duplicate thresholds are 4+ bits).
    """
    thumbnail = image.convert("L").resize((_PHASH_SIDE, _PHASH_SIDE), Image.Resampling.LANCZOS, reducing_gap=2.0)
    return int(str(imagehash.phash(thumbnail)), 16)  # imagehash's own resize to 32x32 is then a no-op


def colour_signature(image: Image.Image) -> bytes:
    """Where the picture has which colour: the mean chroma (Cb, Cr of YCbCr, 0-255) of each cell of a
    4x4 grid, 32 bytes.

    pHash is computed from luminance alone, so a red and a blue version of one product photo hash
    alike; this tells them apart. Chroma leaves brightness out, so a brightened or re-encoded copy
    keeps its signature (within a few units); the grid keeps a red top over a blue skirt apart from the
    reverse. Area averaging (BOX) makes each value the mean over its whole cell.
    """
    cells = image.convert("RGB").resize((COLOUR_GRID, COLOUR_GRID), Image.Resampling.BOX).convert("YCbCr")
    return np.asarray(cells, dtype=np.uint8)[:, :, 1:].tobytes()


def colour_distance(a: np.ndarray | bytes, b: np.ndarray | bytes) -> np.ndarray:
    """The largest chroma difference over the grid cells (Euclidean in the CbCr plane, 0-255 units) of
    two colour signatures, or elementwise over rows of two (n, 32) uint8 arrays.

    The largest cell, not the mean: a colour change confined to the product (a quarter of the picture)
    must count in full, not diluted by the unchanged background.
    """
    a = np.frombuffer(a, dtype=np.uint8) if isinstance(a, bytes) else a
    b = np.frombuffer(b, dtype=np.uint8) if isinstance(b, bytes) else b
    diff = a.astype(np.int32).reshape(*a.shape[:-1], -1, 2) - b.astype(np.int32).reshape(*b.shape[:-1], -1, 2)
    return np.sqrt((diff * diff).sum(axis=-1)).max(axis=-1)
