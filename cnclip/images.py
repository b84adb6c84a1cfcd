"""Decode untrusted image bytes into 8-bit RGB, safely.

Shared by training (cnclip.data) and pair building (data_tools), so an image means the same thing
to both: EXIF orientation applied, 16-bit scaled (not clipped) to 8 bits, transparency flattened
onto white (as transformers' convert_to_rgb does), and the pixel count checked from the header
before a single pixel is decoded, so a decompression bomb cannot exhaust memory.
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


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is flattened onto white, as shops display it."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        if image.mode in _SIXTEEN_BIT_MODES or pixels.max(initial=0) > 255:
            pixels = pixels / 257.0  # 16-bit range onto 8 bits; Pillow's convert would clip to white
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_rgb(raw: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Bytes -> upright RGB image (first frame of an animation); ValueError with a short reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            img = Image.open(io.BytesIO(raw))
            width, height = img.size
            if width * height > max_pixels:
                raise ValueError(f"image too large: {width}x{height} pixels (limit {max_pixels})")
            img.load()
            return to_rgb(ImageOps.exif_transpose(img))
    except Image.DecompressionBombError as exc:
        raise ValueError(f"image too large: {exc}") from None
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
