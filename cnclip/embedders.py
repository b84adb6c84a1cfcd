"""What the search index and the search app embed with: a model behind one small interface, two backends.

* `torch` (TorchEmbedder): a run directory, model directory or hub id, loaded with transformers; images go
  through the image-embedding cache training uses (cnclip.image_cache).
* `onnx` (cnclip.onnx_runtime.OnnxEmbedder): a directory written by `cnclip export RUN --format onnx`, run
  with onnxruntime, the `tokenizers` library and Pillow only.

This module imports neither torch nor onnxruntime: cnclip.search_index.open_embedder imports the backend
asked for, so the onnx path runs where torch is not installed (`pip install "cnclip[serve]"`).

Every embedder returns float32 unit rows as numpy arrays, and names the weights it embeds with
(`fingerprint`): a search index records it and refuses a query model with other weights. A torch model
and its ONNX export share the fingerprint when the export records the weights it came from
(`source.fingerprint` in cnclip_onnx.json), whatever the export's precision.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
from PIL import Image

from .image_sources import ImageSource
from .prompts import ClassList
from .skiplog import SkipLog

BACKENDS = ("torch", "onnx")


@dataclass
class SourceEmbeddings:
    """Unit embeddings of the decodable images of an ImageSource; the others in `bad` with why."""

    ids: list
    embeddings: np.ndarray  # float32, one unit row per id
    bad: dict
    computed: bool  # False when every embedding came from a cache


class Embedder(Protocol):
    backend: str  # "torch" or "onnx"
    spec: str  # what the user named: recorded in an index, shown on the page
    fingerprint: str  # the weights: equal fingerprints embed alike
    precision: str  # "fp32", "fp16", "int8", or the torch runtime's precision
    context_length: int
    logit_scale: float  # CLIP's multiplier of cosine similarities (zero-shot probabilities)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray: ...

    def embed_source(self, source: ImageSource, cache_dir: str | None, batch_size: int, num_workers: int,
                     skips: SkipLog) -> SourceEmbeddings: ...

    def class_embeddings(self, templates: list[str], classes: ClassList) -> np.ndarray: ...


def combine_fingerprints(image: str, text: str) -> str:
    """One fingerprint for both towers (the form a search index records)."""
    return hashlib.blake2b(f"{image}:{text}".encode(), digest_size=16).hexdigest()


def unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), np.float32(1e-12))


def ensemble(text_emb: np.ndarray, owners: Sequence[int], num_classes: int) -> np.ndarray:
    """One embedding per class, as cnclip.classifier.ensemble: normalise, average per class, renormalise."""
    emb = unit_rows(text_emb)
    owner = np.asarray(owners, dtype=np.int64)
    counts = np.bincount(owner, minlength=num_classes)
    if (counts == 0).any():
        raise ValueError(f"classes without prompts: {np.flatnonzero(counts == 0).tolist()}")
    sums = np.zeros((num_classes, emb.shape[1]), np.float32)
    np.add.at(sums, owner, emb)
    return unit_rows(sums / counts[:, None])


def model_spec(model: str) -> str:
    """A model argument as an index records it: an existing path made absolute, a hub id as given."""
    return str(Path(model).resolve()) if Path(model).exists() else model


class TorchEmbedder:
    """A transformers ChineseCLIPModel (cnclip.inference.load_for_inference) on a torch device."""

    backend = "torch"

    def __init__(self, loaded, spec: str, runtime):
        from .data import ImageTransform
        from .models import image_tower_fingerprint, text_tower_fingerprint

        self.loaded, self.spec, self.runtime = loaded, spec, runtime
        self.clip = loaded.clip.to(runtime.device).eval()
        self.image_tower = image_tower_fingerprint(self.clip)
        self.fingerprint = combine_fingerprints(self.image_tower, text_tower_fingerprint(self.clip))
        self.precision = runtime.precision
        self.context_length = loaded.recipe.data.context_length if loaded.recipe else 52
        self.transform = ImageTransform(loaded.preprocess)

    @classmethod
    def load(cls, spec: str, device: str = "auto") -> "TorchEmbedder":
        from .inference import load_for_inference
        from .runtime import pick_runtime

        return cls(load_for_inference(spec, what="--model"), spec, pick_runtime(device, "auto"))

    @property
    def logit_scale(self) -> float:
        from .classifier import logit_scale_of

        return logit_scale_of(self.clip)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        from .data import tokenize
        from .models import encode_texts

        tokens = {k: v.to(self.runtime.device) for k, v in
                  tokenize(self.loaded.tokenizer, list(texts), self.context_length).items()}
        with torch.no_grad(), self.runtime.autocast():
            emb = encode_texts(self.clip, **tokens).float().cpu()
        return unit_rows(emb.numpy())

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        import torch

        from .models import encode_images

        with torch.no_grad(), self.runtime.autocast():
            emb = encode_images(self.clip, self.transform(list(images)).to(self.runtime.device)).float().cpu()
        return unit_rows(emb.numpy())

    def embed_source(self, source: ImageSource, cache_dir: str | None, batch_size: int, num_workers: int,
                     skips: SkipLog) -> SourceEmbeddings:
        """Through the image-embedding cache: a split indexed whole hits the entry training made."""
        from .image_cache import split_image_features

        features = split_image_features(source, self.clip, self.transform, self.image_tower, self.runtime,
                                        cache_dir, batch_size, num_workers, skips)
        return SourceEmbeddings(list(features.ids), unit_rows(features.embeddings.float().numpy()),
                                dict(features.bad), features.computed)

    def class_embeddings(self, templates: list[str], classes: ClassList) -> np.ndarray:
        from .classifier import class_embeddings

        return class_embeddings(self.clip, self.loaded.tokenizer, templates, classes, self.runtime,
                                self.context_length, 256).float().cpu().numpy()
