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
from dataclasses import dataclass
from hashlib import blake2b


@dataclass(frozen=True, slots=True)
class CapGroup:
    """What the cap needs to know about one duplicate group."""

    priority: int  # lower survives
    queries: tuple[str, ...]  # the query of each member, in member (input) order


def pair_priority(seed: int, image_sha: bytes) -> int:
    """Seeded, content-derived rank of a group within a query (its representative's image)."""
    digest = blake2b(image_sha, digest_size=8, key=b"cap" + seed.to_bytes(8, "little", signed=True))
    return int.from_bytes(digest.digest(), "big")


def cap_groups(groups: list[CapGroup], cap: int) -> dict[int, int]:
    """For each group that survives, the position of the member to keep; absent groups are capped.

    cap 0 means no cap: every group keeps its first member. Memory: one heap of at most `cap`
    entries per query, plus a cursor per group. Time: O(members + proposals x log cap); a group
    proposes only with members whose query is new to it (`_proposal_positions`, computed once per
    group of several members), so a picture found by m queries and refused by all costs O(m), not O(m^2).
    """
    if cap <= 0:
        return {g: 0 for g in range(len(groups))}
    held: dict[str, list[tuple[int, int]]] = {}  # query -> heap of (-priority, -group): heap[0] is the worst
    cursor = [0] * len(groups)  # how many of the group's proposal positions it has used
    positions: dict[int, list[int]] = {}  # group -> its proposal positions, for groups of several members
    chosen: dict[int, int] = {}
    waiting = deque(range(len(groups)))
    while waiting:
        g = waiting.popleft()
        queries = groups[g].queries
        if len(queries) == 1:  # most groups: one member, one proposal
            member = 0 if cursor[g] == 0 else None
        else:
            if g not in positions:
                positions[g] = _proposal_positions(queries)
            member = positions[g][cursor[g]] if cursor[g] < len(positions[g]) else None
        if member is None:
            continue  # every query that found it is full: capped
        cursor[g] += 1
        heap = held.setdefault(groups[g].queries[member], [])
        entry = (-groups[g].priority, -g)
        chosen[g] = member
        if len(heap) < cap:
            heapq.heappush(heap, entry)
            continue
        if entry > heap[0]:  # ranks above the worst held group: that one is displaced
            entry = heapq.heapreplace(heap, entry)
        loser = -entry[1]
        del chosen[loser]
        waiting.append(loser)
    return chosen


def _proposal_positions(queries: tuple[str, ...]) -> list[int]:
    """Member positions whose query no earlier member had, in order (a query that refused a group
    never takes it later: its held set only gets better)."""
    seen: set[str] = set()
    positions = []
    for position, query in enumerate(queries):
        if query not in seen:
            seen.add(query)
            positions.append(position)
    return positions
