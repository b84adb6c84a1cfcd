"""A text-to-image / image-to-image search index over your own images (`cnclip search`, `cnclip serve`).

An index is a directory:

  index.json            manifest: version, the model that built it (spec and weight fingerprint),
                        context length, index kind, the indexed roots, counts
  items.jsonl           row -> {key, kind, root, ref, caption, digest, offset, length}: what row i is
  vectors.safetensors   the unit-length image embeddings, row i = item i (float32)
  faiss.index           the nearest-neighbour structure over those vectors (inner product = cosine)

Guarantees:

* Sources: a folder of images (searched recursively), a Chinese-CLIP split (`{split}_imgs.tsv`, with
  captions from `{split}_texts.jsonl`), or build-pairs output in any of its formats (that layout,
  `{split}_pairs.jsonl`, or webdataset `{split}-*.tar` shards, read in place).
  With the torch backend, images are embedded through the image-embedding cache training uses
  (cnclip.image_cache): a split indexed whole hits the cache training filled. The onnx backend embeds
  them in this process, a batch of resized crops at a time.
* Incremental: building into an existing index keeps every row whose key and content digest are
  unchanged (its stored vector is reused, never re-embedded), embeds only new or changed images, and
  drops rows whose image is gone. The faiss structure is rebuilt from the stored vectors.
* Exact below APPROXIMATE_FROM vectors (faiss IndexFlatIP), an inverted file from there on
  (IndexIVFScalarQuantizer: 8-bit codes in k-means cells, its candidates re-ranked with the stored
  float32 vectors, so every score returned is the exact cosine); measured with
  benchmarks/search_throughput.py, see docs/search.md. Indexes with an HNSW graph, which earlier
  versions built, still load and answer; updating one builds the kind `auto` picks.
* The index records the backend (torch or onnx, cnclip.embedders), the model and its weight
  fingerprint; a query with other weights is refused with a message saying which model built it. A
  torch model and an ONNX export of the same weights are interchangeable when the export records the
  weights' fingerprint (cnclip.onnx_runtime); an export that does not is accepted only by an index it
  built itself.
* This module imports no torch: the onnx backend runs without it.
* Reading an image back for a thumbnail never leaves the indexed roots: the row's stored path is
  resolved (symlinks included) and must lie inside its root, and its content must still match the
  digest recorded when it was indexed.
* Every file is written atomically: the whole directory is swapped in when complete.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .atomic import atomic_dir
from .embedders import BACKENDS, Embedder, TorchEmbedder
from .errors import DataError, UsageError
from .global_state import faiss_threads
from .image_sources import IMAGE_EXTENSIONS, ImageTSV
from .images import decode_base64
from .skiplog import SkipLog

log = logging.getLogger(__name__)
logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing is not news to a user

INDEX_VERSION = 1
MANIFEST, ITEMS, VECTORS, FAISS_FILE = "index.json", "items.jsonl", "vectors.safetensors", "faiss.index"
KINDS = ("auto", "exact", "ivf")
# From this many vectors on, "auto" builds the inverted file ("ivf") instead of the exact flat index.
# Measured with benchmarks/search_throughput.py --threads 1 (benchmarks/results/search_ivf_*.json, the
# table in docs/search.md "Exact or approximate": one faiss thread's CPU time for single queries, dim 512,
# a busy 2-core CPU): an exact query's p95 grows linearly with the count, 0.8 ms at 10k, 8.6 ms at 40k,
# 20 ms at 100k and 200 ms at 1M on clustered vectors (7.7 ms at 40k on random ones), so past about
# 40k it breaks the 10 ms a query that search at a million images keeps to. The inverted file at nprobe 16
# takes 1.05 ms p95 at 1M and finds the whole exact top 10 of clustered vectors from 40k on; below 40k the
# exact index is fast enough, builds at once and is never wrong, and it is where the inverted file has
# least to work with (94.5% at 10k clustered vectors, 10 a cluster).
APPROXIMATE_FROM = 40_000
# The inverted file: k-means splits the vectors into about IVF_CELLS_PER_ROOT * sqrt(count) cells; a
# query scans the nprobe cells whose centres are nearest to it, over 8-bit codes of the vectors (a
# quarter of their float32 size), and the IVF_REFINE * k best candidates are re-ranked by their exact
# cosine with the float32 vectors the index stores anyway, so the scores returned are exact.
IVF_CELLS_PER_ROOT, IVF_REFINE = 4, 4
# nprobe is checked on the data at build time (tune_ivf): IVF_CHECK_QUERIES queries near stored vectors
# (cosine about 0.75 to one) must find IVF_TARGET_RECALL of their exact top 10; nprobe starts at
# IVF_NPROBE and doubles up to IVF_NPROBE_MAX until they do (at a million vectors nprobe 64 took 2.6 ms p95;
# 128, not measured there, costs about twice that: still under 10 ms).
IVF_NPROBE, IVF_NPROBE_MAX, IVF_TARGET_RECALL, IVF_CHECK_QUERIES = 16, 128, 0.95, 200
# The length of a check query's random offset from its stored vector: cosine ~0.75 to it, as the benchmark's
# near queries (a closer query finds its own neighbourhood too easily to check anything).
IVF_CHECK_OFFSET = 0.9
# k-means runs IVF_TRAIN_ITERATIONS rounds on a sample of IVF_TRAIN_PER_CELL vectors a cell: faiss asks
# for at least 39 a cell, and k-means time grows with the sample (160,000 vectors at a million).
IVF_TRAIN_PER_CELL, IVF_TRAIN_ITERATIONS = 40, 10


# ---------------------------------------------------------------- the nearest-neighbour structure


def choose_kind(count: int, requested: str = "auto") -> str:
    if requested not in KINDS:
        raise UsageError(f"index kind {requested!r}: choose from {', '.join(KINDS)}")
    if requested != "auto":
        return requested
    return "ivf" if count >= APPROXIMATE_FROM else "exact"


def ivf_cells(count: int) -> int:
    """How many k-means cells an inverted file over `count` vectors gets: IVF_CELLS_PER_ROOT * sqrt(count),
    but never fewer than IVF_TRAIN_PER_CELL vectors a cell (a tiny index is one cell: an exact scan)."""
    return max(1, min(round(IVF_CELLS_PER_ROOT * count ** 0.5), count // IVF_TRAIN_PER_CELL))


def build_faiss(vectors: np.ndarray, kind: str):
    """A faiss index over unit vectors where inner product is cosine similarity; row i keeps id i.

    Search it with search_faiss, which re-ranks an inverted file's candidates exactly."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    count, dim = vectors.shape
    if kind == "exact":
        index = faiss.IndexFlatIP(dim)
    elif kind == "ivf":
        cells = ivf_cells(count)
        index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(dim), dim, cells, faiss.ScalarQuantizer.QT_8bit,
                                              faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = IVF_TRAIN_ITERATIONS
        index.cp.min_points_per_centroid = 1  # ivf_cells gives every cell IVF_TRAIN_PER_CELL but in a tiny index
        sample = min(count, IVF_TRAIN_PER_CELL * cells)
        rows = np.sort(np.random.default_rng(0).choice(count, sample, replace=False)) if sample < count else slice(None)
        index.train(vectors[rows])
        index.nprobe = min(IVF_NPROBE, cells)
    else:
        raise UsageError(f"index kind {kind!r}: choose from exact, ivf")
    if count:
        index.add(vectors)
    return index


def tune_ivf(index, vectors: np.ndarray) -> float:
    """Set the inverted file's nprobe to the smallest of IVF_NPROBE, 2 * IVF_NPROBE, ... IVF_NPROBE_MAX (or
    every cell) at which IVF_CHECK_QUERIES queries near stored vectors find IVF_TARGET_RECALL of their exact
    top 10; return the recall@10 measured at the nprobe set (below the target when no nprobe reaches it).
    A result counts as found when its cosine reaches the exact 10th one: among duplicate images, which of
    the equal copies comes back does not matter."""
    import faiss

    rng = np.random.default_rng(0)
    count, dim = vectors.shape
    queries = vectors[rng.choice(count, min(count, IVF_CHECK_QUERIES), replace=False)]
    queries = queries + IVF_CHECK_OFFSET / np.sqrt(dim) * rng.standard_normal(queries.shape, dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    k = min(10, count)
    exact, _ = faiss.knn(queries, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)
    kth = exact[:, -1:] - 1e-5  # float32 sums in another order (BLAS vs numpy) may differ in the last digits
    nprobe, last = min(IVF_NPROBE, index.nlist), min(IVF_NPROBE_MAX, index.nlist)
    while True:
        index.nprobe = nprobe
        scores, _ = search_faiss(index, "ivf", vectors, queries, k)
        recall = float(np.mean(np.sum(scores >= kth, axis=1) / k))
        if recall >= IVF_TARGET_RECALL or nprobe >= last:
            return recall
        nprobe = min(2 * nprobe, last)


def build_structure(vectors: np.ndarray, requested: str = "auto") -> tuple[str, object, dict]:
    """(kind, faiss index, what index.json records about it) for `requested` over `vectors`.

    An inverted file gets the nprobe tune_ivf finds. When no nprobe up to IVF_NPROBE_MAX finds
    IVF_TARGET_RECALL of the exact top 10 (vectors without cluster structure: uniformly random ones of
    dimension 512 found 80% at 10,000 and 35% at 100,000), "auto" builds the exact index instead and says
    so; an explicit "ivf" is kept, with a warning that names the recall."""
    kind = choose_kind(len(vectors), requested)
    index = build_faiss(vectors, kind)
    if kind != "ivf":
        return kind, index, {}
    recall = tune_ivf(index, vectors)
    info = {"cells": int(index.nlist), "nprobe": int(index.nprobe), "check_recall_at_10": round(recall, 4)}
    if recall >= IVF_TARGET_RECALL:
        return kind, index, info
    why = (f"the inverted file over {len(vectors):,} vectors finds {recall:.0%} of the exact top 10 for queries near "
           f"stored vectors even scanning {index.nprobe} of {index.nlist} cells (the target is "
           f"{IVF_TARGET_RECALL:.0%}): these embeddings do not cluster")
    if requested == "auto":
        log.warning("%s; building the exact index instead", why)
        return "exact", build_faiss(vectors, "exact"), {"ivf_rejected": info}
    log.warning("%s; --kind exact would always find the true top k", why)
    return kind, index, info


def search_faiss(index, kind: str, vectors: np.ndarray, queries: np.ndarray, k: int,
                 refine: int = IVF_REFINE) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows) of the k nearest stored vectors, each queries x k; a row of -1 where there are
    fewer than k. For "ivf" the index proposes `refine` * k candidates from its 8-bit codes and the
    stored float32 `vectors` rank them, so scores are exact cosines; other kinds answer directly
    (indexes built before "ivf" existed hold an HNSW graph and still load and search)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if kind != "ivf":
        return index.search(queries, k)
    _, candidates = index.search(queries, min(refine * k, len(vectors)))
    scores = np.einsum("qcd,qd->qc", vectors[np.maximum(candidates, 0)], queries)
    scores[candidates < 0] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    scores, rows = np.take_along_axis(scores, order, 1), np.take_along_axis(candidates, order, 1)
    if rows.shape[1] < k:  # fewer candidates than k: pad as faiss does
        pad = k - rows.shape[1]
        rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return scores, rows


# ---------------------------------------------------------------- what gets indexed


@dataclass
class Item:
    """One indexed image. `key` is unique in the index and stable across rebuilds."""

    key: str
    kind: str  # "file" (ref = path relative to root), "tsv" (ref = image id), "pairs" (ref = pair id), "tar"
    root: str  # absolute path: the folder of a file item, the TSV / JSONL file of the others
    ref: str
    caption: str
    digest: str  # blake2b of the image bytes (base64 payload for TSV / pairs)
    offset: int = 0  # byte range of the payload (TSV), line (pairs) or image member (tar) in `root`
    length: int = 0

    @property
    def label(self) -> str:
        """What a person sees under a thumbnail: the caption, else the path or id."""
        return self.caption or self.ref


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _folder_items(root: Path, skips: SkipLog) -> list[Item]:
    from tqdm import tqdm

    root = root.resolve()
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            if path.is_symlink() and not path.resolve().is_relative_to(root):
                skips.skip("symlink out of the folder", str(path))
                continue
            paths.append(path)
    items = []
    for path in tqdm(paths, desc=f"reading {root.name}", unit="img", dynamic_ncols=True, leave=False):
        try:
            data = path.read_bytes()
        except OSError as exc:
            skips.skip("unreadable file", str(path), exc.strerror or str(exc))
            continue
        ref = path.relative_to(root).as_posix()
        items.append(Item(f"file:{root}:{ref}", "file", str(root), ref, "", _digest(data)))
    return items


def _captions(texts_path: Path) -> dict[int, str]:
    """image id -> its first caption, from a `{split}_texts.jsonl` (bad lines are simply not captions)."""
    from .texts import read_texts

    captions: dict[int, str] = {}
    if texts_path.is_file():
        for record in read_texts(texts_path, SkipLog(max_examples=0)):
            for image_id in record.image_ids:
                captions.setdefault(image_id, record.text)
    return captions


def _tsv_items(tsv: Path, skips: SkipLog) -> list[Item]:
    tsv = tsv.resolve()
    images = ImageTSV(tsv, skips)
    captions = _captions(tsv.with_name(tsv.name[: -len("_imgs.tsv")] + "_texts.jsonl"))
    items = []
    for image_id in images.ids:
        offset, length = images.offsets[image_id]
        items.append(Item(f"tsv:{tsv}:{image_id}", "tsv", str(tsv), str(image_id), captions.get(image_id, ""),
                          _digest(images.read(image_id)), offset, length))
    return items


def _pairs_items(path: Path, skips: SkipLog) -> list[Item]:
    path = path.resolve()
    items, offset = [], 0
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, start=1):
            start, offset = offset, offset + len(line)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                image, pair_id = record["image"], str(record.get("id", lineno))
                if not isinstance(image, str):
                    raise TypeError("image is not a base64 string")
            except (ValueError, KeyError, TypeError) as exc:
                skips.skip("malformed pairs line", f"{path}:{lineno}", str(exc))
                continue
            items.append(Item(f"pairs:{path}:{pair_id}", "pairs", str(path), pair_id, str(record.get("text", "")),
                              _digest(image.encode()), start, len(line)))
    return items


def _tar_items(shard: Path, skips: SkipLog) -> list[Item]:
    """A webdataset shard (build-pairs --format webdataset, img2dataset): images read in place by offset."""
    from .data_formats import WebDatasetShards

    shard = shard.resolve()
    samples = WebDatasetShards([shard], skips)
    items = []
    with open(shard, "rb") as fh:
        for image_id, caption, _ in samples.texts:
            _, offset, size = samples.image_range(image_id)
            fh.seek(offset)
            items.append(Item(f"tar:{shard}:{image_id}", "tar", str(shard), str(image_id), caption,
                              _digest(fh.read(size)), offset, size))
    return items


def discover(sources: list[str | Path], split: str | None, skips: SkipLog) -> list[Item]:
    """Every image the sources hold, in a fixed order; an unusable source is a DataError naming it."""
    items: list[Item] = []
    for source in map(Path, sources):
        if not source.exists():
            raise DataError(f"source not found: {source}")
        if source.is_file():
            if source.name.endswith("_imgs.tsv"):
                found = _tsv_items(source, skips)
            elif source.name.endswith("_pairs.jsonl"):
                found = _pairs_items(source, skips)
            elif source.suffix == ".tar":
                found = _tar_items(source, skips)
            else:
                raise DataError(f"{source}: expected a folder, a {{split}}_imgs.tsv, a {{split}}_pairs.jsonl or a "
                                f"webdataset .tar")
        else:
            pattern = f"{split or '*'}"
            tsvs = sorted(source.glob(f"{pattern}_imgs.tsv"))
            pairs = sorted(source.glob(f"{pattern}_pairs.jsonl"))
            tars = sorted(source.glob(f"{pattern}-*.tar"))
            if tsvs or pairs or tars:  # a Chinese-CLIP layout or build-pairs output (any --format)
                found = ([i for f in tsvs for i in _tsv_items(f, skips)]
                         + [i for f in pairs for i in _pairs_items(f, skips)]
                         + [i for f in tars for i in _tar_items(f, skips)])
            else:
                found = _folder_items(source, skips)
        if not found:
            raise DataError(f"{source} holds no images to index (looked for {', '.join(sorted(IMAGE_EXTENSIONS))} "
                            f"files in the folder and its sub-folders, or {{split}}_imgs.tsv / _pairs.jsonl)")
        items.extend(found)
    keys: set[str] = set()
    unique = []
    for item in items:  # the same source given twice
        if item.key not in keys:
            keys.add(item.key)
            unique.append(item)
    return unique


def read_payload(item: Item) -> bytes:
    """The raw image bytes of an item, checked against its digest and kept inside its root.

    ValueError with a short reason when the image moved out of bounds, changed or cannot be read.
    """
    if item.kind == "file":
        root = Path(item.root).resolve()
        path = (root / item.ref).resolve()
        if not path.is_relative_to(root):
            raise ValueError(f"{item.ref} lies outside the indexed folder {root}")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ValueError(f"unreadable: {exc.strerror or exc}") from None
        if _digest(data) != item.digest:
            raise ValueError(f"{item.ref} changed since it was indexed; rebuild the index")
        return data
    try:
        with open(item.root, "rb") as fh:
            fh.seek(item.offset)
            chunk = fh.read(item.length)
    except OSError as exc:
        raise ValueError(f"unreadable: {exc.strerror or exc}") from None
    payload = chunk if item.kind in ("tsv", "tar") else json.loads(chunk).get("image", "").encode()
    if _digest(payload) != item.digest:
        raise ValueError(f"{item.root} changed since it was indexed; rebuild the index")
    if item.kind == "tar":
        return payload  # raw image bytes inside the tar
    return decode_base64(payload)


class ItemImages:
    """A list of items as an ImageSource (cnclip.image_sources), so the image cache can embed them."""

    def __init__(self, items: list[Item]):
        self.items = items
        self.ids = list(range(len(items)))
        self.path = Path(items[0].root) if items else Path(".")
        h = hashlib.blake2b(digest_size=16)
        for item in items:
            h.update(f"{item.key}\0{item.digest}\n".encode())
        self.fingerprint = h.hexdigest()

    def __len__(self) -> int:
        return len(self.items)

    def read(self, i: int) -> bytes:
        return base64.urlsafe_b64encode(read_payload(self.items[i]))


# ---------------------------------------------------------------- the index on disk


@dataclass
class SearchIndex:
    path: Path
    manifest: dict
    items: list[Item]
    vectors: np.ndarray  # float32, unit rows
    faiss_index: object = field(repr=False, default=None)

    def __len__(self) -> int:
        return len(self.items)

    @classmethod
    def load(cls, path: str | Path) -> "SearchIndex":
        from safetensors.numpy import load_file
        import faiss

        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise UsageError(f"{path} is not a search index (no {MANIFEST}); build one with "
                             f"`cnclip search index SOURCE --model MODEL --out {path}`")
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("version") != INDEX_VERSION:
            raise UsageError(f"{path}: index version {manifest.get('version')} is not {INDEX_VERSION}; rebuild it")
        with open(path / ITEMS, encoding="utf-8") as fh:
            items = [Item(**json.loads(line)) for line in fh if line.strip()]
        vectors = load_file(str(path / VECTORS))["vectors"]
        return cls(path, manifest, items, vectors, faiss.read_index(str(path / FAISS_FILE)))  # nprobe included

    @property
    def backend(self) -> str:
        return self.manifest["model"].get("backend", "torch")  # indexes from before the onnx backend: torch

    def check_model(self, embedder: Embedder) -> None:
        """Refuse a query model whose weights are not the ones the index was built with (backend aside)."""
        built = self.manifest["model"]
        if embedder.fingerprint != built["fingerprint"]:
            raise UsageError(
                f"model mismatch: {self.path} was built with {built['spec']!r} (backend {self.backend}, weights "
                f"{built['fingerprint'][:12]}), the query model {embedder.spec!r} (backend {embedder.backend}) has "
                f"other weights ({embedder.fingerprint[:12]}); its embeddings would not be comparable. Query with "
                f"--backend {self.backend} --model {built['spec']}, or rebuild the index with `cnclip search index "
                f"SOURCE --backend {embedder.backend} --model {embedder.spec} --out {self.path}`")

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), each queries x min(k, len); queries must be unit rows."""
        k = max(1, min(k, len(self.items)))
        return search_faiss(self.faiss_index, self.manifest["kind"], self.vectors, queries, k)

    def write(self) -> None:
        from safetensors.numpy import save_file
        import faiss

        with atomic_dir(self.path) as tmp:
            with open(tmp / ITEMS, "w", encoding="utf-8") as fh:
                for item in self.items:
                    fh.write(json.dumps(asdict(item), ensure_ascii=False) + "\n")
            save_file({"vectors": np.ascontiguousarray(self.vectors, dtype=np.float32)}, str(tmp / VECTORS))
            faiss.write_index(self.faiss_index, str(tmp / FAISS_FILE))
            (tmp / MANIFEST).write_text(json.dumps(self.manifest, ensure_ascii=False, indent=2) + "\n",
                                        encoding="utf-8")


@dataclass
class BuildReport:
    total: int
    kept: int  # rows reused from the existing index, not re-embedded
    embedded: int  # new or changed images embedded now
    from_cache: int  # new or changed images whose embeddings the image-embedding cache already held
    removed: int  # rows dropped: the image is gone or changed
    undecodable: int
    kind: str
    seconds: float
    skipped: dict
    # what a search holds in memory per image, from the written files: the faiss structure, the float32 vector
    index_bytes_per_image: float = 0.0
    vector_bytes_per_image: float = 0.0
    structure: dict = field(default_factory=dict)  # an inverted file's cells, nprobe and checked recall

    def to_dict(self) -> dict:
        return asdict(self)


def build_index(sources: list[str], out: str | Path, embedder: Embedder, *, split: str | None = None,
                kind: str = "auto", cache_dir: str | None = None, batch_size: int = 64, num_workers: int = 0,
                rebuild: bool = False) -> BuildReport:
    """Create or update the index at `out` so that it holds exactly the images of `sources`."""
    tic = time.perf_counter()
    out = Path(out)
    if out.exists() and not (out / MANIFEST).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out} exists and is not a search index; choose a new or empty directory")
    old = SearchIndex.load(out) if (out / MANIFEST).is_file() and not rebuild else None
    if old is not None:
        old.check_model(embedder)
    skips = SkipLog()
    items = discover(sources, split, skips)
    previous = {(i.key, i.digest): row for row, i in enumerate(old.items)} if old else {}
    keep_rows = [previous.get((i.key, i.digest)) for i in items]
    todo = [i for i, row in zip(items, keep_rows) if row is None]
    log.info("%d images: %d already indexed, %d to embed", len(items), len(items) - len(todo), len(todo))

    new_vectors: dict[str, np.ndarray] = {}
    bad: dict[str, str] = {}
    from_cache = False
    if todo:
        by_id = SkipLog(max_examples=0)
        whole_tsv = _whole_tsv(todo, items)
        source = ImageTSV(whole_tsv, SkipLog(max_examples=0)) if whole_tsv else ItemImages(todo)
        features = embedder.embed_source(source, cache_dir, batch_size, num_workers, by_id)
        # The torch backend's cache answers for a whole entry: loaded as it was, or (partly) computed now, when a
        # part left by an interrupted run counts as embedded now.
        from_cache = not features.computed
        emb = features.embeddings
        if whole_tsv:
            by_ref = {str(image_id): row for row, image_id in enumerate(features.ids)}
            for item in todo:
                if item.ref in by_ref:
                    new_vectors[item.key] = emb[by_ref[item.ref]]
            bad = {f"tsv:{Path(whole_tsv).resolve()}:{i}": why for i, why in features.bad.items()}
        else:
            for row, i in enumerate(features.ids):
                new_vectors[todo[i].key] = emb[row]
            bad = {todo[i].key: why for i, why in features.bad.items()}
        for key, why in bad.items():
            skips.skip("undecodable image", key.split(":", 2)[-1], why)

    rows, vectors = [], []
    for item, row in zip(items, keep_rows):
        if row is not None:
            rows.append(item)
            vectors.append(old.vectors[row])
        elif item.key in new_vectors:
            rows.append(item)
            vectors.append(new_vectors[item.key])
    if not rows:
        raise DataError(f"none of the {len(items)} images in {', '.join(map(str, sources))} could be decoded")
    matrix = np.stack(vectors).astype(np.float32)
    log.info("building the %s index over %d vectors", choose_kind(len(rows), kind), len(rows))
    chosen, structure, structure_info = build_structure(matrix, kind)
    manifest = {
        "version": INDEX_VERSION,
        "model": {"spec": embedder.spec, "fingerprint": embedder.fingerprint, "backend": embedder.backend,
                  "precision": embedder.precision},
        "context_length": embedder.context_length,
        "kind": chosen, **({"structure": structure_info} if structure_info else {}),
        "dim": int(matrix.shape[1]), "count": len(rows),
        "roots": sorted({i.root for i in rows}),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    SearchIndex(out, manifest, rows, matrix, structure).write()
    kept = sum(r is not None for r in keep_rows)
    return BuildReport(total=len(rows), kept=kept, embedded=0 if from_cache else len(new_vectors),
                       from_cache=len(new_vectors) if from_cache else 0,
                       removed=(len(old.items) - kept) if old else 0, undecodable=len(bad), kind=chosen,
                       seconds=round(time.perf_counter() - tic, 3), skipped=skips.summary(), structure=structure_info,
                       index_bytes_per_image=round((out / FAISS_FILE).stat().st_size / len(rows), 1),
                       vector_bytes_per_image=round((out / VECTORS).stat().st_size / len(rows), 1))


def _whole_tsv(todo: list[Item], items: list[Item]) -> str | None:
    """The TSV file when everything to embed is exactly one whole TSV: embedded as the split itself,
    so the cache entry training made for that split is reused."""
    roots = {i.root for i in todo}
    if len(roots) != 1 or todo[0].kind != "tsv":
        return None
    root = roots.pop()
    return root if len(todo) == sum(1 for i in items if i.root == root) else None


# ---------------------------------------------------------------- querying with a model


def open_embedder(backend: str, spec: str, device: str = "auto", threads: int | None = None) -> Embedder:
    """The embedder for `spec` on `backend`; `threads` caps the threads one embedding call uses."""
    if backend == "torch":
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            raise UsageError("--backend torch needs torch, which is not installed here (an install of "
                             "'cnclip[serve]' alone runs --backend onnx only); install cnclip with its "
                             "dependencies, or use --backend onnx with an ONNX export")
        return TorchEmbedder.load(spec, device)
    if backend == "onnx":
        from .onnx_runtime import OnnxEmbedder

        if device not in ("auto", "cpu"):
            raise UsageError(f"--device {device}: the onnx backend runs on the CPU (onnxruntime's CPU provider)")
        return OnnxEmbedder.load(spec, threads=threads)
    raise UsageError(f"--backend {backend!r}: choose from {', '.join(BACKENDS)}")



@dataclass
class Hit:
    rank: int
    row: int
    score: float
    key: str
    ref: str
    caption: str
    source: str  # the indexed root it comes from

    def to_dict(self) -> dict:
        return asdict(self)


class Searcher:
    """An index together with a model of the same weights: text, image and zero-shot queries.

    Safe to call from several threads at once when the embedder is (the onnx one is): the faiss index is
    only read, and the zero-shot class cache is guarded by a lock.
    """

    def __init__(self, index: SearchIndex, embedder: Embedder):
        index.check_model(embedder)
        self.index, self.embedder = index, embedder
        self._class_cache: dict[tuple, np.ndarray] = {}
        self._class_lock = threading.Lock()

    @classmethod
    def open(cls, index_path: str | Path, model: str | None = None, device: str = "auto", *,
             backend: str | None = None, threads: int | None = None) -> "Searcher":
        """The index with `model` on `backend` (default: the model and backend that built it)."""
        index = SearchIndex.load(index_path)
        if model is None and backend not in (None, index.backend):
            raise UsageError(f"{index_path} was built with the {index.backend} backend ({index.manifest['model']['spec']}); "
                             f"--backend {backend} needs --model naming that backend's copy of the same weights")
        spec = model or index.manifest["model"]["spec"]
        return cls(index, open_embedder(backend or index.backend, spec, device, threads))

    def _hits(self, query: np.ndarray, k: int) -> list[Hit]:
        # One query is one thread's work for every kind, and one thread is faster than several contending for
        # busy cores (benchmarks/search_throughput.py: 2.1 vs 37 ms exact at 10k on a loaded 2-core CPU).
        # Set around each search only: the process' faiss thread count is the caller's.
        with faiss_threads(1):
            scores, rows = self.index.search(query[None, :], k)
        hits = []
        for rank, (score, row) in enumerate(zip(scores[0].tolist(), rows[0].tolist()), start=1):
            if row < 0:  # an approximate index can return fewer than k
                continue
            item = self.index.items[row]
            hits.append(Hit(rank, row, float(score), item.key, item.ref, item.caption, item.root))
        return hits

    def text_embedding(self, text: str) -> np.ndarray:
        if not text.strip():
            raise UsageError("the query text is empty")
        return self.embedder.embed_texts([text])[0]

    def image_embedding(self, image) -> np.ndarray:
        return self.embedder.embed_images([image])[0]

    def by_text(self, text: str, k: int = 10) -> list[Hit]:
        return self._hits(self.text_embedding(text), k)

    def by_image(self, image, k: int = 10) -> list[Hit]:
        return self._hits(self.image_embedding(image), k)

    def classify(self, image, classes, templates: list[str], top_k: int = 5) -> list[dict]:
        """Zero-shot: the image's top classes with probabilities (prompt ensembling, as cnclip.classifier)."""
        cache_key = (classes.keys, classes.names, tuple(templates))
        with self._class_lock:
            if cache_key not in self._class_cache:
                self._class_cache.clear()  # one class list at a time is what a page uses
                self._class_cache[cache_key] = self.embedder.class_embeddings(templates, classes)
            class_emb = self._class_cache[cache_key]
        logits = (class_emb @ self.image_embedding(image)) * self.embedder.logit_scale
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        order = np.argsort(-probs, kind="stable")[:min(top_k, len(classes))]
        return [{"key": classes.keys[i], "name": classes.names[i][0], "probability": float(probs[i])}
                for i in order.tolist()]
