"""Per-query cap: no query may dominate the data set (CLIP capped each of its queries at 20,000 pairs).

Which pairs survive the cap is decided by a seeded hash of the pair's content, not by input
order, so a cap samples evenly across a query's hits, and reruns (any worker count, any shard
size) pick exactly the same pairs.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass
from hashlib import blake2b


@dataclass(frozen=True, slots=True)
class CapCandidate:
    """What the cap needs to know about one deduplicated pair."""

    order: int  # global input order
    query: str
    priority: int  # lower survives


def pair_priority(seed: int, image_sha: bytes) -> int:
    """Seeded, content-derived rank of a pair within its query (images are unique after dedup)."""
    digest = blake2b(image_sha, digest_size=8, key=b"cap" + seed.to_bytes(8, "little", signed=True))
    return int.from_bytes(digest.digest(), "big")


def cap_per_query(candidates: Iterable[CapCandidate], cap: int) -> tuple[set[int], dict[str, int]]:
    """Orders of the capped (dropped) pairs, and how many were capped per query; cap 0 means no cap.

    Keeps a bounded max-heap per query, so memory is O(min(hits, cap)) per query.
    """
    capped: set[int] = set()
    capped_per_query: dict[str, int] = {}
    if cap <= 0:
        return capped, capped_per_query
    heaps: dict[str, list[tuple[int, int]]] = {}
    for candidate in candidates:
        heap = heaps.setdefault(candidate.query, [])
        entry = (-candidate.priority, -candidate.order)  # heap[0] is the worst kept pair
        if len(heap) < cap:
            heapq.heappush(heap, entry)
            continue
        if entry > heap[0]:  # ranks above the worst kept pair: that one is dropped instead
            entry = heapq.heapreplace(heap, entry)
        capped.add(-entry[1])
        capped_per_query[candidate.query] = capped_per_query.get(candidate.query, 0) + 1
    return capped, capped_per_query
