"""Near-duplicate search at scale: data_tools.hamming against the banded search it replaced; prints JSON.

Random 64-bit hashes (no structure: every candidate a band or table turns up is a false one, the
case that made the banded search quadratic). Per size:

* `pairs`: data_tools.hamming.hamming_pairs over all hashes (split grouping's self-join): CPU
  seconds, µs per hash, pairs found, and the (tables, bits) layout it chose;
* `pairs_sampled` instead, past --sample-from: the table build over all n and the queries of a random
  sample of --sample-queries hashes, timed apart; CPU total estimated as build + n * mean query;
* `online`: HammingIndex.near then .add for every hash in turn (dedup's use), CPU seconds and µs per hash;
* `old`: the band-per-radius scheme both modules used before (radius + 1 bands, every pair inside a
  band's bucket compared: n^2 / 2^(64 / (radius + 1)) comparisons a band), only for sizes up to
  --old-max, since it is quadratic; its pair count must equal the new one's.

CPU seconds (time.process_time) are reported beside wall seconds because the machine may be shared.

    python benchmarks/hamming_scale.py                              # 25k, 50k, 100k, 1M at radius 8
    python benchmarks/hamming_scale.py --sizes 2000 --radius 4      # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from itertools import pairwise
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_tools.hamming import HammingIndex, _multihash, _range, hamming_pairs, layout  # noqa: E402


def banded_pair_count(hashes: np.ndarray, radius: int) -> int:
    """Distinct pairs within `radius`, found the old way: radius + 1 bands, each bucket compared pairwise."""
    bands = radius + 1
    edges = [round(i * 64 / bands) for i in range(bands + 1)]
    found = set()
    for lo, hi in pairwise(edges):
        keys = (hashes >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        for start, end in zip(starts, np.r_[starts[1:], len(order)]):
            members = order[start:end]
            values = hashes[members]
            for row in range(0, len(members) - 1, 1024):
                close = np.bitwise_count(values[row:row + 1024, None] ^ values[None, :]) <= radius
                a, b = np.nonzero(np.triu(close, k=row + 1))
                found.update(zip(members[a + row].tolist(), members[b].tolist()))
    return len(found)


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, round(time.perf_counter() - wall, 3), round(time.process_time() - cpu, 3)


def new_pair_count(hashes: np.ndarray, radius: int) -> int:
    return sum(len(left) for left, _ in hamming_pairs(hashes, radius))


def sampled_pairs(hashes: np.ndarray, radius: int, queries: int) -> dict:
    """hamming_pairs' two steps, timed apart, with the queries of a random sample of the hashes: the table
    build over all n, and the per-query search, whose mean over a sample is its mean over all n (the
    same index answers every query). Total CPU = build + n * mean query."""
    codes = hashes.view(np.uint8).reshape(len(hashes), 8)
    index, _, build = timed(lambda: _multihash(radius, len(hashes), codes))
    sample = np.sort(np.random.default_rng(1).choice(len(hashes), queries, replace=False))
    (limits, _), _, search = timed(lambda: _range(index, codes[sample], radius))
    per_query = search / queries
    total = build + per_query * len(hashes)
    return {"sampled_queries": queries, "build_cpu_s": build, "query_cpu_us": round(1e6 * per_query, 2),
            "cpu_s_estimated": round(total, 3), "cpu_us_per_hash": round(1e6 * total / len(hashes), 2),
            "neighbours_in_sample": int(limits[-1]) - queries}


def online(hashes: np.ndarray, radius: int) -> int:
    """Dedup's pattern: look each hash up among the earlier ones, then store it; returns how many had a neighbour."""
    index, repeats = HammingIndex(radius), 0
    for number, value in enumerate(hashes.tolist()):
        repeats += bool(index.near(value))
        index.add(value, number)
    return repeats


def one_size(n: int, radius: int, old_max: int, online_max: int, sample_from: int = 10**12,
             sample_queries: int = 20_000, seed: int = 0) -> dict:
    hashes = np.random.default_rng(seed).integers(0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True)
    row: dict = {"hashes": n, "radius": radius, "layout": dict(zip(("tables", "bits"), layout(radius, n)))}
    if n > sample_from:
        row["pairs_sampled"] = sampled_pairs(hashes, radius, sample_queries)
        row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        return row
    pairs, wall, cpu = timed(lambda: new_pair_count(hashes, radius))
    row["pairs"] = {"wall_s": wall, "cpu_s": cpu, "cpu_us_per_hash": round(1e6 * cpu / n, 2), "found": pairs}
    if n <= online_max:
        repeats, wall, cpu = timed(lambda: online(hashes, radius))
        row["online"] = {"wall_s": wall, "cpu_s": cpu, "cpu_us_per_hash": round(1e6 * cpu / n, 2),
                         "with_earlier_neighbour": repeats}
    if n <= old_max:
        old_pairs, wall, cpu = timed(lambda: banded_pair_count(hashes, radius))
        row["old"] = {"wall_s": wall, "cpu_s": cpu, "cpu_us_per_hash": round(1e6 * cpu / n, 2), "found": old_pairs}
        assert old_pairs == pairs, f"old search found {old_pairs} pairs, new {pairs}"
    row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="25000,50000,100000,1000000")
    parser.add_argument("--radius", type=int, default=8)
    parser.add_argument("--old-max", type=int, default=100_000, help="largest size the quadratic old search runs at")
    parser.add_argument("--online-max", type=int, default=100_000, help="largest size the one-at-a-time index runs at")
    parser.add_argument("--sample-from", type=int, default=100_000,
                        help="past this size, time the table build and a sample of the queries (--sample-queries) "
                             "and estimate the total from them instead of running every query")
    parser.add_argument("--sample-queries", type=int, default=20_000)
    args = parser.parse_args()
    import faiss

    results = []
    for n in map(int, args.sizes.split(",")):
        results.append(one_size(n, args.radius, args.old_max, args.online_max, args.sample_from, args.sample_queries))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "hamming_scale", "faiss": faiss.__version__, "faiss_threads": faiss.omp_get_max_threads(),
                      "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                      "load_average": os.getloadavg(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
