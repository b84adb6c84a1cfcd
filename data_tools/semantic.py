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
"""

from __future__ import annotations

import logging

import numpy as np

from cnclip.global_state import faiss_threads

HNSW_LINKS = 16  # M: neighbours per node
EF_CONSTRUCTION = 40
EF_SEARCH = 64
PENDING = 256  # vectors compared exactly before they are added to the graph


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


def similar_pairs(vectors: np.ndarray, threshold: float, neighbours: int = 16) -> list[tuple[int, int]]:
    """Pairs (i, j), i < j, among the rows of `vectors` (normalised) with cosine >= threshold.

    Each row's `neighbours` nearest rows are checked, which is enough to connect every group of
    near-identical images (a group larger than that is still linked through chains of neighbours).
    """
    n = len(vectors)
    if n < 2:
        return []
    index = _hnsw(vectors.shape[1])
    with _one_thread():
        index.add(vectors)
        sims, rows = index.search(vectors, min(neighbours + 1, n))
    pairs = set()
    for i in range(n):
        for sim, j in zip(sims[i], rows[i]):
            if j >= 0 and j != i and sim >= threshold:
                pairs.add((min(i, int(j)), max(i, int(j))))
    return sorted(pairs)
