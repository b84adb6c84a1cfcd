"""Search index speed and recall: exact (faiss IndexFlatIP) vs the inverted file (ivf) by size and kind of
vectors; prints JSON.

Three kinds of vectors of dimension 512 (the projection size of chinese-clip-vit-base-patch16):

* `random`: uniformly random unit vectors, the queries other random unit vectors. The hardest case
  for an approximate index, since nothing clusters.
* `clustered`: a Gaussian mixture on the sphere, as image embeddings are: CLUSTERS centres, each
  point its centre plus an offset in a subspace of INTRINSIC dimensions private to its cluster (and a
  little noise in all 512), normalised; two points of one cluster are at cosine about 0.8, of two
  clusters about 0. The queries are fresh draws from the same mixture.
* `images`: image embeddings of generated pictures (a shape of random colour, size and place on a
  background of random colour, plus pixel noise) from a tiny random ChineseCLIP image tower with a
  512-wide projection; the queries are embeddings of other generated pictures.

Per size and index kind: build seconds, one-query time (median and p95 over single queries, as a
person's search sends them: wall clock, and this thread's CPU time, which a busy machine does not
inflate), batch throughput (queries/s for a batch of all queries), the index's bytes per vector (the
serialised faiss.index over the count; every kind also stores the float32 vectors, 4 * 512 bytes, in
vectors.safetensors), and for the approximate kind recall@10 against the exact top 10 (the share of
the exact ten neighbours it finds) for the queries and for queries near a stored vector (cosine ~0.75
to it: a similar image is there), with an nprobe sweep. The structures and the search are the ones
`cnclip search index` and `cnclip search query` use (cnclip.search_index.build_structure, search_faiss):
the ivf build time includes its nprobe check on the data, and its params are what index.json records
(cells, the nprobe chosen, the check's recall). The result is what cnclip.search_index.APPROXIMATE_FROM
and the IVF_* constants are set from.

    python benchmarks/search_throughput.py --threads 1                                 # 10k and 100k, all kinds
    python benchmarks/search_throughput.py --threads 1 --data clustered --sizes 1000000 --out benchmarks/results/search_ivf_1m.json
    python benchmarks/search_throughput.py --sizes 2000 --data clustered               # smoke test
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

from cnclip.search_index import build_faiss, build_structure, search_faiss  # noqa: E402

DIM, K = 512, 10
NPROBE_SWEEP = (4, 8, 16, 32, 64)
INDEX_KINDS = ("exact", "ivf")
DATA_KINDS = ("random", "clustered", "images")
CLUSTERS, INTRINSIC, SPREAD, NOISE = 1000, 24, 0.5, 0.02
IMAGE_SIZE = 32
CHUNK = 100_000  # vectors drawn at a time


def in_chunks(n: int, draw) -> np.ndarray:
    """n rows of draw(m), CHUNK at a time, into one array: a million vectors peak near their own 2 GB
    instead of several temporaries of that size (up to n = CHUNK the draws are those of one call)."""
    out = np.empty((n, DIM), dtype=np.float32)
    for start in range(0, n, CHUNK):
        out[start:start + CHUNK] = draw(min(CHUNK, n - start))
    return out


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    def draw(m: int) -> np.ndarray:
        x = rng.standard_normal((m, DIM), dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)
    return in_chunks(n, draw)


def clustered(rng: np.random.Generator, n: int, model: dict) -> np.ndarray:
    """n draws from the mixture in `model` (centres and per-cluster subspace bases, see mixture())."""
    centres, bases = model["centres"], model["bases"]

    def draw(m: int) -> np.ndarray:
        which = rng.integers(0, len(centres), m)
        x = centres[which] + NOISE * rng.standard_normal((m, DIM), dtype=np.float32)
        for c in np.unique(which):
            rows = np.flatnonzero(which == c)
            x[rows] += (SPREAD / np.sqrt(INTRINSIC)) * rng.standard_normal((len(rows), INTRINSIC),
                                                                           dtype=np.float32) @ bases[c]
        return x / np.linalg.norm(x, axis=1, keepdims=True)
    return in_chunks(n, draw)


def mixture(rng: np.random.Generator) -> dict:
    centres = unit(rng, CLUSTERS)
    bases = rng.standard_normal((CLUSTERS, INTRINSIC, DIM), dtype=np.float32)
    bases /= np.linalg.norm(bases, axis=2, keepdims=True)
    return {"centres": centres, "bases": bases}


def tiny_image_tower():
    """A random ChineseCLIP image tower at tiny shapes (2 layers, width 64) with a 512-wide projection."""
    import torch
    from transformers import ChineseCLIPConfig, ChineseCLIPModel

    torch.manual_seed(0)
    config = ChineseCLIPConfig(
        text_config={"vocab_size": 32, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 4},
        vision_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": IMAGE_SIZE, "patch_size": 8, "initializer_factor": 3.0},
        projection_dim=DIM)
    return ChineseCLIPModel(config).eval()


def generated_images(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 3, 32, 32) float pictures: a background colour, a box of another colour at a random place, noise."""
    pictures = np.empty((n, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    pictures[:] = rng.uniform(-1, 1, (n, 3, 1, 1))
    corners = rng.integers(0, IMAGE_SIZE - 4, (n, 2))
    sides = rng.integers(4, IMAGE_SIZE // 2, (n, 2))
    colours = rng.uniform(-1, 1, (n, 3, 1, 1)).astype(np.float32)
    for i, ((y, x), (h, w)) in enumerate(zip(corners, sides)):
        pictures[i, :, y:y + h, x:x + w] = colours[i]
    return pictures + 0.1 * rng.standard_normal(pictures.shape, dtype=np.float32)


def image_embeddings(rng: np.random.Generator, n: int, model) -> np.ndarray:
    import torch

    from cnclip.models import encode_images  # noqa: I001 - the embedding `cnclip search index` stores

    out = np.empty((n, DIM), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, n, 2048):
            pictures = torch.from_numpy(generated_images(rng, min(2048, n - start)))
            out[start:start + len(pictures)] = encode_images(model, pictures).numpy()
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def sampler(kind: str, rng: np.random.Generator):
    """draw(n) for one kind of vectors; the model behind it (mixture, image tower) is made once."""
    if kind == "random":
        return lambda n: unit(rng, n)
    if kind == "clustered":
        model = mixture(rng)
        return lambda n: clustered(rng, n, model)
    if kind == "images":
        tower = tiny_image_tower()
        return lambda n: image_embeddings(rng, n, tower)
    raise SystemExit(f"--data: unknown kind {kind!r}; choose from {', '.join(DATA_KINDS)}")


def bytes_per_vector(index) -> float:
    """The size of faiss.index as `cnclip search index` writes it, over the count. Written to a file, not
    serialised in memory: that would hold two more copies of a 2 GB index (peak RSS 8.1 GB at a million)."""
    import tempfile

    import faiss

    with tempfile.TemporaryDirectory() as tmp:
        faiss.write_index(index, str(Path(tmp) / "faiss.index"))
        return round((Path(tmp) / "faiss.index").stat().st_size / max(index.ntotal, 1), 1)


def overlap(rows: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of the exact top 10 that the approximate top 10 contains."""
    return round(float(np.mean([len(set(a) & set(b)) / K for a, b in zip(rows.tolist(), exact.tolist())])), 4)


def measure(search, queries: np.ndarray) -> tuple[dict, np.ndarray]:
    """Single-query latency, wall and CPU (this thread's: with one faiss thread, the search's own work,
    which a busy machine does not inflate), batch throughput, and the batch's top-10 rows."""
    single, cpu = [], []
    for q in queries:
        tic, cpu_tic = time.perf_counter(), time.thread_time()
        search(q[None, :])
        single.append(time.perf_counter() - tic)
        cpu.append(time.thread_time() - cpu_tic)
    tic = time.perf_counter()
    _, rows = search(queries)
    batch = time.perf_counter() - tic
    single.sort()
    cpu.sort()
    return {"query_ms_median": round(1000 * statistics.median(single), 3),
            "query_ms_p95": round(1000 * single[int(0.95 * (len(single) - 1))], 3),
            "query_cpu_ms_median": round(1000 * statistics.median(cpu), 3),
            "query_cpu_ms_p95": round(1000 * cpu[int(0.95 * (len(cpu) - 1))], 3),
            "batch_queries_per_s": round(len(queries) / batch, 1)}, rows


def nprobe_sweep(index, data, queries, near, exact_rows, exact_near, sweep) -> list[dict]:
    """Recall and single-query time at each nprobe (the same trained and filled index; search-time only),
    and the recall when the 8-bit codes alone rank (no re-ranking of 4 * k candidates with the vectors)."""
    out, tuned = [], index.nprobe
    for nprobe in sweep:
        index.nprobe = min(nprobe, index.nlist)
        timing, rows = measure(lambda q: search_faiss(index, "ivf", data, q, K), queries)
        _, near_rows = search_faiss(index, "ivf", data, near, K)
        _, codes_rows = search_faiss(index, "ivf", data, queries, K, refine=1)
        _, codes_near = search_faiss(index, "ivf", data, near, K, refine=1)
        out.append({"nprobe": index.nprobe, **timing, "recall_at_10_vs_exact": overlap(rows, exact_rows),
                    "recall_at_10_vs_exact_near_queries": overlap(near_rows, exact_near),
                    "codes_only_recall_at_10_vs_exact": overlap(codes_rows, exact_rows),
                    "codes_only_recall_at_10_vs_exact_near_queries": overlap(codes_near, exact_near)})
    index.nprobe = tuned
    return out


def one_size(data_kind: str, data: np.ndarray, queries: np.ndarray, rng: np.random.Generator, kinds: list[str],
             sweep: list[int]) -> dict:
    n = len(data)
    # queries near a stored vector (cosine ~0.75 to it), as when a similar image is in the collection
    near = data[rng.choice(n, len(queries), replace=False)] + 0.04 * rng.standard_normal((len(queries), DIM),
                                                                                        dtype=np.float32)
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    row = {"data": data_kind, "vectors": n, "dim": DIM}
    tic = time.perf_counter()
    exact = build_faiss(data, "exact")
    build = time.perf_counter() - tic
    _, exact_rows = exact.search(queries, K)
    _, exact_near = exact.search(near, K)
    if "exact" in kinds:
        timing, _ = measure(lambda q: search_faiss(exact, "exact", data, q, K), queries)
        row["exact"] = {"build_s": round(build, 2), **timing, "bytes_per_vector": bytes_per_vector(exact)}
    del exact
    if "ivf" in kinds:
        tic = time.perf_counter()
        _, index, structure = build_structure(data, "ivf")  # the nprobe cnclip's check on the data chooses
        build = time.perf_counter() - tic
        timing, rows = measure(lambda q: search_faiss(index, "ivf", data, q, K), queries)
        _, near_rows = search_faiss(index, "ivf", data, near, K)
        row["ivf"] = {"build_s": round(build, 2), **timing, "bytes_per_vector": bytes_per_vector(index),
                      "params": structure,
                      "recall_at_10_vs_exact": overlap(rows, exact_rows),
                      "recall_at_10_vs_exact_near_queries": overlap(near_rows, exact_near),
                      "nprobe_sweep": nprobe_sweep(index, data, queries, near, exact_rows, exact_near, sweep)}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000", help="index sizes, comma-separated")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--data", default=",".join(DATA_KINDS), help="kinds of vectors, comma-separated: "
                        + ", ".join(DATA_KINDS))
    parser.add_argument("--kinds", default=",".join(INDEX_KINDS), help="index kinds measured, comma-separated: "
                        + ", ".join(INDEX_KINDS) + " (the exact top 10 is always computed: recall is measured "
                        "against it)")
    parser.add_argument("--nprobe", default=",".join(map(str, NPROBE_SWEEP)),
                        help="nprobe values the ivf sweep searches with, comma-separated")
    parser.add_argument("--threads", type=int, default=0,
                        help="faiss OpenMP threads (default: faiss's own, all cores); on a busy machine 1 thread "
                             "answers single queries faster than contended threads")
    parser.add_argument("--out", help="also write the JSON to this file")
    args = parser.parse_args()
    import faiss

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    kinds = args.kinds.split(",")
    if not set(kinds) <= set(INDEX_KINDS):
        raise SystemExit(f"--kinds: choose from {', '.join(INDEX_KINDS)}")
    sweep = [int(x) for x in args.nprobe.split(",") if x]

    results = []
    for data_kind in args.data.split(","):
        rng = np.random.default_rng(0)
        draw = sampler(data_kind, rng)
        queries = draw(args.queries)
        for n in map(int, args.sizes.split(",")):
            results.append(one_size(data_kind, draw(n), queries, rng, kinds, sweep))
            print(f"{data_kind} {n} vectors: {json.dumps(results[-1])}", file=sys.stderr, flush=True)
    report = json.dumps({"benchmark": "search_throughput", "faiss": faiss.__version__,
                         "threads": faiss.omp_get_max_threads(), "cpu": platform.processor() or platform.machine(),
                         "load_average": os.getloadavg(), "queries": args.queries, "results": results}, indent=2)
    if args.out:
        Path(args.out).write_text(report + "\n", encoding="utf-8")
    print(report)


if __name__ == "__main__":
    main()
