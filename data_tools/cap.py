"""Per-query cap: no query may dominate the data set (CLIP capped each of its queries at 20,000 pairs).

The cap works on duplicate groups (data_tools.dedup), not on single records: a group is one
picture that may have been found by several queries. Which groups survive a query's cap is
decided by a seeded hash of the group's image, not by input order, so a cap samples evenly
across a query's hits, and reruns (any worker count, any shard size) pick exactly the same pairs.

A group whose first copy sits in a query that is over its cap is offered to the query of its
next copy, and so on (deferred acceptance, as in stable matching): a picture is dropped by the
cap only when every query that found it is full of pictures ranked above it. The result does
not depend on the order in which groups are processed.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from hashlib import blake2b

import numpy as np


@dataclass(frozen=True)
class CapGroups:
    """The duplicate groups as the cap sees them, in arrays (no Python object per group): group g's
    members have the query codes `queries[starts[g]:starts[g + 1]]`, in input order."""

    priority: np.ndarray  # uint64 per group: lower survives
    queries: np.ndarray  # int64 query code of every member, group after group
    starts: np.ndarray  # int64, one more than the groups

    @classmethod
    def of(cls, groups: Iterable[tuple[int, Sequence[Hashable]]]) -> CapGroups:
        """From (priority, the query of each member) pairs; queries may be any hashable values."""
        codes: dict[Hashable, int] = {}
        priority, queries, starts = [], [], [0]
        for rank, members in groups:
            priority.append(rank)
            queries.extend(codes.setdefault(query, len(codes)) for query in members)
            starts.append(len(queries))
        return cls(np.array(priority, dtype=np.uint64), np.array(queries, dtype=np.int64), np.array(starts, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.priority)

    @cached_property  # the cap and then each member's fate read it: one sort of the members, not two
    def layout(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per member: its group, its position in the group, and the position of the group's first member
        with the same query (its own position when its query is new to the group)."""
        group = np.repeat(np.arange(len(self), dtype=np.int64), np.diff(self.starts))
        position = np.arange(len(group), dtype=np.int64) - self.starts[group]
        key = group * (int(self.queries.max(initial=0)) + 1) + self.queries
        _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
        return group, position, position[first][inverse.reshape(-1)]


def pair_priority(seed: int, image_sha: bytes) -> int:
    """Seeded, content-derived rank of a group within a query (its representative's image)."""
    digest = blake2b(image_sha, digest_size=8, key=b"cap" + seed.to_bytes(8, "little", signed=True))
    return int.from_bytes(digest.digest(), "big")


def cap_groups(groups: CapGroups, cap: int) -> np.ndarray:
    """Per group, the position of the member to keep, or -1 where the cap drops the group.

    cap 0 means no cap: every group keeps its first member. A group proposes only with members whose
    query is new to it (a query that refused a group never takes it later: its held set only gets
    better), first to the query of its first member. Deferred acceptance yields one outcome whatever
    the order of the proposals, so the first proposal of every group is decided at once, in numpy: a
    sort by (query, priority, group) keeps each query's best `cap`. Only groups refused there that
    have another query to try go on, one proposal at a time, against a heap per query they touch.
    Time: O(members log members) in numpy plus O(later proposals x log cap) in Python; a picture found
    by m queries and refused by all costs O(m log m), not O(m^2).
    """
    n = len(groups)
    if cap <= 0:
        return np.zeros(n, dtype=np.int64)
    group, position, first_position = groups.layout
    offer = np.flatnonzero(position == first_position)  # members whose query is new to their group, group after group
    offer_query, offer_position = groups.queries[offer], position[offer]
    offers = np.searchsorted(group[offer], np.arange(n + 1))  # group g's proposals: offers[g]:offers[g + 1]

    keep = np.full(n, -1, dtype=np.int64)
    everyone = np.arange(n, dtype=np.int64)
    query = offer_query[offers[:-1]]
    order = np.lexsort((everyone, groups.priority, query))  # by query, then best first
    sorted_query = query[order]
    segment = np.searchsorted(sorted_query, sorted_query, side="left")
    held = (everyone - segment) < cap
    keep[order[held]] = offer_position[offers[:-1][order[held]]]
    cursor = offers[:-1] + 1
    refused = order[~held]
    waiting = deque(refused[cursor[refused] < offers[1:][refused]].tolist())
    if not waiting:
        return keep

    heaps: dict[int, list[tuple[int, int]]] = {}  # query -> heap of (-priority, -group): heap[0] is the worst

    def heap_of(q: int) -> list[tuple[int, int]]:
        if q not in heaps:  # the groups the first round left there
            lo = int(np.searchsorted(sorted_query, q, side="left"))
            hi = min(int(np.searchsorted(sorted_query, q, side="right")), lo + cap)
            heaps[q] = [(-int(groups.priority[g]), -g) for g in order[lo:hi].tolist()]
            heapq.heapify(heaps[q])
        return heaps[q]

    while waiting:
        g = waiting.popleft()
        if cursor[g] == offers[g + 1]:
            continue  # every query that found it is full of pictures ranked above it: capped
        at = int(cursor[g])  # its next proposal
        cursor[g] += 1
        heap = heap_of(int(offer_query[at]))
        entry = (-int(groups.priority[g]), -g)
        keep[g] = offer_position[at]
        if len(heap) < cap:
            heapq.heappush(heap, entry)
            continue
        if entry > heap[0]:  # ranks above the worst held group: that one is displaced
            entry = heapq.heapreplace(heap, entry)
        loser = -entry[1]
        keep[loser] = -1
        waiting.append(loser)
    return keep
