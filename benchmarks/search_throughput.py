"""Search index speed: exact (faiss IndexFlatIP) vs approximate (HNSW) at 10k and 100k vectors; prints JSON.

The vectors are uniformly random unit vectors of dimension 512 (the projection size of
chinese-clip-vit-base-patch16), the queries other random unit vectors: the hardest case for an
approximate index, since nothing clusters. Real image embeddings cluster and fare better.

Per size and kind: build seconds, one-query latency (median and p95 over single queries, as a
person's search sends them) and batch throughput (queries/s for a batch of all queries), and for
HNSW recall@10 against the exact top 10 (the share of the exact ten neighbours it finds), for the
random queries and for queries near a stored vector (cosine ~0.75 to it: a similar image is there). The
index structures are the ones `cnclip search index` builds (cnclip.search_index.build_faiss), and
the result is what cnclip.search_index.APPROXIMATE_FROM is set from.

    python benchmarks/search_throughput.py               # 10k and 100k (about a minute on 2 cores)
    python benchmarks/search_throughput.py --sizes 2000  # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cnclip.search_index import HNSW_EF_SEARCH, HNSW_M, build_faiss  # noqa: E402

DIM, K = 512, 10
EF_SWEEP = (32, 128, 512, 2048)


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def overlap(rows: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of the exact top 10 that the approximate top 10 contains."""
    return round(float(np.mean([len(set(a) & set(b)) / K for a, b in zip(rows.tolist(), exact.tolist())])), 4)


def ef_sweep(index, queries, near, exact_rows, exact_near) -> list[dict]:
    """Recall and single-query time at other efSearch values (the same built graph; search-time only)."""
    out = []
    for ef in EF_SWEEP:
        index.hnsw.efSearch = ef
        timing, rows = measure(index, queries[:50])
        _, near_rows = index.search(near, K)
        out.append({"efSearch": ef, "query_ms_median": timing["query_ms_median"],
                    "recall_at_10_vs_exact": overlap(rows, exact_rows[:50]),
                    "recall_at_10_vs_exact_near_queries": overlap(near_rows, exact_near)})
    index.hnsw.efSearch = HNSW_EF_SEARCH
    return out


def measure(index, queries: np.ndarray) -> dict:
    single = []
    for q in queries:
        tic = time.perf_counter()
        index.search(q[None, :], K)
        single.append(time.perf_counter() - tic)
    tic = time.perf_counter()
    _, rows = index.search(queries, K)
    batch = time.perf_counter() - tic
    single.sort()
    return {"query_ms_median": round(1000 * statistics.median(single), 3),
            "query_ms_p95": round(1000 * single[int(0.95 * (len(single) - 1))], 3),
            "batch_queries_per_s": round(len(queries) / batch, 1)}, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--exact-sizes", default="", help="sizes measured with the exact index only (e.g. 1000000: "
                        "where exact search stops being instant; HNSW at that size takes too long to build here)")
    parser.add_argument("--threads", type=int, default=0,
                        help="faiss OpenMP threads (default: faiss's own, all cores); on a busy machine 1 thread "
                             "answers single queries faster than contended threads")
    args = parser.parse_args()
    import faiss

    if args.threads:
        faiss.omp_set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    queries = unit(rng, args.queries)
    results = []
    for n in map(int, args.sizes.split(",")):
        data = unit(rng, n)
        # queries near a stored vector (cosine ~0.75 to it), as when a similar image is in the collection
        near = data[rng.choice(n, args.queries, replace=False)] + 0.04 * rng.standard_normal((args.queries, DIM),
                                                                                          dtype=np.float32)
        near /= np.linalg.norm(near, axis=1, keepdims=True)
        row = {"vectors": n, "dim": DIM}
        exact_rows = None
        for kind in ("exact", "hnsw"):
            tic = time.perf_counter()
            index = build_faiss(data, kind)
            build = time.perf_counter() - tic
            timing, rows = measure(index, queries)
            entry = {"build_s": round(build, 2), **timing}
            _, near_rows = index.search(near, K)
            if kind == "exact":
                exact_rows, exact_near = rows, near_rows
            else:
                entry["recall_at_10_vs_exact"] = overlap(rows, exact_rows)
                entry["recall_at_10_vs_exact_near_queries"] = overlap(near_rows, exact_near)
                entry["params"] = {"M": HNSW_M, "efSearch": HNSW_EF_SEARCH}
                entry["ef_sweep"] = ef_sweep(index, queries, near, exact_rows, exact_near)
            row[kind] = entry
        results.append(row)
        print(f"{n} vectors: {json.dumps(row)}", file=sys.stderr)
    for n in (int(x) for x in args.exact_sizes.split(",") if x):
        data = unit(rng, n)
        tic = time.perf_counter()
        index = build_faiss(data, "exact")
        build = time.perf_counter() - tic
        timing, _ = measure(index, queries[:20])
        results.append({"vectors": n, "dim": DIM, "exact": {"build_s": round(build, 2), **timing, "queries": 20}})
        print(f"{n} vectors: {json.dumps(results[-1])}", file=sys.stderr)
        del data, index
    print(json.dumps({"benchmark": "search_throughput", "faiss": faiss.__version__,
                      "threads": faiss.omp_get_max_threads(), "cpu": platform.processor() or platform.machine(),
                      "load_average": os.getloadavg(), "queries": args.queries, "results": results}, indent=2))


if __name__ == "__main__":
    main()
