"""data_tools.hamming: the Hamming neighbourhoods dedup and split grouping share, against brute force."""

import random

import numpy as np
import pytest

from data_tools.config import DedupConfig, SplitConfig
from data_tools.dedup import Deduplicator
from data_tools.hamming import HammingIndex, hamming_pairs, layout
from data_tools.images import colour_distance
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


def test_index_grows_in_levels_and_stays_exact():
    """Added one at a time, the index keeps at most log2(n) levels, the largest under a layout for its size."""
    rng = random.Random(7)
    stored = [rng.getrandbits(64) for _ in range(20_000)]
    index = HammingIndex(8)
    for number, value in enumerate(stored):
        index.add(value, number)
    sizes = [end - first for first, end, _ in index._levels]
    assert sum(sizes) == 20_000 and len(sizes) <= 15 and sizes == sorted(sizes, reverse=True)
    largest = index._levels[0][2]
    assert (largest.tables, largest.bits) == layout(8, sizes[0]) != layout(8, 1024)
    queries = [stored[i] ^ sum(1 << b for b in rng.sample(range(64), rng.randrange(11))) for i in range(0, 20_000, 97)]
    values = np.array(stored, dtype=np.uint64)
    for q in queries:
        expected = np.flatnonzero(np.bitwise_count(values ^ np.uint64(q)) <= 8).tolist()
        assert index.near(q) == expected
    stored_near, earlier = index.near_batch(queries)
    assert stored_near == [index.near(q) for q in queries]
    assert earlier == [[i for i in range(j) if bits(queries[i], queries[j]) <= 8] for j in range(len(queries))]


def test_a_query_checks_far_fewer_candidates_than_a_scan():
    """Sub-quadratic: the full-distance checks per query (of the tables hamming_pairs searches) stay far
    below the number stored."""
    from data_tools.hamming import _Tables

    per_query = {}
    for n in (1_500, 12_000, 100_000):
        hashes = np.random.default_rng(n).integers(0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True)
        tables = _Tables(hashes, 8)
        for _ in tables.search(hashes, first_id=0):  # random hashes: a handful of pairs within 8 bits at most
            pass
        per_query[n] = tables.candidates_checked / n
    assert per_query[100_000] < 100_000 / 1000  # a scan checks all of them; the old banded search n / 128 a band
    # 66x the hashes, not 66x the checks (wider keys cost more lookups: the layout balances the two)
    assert per_query[100_000] < 6 * per_query[1_500]


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


@pytest.mark.parametrize("batch", [1, 7, 64, 10_000])
def test_dedup_in_batches_decides_as_one_at_a_time(batch):
    """check_many (the batch's pHash neighbours looked up together, in-batch copies included) gives each
    record the group a scan over the earlier representatives gives, with colours, same images and same
    texts in play, whatever the batch size."""
    rng = random.Random(11)
    hashes = planted(4, seed=400)
    mixed = len(hashes)  # these also repeat images and texts; the recoloured triples below only pictures
    colours = [bytes([rng.choice([0, 0, 200])] * 32) for _ in hashes]
    for _ in range(12):  # a picture, its recolouring (a new representative), and a copy of the recolouring
        base = rng.getrandbits(64)
        hashes += [base, base ^ 1, base ^ 3]
        colours += [bytes(32), bytes([200] * 32), bytes([200] * 32)]
    n = len(hashes)
    shas = [b"same-pixels" if i % 9 == 0 and i < mixed and rng.random() < 0.5 else i.to_bytes(4, "big") for i in range(n)]
    texts = [f"文本{i % 150 if i < mixed else i}" for i in range(n)]  # repeats after 150

    representatives: dict[int, tuple] = {}  # number -> (sha, hash, colour, text)
    expected = []
    for i in range(n):
        reps = list(representatives.items())
        decision = next(((Reason.DUPLICATE_IMAGE, r) for r, v in reps if v[0] == shas[i]), None)
        decision = decision or next(((Reason.NEAR_DUPLICATE_IMAGE, r) for r, v in reps if bits(v[1], hashes[i]) <= 4
                                     and colour_distance(v[2], colours[i]) <= 20), None)
        decision = decision or next(((Reason.DUPLICATE_TEXT, r) for r, v in reps if v[3] == texts[i]), None)
        expected.append(decision)
        if decision is None:
            representatives[i] = (shas[i], hashes[i], colours[i], texts[i])

    dedup = Deduplicator(phash_max_distance=4, colour_max_distance=20)
    got = []
    for start in range(0, n, batch):
        part = range(start, min(start + batch, n))
        got += dedup.check_many(list(part), [shas[i] for i in part], [hashes[i] for i in part], ["q"] * len(part),
                                [texts[i] for i in part], colours=[colours[i] for i in part])
    assert [None if g is None else tuple(g) for g in got] == expected
    kinds = {e[0] for e in expected if e is not None}
    assert kinds == {Reason.DUPLICATE_IMAGE, Reason.NEAR_DUPLICATE_IMAGE, Reason.DUPLICATE_TEXT}
    # a near copy whose colours differ from the earliest near representative joins a later one
    assert any(e and e[0] is Reason.NEAR_DUPLICATE_IMAGE and any(bits(hashes[r], hashes[i]) <= 4 for r in representatives
               if r < e[1]) for i, e in enumerate(expected))


def test_a_dense_cluster_comes_out_in_bounded_pieces(monkeypatch):
    """Hundreds of copies of one picture: every pair still found once, in pieces of about CANDIDATES
    candidates (plus one key's ids at most), not all at once."""
    from data_tools import hamming

    monkeypatch.setattr(hamming, "CANDIDATES", 1000)
    rng = random.Random(5)
    base = rng.getrandbits(64)
    hashes = [base] * 200 + [base ^ (1 << rng.randrange(64)) for _ in range(200)] + planted(8, seed=6)
    n = len(hashes)
    expected = {(i, j) for i in range(n) for j in range(i + 1, n) if bits(hashes[i], hashes[j]) <= 8}
    pieces = list(hamming_pairs(np.array(hashes, dtype=np.uint64), 8))
    found = [(a, b) for left, right in pieces for a, b in zip(left.tolist(), right.tolist())]
    assert len(found) == len(set(found)) and set(found) == expected and len(expected) > 79_000
    assert len(pieces) > 40 and max(len(left) for left, _ in pieces) <= 1000 + 400
