"""Decode untrusted image bytes into 8-bit RGB, safely.

Shared by training (cnclip.data) and pair building (data_tools), so an image means the same thing
to both: EXIF orientation applied, 16-bit scaled (not clipped) to 8 bits, transparency flattened
onto white (as transformers' convert_to_rgb does), and the pixel count checked from the header
before a single pixel is decoded, so a decompression bomb cannot exhaust memory. Converting a 16-bit
image costs about 3 bytes a pixel beside Pillow's own copy (integer division in place, not float64).
A caller with a tighter budget (the search page's uploads) can ask for a large JPEG to be decoded at
1/2, 1/4 or 1/8 scale instead of refused (`shrink_jpeg`).
"""

from __future__ import annotations

import base64
import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


def decode_base64(payload: str | bytes) -> bytes:
    """Base64 from any source we read (TSV, pairs JSONL, data URIs, crawl fields), with or without padding.

    `urlsafe_b64decode` also accepts the standard alphabet; plain `b64decode` would silently drop `-`
    and `_`. The padding is computed on `payload` itself, so strip a data URI's prefix first.
    Raises binascii.Error (a ValueError) on bad input.
    """
    pad = -len(payload) % 4
    return base64.urlsafe_b64decode(payload + ("=" * pad if isinstance(payload, str) else b"=" * pad))

# Pillow's own default bomb limit (~89 MP), enforced by us from the header.
MAX_PIXELS = 89_478_485

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class ImageTooLarge(ValueError):
    """The header announces more pixels than the caller's budget: refused before decoding."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is flattened onto white, as shops display it."""
    if image.mode == "RGB":
        return image
    # 16-bit range onto 8 bits as floor(v / 257); Pillow's convert would clip to white. Worked in the
    # image's own type, never float64: that and its temporaries cost 24 bytes a pixel, 2 GB for an
    # 81-megapixel 16-bit PNG of 180 kB.
    if image.mode in _SIXTEEN_BIT_MODES:
        eight_bit = np.empty((image.height, image.width), np.uint8)
        np.floor_divide(np.asarray(image), 257, out=eight_bit, casting="unsafe")  # 65535 // 257 = 255
        return Image.fromarray(eight_bit).convert("RGB")
    if image.mode in ("I", "F"):
        pixels = np.array(image)  # 32-bit values, changed in place
        if pixels.max(initial=0) > 255:
            if pixels.dtype.kind == "f":
                pixels /= 257
            else:
                pixels //= 257
        np.clip(pixels, 0, 255, out=pixels)
        return Image.fromarray(pixels.astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        return _flatten_onto_white(image)
    return image.convert("RGB")


def _flatten_onto_white(image: Image.Image, band_pixels: int = 1 << 22) -> Image.Image:
    """Composite onto white a band of rows at a time: the three RGBA temporaries cost a band, not the image.

    Whole-image, they cost 12 bytes a pixel beside the source (760 MB for a 40-megapixel RGBA PNG); the
    result is the same pixel for pixel, since compositing is per pixel and crop keeps the transparency info.
    """
    out = Image.new("RGB", image.size)
    rows = max(1, band_pixels // max(1, image.width))
    for top in range(0, image.height, rows):
        box = (0, top, image.width, min(image.height, top + rows))
        rgba = image.crop(box).convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        out.paste(Image.alpha_composite(background, rgba).convert("RGB"), box[:2])
    return out


def decode_rgb(raw: bytes, max_pixels: int = MAX_PIXELS, *, shrink_jpeg: bool = False) -> Image.Image:
    """Bytes -> upright RGB image (first frame of an animation); ValueError with a short reason.

    More than `max_pixels` raises ImageTooLarge (a ValueError) before decoding, unless `shrink_jpeg`
    lets a JPEG that is over it be decoded at the largest DCT scale (1/2, 1/4, 1/8) that fits.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            img = Image.open(io.BytesIO(raw))
            if shrink_jpeg:
                _draft_within(img, max_pixels)
            width, height = img.size
            if width * height > max_pixels:
                raise ImageTooLarge(f"image too large: {width}x{height} pixels (limit {max_pixels})")
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # without in_place, an upright image is copied whole
            return to_rgb(img)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image too large: {exc}") from None
    except UnidentifiedImageError:  # its message holds a memory address: keep reports reproducible
        raise ValueError("undecodable image: not a recognised image format") from None
    except ValueError:
        raise
    except Exception as exc:  # Pillow raises OSError, SyntaxError, struct.error, ... on bad data
        raise ValueError(f"undecodable image: {describe_decode_error(exc)}") from None


def describe_decode_error(exc: BaseException) -> str:
    """`OSError: image file is truncated (3 bytes not processed)`: the type and Pillow's own words, on one line."""
    words = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {words}" if words else type(exc).__name__


def _draft_within(img: Image.Image, max_pixels: int) -> None:
    """Ask a JPEG decoder over `max_pixels` for the mildest scale (1/2, 1/4, 1/8) that fits; others unchanged.

    libjpeg then decodes only that many pixels, so the full-size image never exists in memory; at 1/8
    a JPEG can still be over, and decode_rgb refuses it from the new size.
    """
    width, height = img.size
    if img.format not in ("JPEG", "MPO") or width * height <= max_pixels:
        return
    scale = next((s for s in (2, 4, 8) if -(-width // s) * -(-height // s) <= max_pixels), 8)
    img.draft(None, (max(1, width // scale), max(1, height // scale)))
