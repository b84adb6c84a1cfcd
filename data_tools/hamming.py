"""Hamming neighbourhoods of 64-bit hashes (pHash): the one structure near-duplicate dedup
(data_tools.dedup) and leak-free split grouping (data_tools.split) search with.

Guarantees:

* Exact: `hamming_pairs` returns every pair of hashes within `radius` bits, each once, and
  `HammingIndex.near` every stored hash within `radius` of a query, the same sets a comparison
  against every hash gives (tests/test_hamming.py checks this exhaustively, with planted pairs at
  distances radius - 1, radius and radius + 1, for every radius the filter config allows).
* Sub-quadratic: multi-index hashing (faiss.IndexBinaryMultiHash). The 64 bits are cut into `tables`
  disjoint substrings of `bits` bits; every stored hash is filed under each substring's value. Two
  hashes within `radius` bits differ in at most `flips = radius // tables` bits of some substring
  (pigeonhole: `tables * (flips + 1) > radius`), so looking up, in every table, each key within
  `flips` bit flips of the query's substring finds every neighbour; the candidates found are then
  checked with their full distance. A query costs `tables * V(bits, flips)` lookups, V(b, f) being
  the number of keys within f flips of a b-bit key, plus the candidates those keys hold, about
  `n * lookups / 2**bits` for spread-out hashes. `layout` picks (tables, bits) minimising that cost
  for the number of hashes, so `bits` grows with log2(n) and the candidates checked per query stay
  flat (about 25 for random hashes at radius 8), far below the n comparisons of a scan.
  benchmarks/hamming_scale.py measures the time: random hashes at radius 8 take 0.07 ms of CPU a
  query at 100k and 0.5 ms at 1M on a shared 2-core machine (the ~700 table lookups a query become
  cache misses as the tables grow), which at 1M is no faster than the banded search this replaced
  would be by extrapolation (docs/data.md has the table). The cost grows with the radius
  (V(bits, flips) does): radius 16, split's largest, costs about 100x radius 8 per query.
* Memory: the 8-byte hash plus, per table, an 8-byte id and hash-map slot, about 100 bytes a hash.

faiss is used for the tables and the candidate check because it is already a dependency (the
semantic index) and does both in C++; the layout choice is ours, since faiss' defaults assume
that the caller knows the radius's pigeonhole split.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Iterator
from functools import cache
from math import comb

import numpy as np

from cnclip.global_state import faiss_threads

HASH_BITS = 64
CANDIDATE_COST = 3.0  # a candidate's check costs about 3 table lookups (measured with faiss 1.15, random hashes)
QUERY_BATCH = 65_536  # hamming_pairs answers this many queries at a time: bounded result memory


def _faiss():
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build it picked is not news
    import faiss

    return faiss


def _one_thread():
    """One faiss thread per call (scoped: the process' setting is restored): a single query gains nothing
    from more, and on a busy machine OpenMP's waiting for a second thread costs more than the query."""
    return faiss_threads(1, _faiss())


def _ball(bits: int, flips: int) -> int:
    """Keys within `flips` bit flips of a `bits`-bit key."""
    return sum(comb(bits, i) for i in range(flips + 1))


@cache
def layout(radius: int, size: int) -> tuple[int, int]:
    """(tables, bits) with the least estimated cost per query among `size` spread-out hashes.

    Every layout is exact (the flips per table follow from the radius); only the speed differs.
    """
    if not 0 <= radius < HASH_BITS:
        raise ValueError(f"Hamming radius {radius}: expected 0..{HASH_BITS - 1}")
    best: tuple[float, int, int] | None = None
    for tables in range(1, min(radius + 1, HASH_BITS) + 1):
        for bits in range(1, HASH_BITS // tables + 1):
            lookups = tables * _ball(bits, min(radius // tables, bits))
            cost = lookups * (1.0 + CANDIDATE_COST * size / 2.0**bits)
            if best is None or cost < best[0]:
                best = (cost, tables, bits)
    assert best is not None
    return best[1], best[2]


def _codes(hashes) -> np.ndarray:
    """64-bit hashes as faiss binary codes: (n, 8) uint8, the hash's little-endian bytes."""
    values = np.ascontiguousarray(np.asarray(hashes, dtype=np.uint64).reshape(-1))
    return values.view(np.uint8).reshape(len(values), 8)


def _multihash(radius: int, size: int, codes: np.ndarray):
    tables, bits = layout(radius, max(size, 1))
    index = _faiss().IndexBinaryMultiHash(HASH_BITS, tables, bits)
    index.nflip = min(radius // tables, bits)  # more flips than bits would enumerate the same keys
    if len(codes):
        index.add(codes)
    return index


def _range(index, codes: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """(limits, ids): query q's neighbours are ids[limits[q]:limits[q + 1]]."""
    with _one_thread():
        limits, _, ids = index.range_search(codes, radius + 1)  # faiss keeps distances < its radius
    return limits.astype(np.int64), ids


def hamming_pairs(hashes: np.ndarray, radius: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every pair (i, j), i < j, of `hashes` (uint64) within `radius` bits, exactly once.

    Yielded as two non-empty index arrays a batch of queries at a time, so the pairs of a large set
    are never all in memory together.
    """
    codes = _codes(hashes)
    n = len(codes)
    if n < 2:
        return
    index = _multihash(radius, n, codes)
    for start in range(0, n, QUERY_BATCH):
        limits, ids = _range(index, codes[start:start + QUERY_BATCH], radius)
        left = np.repeat(np.arange(start, start + len(limits) - 1), np.diff(limits))
        later = ids > left
        if later.any():
            yield left[later], ids[later]


class HammingIndex:
    """A growing set of 64-bit hashes, each with a payload (the caller's record number); `near`
    answers which stored hashes lie within `radius` bits of a query.

    The layout is chosen for the number stored: when that grows past four times the size it was
    chosen for, the tables are rebuilt under the better layout (amortised: each hash is re-filed
    O(log n) times in all).
    """

    def __init__(self, radius: int) -> None:
        self.radius = radius
        self._hashes = array("Q")
        self._payloads: list[int] = []
        self._planned_for = 1024
        self._index = _multihash(radius, self._planned_for, _codes([]))

    def __len__(self) -> int:
        return len(self._payloads)

    def add(self, value: int, payload: int = 0) -> None:
        self._hashes.append(value)
        self._payloads.append(payload)
        if len(self._payloads) > 4 * self._planned_for:
            self._planned_for = 4 * len(self._payloads)
            if layout(self.radius, self._planned_for) != (self._index.nhash, self._index.b):
                self._index = _multihash(self.radius, self._planned_for, self._stored())
                return
        self._index.add(_codes([value]))

    def near(self, value: int) -> list[int]:
        """Payloads of every stored hash within the radius of `value`, in the order they were added."""
        if not self._payloads:
            return []
        _, ids = _range(self._index, _codes([value]), self.radius)
        return [self._payloads[i] for i in sorted(ids.tolist())]

    def _stored(self) -> np.ndarray:
        return _codes(np.frombuffer(self._hashes, dtype=np.uint64))
