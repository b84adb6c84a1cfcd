"""data_tools.semantic: every pair at or above the cosine threshold, however dense the cluster."""

import numpy as np
import pytest

from data_tools.dedup import Deduplicator
from data_tools.records import Reason
from data_tools.semantic import PENDING, SemanticIndex, normalise, similar_pairs
from data_tools.split import leak_free_groups

THRESHOLD = 0.9
DIM = 32


def two_dense_clusters(background: int = 200, size: int = 40, seed: int = 0) -> np.ndarray:
    """Two clusters of `size` near-identical vectors (cosine ~0.9999 inside) whose cross pairs all sit at
    cosine ~0.94, after `background` random vectors (cosine ~0 to everything)."""
    rng = np.random.default_rng(seed)
    shared, a, b = normalise(rng.normal(size=(3, DIM)))
    centres = normalise(np.stack([shared + 0.25 * a, shared + 0.25 * b]))
    members = normalise(np.repeat(centres, size, axis=0) + 0.002 * rng.normal(size=(2 * size, DIM)))
    return np.concatenate([normalise(rng.normal(size=(background, DIM))), members])


def brute_force(vectors: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    cosine = vectors @ vectors.T
    return {(i, j) for i, j in zip(*np.nonzero(np.triu(cosine >= threshold, k=1)))}


def found(vectors: np.ndarray, **kwargs) -> list[tuple[int, int]]:
    return [pair for left, right in similar_pairs(vectors, THRESHOLD, **kwargs)
            for pair in zip(left.tolist(), right.tolist())]


def test_the_clusters_are_denser_than_any_fixed_neighbour_count():
    vectors = two_dense_clusters()
    cross = vectors[200:240] @ vectors[240:].T
    assert cross.min() >= THRESHOLD and cross.max() < 0.99  # every cross pair reaches the threshold
    assert (vectors[200:240] @ vectors[200:240].T).min() > cross.max()  # yet 39 own members are nearer


@pytest.mark.parametrize("path", ["exact", "graph"])
def test_similar_pairs_finds_every_pair_of_two_dense_clusters(path):
    vectors = two_dense_clusters()
    pairs = found(vectors, exact_up_to=len(vectors) if path == "exact" else 0)
    assert len(pairs) == len(set(pairs))  # each once
    assert set(pairs) == brute_force(vectors, THRESHOLD)
    assert len(pairs) == 80 * 79 // 2  # all pairs among the 80, none with the background


@pytest.mark.parametrize("path", ["exact", "graph"])
def test_similar_pairs_match_brute_force_on_many_small_groups(path):
    rng = np.random.default_rng(3)
    centres = normalise(rng.normal(size=(150, DIM)))
    vectors = normalise(np.repeat(centres, 4, axis=0) + 0.1 * rng.normal(size=(600, DIM)))
    expected = brute_force(vectors, THRESHOLD)
    assert expected and set(found(vectors, exact_up_to=600 if path == "exact" else 0)) == expected


def test_similar_pairs_keeps_the_threshold_itself():
    vectors = normalise(np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], dtype=np.float32))
    cosine = float(vectors[0] @ vectors[1])
    for path in (3, 0):
        pairs = [p for left, right in similar_pairs(vectors, cosine, exact_up_to=path) for p in zip(left.tolist(), right.tolist())]
        assert (0, 1) in pairs and (0, 2) not in pairs


def test_dense_clusters_go_to_one_split_group():
    """Every cross pair reaches split's threshold, so all 80 pictures must share a group (and a split)."""
    vectors = two_dense_clusters()
    n = len(vectors)
    groups = leak_free_groups([f"图片{i}" for i in range(n)], np.zeros(n, dtype=np.uint64), None,
                              similar_pairs(vectors, THRESHOLD))
    assert len({groups.find(i) for i in range(200, n)}) == 1
    assert len({groups.find(i) for i in range(200)}) == 200  # the background is linked to nothing


def test_semantic_dedup_of_dense_clusters_matches_brute_force():
    """In input order each record joins the most similar kept image at or above the threshold, as a scan decides."""
    vectors = two_dense_clusters()
    assert len(vectors) > PENDING  # part of the kept images are in the graph, part still compared exactly
    dedup = Deduplicator(None, SemanticIndex(DIM, THRESHOLD))
    kept: list[int] = []
    for number, vector in enumerate(vectors):
        sims = vectors[kept] @ vector if kept else np.zeros(0)
        expected = kept[int(np.argmax(sims))] if len(sims) and sims.max() >= THRESHOLD else None
        got = dedup.check(number, number.to_bytes(4, "big"), 0, "q", f"文本{number}", vector)
        assert got == (None if expected is None else (Reason.SEMANTIC_DUPLICATE, expected))
        if expected is None:
            kept.append(number)
    assert kept == list(range(201))  # the background and the first cluster member; everything else repeats it
