"""Image-embedding neighbourhoods with faiss: semantic dedup and the semantic part of split grouping.

Near-duplicates that pHash misses (crops, watermarks, re-uploads at another size) have nearly the
same CLIP image embedding. Embeddings are L2-normalised, so inner product is cosine similarity.

The index is an HNSW graph (faiss.IndexHNSWFlat): a lookup visits O(log n) nodes and an image
costs a fixed number of bytes (its vector plus about 2*M neighbour links), so work and memory per
image stay flat as the corpus grows (benchmarks/semantic_dedup.py measures both). HNSW is
approximate: a true neighbour is missed with a small probability (recall > 0.99 at the settings
below). Vectors are added in small batches; until then the newest ones are compared exactly,
so "the nearest kept image" includes the records just before. One faiss thread (for these calls only: the
process' setting is restored after each) keeps the graph, and so the output, identical from run to run.

`similar_pairs` (split grouping) finds every pair at or above a threshold, with no fixed neighbour
count: exact up to EXACT_UP_TO rows, an adaptive-k HNSW search past it (its docstring states the
costs). tests/test_semantic_pairs.py checks both against brute force on two dense clusters of 40
near-identical vectors whose cross pairs all reach the threshold.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np

from cnclip.global_state import faiss_threads

HNSW_LINKS = 16  # M: neighbours per node
EF_CONSTRUCTION = 40
EF_SEARCH = 64
PENDING = 256  # vectors compared exactly before they are added to the graph
EXACT_UP_TO = 20_000  # similar_pairs: exact range search up to this many rows, adaptive-k HNSW past it
EXACT_BLOCK = 1024  # rows per exact range search: bounds the n-wide similarity block in memory
FIRST_K, GROW = 16, 4  # adaptive k: the first neighbour count, and its growth while a row's k are all close


def _faiss():
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build it picked is not news
    import faiss

    return faiss


def _one_thread():
    """One faiss thread for each add and search: HNSW insertion order must not depend on thread timing.
    Scoped, so the caller's own faiss thread count is left as it was."""
    return faiss_threads(1, _faiss())


def normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def _hnsw(dim: int):
    faiss = _faiss()
    index = faiss.IndexHNSWFlat(dim, HNSW_LINKS, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = EF_CONSTRUCTION
    index.hnsw.efSearch = EF_SEARCH
    return index


class SemanticIndex:
    """Kept image embeddings; `find` returns a kept image with cosine >= threshold, if any."""

    def __init__(self, dim: int, threshold: float) -> None:
        self.threshold = threshold
        self._index = _hnsw(dim)
        self._payloads: list[int] = []  # faiss row -> caller's record number
        self._pending = np.zeros((PENDING, dim), dtype=np.float32)
        self._pending_payloads: list[int] = []

    def __len__(self) -> int:
        return len(self._payloads) + len(self._pending_payloads)

    def find(self, vector: np.ndarray) -> int | None:
        """The record number of the most similar kept image at or above the threshold, else None."""
        best, best_sim = None, self.threshold
        if self._index.ntotal:
            with _one_thread():
                sims, rows = self._index.search(vector.reshape(1, -1), 1)
            if rows[0, 0] >= 0 and sims[0, 0] >= best_sim:
                best, best_sim = self._payloads[rows[0, 0]], float(sims[0, 0])
        pending = len(self._pending_payloads)
        if pending:
            sims = self._pending[:pending] @ vector
            j = int(np.argmax(sims))
            if sims[j] >= best_sim:
                best = self._pending_payloads[j]
        return best

    def add(self, vector: np.ndarray, payload: int) -> None:
        self._pending[len(self._pending_payloads)] = vector
        self._pending_payloads.append(payload)
        if len(self._pending_payloads) == PENDING:
            with _one_thread():
                self._index.add(self._pending)
            self._payloads.extend(self._pending_payloads)
            self._pending_payloads.clear()


def similar_pairs(vectors: np.ndarray, threshold: float,
                  exact_up_to: int = EXACT_UP_TO) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every pair (i, j), i < j, of rows of `vectors` (normalised) with cosine >= threshold, each once,
    yielded as two non-empty index arrays a batch at a time; however dense a cluster, no fixed neighbour count.

    Up to `exact_up_to` rows: exact (a range search on faiss.IndexFlatIP, a block of rows at a
    time): n^2 * dim multiply-adds, memory O(block * n + pairs). Past it: an HNSW graph and an
    adaptive k: every row is searched for its FIRST_K nearest, and a row whose farthest result still
    reaches the threshold is searched again with GROW times the k (and efSearch >= k), until its
    farthest result falls below the threshold or k covers all rows. A row with c neighbours at or
    above the threshold ends with k <= max(FIRST_K, GROW * c), so all rows together cost
    O((n + pairs) * log n) graph steps (the geometric re-searches add at most a third) on top of
    building the graph, and memory O(n + pairs). HNSW is approximate there: a pair is missed with
    the graph's small miss probability (recall > 0.99 at these settings for near-identical images).
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if len(vectors) < 2:
        return iter(())
    if len(vectors) <= exact_up_to:
        return _exact_pairs(vectors, threshold)
    return _graph_pairs(vectors, threshold)


def _exact_pairs(vectors: np.ndarray, threshold: float) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    index = _faiss().IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    below = float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))  # faiss keeps similarities > radius
    for start in range(0, len(vectors), EXACT_BLOCK):
        with _one_thread():
            limits, sims, rows = index.range_search(vectors[start:start + EXACT_BLOCK], below)
        left = np.repeat(np.arange(start, start + len(limits) - 1), np.diff(limits.astype(np.int64)))
        keep = (rows > left) & (sims >= threshold)
        if keep.any():
            yield left[keep], rows[keep]


def _graph_pairs(vectors: np.ndarray, threshold: float) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    faiss = _faiss()
    n = len(vectors)
    index = _hnsw(vectors.shape[1])
    with _one_thread():
        index.add(vectors)
    keys: list[np.ndarray] = []  # pair i < j as i * n + j: found from either end, kept once
    todo, k = np.arange(n), FIRST_K
    while len(todo):
        k = min(k, n - 1)
        params = faiss.SearchParametersHNSW(efSearch=max(EF_SEARCH, k + 1))
        with _one_thread():
            sims, rows = index.search(vectors[todo], k + 1, params=params)
        close = (sims >= threshold) & (rows >= 0) & (rows != todo[:, None])
        left = np.broadcast_to(todo[:, None], rows.shape)[close]
        right = rows[close]
        keys.append(np.minimum(left, right) * n + np.maximum(left, right))
        full = (sims[:, -1] >= threshold) & (k < n - 1)  # its farthest result still reaches: there may be more
        todo, k = todo[full], k * GROW
    unique = np.unique(np.concatenate(keys))
    if len(unique):
        yield unique // n, unique % n
