"""Readers for the Chinese-CLIP data layout, image preprocessing and tokenizing.

Layout (MUGE / Flickr30K-CN / COCO-CN as distributed for Chinese-CLIP), per split:
  {split}_imgs.tsv     image_id<TAB>base64(image bytes)     (urlsafe or standard alphabet)
  {split}_texts.jsonl  {"text_id": 8428, "text": "...", "image_ids": [1076345, 517602]}

Bad input never stops a run silently or with a traceback: every skipped line or image is
counted with its file and line in a SkipLog, which the caller reports. The images file itself is
read by `cnclip.image_sources.ImageTSV`.
"""

from __future__ import annotations

import binascii
import logging
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import ConfigError, DataError
from .data_formats import open_split
from .image_sources import ImageSource, ImageTSV
# MAX_RESIZED_PIXELS is re-exported: it was defined here before the PIL part moved to cnclip.images.
from .images import MAX_RESIZED_PIXELS, ImagePreprocess, ImageResize, decode_base64, decode_rgb  # noqa: F401
from .skiplog import SkipLog
from .texts import TextRecord, read_texts  # noqa: F401 (re-exported: they were defined here)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- images (TSV)


def decode_base64_image(payload: bytes) -> Image.Image:
    """Decode one TSV payload into an RGB image; raises ValueError with a short reason."""
    try:
        raw = decode_base64(payload)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"invalid base64: {exc}") from None
    return decode_rgb(raw)


# ---------------------------------------------------------------- texts (JSONL)


@dataclass
class Split:
    """One split: its images (by id) and its texts, with dangling image ids removed and counted."""

    name: str
    images: ImageSource  # ImageTSV, or a reader of cnclip.data_formats
    texts: list[TextRecord]
    labelled: bool


def load_split(root: str | Path, split: str, skips: SkipLog, fmt: str = "cnclip", image_column: str = "image",
               text_column: str = "text") -> Split:
    """One split in any `data.format` (cnclip.data_formats): the cnclip layout here, the others there."""
    if fmt == "cnclip":
        root = Path(root)
        images = ImageTSV(root / f"{split}_imgs.tsv", skips)
        texts_path = root / f"{split}_texts.jsonl"
        texts = read_texts(texts_path, skips)
    else:
        images, tuples, texts_path = open_split(fmt, root, split, skips, image_column, text_column)
        texts = [TextRecord(*fields) for fields in tuples]
    if not texts:
        raise DataError(f"split '{split}' has no usable texts: {texts_path}")
    if not images.ids:
        raise DataError(f"split '{split}' has no images: {images.path}")
    labelled = any(rec.image_ids for rec in texts)
    kept = []
    for rec in texts:
        present = tuple(i for i in rec.image_ids if i in images)
        for missing in (i for i in rec.image_ids if i not in images):
            skips.skip("image id without image", f"{texts_path} text_id {rec.text_id}",
                       f"image {missing} not in {images.path.name}")
        if rec.image_ids and not present:
            continue  # every image of this text is missing: the text is unusable (counted above)
        kept.append(TextRecord(rec.text_id, rec.text, present))
    if not kept:
        raise DataError(f"split '{split}': no text refers to an image that exists in {images.path}")
    return Split(split, images, kept, labelled)


def load_data_split(data, split: str, skips: SkipLog) -> Split:
    """A split as a recipe's `data` section describes it (root, format, hf columns)."""
    return load_split(data.root, split, skips, data.format, data.image_column, data.text_column)


# ---------------------------------------------------------------- preprocessing


class ImageTransform(ImageResize):
    """The checkpoint's image preprocessing: the per-image PIL part (cnclip.images.ImageResize, torch-free) and
    a batched tensor part.

    Equal to transformers' ChineseCLIPImageProcessor for the same preprocessor_config.json:
    PIL resize with the configured filter, integer-offset centre crop, rescale, normalise.
    """

    def __init__(self, cfg: ImagePreprocess):
        super().__init__(cfg)
        self.mean = torch.tensor(cfg.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.std, dtype=torch.float32).view(1, 3, 1, 1)

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 NxHxWx3 -> float32 Nx3xHxW, rescaled and normalised (works on any device)."""
        x = batch.permute(0, 3, 1, 2).float() * self.cfg.rescale_factor
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        return self.normalize(torch.from_numpy(np.stack([self.pil_to_array(i) for i in images])))


class ImageArrays(torch.utils.data.Dataset):
    """Decoded, resized images of a TSV for the embedding cache; a bad image yields None."""

    def __init__(self, images: ImageTSV, ids: list[int], transform: ImageTransform):
        self.images, self.ids, self.transform = images, ids, transform

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        image_id = self.ids[i]
        try:
            return image_id, self.transform.pil_to_array(decode_base64_image(self.images.read(image_id))), ""
        except ValueError as exc:
            return image_id, None, str(exc)


def collate_image_arrays(items):
    ids = [i for i, arr, _ in items if arr is not None]
    arrays = [arr for _, arr, _ in items if arr is not None]
    bad = [(i, err) for i, arr, err in items if arr is None]
    batch = torch.from_numpy(np.stack(arrays)) if arrays else None
    return ids, batch, bad


# ---------------------------------------------------------------- text


def preprocess_text(text: str) -> str:
    """What Chinese-CLIP does to every caption before tokenising, in training and in evaluation
    (cn_clip/training/data.py, cn_clip/eval/data.py): lower-case, and curly quotes “ ” become "."""
    return text.lower().replace("“", '"').replace("”", '"')


TOKENIZE_CHUNK = 8192  # captions per tokenizer call: its Python lists of ids for a chunk, never for the whole split


def tokenize(tokenizer, texts: list[str], context_length: int, compact: bool = False) -> dict[str, torch.Tensor]:
    """Pad every caption to the same length once, so batches are plain row gathers.

    The one place cnclip tokenises (training, evaluation, zero-shot, search): captions go through
    `preprocess_text` first, as in Chinese-CLIP. The tokenizer sees TOKENIZE_CHUNK captions at a time,
    so its per-token Python objects stay bounded however many captions there are. `compact` stores
    the rows in the smallest integer types that hold them (`compact_tokens`: 4 bytes per token for a
    Chinese BERT vocabulary instead of 24); `gather_tokens` widens each batch back to int64."""
    chunks = []
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        enc = tokenizer(
            [preprocess_text(t) for t in texts[start:start + TOKENIZE_CHUNK]], padding="max_length", truncation=True,
            max_length=context_length, return_tensors="pt"
        )
        chunk = {name: enc[name] for name in ("input_ids", "attention_mask", "token_type_ids") if name in enc}
        chunks.append(compact_tokens(chunk) if compact else chunk)
    if not chunks:  # no captions: the tokenizer's own empty output
        enc = tokenizer([], padding="max_length", truncation=True, max_length=context_length, return_tensors="pt")
        chunks.append({name: enc[name] for name in ("input_ids", "attention_mask", "token_type_ids") if name in enc})
    if len(chunks) == 1:
        return chunks[0]
    names = chunks[0].keys()
    dtypes = {name: _widest(chunk[name].dtype for chunk in chunks) for name in names}  # compact chunks may differ
    return {name: torch.cat([chunk[name].to(dtypes[name]) for chunk in chunks]) for name in names}


_INTEGER_TYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)  # each holds every value of the ones before


def _widest(dtypes) -> torch.dtype:
    return max(dtypes, key=_INTEGER_TYPES.index)


def compact_tokens(tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same values in the smallest of uint8/int16/int32/int64 that holds each tensor's range: ids of
    a vocabulary under 32768 take 2 bytes, the 0/1 masks 1 byte."""
    out = {}
    for name, values in tokens.items():
        lo, hi = (int(values.min()), int(values.max())) if values.numel() else (0, 0)
        for dtype in _INTEGER_TYPES:
            info = torch.iinfo(dtype)
            if info.min <= lo and hi <= info.max:
                out[name] = values.to(dtype)
                break
    return out


def check_context_length(clip, context_length: int) -> None:
    """Refuse a context longer than the text tower has position embeddings for (512 for Chinese-CLIP's
    BERTs): beyond it the tower cannot embed the tokens. Anything up to it is accepted."""
    limit = clip.config.text_config.max_position_embeddings
    if context_length > limit:
        raise ConfigError(f"recipe key 'data.context_length' is {context_length}, more than the text tower's "
                          f"max_position_embeddings ({limit}); use at most {limit}")


def gather_tokens(tokens: dict[str, torch.Tensor], rows: torch.Tensor, device) -> dict[str, torch.Tensor]:
    """Rows of the pre-tokenised captions, trimmed to the longest caption in this batch, as int64
    (compact storage, `compact_tokens`, is widened here, a batch at a time).

    For a GPU the rows go through pinned memory, so the copy is truly asynchronous.
    """
    length = int(tokens["attention_mask"][rows].sum(1).max())
    if torch.device(device).type != "cuda":
        return {k: v[rows, :length].to(device=device, dtype=torch.int64) for k, v in tokens.items()}
    out = {}
    for k, v in tokens.items():  # gathered straight into contiguous pinned memory: one copy, truly async
        pinned = torch.empty((rows.shape[0], length), dtype=v.dtype, pin_memory=True)
        torch.index_select(v[:, :length], 0, rows, out=pinned)
        out[k] = pinned.to(device, non_blocking=True).to(torch.int64)  # widened on the device: fewer bytes copied
    return out


def int64_tensor(values: array) -> torch.Tensor:
    """An int64 tensor over an `array("q")`'s own buffer (no copy; the tensor keeps the array alive):
    indices collected 8 bytes each instead of a Python int each."""
    return torch.from_numpy(np.frombuffer(values, dtype=np.int64))
