"""Hamming neighbourhoods of 64-bit hashes (pHash): the one structure near-duplicate dedup
(data_tools.dedup) and leak-free split grouping (data_tools.split) search with.

Guarantees:

* Exact: `hamming_pairs` returns every pair of hashes within `radius` bits, each once;
  `HammingIndex.near` / `near_batch` every stored hash within `radius` of a query, the same sets a
  comparison against every hash gives (tests/test_hamming.py checks this exhaustively, with planted
  pairs at distances radius - 1, radius and radius + 1, for every radius the filter config allows).
* Sub-quadratic: multi-index hashing, vectorised in numpy. The 64 bits are cut into `tables`
  disjoint substrings of `bits` bits; each table files every hash under its substring's value.
  Two hashes within `radius` bits differ in at most `flips = radius // tables` bits of some
  substring (pigeonhole: `tables * (flips + 1) > radius`), so looking up, in every table, each key
  within `flips` bit flips of the query's substring finds every neighbour; the candidates found are
  then checked with their full distance, and a pair is kept only in the first table that finds it
  (so each pair once, without a set). A query costs `tables * V(bits, flips)` lookups, V(b, f)
  being the number of keys within f flips of a b-bit key, plus the candidates those keys hold,
  about `n * lookups / 2**bits` for spread-out hashes. `layout` picks (tables, bits) minimising that
  cost for the number of hashes, so `bits` grows with log2(n) and the work per query grows slowly
  (random hashes at radius 8: 12 candidates a query at 1,500 hashes, 55 at 100,000, against n for a scan).
* Why numpy and not a hash map per query: the tables are direct-address (a `2**bits + 1` offsets
  array into the ids sorted by key, built with one sort), and a batch of queries is answered at
  once, all of its keys x flip masks in one gather, so the per-lookup cost is a memory access, not
  an interpreter step or a hash-map probe. Measured (benchmarks/hamming_scale.py, random hashes at
  radius 8, CPU seconds on a shared 2-core machine at load average 5-11, docs/data.md has the
  table): all pairs of 100,000 hashes in 2.4 s and of 1,000,000 in 52 s, against 7.1 s and about
  521 s for the faiss IndexBinaryMultiHash this replaced (a hash-map probe per lookup) and 3.6 s and
  about 360 s (extrapolated) for the older banded search; dedup's batched lookups take 56 s at
  1,000,000. Limit: 64 bits allow 3 tables of at most 21 bits at radius 8, so past about 2,000,000
  hashes the candidates per query grow in proportion to n (estimated 2,050 s for all pairs of
  10,000,000, 204 us a query). The cost grows with the radius (V(bits, flips) does): radius 16,
  split's largest, costs about 100x radius 8 per query.
* Memory: the hashes, per table an 8-byte id per hash and the offsets (`2**bits` 8-byte entries,
  `bits` <= MAX_KEY_BITS, so at most 128 MiB a table), and per step the QUERY_LOOKUPS keys looked
  up and about CANDIDATES candidates (one key's ids are checked together: more only when a single
  key holds more hashes). Results come out a piece at a time, so a dense cluster (thousands of
  copies of one picture) costs time in proportion to its pairs but not memory.

`HammingIndex` grows (dedup stores representatives as it finds them): its hashes are kept in
levels, each with its own tables, a new level per added batch; a level is merged into the one
before it while that one is at most twice its size, so there are at most log2(n) levels and each
hash is re-filed O(log n) times in all (the logarithmic method). Dedup asks for a whole batch of
records at once (`near_batch`): their neighbours among the stored hashes and among each other.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import cache, lru_cache
from itertools import combinations
from math import comb

import numpy as np

HASH_BITS = 64
MAX_KEY_BITS = 24  # direct-address offsets of 2**24 entries (128 MiB) a table at most
CANDIDATE_COST = 1.0  # a candidate's check costs about one key lookup (both a random gather; measured, numpy 2)
QUERY_LOOKUPS = 1 << 20  # keys looked up together: bounds a batch's temporary memory (tens of MiB)
CANDIDATES = 1 << 22  # candidates checked together, about: bounds that step's memory (a few hundred MiB)


def _ball(bits: int, flips: int) -> int:
    """Keys within `flips` bit flips of a `bits`-bit key."""
    return sum(comb(bits, i) for i in range(flips + 1))


@lru_cache(maxsize=4096)  # a growing index asks for many sizes: bounded
def layout(radius: int, size: int) -> tuple[int, int]:
    """(tables, bits) with the least estimated cost per query among `size` spread-out hashes.

    Every layout is exact (the flips per table follow from the radius); only the speed differs.
    """
    if not 0 <= radius < HASH_BITS:
        raise ValueError(f"Hamming radius {radius}: expected 0..{HASH_BITS - 1}")
    best: tuple[float, int, int] | None = None
    for tables in range(1, min(radius + 1, HASH_BITS) + 1):
        for bits in range(1, min(HASH_BITS // tables, MAX_KEY_BITS) + 1):
            lookups = tables * _ball(bits, min(radius // tables, bits))
            cost = lookups * (1.0 + CANDIDATE_COST * size / 2.0**bits) + tables * 2.0**bits / max(size, 1)
            if best is None or cost < best[0]:
                best = (cost, tables, bits)
    assert best is not None
    return best[1], best[2]


@cache
def _masks(bits: int, flips: int) -> np.ndarray:
    """Every `bits`-bit mask with at most `flips` bits set, the empty one first."""
    masks = [sum(1 << b for b in chosen) for f in range(flips + 1) for chosen in combinations(range(bits), f)]
    return np.array(masks, dtype=np.int64)


def _as_hashes(values) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(values, dtype=np.uint64).reshape(-1))


class _Tables:
    """Multi-index hash tables over `hashes` (ids 0..n-1), answering batches of queries exactly."""

    def __init__(self, hashes: np.ndarray, radius: int) -> None:
        self.hashes, self.radius = hashes, radius
        self.tables, self.bits = layout(radius, max(len(hashes), 1))
        self.flips = min(radius // self.tables, self.bits)
        self.key_mask = np.uint64((1 << self.bits) - 1)
        self.sorted_ids, self.offsets = [], []
        self.candidates_checked = 0  # full-distance checks so far (the sub-quadratic claim's test reads it)
        for table in range(self.tables):
            keys = self.keys(hashes, table)
            self.sorted_ids.append(np.argsort(keys, kind="stable"))
            offsets = np.zeros((1 << self.bits) + 1, dtype=np.int64)
            np.cumsum(np.bincount(keys, minlength=1 << self.bits), out=offsets[1:])
            self.offsets.append(offsets)

    def keys(self, values: np.ndarray, table: int) -> np.ndarray:
        return ((values >> np.uint64(table * self.bits)) & self.key_mask).astype(np.int64)

    def search(self, queries: np.ndarray, first_id: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(query positions, ids) of every stored hash within the radius of each query, each pair once,
        in non-empty pieces. `first_id`: the query at position p is the stored hash first_id + p (a
        self-join), and only ids after it are returned."""
        masks = _masks(self.bits, self.flips)
        step = max(1, QUERY_LOOKUPS // len(masks))
        for start in range(0, len(queries), step):
            batch = queries[start:start + step]
            for table in range(self.tables):
                for positions, ids in self._search_table(batch, table, masks, None if first_id is None else first_id + start):
                    yield positions + start, ids

    def _search_table(self, batch: np.ndarray, table: int, masks: np.ndarray,
                      first_id: int | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        keys = (self.keys(batch, table)[:, None] ^ masks[None, :]).ravel()
        offsets = self.offsets[table]
        starts = offsets[keys]
        counts = offsets[keys + 1] - starts
        hit = np.flatnonzero(counts)
        ends = np.cumsum(counts[hit])
        # hit keys in pieces of about CANDIDATES candidates (one key's ids are never split): a dense
        # cluster of equal hashes costs time in proportion to its pairs, never memory
        cuts = np.searchsorted(ends, np.arange(CANDIDATES, ends[-1] if len(ends) else 0, CANDIDATES), side="right")
        for piece in np.split(np.arange(len(hit)), np.unique(cuts)):
            if len(piece):
                found = self._check(batch, table, hit[piece], starts[hit[piece]], counts[hit[piece]], len(masks), first_id)
                if len(found[1]):
                    yield found

    def _check(self, batch: np.ndarray, table: int, hit: np.ndarray, starts: np.ndarray, counts: np.ndarray,
               n_masks: int, first_id: int | None) -> tuple[np.ndarray, np.ndarray]:
        """The ids filed under the hit keys, checked against their queries' full distance."""
        ends = np.cumsum(counts)
        # the ids filed under each hit key, laid end to end: start of its run + 0, 1, ... count - 1
        slots = np.repeat(starts - ends + counts, counts) + np.arange(ends[-1])
        ids = self.sorted_ids[table][slots]
        positions = np.repeat(hit // n_masks, counts)
        if first_id is not None:
            later = ids > positions + first_id
            positions, ids = positions[later], ids[later]
        self.candidates_checked += len(ids)
        diff = batch[positions] ^ self.hashes[ids]
        keep = np.bitwise_count(diff) <= self.radius
        for earlier in range(table):  # within `flips` in an earlier table: that table returned it
            keep &= np.bitwise_count((diff >> np.uint64(earlier * self.bits)) & self.key_mask) > self.flips
        return positions[keep], ids[keep]


def hamming_pairs(hashes: np.ndarray, radius: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every pair (i, j), i < j, of `hashes` (uint64) within `radius` bits, exactly once.

    Yielded as two non-empty index arrays a batch of queries at a time, so the pairs of a large set
    are never all in memory together. Cost: the tables' build (a sort per table) plus n queries
    (see the module docstring).
    """
    values = _as_hashes(hashes)
    if len(values) < 2:
        return
    yield from _Tables(values, radius).search(values, first_id=0)


class HammingIndex:
    """A growing set of 64-bit hashes, each with a payload (the caller's record number); `near` and
    `near_batch` answer which stored hashes lie within `radius` bits of queries.

    Stored in levels (see the module docstring): adding a batch of k hashes costs O(k log n)
    amortised; a query costs one search per level, at most log2(n) of them.
    """

    def __init__(self, radius: int) -> None:
        layout(radius, 1)  # the radius is checked now, not at the first query
        self.radius = radius
        self._hashes = np.empty(1024, dtype=np.uint64)
        self._payloads = np.empty(1024, dtype=np.int64)
        self._size = 0
        self._levels: list[tuple[int, int, _Tables]] = []  # (first id, end id, tables), in id order

    def __len__(self) -> int:
        return self._size

    def add(self, value: int, payload: int = 0) -> None:
        self.add_many([value], [payload])

    def add_many(self, values: Sequence[int] | np.ndarray, payloads: Sequence[int] | np.ndarray) -> None:
        values, payloads = _as_hashes(values), np.asarray(payloads, dtype=np.int64).reshape(-1)
        if len(values) != len(payloads):
            raise ValueError(f"{len(values)} hashes but {len(payloads)} payloads")
        if not len(values):
            return
        end = self._size + len(values)
        if end > len(self._hashes):  # amortised doubling (each level holds its own copy of its hashes)
            grown = max(end, 2 * len(self._hashes))
            self._hashes = np.concatenate([self._hashes[:self._size], np.empty(grown - self._size, np.uint64)])
            self._payloads = np.concatenate([self._payloads[:self._size], np.empty(grown - self._size, np.int64)])
        self._hashes[self._size:end], self._payloads[self._size:end] = values, payloads
        first = self._size
        self._size = end
        while self._levels and self._levels[-1][1] - self._levels[-1][0] <= 2 * (end - first):
            first = self._levels.pop()[0]  # merge: re-filed with the level before it
        self._levels.append((first, end, _Tables(self._hashes[first:end].copy(), self.radius)))

    def near(self, value: int) -> list[int]:
        """Payloads of every stored hash within the radius of `value`, in the order they were added."""
        return self.near_batch([value])[0][0]

    def near_batch(self, values: Sequence[int] | np.ndarray) -> tuple[list[list[int]], list[list[int]]]:
        """For each of `values`: the payloads of the stored hashes within the radius, in the order
        they were added, and the positions of the earlier `values` within the radius, ascending."""
        queries = _as_hashes(values)
        stored: list[list[int]] = [[] for _ in range(len(queries))]
        earlier: list[list[int]] = [[] for _ in range(len(queries))]
        pairs = [(p, first + i) for first, _, tables in self._levels for p, i in tables.search(queries)]
        if pairs:
            positions = np.concatenate([p for p, _ in pairs])
            ids = np.concatenate([i for _, i in pairs])
            order = np.lexsort((ids, positions))
            for p, payload in zip(positions[order].tolist(), self._payloads[ids[order]].tolist()):
                stored[p].append(payload)
        for left, right in hamming_pairs(queries, self.radius):
            order = np.lexsort((left, right))
            for i, j in zip(left[order].tolist(), right[order].tolist()):
                earlier[j].append(i)
        return stored, earlier
