"""Global stages: dedup, per-query cap, split (data_tools.dedup, .balance, .split)."""

import random
from collections import Counter

import numpy as np
import pytest

from data_tools.cap import CapGroups, cap_groups, pair_priority
from data_tools.dedup import Deduplicator
from data_tools.semantic import SemanticIndex, normalise, similar_pairs
from data_tools.records import Reason
from cnclip.errors import UsageError
from data_tools.split import assign_split, leak_free_groups, parse_splits

from conftest import in_fresh_process, load_benchmark


def test_dedup_groups_under_the_first_and_gives_one_reason():
    dedup = Deduplicator(phash_max_distance=4)
    sha = [bytes([i]) * 16 for i in range(5)]
    base = 0x0F0F_0F0F_0F0F_0F0F
    assert dedup.check(0, sha[0], base, "猫", "一只小猫") is None
    assert dedup.check(1, sha[0], base ^ 0xFFFF_0000, "狗", "一只小狗") == (Reason.DUPLICATE_IMAGE, 0)  # same pixels
    assert dedup.check(2, sha[1], base ^ 0b111, "狗", "一只小狗") == (Reason.NEAR_DUPLICATE_IMAGE, 0)  # 3 bits away
    assert dedup.check(3, sha[2], ~base & (2**64 - 1), "猫", "一只小猫") == (Reason.DUPLICATE_TEXT, 0)  # same query+text
    assert dedup.check(4, sha[3], ~base & (2**64 - 1), "狗", "一只小猫") is None  # same text, other query: new group
    assert dedup.check(5, sha[4], base ^ 0b111, "狗", "一只小狗") == (Reason.NEAR_DUPLICATE_IMAGE, 0)  # members are not
    assert dedup.check(6, sha[1], 0x1234, "狗", "一只小狗") is None  # representatives: their image and text are free


def test_near_dedup_can_be_disabled():
    dedup = Deduplicator(phash_max_distance=None)
    assert dedup.check(0, b"a" * 16, 7, "q", "t1") is None
    assert dedup.check(1, b"b" * 16, 7, "q", "t2") is None


def test_semantic_dedup_finds_the_kept_image_within_the_threshold():
    rng = np.random.default_rng(0)
    vectors = normalise(rng.normal(size=(600, 32)))
    dedup = Deduplicator(None, SemanticIndex(32, threshold=0.95))
    for number, vector in enumerate(vectors):  # 600 distinct directions: all kept (more than the exact buffer)
        assert dedup.check(number, bytes([number % 256, number // 256]), 0, "q", f"t{number}", vector) is None
    near = normalise(vectors[[3, 590]] + 0.02 * rng.normal(size=(2, 32)))  # one in the graph, one still pending
    assert dedup.check(600, b"x", 0, "q", "u1", near[0]) == (Reason.SEMANTIC_DUPLICATE, 3)
    assert dedup.check(601, b"y", 0, "q", "u2", near[1]) == (Reason.SEMANTIC_DUPLICATE, 590)


def test_similar_pairs_matches_brute_force():
    rng = np.random.default_rng(1)
    centres = normalise(rng.normal(size=(40, 16)))
    vectors = normalise(np.repeat(centres, 3, axis=0) + 0.08 * rng.normal(size=(120, 16)))
    cosine = vectors @ vectors.T
    expected = {(i, j) for i in range(120) for j in range(i + 1, 120) if cosine[i, j] >= 0.9}
    found = {pair for left, right in similar_pairs(vectors, 0.9) for pair in zip(left.tolist(), right.tolist())}
    assert expected and found == expected


def test_leak_free_groups_link_captions_that_differ_only_in_punctuation():
    groups = leak_free_groups(["红色 连衣裙!", "红色连衣裙", "蓝色台灯", "ＡＢ猫", "ab猫"], np.array([0, 1 << 63, 7, 9, 11], dtype=np.uint64), None)
    assert [groups.find(i) for i in range(5)] == [0, 0, 2, 3, 3]


def chosen(groups: list[tuple[int, tuple[str, ...]]], cap: int) -> dict[int, int]:
    """cap_groups over (priority, member queries) groups, as {group: member kept}."""
    keep = cap_groups(CapGroups.of(groups), cap)
    return {g: position for g, position in enumerate(keep.tolist()) if position >= 0}


def test_cap_keeps_the_best_groups_of_each_query():
    groups = [(pair_priority(0, f"{q}{i}".encode()), (q,)) for q, n in (("猫", 30), ("狗", 5)) for i in range(n)]
    kept = chosen(groups, cap=20)
    cat = sorted(range(30), key=lambda g: groups[g][0])
    assert set(kept) == set(cat[:20]) | set(range(30, 35)) and set(kept.values()) == {0}
    assert chosen(groups, cap=0) == {g: 0 for g in range(35)}


def test_cap_offers_a_refused_group_to_the_query_of_its_next_copy():
    # group 0: first found by 猫 (full of better groups), copied under 狗 and 鸟; 狗 is full too.
    groups = [(100, ("猫", "猫", "狗", "鸟")), (1, ("猫",)), (2, ("狗",)), (3, ("鸟",))]
    assert chosen(groups, cap=1) == {1: 0, 2: 0, 3: 0}  # every query that found group 0 is full of better ones
    groups[3] = (200, ("鸟",))
    assert chosen(groups, cap=1) == {0: 3, 1: 0, 2: 0}  # 猫 and 狗 refuse it, 鸟 takes it and drops group 3
    # a displaced group moves on too, and the outcome does not depend on which group comes first
    groups = [(5, ("狗", "猫")), (1, ("狗",)), (9, ("猫",))]
    assert chosen(groups, cap=1) == {0: 1, 1: 0}
    assert chosen(groups[::-1], cap=1) == {1: 0, 2: 1}


def reference_cap(groups: list[tuple[int, tuple[str, ...]]], cap: int) -> dict[int, int]:
    """Deferred acceptance written plainly, one proposal at a time, O(n^2): a free group offers itself to
    the query of its next member whose query is new to it; a query over its cap drops its worst group
    (highest priority, then highest group number), which becomes free again."""
    held: dict[str, list[int]] = {}
    offers = [[p for p, q in enumerate(queries) if q not in queries[:p]] for _, queries in groups]
    tried = [0] * len(groups)
    kept: dict[int, int] = {}
    free = list(range(len(groups)))
    while free:
        g = free.pop()
        if tried[g] == len(offers[g]):
            continue
        position = offers[g][tried[g]]
        tried[g] += 1
        query = groups[g][1][position]
        held.setdefault(query, []).append(g)
        kept[g] = position
        if len(held[query]) > cap:
            worst = max(held[query], key=lambda h: (groups[h][0], h))
            held[query].remove(worst)
            del kept[worst]
            free.append(worst)
    return kept


def test_cap_equals_plain_deferred_acceptance_on_random_crawls():
    """Random groups of 1-5 members over few queries (so caps bind and copies cross queries), many
    equal priorities (ties go to the lower group number): the vectorised first round plus heaps gives
    the plain algorithm's outcome, at every cap."""
    rng = random.Random(7)
    for trial in range(300):
        queries = [f"q{k}" for k in range(rng.randint(1, 6))]
        groups = [(rng.randint(0, 8), tuple(rng.choice(queries) for _ in range(rng.choice((1, 1, 1, 2, 3, 5)))))
                  for _ in range(rng.randint(1, 40))]
        for cap in (1, 2, 3, 7):
            assert chosen(groups, cap) == reference_cap(groups, cap), (trial, cap, groups)


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
    # Stable: a function of (image key, splits, seed) alone, so a rebuild puts every image where it was:
    # the same in any key order and in another process (another str-hash salt, fresh random state).
    first = {k: assign_split(k, splits, 0) for k in keys[:200]}
    random.seed(1)
    assert {k: assign_split(k, splits, 0) for k in reversed(keys[:200])} == first
    elsewhere = in_fresh_process("import json; from data_tools.split import assign_split, parse_splits; "
                                 "print(json.dumps([assign_split(i.to_bytes(16, 'big'), parse_splits('0.8,0.1,0.1'), 0)"
                                 " for i in range(200)]))")
    assert elsewhere == list(first.values()) and set(elsewhere) == {"train", "valid", "test"}
    assert [assign_split(k, splits, 0) for k in keys[:50]] != [assign_split(k, splits, 1) for k in keys[:50]]
    assert {assign_split(k, parse_splits("1,0,0"), 0) for k in keys[:100]} == {"train"}


def test_semantic_dedup_benchmark_finds_every_planted_copy_at_small_size():
    """benchmarks/semantic_dedup.py, one small size: the JSON it reports, and dedup exact on it."""
    bench = load_benchmark("semantic_dedup")
    run = bench.one_size(2000, 64)
    assert run["removed"] == run["planted_copies"] == 200 and run["planted_found"] == 1.0
    assert 64 * 4 * 0.9 < run["index_bytes_per_image"] < 64 * 4 + 400  # the vector plus its graph links
    assert run["distances_per_lookup"] > 0 and run["cpu_us_per_image"] > 0
    pairs = run["split_pairs"]  # split grouping's pairs: the graph path finds what the exact one does
    assert pairs["exact"]["pairs"] >= 200 and pairs["graph"]["pairs"] == pairs["exact"]["pairs"] and pairs["graph"]["recall"] == 1.0
