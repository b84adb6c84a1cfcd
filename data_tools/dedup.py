"""Duplicate removal: exact images, near-duplicate images, and repeated (query, text) pairs.

Runs once over all accepted records in input order, so "keep the first" is well defined and
independent of how many workers produced the records.
"""

from __future__ import annotations

from collections import defaultdict
from hashlib import blake2b

from data_tools.records import Reason

HASH_BITS = 64


class HammingIndex:
    """Finds a stored 64-bit hash within a Hamming distance, without comparing against all of them.

    Multi-index hashing: split the bits into `max_distance + 1` bands; by pigeonhole, two hashes
    within `max_distance` agree exactly on at least one band, so only hashes sharing a band value
    are compared.
    """

    def __init__(self, max_distance: int) -> None:
        self.max_distance = max_distance
        bands = max_distance + 1
        edges = [round(i * HASH_BITS / bands) for i in range(bands + 1)]
        self._bands = [(lo, (1 << (hi - lo)) - 1) for lo, hi in zip(edges, edges[1:])]
        self._tables: list[dict[int, list[int]]] = [defaultdict(list) for _ in self._bands]

    def contains_near(self, value: int) -> bool:
        """Is some stored hash within max_distance of `value`?"""
        for (shift, mask), table in zip(self._bands, self._tables):
            for other in table.get((value >> shift) & mask, ()):
                if (value ^ other).bit_count() <= self.max_distance:
                    return True
        return False

    def add(self, value: int) -> None:
        for (shift, mask), table in zip(self._bands, self._tables):
            table[(value >> shift) & mask].append(value)


class Deduplicator:
    """Keeps the first of each duplicate group; later members get the reason of the first check they fail."""

    def __init__(self, phash_max_distance: int | None) -> None:
        self._images: set[bytes] = set()
        self._near = HammingIndex(phash_max_distance) if phash_max_distance is not None else None
        self._texts: set[bytes] = set()

    def check(self, image_sha: bytes, phash: int, query: str, text: str) -> Reason | None:
        """Return the duplicate reason, or None and remember the record as a kept representative."""
        if image_sha in self._images:
            return Reason.DUPLICATE_IMAGE
        if self._near is not None and self._near.contains_near(phash):
            return Reason.NEAR_DUPLICATE_IMAGE
        text_key = blake2b(f"{query}\x00{text}".encode(), digest_size=12).digest()
        if text_key in self._texts:
            return Reason.DUPLICATE_TEXT
        self._images.add(image_sha)
        if self._near is not None:
            self._near.add(phash)
        self._texts.add(text_key)
        return None
