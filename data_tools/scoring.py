"""Model stage of build-pairs: Chinese-CLIP image and text embeddings of every accepted record.

With `--model`, every record that passed the per-record stages gets
* its image embedding, computed through cnclip's image-embedding cache (cnclip.image_cache) over
  the JPEGs in DIR/.work: batched, on the GPU when there is one, resumable part by part, and
  reused by any later run with the same model and records (e.g. to try another threshold);
* the cosine similarity of its image and caption embeddings (the CLIP score), stored with the
  pair in the output's meta and filtered by `--min-similarity` / `--keep-top` (select_by_similarity).
The model is loaded the way cnclip loads one for inference (cnclip.inference.load_for_inference):
a base model id or directory, `modelscope:<id>`, or a fine-tuning run directory.
The image embeddings also drive semantic dedup and the semantic part of split grouping.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import math
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnclip.errors import DataError, UsageError
from data_tools.semantic import normalise

HISTOGRAM_BINS = 20  # equal-width bins over [min, max] of the scores, for choosing a threshold


@dataclass(frozen=True)
class ScoringOptions:
    model: str  # what cnclip accepts as model.base, or a run directory
    min_similarity: float | None = None  # drop pairs scoring below this
    keep_top: float | None = None  # keep this fraction of the best-scoring pairs (0 < f <= 1)
    per_query: bool = False  # apply keep_top within each query instead of over all pairs
    cache_dir: Path | None = None  # image-embedding cache; None: DIR/.work/image_features
    device: str = "auto"
    precision: str = "fp32"  # fp32 keeps scores identical on CPU and GPU (thresholds carry over)
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.keep_top is not None and not 0.0 < self.keep_top <= 1.0:
            raise UsageError(f"--keep-top must be a fraction in (0, 1], got {self.keep_top}")
        if self.per_query and self.keep_top is None:
            raise UsageError("--similarity-per-query applies to --keep-top; give --keep-top FRACTION")


@dataclass
class Embeddings:
    images: np.ndarray  # (n, d) float32, L2-normalised, row i = accepted record i
    similarity: np.ndarray  # (n,) float32 cosine(image, caption)
    model: str


class WorkImages:
    """The accepted records' JPEGs in DIR/.work shards, as a cnclip ImageSource (ids 0..n-1 in input order).

    Shards are uncompressed Parquet, read memory-mapped one shard at a time, so the cache's
    sequential reads cost no copies.
    """

    def __init__(self, shard_paths: list[Path], counts: list[int], shas: list[bytes], identity: str) -> None:
        self.path = shard_paths[0].parent if shard_paths else Path(".")
        self._paths = shard_paths
        self._starts = np.cumsum([0] + counts[:-1]).tolist() if counts else []
        self.ids = list(range(sum(counts)))
        digest = hashlib.blake2b(identity.encode(), digest_size=16)
        for sha in shas:
            digest.update(sha)
        self.fingerprint = digest.hexdigest()
        self._loaded: tuple[int, Any] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def read(self, image_id: int) -> bytes:
        import pyarrow.parquet as pq

        shard = bisect_right(self._starts, image_id) - 1
        if self._loaded is None or self._loaded[0] != shard:
            column = pq.read_table(self._paths[shard], columns=["jpeg"], memory_map=True).column("jpeg")
            self._loaded = (shard, column)
        return base64.urlsafe_b64encode(self._loaded[1][image_id - self._starts[shard]].as_py())

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_loaded"] = None
        return state


def embed_records(images: WorkImages, texts: list[str], options: ScoringOptions, default_cache: Path,
                  progress: bool) -> Embeddings:
    """Image embeddings (through the cache) and image-text similarities of every accepted record."""
    from cnclip.global_state import exact_float32
    from cnclip.inference import load_for_inference
    from cnclip.runtime import pick_runtime

    loaded = load_for_inference(options.model)
    runtime = pick_runtime(options.device, options.precision)
    # fp32 means fp32 on a GPU too (no TF32), so scores match the CPU's; only for this call, not the process
    with exact_float32() if runtime.autocast_dtype is None else contextlib.nullcontext():
        return _embed(images, texts, options, default_cache, progress, loaded, runtime)


def _embed(images: WorkImages, texts: list[str], options: ScoringOptions, default_cache: Path, progress: bool,
           loaded: Any, runtime: Any) -> Embeddings:
    import torch
    from tqdm import tqdm

    from cnclip.data import ImageTransform, tokenize
    from cnclip.image_cache import split_image_features
    from cnclip.models import encode_texts, image_tower_fingerprint
    from cnclip.skiplog import SkipLog

    clip = loaded.clip.to(runtime.device).train(False)  # inference mode (dropout off)
    skips = SkipLog()
    features = split_image_features(images, clip, ImageTransform(loaded.preprocess), image_tower_fingerprint(clip),
                                    runtime, str(options.cache_dir or default_cache), options.batch_size, 0, skips)
    if features.bad or len(features.ids) != len(images):
        raise DataError(f"image embeddings: {len(features.bad)} stored images could not be decoded; delete the "
                        f"work directory {images.path.parent} and rerun")
    order = torch.tensor([features.row[i] for i in images.ids], dtype=torch.long)
    image_emb = normalise(features.embeddings[order].numpy())
    context = loaded.recipe.data.context_length if loaded.recipe is not None else 52
    text_emb = np.zeros_like(image_emb)
    batch = options.batch_size
    with torch.no_grad(), runtime.autocast():
        for start in tqdm(range(0, len(texts), batch), desc="caption embeddings", unit="batch", disable=not progress):
            tokens = tokenize(loaded.tokenizer, texts[start:start + batch], context)
            length = int(tokens["attention_mask"].sum(1).max())
            tokens = {k: v[:, :length].to(runtime.device) for k, v in tokens.items()}
            emb = encode_texts(clip, **tokens)
            text_emb[start:start + batch] = emb.float().cpu().numpy()
    text_emb = normalise(text_emb)
    similarity = np.einsum("nd,nd->n", image_emb, text_emb).astype(np.float32)
    return Embeddings(image_emb, similarity, options.model)


def select_by_similarity(similarity: np.ndarray, queries: list[str], options: ScoringOptions) -> np.ndarray:
    """Boolean mask of the records that pass --min-similarity and --keep-top (global or per query).

    keep_top keeps ceil(fraction * n) records of each pool (all records, or each query's), the
    highest scores first; ties at the boundary are broken by input order.
    """
    keep = np.ones(len(similarity), dtype=bool)
    if options.min_similarity is not None:
        keep &= similarity >= options.min_similarity
    if options.keep_top is not None:
        pools: dict[str, list[int]] = {}
        if options.per_query:
            for i, query in enumerate(queries):
                pools.setdefault(query, []).append(i)
        else:
            pools[""] = list(range(len(similarity)))
        top = np.zeros(len(similarity), dtype=bool)
        for members in pools.values():
            members_a = np.asarray(members)
            ranked = members_a[np.argsort(-similarity[members_a], kind="stable")]
            top[ranked[:math.ceil(options.keep_top * len(members_a))]] = True
        keep &= top
    return keep


def histogram(similarity: np.ndarray, bins: int = HISTOGRAM_BINS) -> dict[str, Any]:
    """Counts of the scores in equal-width bins, with the quantiles a threshold is usually chosen from."""
    if len(similarity) == 0:
        return {"count": 0, "edges": [], "counts": []}
    counts, edges = np.histogram(similarity, bins=bins)
    quantiles = np.quantile(similarity, [0.1, 0.25, 0.5, 0.75, 0.9])
    return {
        "count": int(len(similarity)),
        "min": round(float(similarity.min()), 6),
        "max": round(float(similarity.max()), 6),
        "mean": round(float(similarity.mean()), 6),
        "quantiles": {q: round(float(v), 6) for q, v in zip(("p10", "p25", "p50", "p75", "p90"), quantiles)},
        "edges": [round(float(e), 6) for e in edges],
        "counts": counts.tolist(),
    }
