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
from dataclasses import dataclass

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


# ---------------------------------------------------------------- preprocessing for a model


@dataclass(frozen=True)
class ImagePreprocess:
    """The checkpoint's own image-processor settings (preprocessor_config.json)."""

    resize_height: int | None  # fixed (h, w) resize: Chinese-CLIP squashes to a square
    resize_width: int | None
    shortest_edge: int | None  # or resize the short side, keep aspect
    do_center_crop: bool
    crop_height: int
    crop_width: int
    resample: int
    rescale_factor: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # Where an odd centre-crop margin leaves its extra pixel: "floor" puts it after the crop (transformers'
    # integer offset, (d) // 2), "round" follows torchvision's CenterCrop (int(round(d / 2)), Python's
    # half-to-even), which open_clip's preprocessing uses (cnclip.open_clip_tower).
    crop_offset: str = "floor"

    @classmethod
    def from_dict(cls, cfg: dict) -> "ImagePreprocess":
        # Defaults are ChineseCLIPImageProcessor's class defaults, used when a key is absent.
        size = cfg.get("size", {"shortest_edge": 224})
        if isinstance(size, int):
            size = {"shortest_edge": size}
        crop = cfg.get("crop_size", {"height": 224, "width": 224})
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        has_hw = "height" in size and "width" in size
        return cls(
            resize_height=size["height"] if has_hw else None,
            resize_width=size["width"] if has_hw else None,
            shortest_edge=None if has_hw else int(size["shortest_edge"]),
            do_center_crop=bool(cfg.get("do_center_crop", True)),
            crop_height=int(crop["height"]),
            crop_width=int(crop["width"]),
            resample=int(cfg.get("resample", 3)),
            rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
            mean=tuple(cfg.get("image_mean", (0.48145466, 0.4578275, 0.40821073))),
            std=tuple(cfg.get("image_std", (0.26862954, 0.26130258, 0.27577711))),
        )

    def to_dict(self) -> dict:
        """The settings as a dict (part of the image-cache key); crop_offset only when it is not the default,
        so the keys of every transformers checkpoint's cache stay what they were."""
        from dataclasses import asdict

        out = asdict(self)
        if out["crop_offset"] == "floor":
            del out["crop_offset"]
        return out

    def crop_start(self, size: int, crop: int) -> int:
        """The first kept row (column) of a centre crop of `crop` out of `size` (see crop_offset)."""
        return int(round((size - crop) / 2.0)) if self.crop_offset == "round" else (size - crop) // 2


# The largest resize made whole (8 megapixels: any sane photo under any Chinese-CLIP config). Past it,
# only the centre crop's region is resized, or, without a centre crop, the image is refused (a 1x20000
# image under shortest_edge 224 would otherwise be resized to 1 gigapixel).
MAX_RESIZED_PIXELS = 8_000_000


class ImageResize:
    """The per-image part of the checkpoint's preprocessing, torch-free: resize and centre crop to uint8 arrays,
    and (`pixels`) the same rescale and normalisation cnclip.data.ImageTransform applies with torch.

    The ONNX runtime (cnclip.onnx_runtime) uses this class as is, so both backends see the same pixels.
    """

    def __init__(self, cfg: ImagePreprocess):
        self.cfg = cfg

    def _target_size(self, width: int, height: int) -> tuple[int, int]:
        c = self.cfg
        if c.shortest_edge is None:
            return c.resize_width, c.resize_height
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = c.shortest_edge, int(c.shortest_edge * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)

    def _crop_box(self, width: int, height: int, size: tuple[int, int]) -> tuple[tuple[int, int], tuple] | None:
        """The source region that becomes the centre crop of an image resized to `size`, or None.

        Resizing only that region to the crop's size samples the same positions at the same scale
        as resizing the whole image and cropping, without allocating the full resized image (a
        1x20000 image under shortest_edge 224 would become 224x4,480,000). Pillow orders the two
        filter passes differently for a region, so pixels can differ by a few levels of 255: used
        only where the full resize would exceed MAX_RESIZED_PIXELS.
        """
        c = self.cfg
        new_w, new_h = size
        if not c.do_center_crop or new_w < c.crop_width or new_h < c.crop_height:
            return None
        top, left = c.crop_start(new_h, c.crop_height), c.crop_start(new_w, c.crop_width)
        sx, sy = width / new_w, height / new_h
        box = (left * sx, top * sy, (left + c.crop_width) * sx, (top + c.crop_height) * sy)
        return (c.crop_width, c.crop_height), box

    def pil_to_array(self, img: Image.Image) -> np.ndarray:
        """uint8 HxWx3 after resize and crop: cheap to ship from DataLoader workers."""
        img = to_rgb(img)  # transparency onto white, as transformers' convert_to_rgb does
        size = self._target_size(*img.size)
        if size[0] * size[1] > MAX_RESIZED_PIXELS:  # bounded before resizing: only what is kept is made
            cropped = self._crop_box(*img.size, size)
            if cropped is not None:
                out_size, box = cropped
                return np.ascontiguousarray(np.asarray(img.resize(out_size, resample=self.cfg.resample, box=box)))
            raise ValueError(f"image too elongated: {img.size[0]}x{img.size[1]} would be resized to "
                             f"{size[0]}x{size[1]} (limit {MAX_RESIZED_PIXELS} pixels)")
        img = img.resize(size, resample=self.cfg.resample)
        arr = np.asarray(img)
        if self.cfg.do_center_crop:
            h, w = arr.shape[:2]
            ch, cw = self.cfg.crop_height, self.cfg.crop_width
            if h < ch or w < cw:  # smaller than the crop: pad with zeros like transformers does
                padded = np.zeros((max(h, ch), max(w, cw), 3), dtype=arr.dtype)
                top, left = (padded.shape[0] - h + 1) // 2, (padded.shape[1] - w + 1) // 2
                padded[top:top + h, left:left + w] = arr
                arr, h, w = padded, *padded.shape[:2]
            top, left = self.cfg.crop_start(h, ch), self.cfg.crop_start(w, cw)
            arr = arr[top:top + ch, left:left + cw]
        return np.ascontiguousarray(arr)

    def pixels(self, images: list[Image.Image]) -> np.ndarray:
        """PIL images -> float32 Nx3xHxW, rescaled and normalised, as ImageTransform() gives with torch."""
        return self.normalize_arrays(np.stack([self.pil_to_array(i) for i in images]))

    def normalize_arrays(self, batch: np.ndarray) -> np.ndarray:
        """uint8 NxHxWx3 (pil_to_array's) -> float32 Nx3xHxW: ImageTransform.normalize's arithmetic in numpy."""
        x = batch.transpose(0, 3, 1, 2).astype(np.float32) * np.float32(self.cfg.rescale_factor)
        mean = np.asarray(self.cfg.mean, np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(self.cfg.std, np.float32).reshape(1, 3, 1, 1)
        return np.ascontiguousarray((x - mean) / std)
