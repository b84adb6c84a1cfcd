"""Global stages: dedup, per-query cap, split (data_tools.dedup, .balance, .split)."""

import random
from collections import Counter

import pytest

from data_tools.cap import CapCandidate, cap_per_query, pair_priority
from data_tools.dedup import Deduplicator, HammingIndex
from data_tools.records import Reason
from cnclip.errors import UsageError
from data_tools.split import assign_split, parse_splits


@pytest.mark.parametrize("max_distance", [0, 2, 4, 8])
def test_hamming_index_matches_brute_force(max_distance):
    rng = random.Random(max_distance)
    stored = [rng.getrandbits(64) for _ in range(300)]
    # Queries: random hashes, and stored hashes with a few bits flipped.
    queries = [rng.getrandbits(64) for _ in range(200)]
    queries += [h ^ sum(1 << rng.randrange(64) for _ in range(rng.randrange(10))) for h in stored[:200]]
    index = HammingIndex(max_distance)
    for h in stored:
        index.add(h)
    for q in queries:
        expected = any((q ^ h).bit_count() <= max_distance for h in stored)
        assert index.contains_near(q) is expected


def test_dedup_keeps_the_first_and_gives_one_reason():
    dedup = Deduplicator(phash_max_distance=4)
    sha = [bytes([i]) * 16 for i in range(5)]
    base = 0x0F0F_0F0F_0F0F_0F0F
    assert dedup.check(sha[0], base, "猫", "一只小猫") is None
    assert dedup.check(sha[0], base ^ 0xFFFF_0000, "狗", "一只小狗") is Reason.DUPLICATE_IMAGE  # same pixels
    assert dedup.check(sha[1], base ^ 0b111, "狗", "一只小狗") is Reason.NEAR_DUPLICATE_IMAGE  # 3 bits away
    assert dedup.check(sha[2], ~base & (2**64 - 1), "猫", "一只小猫") is Reason.DUPLICATE_TEXT  # same query+text
    assert dedup.check(sha[3], ~base & (2**64 - 1), "狗", "一只小猫") is None  # same text, other query: kept
    assert dedup.check(sha[4], base ^ 0b111, "狗", "一只小狗") is Reason.NEAR_DUPLICATE_IMAGE  # rejected ones were not remembered...
    assert dedup.check(sha[1], 0x1234, "狗", "一只小狗") is None  # ...so their image and text are still free


def test_near_dedup_can_be_disabled():
    dedup = Deduplicator(phash_max_distance=None)
    assert dedup.check(b"a" * 16, 7, "q", "t1") is None
    assert dedup.check(b"b" * 16, 7, "q", "t2") is None


def candidates(counts, seed=0):
    order = 0
    for query, n in counts.items():
        for i in range(n):
            yield CapCandidate(order, query, pair_priority(seed, f"{query}{i}".encode()))
            order += 1


def test_cap_per_query():
    capped, per_query = cap_per_query(candidates({"猫": 30, "狗": 5, "鸟": 20}), cap=20)
    assert per_query == {"猫": 10} and len(capped) == 10 and all(order < 30 for order in capped)
    assert cap_per_query(candidates({"猫": 30}), cap=0) == (set(), {})


def test_cap_is_seeded_and_independent_of_input_order():
    a, _ = cap_per_query(candidates({"猫": 50}, seed=1), cap=10)
    b, _ = cap_per_query(reversed(list(candidates({"猫": 50}, seed=1))), cap=10)
    c, _ = cap_per_query(candidates({"猫": 50}, seed=2), cap=10)
    assert a == b and a != c
    assert a != set(range(10, 50))  # a hash sample, not "the first 10"


def test_parse_splits():
    assert parse_splits("0.98,0.01,0.01") == (("train", 0.98), ("valid", 0.01), ("test", 0.01))
    for bad in ("0.5,0.5", "a,b,c", "0.5,0.5,0.5", "1.2,-0.1,-0.1"):
        with pytest.raises(UsageError):
            parse_splits(bad)


def test_split_assignment_is_stable_and_proportional():
    splits = parse_splits("0.8,0.1,0.1")
    keys = [i.to_bytes(16, "big") for i in range(20_000)]
    counts = Counter(assign_split(key, splits, seed=0) for key in keys)
    assert abs(counts["train"] / 20_000 - 0.8) < 0.02 and abs(counts["test"] / 20_000 - 0.1) < 0.02
    assert [assign_split(k, splits, 0) for k in keys[:50]] == [assign_split(k, splits, 0) for k in keys[:50]]
    assert [assign_split(k, splits, 0) for k in keys[:50]] != [assign_split(k, splits, 1) for k in keys[:50]]
    assert {assign_split(k, parse_splits("1,0,0"), 0) for k in keys[:100]} == {"train"}
