"""train/valid/test assignment by leak-free group.

Two pairs that share a normalised caption, or whose images are near each other (pHash within
`split.phash_max_distance` bits with colour signatures within `split.colour_max_distance`, as
dedup defines a near duplicate, or image-embedding cosine >= `split.semantic_threshold` when a
model scores the pairs), are linked; the connected components of these links are the groups, and
every pair of a group goes to the same split. So no caption and no near-duplicate pair (at those
thresholds, which are looser than dedup's: they catch what dedup let through) crosses splits.

A group's split is a seeded hash of its first pair's image, not a shuffle: adding more crawl data
later moves an existing pair only if the new data links its group to another one.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from hashlib import blake2b

import numpy as np

from cnclip.errors import UsageError
from data_tools.hamming import hamming_pairs
from data_tools.images import COLOUR_SIGNATURE_BYTES, colour_distance

SPLIT_NAMES = ("train", "valid", "test")


def parse_splits(text: str) -> tuple[tuple[str, float], ...]:
    """"0.98,0.01,0.01" -> (("train", 0.98), ("valid", 0.01), ("test", 0.01))."""
    parts = [part.strip() for part in text.split(",")]
    if len(parts) != len(SPLIT_NAMES):
        raise UsageError(f"expected {len(SPLIT_NAMES)} comma-separated fractions for train,valid,test, got {text!r}")
    try:
        fractions = [float(part) for part in parts]
    except ValueError:
        raise UsageError(f"fractions must be numbers, got {text!r}") from None
    if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise UsageError(f"fractions must be >= 0 and sum to 1, got {text!r}")
    return tuple(zip(SPLIT_NAMES, fractions))


def assign_split(image_key: bytes, splits: tuple[tuple[str, float], ...], seed: int) -> str:
    """Map an image key to a split with probability equal to the split's fraction."""
    digest = blake2b(image_key, digest_size=8, key=b"split" + seed.to_bytes(8, "little", signed=True))
    point = int.from_bytes(digest.digest(), "big") / 2**64
    cumulative = 0.0
    for name, fraction in splits:
        cumulative += fraction
        if point < cumulative:
            return name
    return next(name for name, fraction in reversed(splits) if fraction > 0)  # float rounding at the top


_NOT_CONTENT = re.compile(r"[\W_]+")


def caption_key(text: str) -> str:
    """A caption as the leak check compares it: NFKC, lower case, no spaces or punctuation."""
    return _NOT_CONTENT.sub("", unicodedata.normalize("NFKC", text).lower())


class UnionFind:
    """Disjoint sets over 0..n-1; the root of a set is its smallest member (its first pair)."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def colour_array(signatures: list[bytes]) -> np.ndarray:
    """Colour signatures as an (n, 32) uint8 array, one row per pair."""
    return np.frombuffer(b"".join(signatures), dtype=np.uint8).reshape(len(signatures), COLOUR_SIGNATURE_BYTES)


def leak_free_groups(captions: list[str], phashes: np.ndarray, phash_max_distance: int | None,
                     semantic_pairs: Iterable[tuple[np.ndarray, np.ndarray]] = (), colours: np.ndarray | None = None,
                     colour_max_distance: float | None = None) -> UnionFind:
    """Link pairs by identical caption_key, near picture (pHash, and colour signature when both
    `colours` and `colour_max_distance` are given) and the given semantic pairs (batches of two index
    arrays, as data_tools.semantic.similar_pairs yields them)."""
    groups = UnionFind(len(captions))
    first_with: dict[str, int] = {}
    for i, caption in enumerate(captions):
        groups.union(first_with.setdefault(caption_key(caption), i), i)
    if phash_max_distance is not None:
        for a, b in hamming_pairs(phashes, phash_max_distance):
            if colours is not None and colour_max_distance is not None:
                same_colours = colour_distance(colours[a], colours[b]) <= colour_max_distance
                a, b = a[same_colours], b[same_colours]
            for i, j in zip(a.tolist(), b.tolist()):
                groups.union(i, j)
    for left, right in semantic_pairs:
        for i, j in zip(left.tolist(), right.tolist()):
            groups.union(i, j)
    return groups
