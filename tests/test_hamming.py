"""data_tools.hamming: the Hamming neighbourhoods dedup and split grouping share, against brute force."""

import random

import numpy as np
import pytest

from data_tools.config import DedupConfig, SplitConfig
from data_tools.dedup import Deduplicator
from data_tools.hamming import HammingIndex, hamming_pairs, layout
from data_tools.records import Reason
from data_tools.split import UnionFind, leak_free_groups

DEDUP_RADII = range(33)  # every radius the filter config allows (data_tools.config)
SPLIT_RADII = range(17)


def planted(radius: int, seed: int, base: int = 120) -> list[int]:
    """Random hashes, and copies of them at radius - 1, radius and radius + 1 bits, and copies of copies."""
    rng = random.Random(seed)
    hashes = [rng.getrandbits(64) for _ in range(base)]
    for i in range(base):
        bits = rng.choice([max(radius - 1, 0), radius, min(radius + 1, 64)])
        hashes.append(hashes[i] ^ sum(1 << b for b in rng.sample(range(64), bits)))
    hashes += [h ^ (1 << rng.randrange(64)) for h in hashes[base:base + 40]]  # chains: links of links
    rng.shuffle(hashes)
    return hashes


def bits(a: int, b: int) -> int:
    return (a ^ b).bit_count()


@pytest.mark.parametrize("radius", SPLIT_RADII)
def test_hamming_pairs_are_exactly_the_pairs_within_the_radius(radius):
    hashes = planted(radius, seed=radius)
    n = len(hashes)
    expected = {(i, j) for i in range(n) for j in range(i + 1, n) if bits(hashes[i], hashes[j]) <= radius}
    found = [(a, b) for left, right in hamming_pairs(np.array(hashes, dtype=np.uint64), radius)
             for a, b in zip(left.tolist(), right.tolist())]
    assert len(found) == len(set(found))  # each pair once
    assert expected and set(found) == expected
    # the planted copies at radius + 1 are there and not found: the boundary is exact
    assert any(bits(hashes[i], hashes[j]) == radius + 1 for i in range(n) for j in range(i + 1, n))


@pytest.mark.parametrize("radius", DEDUP_RADII)
def test_index_finds_exactly_the_stored_hashes_within_the_radius(radius):
    hashes = planted(radius, seed=100 + radius)
    stored, queries = hashes[:150], hashes
    index = HammingIndex(radius)
    for number, value in enumerate(stored):
        index.add(value, payload=1000 + number)
    for q in queries:
        assert index.near(q) == [1000 + i for i, h in enumerate(stored) if bits(q, h) <= radius]


def test_index_regrows_its_tables_and_stays_exact():
    """Past four times the size its layout was chosen for, the index re-files every hash under a new layout."""
    rng = random.Random(7)
    stored = [rng.getrandbits(64) for _ in range(20_000)]
    index = HammingIndex(8)
    for number, value in enumerate(stored):
        index.add(value, number)
    assert (index._index.nhash, index._index.b) != layout(8, 1024)  # re-filed under a layout for more hashes
    queries = [stored[i] ^ sum(1 << b for b in rng.sample(range(64), rng.randrange(11))) for i in range(0, 20_000, 97)]
    values = np.array(stored, dtype=np.uint64)
    for q in queries:
        expected = np.flatnonzero(np.bitwise_count(values ^ np.uint64(q)) <= 8).tolist()
        assert index.near(q) == expected


def test_a_query_checks_far_fewer_candidates_than_a_scan():
    """Sub-quadratic: the full-distance checks per query (faiss' own count) stay far below the number stored."""
    faiss = pytest.importorskip("faiss")
    stats = faiss.cvar.indexBinaryHash_stats
    per_query = {}
    for n in (1_500, 12_000):
        hashes = np.random.default_rng(n).integers(0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True)
        stats.reset()
        assert sum(len(left) for left, _ in hamming_pairs(hashes, 8)) == 0  # random hashes: none within 8 bits
        assert stats.nq == n
        per_query[n] = stats.ndis / n
    assert per_query[12_000] < 12_000 / 100  # a scan checks all 12,000; the old banded search n / 128 a band
    assert per_query[12_000] < 2 * per_query[1_500]  # 8x the hashes, not 8x the checks


def brute_force_groups(hashes: list[int], radius: int) -> list[set[int]]:
    uf = UnionFind(len(hashes))
    for i in range(len(hashes)):
        for j in range(i + 1, len(hashes)):
            if bits(hashes[i], hashes[j]) <= radius:
                uf.union(i, j)
    return partition(uf, len(hashes))


def partition(uf: UnionFind, n: int) -> list[set[int]]:
    groups: dict[int, set[int]] = {}
    for i in range(n):
        groups.setdefault(uf.find(i), set()).add(i)
    return sorted(groups.values(), key=min)


@pytest.mark.parametrize("radius", [0, 3, SplitConfig().phash_max_distance, 16])
def test_split_grouping_matches_brute_force(radius):
    hashes = planted(radius, seed=200 + radius)
    captions = [f"图片{i}" for i in range(len(hashes))]  # all different: only pHash links
    groups = leak_free_groups(captions, np.array(hashes, dtype=np.uint64), radius)
    expected = brute_force_groups(hashes, radius)
    assert partition(groups, len(hashes)) == expected
    assert any(len(g) > (2 if radius else 1) for g in expected)  # the chains made groups larger than a pair


@pytest.mark.parametrize("radius", [0, DedupConfig().phash_max_distance, 8, 32])
def test_dedup_near_duplicates_match_brute_force(radius):
    """Each record joins the earliest earlier representative within the radius, as a scan over them decides."""
    hashes = planted(radius, seed=300 + radius)
    dedup = Deduplicator(phash_max_distance=radius)
    representatives: list[int] = []
    for number, value in enumerate(hashes):
        expected = next((rep for rep in representatives if bits(value, hashes[rep]) <= radius), None)
        got = dedup.check(number, number.to_bytes(4, "big"), value, "q", f"文本{number}")
        assert got == (None if expected is None else (Reason.NEAR_DUPLICATE_IMAGE, expected))
        if expected is None:
            representatives.append(number)
    assert 1 < len(representatives) < len(hashes)


def test_no_pairs_yield_no_batches():
    """Callers index other arrays with a batch (split's colour check): an empty batch is never yielded."""
    assert list(hamming_pairs(np.array([0, 2**64 - 1, 2**32 - 1], dtype=np.uint64), 3)) == []
    colours = np.zeros((3, 32), dtype=np.uint8)
    groups = leak_free_groups(["a", "b", "c"], np.array([0, 2**64 - 1, 2**32 - 1], dtype=np.uint64), 3,
                              colours=colours, colour_max_distance=20.0)
    assert [groups.find(i) for i in range(3)] == [0, 1, 2]


def test_scale_benchmark_agrees_with_the_banded_search_at_small_size():
    """benchmarks/hamming_scale.py, small: its new and old pair counts agree (it asserts so) on planted pairs."""
    from conftest import load_benchmark

    bench = load_benchmark("hamming_scale")
    hashes = np.array(planted(4, seed=9), dtype=np.uint64)
    assert bench.new_pair_count(hashes, 4) == bench.banded_pair_count(hashes, 4) > 0
    row = bench.one_size(3000, 4, old_max=3000, online_max=3000)
    assert row["pairs"]["found"] == row["old"]["found"] and row["online"]["cpu_us_per_hash"] > 0
    sampled = bench.one_size(3000, 8, old_max=0, online_max=0, sample_from=1000, sample_queries=500)["pairs_sampled"]
    assert sampled["sampled_queries"] == 500 and sampled["cpu_s_estimated"] >= sampled["build_cpu_s"]
