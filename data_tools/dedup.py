"""Duplicate grouping: exact images, near-duplicate images (pHash and colour), semantic duplicates,
repeated (query, text).

A near duplicate is the same picture, colour included: its pHash (luminance structure) is within
`dedup.phash_max_distance` bits AND its colour signature (data_tools.images.colour_signature) within
`dedup.colour_max_distance`. A red and a blue version of one product photo share a pHash; they are
different items with different captions, and both are kept.

Runs once over all accepted records in input order, so "the first" of a group is well defined and
independent of how many workers produced the records. A record that repeats an earlier group's
representative joins that group with the reason naming the kind of repeat; it is not dropped
here. Near pictures are looked up in data_tools.hamming's index (exact, sub-quadratic), which holds
representatives only. Which member of a group is finally kept is the per-query cap's decision (data_tools.cap):
when the representative's query is over its cap, another member may be kept instead, so an
image is never lost because its first copy happened to sit in a capped query.
"""

from __future__ import annotations

from hashlib import blake2b
from typing import NamedTuple

import numpy as np

from data_tools.hamming import HammingIndex
from data_tools.images import colour_distance
from data_tools.records import Reason
from data_tools.semantic import SemanticIndex


class Duplicate(NamedTuple):
    reason: Reason
    of: int  # the representative's record number


class Deduplicator:
    """Assigns each record to the group of the first earlier representative it repeats.

    Checks in this order, the first match naming the reason: identical normalised pixels,
    pHash within `phash_max_distance` bits with colour signatures within `colour_max_distance`
    (None: pHash alone decides), image-embedding cosine >= the semantic index's threshold, the
    same (query, text). A record that repeats nothing becomes a representative.
    """

    def __init__(self, phash_max_distance: int | None, semantic: SemanticIndex | None = None,
                 colour_max_distance: float | None = None) -> None:
        self._images: dict[bytes, int] = {}
        self._near = HammingIndex(phash_max_distance) if phash_max_distance is not None else None
        self._colour_max_distance = colour_max_distance
        self._colours: dict[int, bytes] = {}  # representative -> its colour signature
        self._semantic = semantic
        self._texts: dict[bytes, int] = {}

    def check(self, number: int, image_sha: bytes, phash: int, query: str, text: str,
              embedding: np.ndarray | None = None, colour: bytes | None = None) -> Duplicate | None:
        """The group record `number` joins, or None (it is now a representative itself).

        `colour` is the record's colour signature; without one, pHash alone decides near duplicates.
        """
        rep = self._images.get(image_sha)
        if rep is not None:
            return Duplicate(Reason.DUPLICATE_IMAGE, rep)
        if self._near is not None and (rep := self._first_near_picture(phash, colour)) is not None:
            return Duplicate(Reason.NEAR_DUPLICATE_IMAGE, rep)
        if self._semantic is not None and embedding is not None:
            if (rep := self._semantic.find(embedding)) is not None:
                return Duplicate(Reason.SEMANTIC_DUPLICATE, rep)
        text_key = blake2b(f"{query}\x00{text}".encode(), digest_size=12).digest()
        rep = self._texts.get(text_key)
        if rep is not None:
            return Duplicate(Reason.DUPLICATE_TEXT, rep)
        self._images[image_sha] = number
        if self._near is not None:
            self._near.add(phash, number)
            if colour is not None:
                self._colours[number] = colour
        if self._semantic is not None and embedding is not None:
            self._semantic.add(embedding, number)
        self._texts[text_key] = number
        return None

    def _first_near_picture(self, phash: int, colour: bytes | None) -> int | None:
        """The earliest representative whose pHash is near and whose colours match (when both are known)."""
        assert self._near is not None
        candidates = self._near.near(phash)  # earliest first
        if self._colour_max_distance is None or colour is None:
            return candidates[0] if candidates else None
        return next((rep for rep in candidates if rep not in self._colours
                     or colour_distance(colour, self._colours[rep]) <= self._colour_max_distance), None)
