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
representatives only, a batch of records at a time (`check_many`): the batch's pHash neighbours
among the stored representatives and among each other are found together, then the records are
decided one by one in order, so the result is the one a record-at-a-time scan gives. Which member of a group is finally kept is the per-query cap's decision (data_tools.cap):
when the representative's query is over its cap, another member may be kept instead, so an
image is never lost because its first copy happened to sit in a capped query.
"""

from __future__ import annotations

from collections.abc import Sequence
from hashlib import blake2b
from typing import NamedTuple

import numpy as np

from data_tools.hamming import HammingIndex
from data_tools.images import colour_distance
from data_tools.records import Reason
from data_tools.semantic import SemanticIndex

# Records checked together: their pHash pairs among each other (at most DEDUP_BATCH**2 / 2, however many
# near copies a crawl repeats) are found at once, so the batch bounds that memory; large enough that the
# per-batch lookups run vectorised.
DEDUP_BATCH = 4096


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
        return self.check_many([number], [image_sha], [phash], [query], [text],
                               None if embedding is None else [embedding], [colour])[0]

    def check_many(self, numbers: Sequence[int], image_shas: Sequence[bytes], phashes: Sequence[int],
                   queries: Sequence[str], texts: Sequence[str], embeddings: Sequence[np.ndarray | None] | None = None,
                   colours: Sequence[bytes | None] | None = None) -> list[Duplicate | None]:
        """`check` for each record in turn: the same answers, with the pHash neighbours of the whole
        batch (among the representatives so far and among each other) looked up at once."""
        stored, earlier = self._near.near_batch(phashes) if self._near is not None else ([], [])
        results: list[Duplicate | None] = []
        new_representatives: list[int] = []  # positions in this batch
        is_representative = [False] * len(numbers)
        for at, number in enumerate(numbers):
            colour = colours[at] if colours is not None else None
            near = None
            if self._near is not None:  # earliest first: stored ones were added before this batch
                candidates = stored[at] + [numbers[i] for i in earlier[at] if is_representative[i]]
                near = self._first_near_picture(candidates, colour)
            embedding = embeddings[at] if embeddings is not None else None
            results.append(self._decide(number, image_shas[at], near, queries[at], texts[at], embedding, colour))
            if results[-1] is None:
                is_representative[at] = True
                new_representatives.append(at)
        if self._near is not None:
            self._near.add_many([phashes[at] for at in new_representatives], [numbers[at] for at in new_representatives])
        return results

    def _decide(self, number: int, image_sha: bytes, near: int | None, query: str, text: str,
                embedding: np.ndarray | None, colour: bytes | None) -> Duplicate | None:
        rep = self._images.get(image_sha)
        if rep is not None:
            return Duplicate(Reason.DUPLICATE_IMAGE, rep)
        if near is not None:
            return Duplicate(Reason.NEAR_DUPLICATE_IMAGE, near)
        if self._semantic is not None and embedding is not None and (rep := self._semantic.find(embedding)) is not None:
            return Duplicate(Reason.SEMANTIC_DUPLICATE, rep)
        text_key = blake2b(f"{query}\x00{text}".encode(), digest_size=12).digest()
        rep = self._texts.get(text_key)
        if rep is not None:
            return Duplicate(Reason.DUPLICATE_TEXT, rep)
        self._images[image_sha] = number
        if self._near is not None and colour is not None:
            self._colours[number] = colour
        if self._semantic is not None and embedding is not None:
            self._semantic.add(embedding, number)
        self._texts[text_key] = number
        return None

    def _first_near_picture(self, candidates: list[int], colour: bytes | None) -> int | None:
        """The earliest of the representatives whose pHash is near (`candidates`, earliest first) whose
        colours match (when both are known)."""
        if self._colour_max_distance is None or colour is None:
            return candidates[0] if candidates else None
        return next((rep for rep in candidates if rep not in self._colours
                     or colour_distance(colour, self._colours[rep]) <= self._colour_max_distance), None)
