"""Embeddings from an ONNX export without torch: onnxruntime, the `tokenizers` library, Pillow and numpy.

Loads a directory written by `cnclip export RUN --format onnx --to DIR` (image_encoder.onnx,
text_encoder.onnx, tokenizer.json, cnclip_onnx.json) and embeds texts and images as the PyTorch model
does:

* Texts: cnclip.data.preprocess_text's rules as the export records them (`text_preprocess`), then the
  saved fast tokenizer ([CLS] ... [SEP]), truncated to the trained context length and right-padded with
  the recorded pad id to the longest text of the batch (the export's text encoder gives the same
  embeddings for any padding).
* Images: cnclip.images.ImageResize, the same class (resize, centre crop, rescale, normalise) the torch
  path's cnclip.data.ImageTransform extends, fed from the export's `preprocess` block; so a picture
  gives the same pixels to both backends (tests/test_onnx_runtime.py: within 1e-5, RGB, grey, RGBA, odd
  sizes) and embeddings within 1e-4 of the PyTorch model's.

Neither this module nor what it imports loads torch or transformers (checked in a subprocess by the tests).
Malformed exports raise cnclip.errors.ModelLoadError naming the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from .embedders import SourceEmbeddings, ensemble, unit_rows
from .errors import ModelLoadError
from .image_sources import ImageSource
from .images import ImagePreprocess, ImageResize, decode_base64, decode_rgb
from .prompts import ClassList, build_prompts
from .skiplog import SkipLog

log = logging.getLogger(__name__)

CONFIG_FILE = "cnclip_onnx.json"
FORMAT, FORMAT_VERSION = "cnclip-onnx", 1
TEXT_BATCH = 64


def _read_config(directory: Path) -> dict:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise ModelLoadError(f"{directory} is not an ONNX export of cnclip (no {CONFIG_FILE}); write one with "
                             f"`cnclip export RUN --format onnx --to {directory}`")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT or cfg.get("version") != FORMAT_VERSION:
        raise ModelLoadError(f"{path}: expected format {FORMAT!r} version {FORMAT_VERSION}, got "
                             f"{cfg.get('format') if isinstance(cfg, dict) else cfg!r} "
                             f"{cfg.get('version') if isinstance(cfg, dict) else ''}")
    missing = [k for k in ("embed_dim", "context_length", "preprocess", "tokenizer", "files", "logit_scale")
               if k not in cfg]
    if missing:
        raise ModelLoadError(f"{path}: missing {', '.join(missing)}")
    return cfg


def image_preprocess(block: dict) -> ImagePreprocess:
    """The export's `preprocess` block as the settings cnclip.images.ImageResize takes."""
    return ImagePreprocess.from_dict({
        "size": block["resize"], "crop_size": block["crop_size"], "do_center_crop": block["do_center_crop"],
        "resample": block["resample"], "rescale_factor": block["rescale_factor"],
        "image_mean": block["mean"], "image_std": block["std"]})


class TextPreprocess:
    """cnclip.data.preprocess_text as the export records it: lower-case, then character replacements."""

    def __init__(self, block: dict):
        self.lowercase = bool(block.get("lowercase", False))
        self.replace = dict(block.get("replace", {}))

    def __call__(self, text: str) -> str:
        if self.lowercase:
            text = text.lower()
        for old, new in self.replace.items():
            text = text.replace(old, new)
        return text


class OnnxTokenizer:
    """tokenizer.json through the `tokenizers` library: truncated to the context length, right-padded."""

    def __init__(self, directory: Path, cfg: dict):
        from tokenizers import Tokenizer

        path = directory / "tokenizer.json"
        if not path.is_file():
            raise ModelLoadError(f"{directory}: no tokenizer.json (the fast tokenizer the export saves)")
        self.tokenizer = Tokenizer.from_file(str(path))
        self.context_length = int(cfg["context_length"])
        self.tokenizer.enable_truncation(max_length=self.context_length)
        self.tokenizer.no_padding()  # padded below, to the longest text of each batch
        self.pad_id = int(cfg["tokenizer"]["pad_token_id"])
        self.add_special_tokens = bool(cfg["tokenizer"].get("add_special_tokens", True))
        self.preprocess = TextPreprocess(cfg.get("text_preprocess", {}))

    def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        encodings = self.tokenizer.encode_batch([self.preprocess(t) for t in texts],
                                                add_special_tokens=self.add_special_tokens)
        length = max(1, max(len(e.ids) for e in encodings))
        ids = np.full((len(encodings), length), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(encodings), length), dtype=np.int64)
        for row, e in enumerate(encodings):
            ids[row, :len(e.ids)] = e.ids
            mask[row, :len(e.ids)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def _files_digest(paths: Sequence[Path]) -> str:
    """The graphs' bytes, with the weights of a large tower kept beside its graph (`FILE.onnx.data`)."""
    h = hashlib.blake2b(digest_size=16)
    for path in (p for graph in paths for p in (graph, graph.with_name(graph.name + ".data")) if p.is_file()):
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


class OnnxEmbedder:
    """An ONNX export as a cnclip.embedders.Embedder (backend "onnx").

    `threads` is onnxruntime's intra-op thread count for each session (None: onnxruntime's default, one per
    core). Sessions are safe to call from several threads at once (onnxruntime's InferenceSession.run is).
    """

    backend = "onnx"

    def __init__(self, directory: str | Path, threads: int | None = None):
        import onnxruntime as ort

        self.directory = Path(directory)
        cfg = _read_config(self.directory)
        self.config = cfg
        self.spec = str(self.directory.resolve())
        self.precision = str(cfg.get("precision", "fp32"))
        self.context_length = int(cfg["context_length"])
        self.embed_dim = int(cfg["embed_dim"])
        self.logit_scale = float(cfg["logit_scale"])
        self.tokenizer = OnnxTokenizer(self.directory, cfg)
        self.resize = ImageResize(image_preprocess(cfg["preprocess"]))
        paths = [self.directory / cfg["files"][tower] for tower in ("image", "text")]
        for path in paths:
            if not path.is_file():
                raise ModelLoadError(f"{path} is missing from the ONNX export")
        # The weights the export came from, when it records them: then an index built with the torch model
        # accepts this export (same weights). Otherwise the ONNX files themselves are the weights' identity.
        source = cfg.get("source") or {}
        self.fingerprint = source.get("fingerprint") or f"onnx-{_files_digest(paths)}"
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.image_session, self.text_session = (
                ort.InferenceSession(str(p), sess_options=options, providers=["CPUExecutionProvider"]) for p in paths)
        except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph / ... on a bad file
            raise ModelLoadError(f"{self.directory}: onnxruntime cannot load the export: {exc}") from None

    @classmethod
    def load(cls, directory: str | Path, threads: int | None = None) -> "OnnxEmbedder":
        return cls(directory, threads)

    def pixels(self, images: Sequence[Image.Image]) -> np.ndarray:
        """float32 Nx3xSxS exactly as the export's image encoder expects them."""
        return self.resize.pixels(list(images))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        out = []
        for start in range(0, len(texts), TEXT_BATCH):
            tokens = self.tokenizer(texts[start:start + TEXT_BATCH])
            out.append(self.text_session.run(["text_embeds"], tokens)[0])
        return unit_rows(np.concatenate(out)) if out else np.zeros((0, self.embed_dim), np.float32)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.embed_dim), np.float32)
        return self._embed_arrays(np.stack([self.resize.pil_to_array(i) for i in images]))

    def _embed_arrays(self, arrays: np.ndarray) -> np.ndarray:
        pixel_values = self.resize.normalize_arrays(arrays)
        return unit_rows(self.image_session.run(["image_embeds"], {"pixel_values": pixel_values})[0])

    def embed_source(self, source: ImageSource, cache_dir: str | None, batch_size: int, num_workers: int,
                     skips: SkipLog) -> SourceEmbeddings:
        """Every image of `source`, `batch_size` at a time in this process; an undecodable one goes to `bad`.

        A batch holds resized uint8 crops, never whole decoded pictures. `cache_dir` and `num_workers` belong
        to the torch path (its image cache and DataLoader workers) and are not used.
        """
        ids, rows, bad = [], [], {}
        batch_ids, batch = [], []
        for position, image_id in enumerate(source.ids):
            try:
                batch.append(self.resize.pil_to_array(decode_rgb(decode_base64(source.read(image_id)))))
                batch_ids.append(image_id)
            except ValueError as exc:
                skips.skip("undecodable image", f"{source.path.name} {image_id}", str(exc))
                bad[image_id] = str(exc)
            if batch and (len(batch) >= batch_size or position == len(source.ids) - 1):
                rows.append(self._embed_arrays(np.stack(batch)))
                ids.extend(batch_ids)
                batch_ids, batch = [], []
        embeddings = np.concatenate(rows) if rows else np.zeros((0, self.embed_dim), np.float32)
        return SourceEmbeddings(ids, embeddings, bad, computed=True)

    def class_embeddings(self, templates: list[str], classes: ClassList) -> np.ndarray:
        texts, owners = build_prompts(templates, classes)
        return ensemble(self.embed_texts(texts), owners, len(classes))
