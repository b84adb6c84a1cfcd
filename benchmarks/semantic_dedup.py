"""Semantic dedup at growing corpus sizes: work and memory per image stay flat (data_tools.semantic).

    python benchmarks/semantic_dedup.py [--small] [--dim 512]

For each size n, a fresh process runs data_tools' Deduplicator with a SemanticIndex (faiss HNSW)
over n clustered, L2-normalised embeddings, 10% of them planted near-copies of an earlier one
(cosine about 0.97), in input order, as build-pairs does. It reports the time per image, the
memory per image (the bytes of the faiss index's vectors and graph, and the resident memory the
run adds, RSS after minus before: the latter can read low when freed input buffers are reused), the distance computations per graph lookup (the work, independent of the machine),
and the share of planted copies found (the HNSW recall at the dedup threshold). It also times
split grouping's similar_pairs (every pair at cosine >= SPLIT_THRESHOLD) on the same vectors: the
adaptive-k HNSW path at every size, and the exact range search (its default up to
data_tools.semantic.EXACT_UP_TO rows) where it is that path, giving the HNSW path's pair recall. Prints one JSON
object. Memory per image is flat; the work per lookup grows like log n (HNSW), and CPU time per
image a little faster once the index outgrows the CPU caches.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SIZES = (10_000, 20_000, 40_000, 80_000)
SMALL_SIZES = (2_000, 4_000)
THRESHOLD = 0.95
SPLIT_THRESHOLD = 0.9


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def index_bytes(semantic) -> int:
    """What the faiss HNSW index holds: the vectors, the graph's links, offsets and levels."""
    import faiss

    index = semantic._index
    hnsw = index.hnsw
    arrays = (hnsw.neighbors, hnsw.offsets, hnsw.levels)
    return index.ntotal * index.d * 4 + sum(faiss.vector_to_array(a).nbytes for a in arrays)


def one_size(n: int, dim: int) -> dict:
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from data_tools.dedup import Deduplicator
    from data_tools.semantic import SemanticIndex, normalise

    rng = np.random.default_rng(0)
    centres = normalise(rng.normal(size=(max(n // 50, 1), dim)))  # clusters, as real embeddings have
    vectors = normalise(centres[rng.integers(0, len(centres), n)] + 0.9 * rng.normal(size=(n, dim)) / np.sqrt(dim))
    planted = rng.choice(np.arange(n // 2, n), size=n // 10, replace=False)
    sources = rng.integers(0, n // 2, size=len(planted))
    vectors[planted] = normalise(vectors[sources] + 0.25 * rng.normal(size=(len(planted), dim)) / np.sqrt(dim))
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    shas = [i.to_bytes(8, "little") for i in range(n)]
    import faiss

    faiss.cvar.hnsw_stats.reset()
    before = rss_bytes()
    semantic = SemanticIndex(dim, THRESHOLD)
    dedup = Deduplicator(None, semantic)
    start = time.process_time()  # CPU time: the machine may be shared
    removed = set()
    for i in range(n):
        if dedup.check(i, shas[i], 0, "q", str(i), vectors[i]) is not None:
            removed.add(i)
    seconds = time.process_time() - start
    after = rss_bytes()
    found = sum(1 for i in planted.tolist() if i in removed)
    split_pairs = measure_similar_pairs(vectors)
    stats = faiss.cvar.hnsw_stats  # graph lookups (one per image once the graph has nodes) and their distances
    return {
        "images": n,
        "dim": dim,
        "seconds": round(seconds, 3),
        "cpu_us_per_image": round(1e6 * seconds / n, 1),
        "distances_per_lookup": round(stats.ndis / max(stats.n1, 1), 1),
        "index_bytes_per_image": round(index_bytes(semantic) / n, 1),
        "rss_bytes_per_image": round((after - before) / n, 1),
        "removed": len(removed),
        "planted_copies": len(planted),
        "planted_found": round(found / len(planted), 4),
        "split_pairs": split_pairs,
    }


def measure_similar_pairs(vectors) -> dict:
    """similar_pairs at the split threshold: CPU seconds and pairs per path, and the graph path's recall."""
    import numpy as np

    from data_tools.semantic import EXACT_UP_TO, similar_pairs

    def run(exact_up_to: int):
        start = time.process_time()
        keys = [left * len(vectors) + right for left, right in similar_pairs(vectors, SPLIT_THRESHOLD, exact_up_to)]
        return np.concatenate(keys) if keys else np.zeros(0, np.int64), time.process_time() - start

    graph, graph_s = run(0)
    out = {"graph": {"cpu_s": round(graph_s, 3), "pairs": len(graph)}}
    if len(vectors) <= EXACT_UP_TO:
        exact, exact_s = run(EXACT_UP_TO)
        out["exact"] = {"cpu_s": round(exact_s, 3), "pairs": len(exact)}
        out["graph"]["recall"] = round(len(np.intersect1d(graph, exact)) / max(len(exact), 1), 5)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="two small sizes (a smoke run)")
    parser.add_argument("--dim", type=int, default=512, help="embedding size (ViT-B/16: 512)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one size in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_size(args.one, args.dim)))
        return
    runs = []
    for n in SMALL_SIZES if args.small else SIZES:  # a fresh process per size: RSS is not shared between them
        out = subprocess.run([sys.executable, __file__, "--one", str(n), "--dim", str(args.dim)],
                             capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    first, last = runs[0], runs[-1]
    print(json.dumps({
        "benchmark": "semantic_dedup",
        "threshold": THRESHOLD,
        "runs": runs,
        "cpu_time_per_image_growth": round(last["cpu_us_per_image"] / first["cpu_us_per_image"], 2),
        "distances_per_lookup_growth": round(last["distances_per_lookup"] / first["distances_per_lookup"], 2),
        "memory_per_image_growth": round(last["index_bytes_per_image"] / max(first["index_bytes_per_image"], 1), 2),
        "corpus_growth": last["images"] // first["images"],
    }, indent=2))


if __name__ == "__main__":
    main()
