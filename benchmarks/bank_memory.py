"""Host and device memory of the training image bank, measured at small sizes and extrapolated.

Writes a cache entry of M random images x D dims (default D 512, the ViT-B/16 projection; parts of
cache.part_size 8192, by the cache's own writer) for each M in --sizes, then reads it in a fresh process
per case and records the rise of the process's RSS high-water mark (VmHWM, reset through
/proc/self/clear_refs; Linux):

* host_fp32: `ImageFeatureCache.get` in the cache's own layout (host, float32), what evaluation reads;
* bank_fp32 / bank_bf16: the trainer's bank (`bank_layout`: normalised, in the training dtype) on a
  device other than the host ("meta" stands in for a GPU on a CPU-only machine): the host's cost of
  loading it, and the device bytes it occupies (the bank tensor's own size).

With --old-tree DIR (a checkout of an older cnclip, e.g. `git archive <commit> | tar -x -C DIR`),
host_fp32 is also measured with that tree's reader ("old_host_fp32"), on the same entry.

Each host figure (the peak during the read, and what is kept after it: the bank when it is on the
host, and the ids' bookkeeping, a list and an id -> row dict) is fitted as a + b * M over the sizes
measured (least squares) and extrapolated to --predict sizes (default 1M and 5M images), per process;
the predicted peak is the larger of the two fits. A node runs one process per GPU (--ranks-per-node,
default 8), each holding its own bank. Device bytes are exact: M x D x element size.
Prints one JSON document.

    python benchmarks/bank_memory.py                                  # 50k, 100k, 200k images, D 512
    python benchmarks/bank_memory.py --old-tree /tmp/old-cnclip       # with the older reader beside it
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

KEY = "b" * 32
GIB = 2 ** 30

MEASURE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    from safetensors import safe_open
    from cnclip.image_cache import ImageFeatureCache, _content_digest

    root, key, case = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    ids = json.loads((root / "ids.json").read_text())

    def status(field):
        line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(field + ":"))
        return int(line.split()[1]) * 1024

    with safe_open(str(sorted((root / key).glob("part-*"))[0]), framework="pt") as fh:  # first-use set-up
        _content_digest(fh.get_tensor("ids"), fh.get_tensor("embeddings"))
    if case != "host_fp32":  # torch imports its meta-device kernels on first use (~0.1 GB of Python)
        torch.empty(2, 2, device="meta")[:1] = torch.nn.functional.normalize(torch.ones(1, 2).to("meta"), dim=-1)
    cache = ImageFeatureCache(root)
    Path("/proc/self/clear_refs").write_text("5")
    start = status("VmRSS")
    if case == "host_fp32":
        features = cache.get(key, ids)
    else:
        from cnclip.image_cache import EmbeddingLayout
        dtype = torch.bfloat16 if case == "bank_bf16" else torch.float32
        features = cache.get(key, ids, EmbeddingLayout(torch.device("meta"), dtype, normalized=True))
    bank = features.embeddings
    print(json.dumps({"host_peak_bytes": status("VmHWM") - start, "host_after_bytes": status("VmRSS") - start,
                      "bank_bytes": bank.numel() * bank.element_size(), "device": bank.device.type}))
""")


def write_entry(root: Path, count: int, dim: int, part_size: int) -> None:
    from cnclip.image_cache import ImageFeatureCache, _part_name, _write_part

    ids = list(range(count))
    entry = root / KEY
    entry.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    for start in range(0, count, part_size):
        share = ids[start:start + part_size]
        _write_part(entry / _part_name(start, part_size), share, torch.randn(len(share), dim, generator=gen), {},
                    len(share))
    ImageFeatureCache(root)._write_manifest(KEY, SimpleNamespace(ids=ids, path=root / "images.tsv"), part_size, dim)
    (root / "ids.json").write_text(json.dumps(ids))


def measure(root: Path, case: str, tree: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    # Run from `tree`: `python -c` puts the working directory first on sys.path.
    out = subprocess.run([sys.executable, "-c", MEASURE, str(root), KEY, case], capture_output=True, text=True,
                         env=env, cwd=tree, check=True)
    return json.loads(out.stdout)


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(a, b) of a + b * M, least squares (a single point: b = value / M, a = 0)."""
    if len(points) == 1:
        return 0.0, points[0][1] / points[0][0]
    n = len(points)
    mx, my = sum(m for m, _ in points) / n, sum(v for _, v in points) / n
    b = sum((m - mx) * (v - my) for m, v in points) / sum((m - mx) ** 2 for m, _ in points)
    return my - b * mx, b


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[50_000, 100_000, 200_000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--part-size", type=int, default=8192, help="cache.part_size")
    ap.add_argument("--predict", type=int, nargs="+", default=[1_000_000, 5_000_000])
    ap.add_argument("--ranks-per-node", type=int, default=8)
    ap.add_argument("--old-tree", type=Path, help="an older cnclip checkout whose reader to measure too")
    args = ap.parse_args(argv)
    cases = [("host_fp32", REPO), ("bank_fp32", REPO), ("bank_bf16", REPO)]
    if args.old_tree:
        cases.insert(0, ("old_host_fp32", args.old_tree))
    measured: dict[str, list[dict]] = {name: [] for name, _ in cases}
    for m in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            write_entry(Path(tmp), m, args.dim, args.part_size)
            for name, tree in cases:
                result = measure(Path(tmp), name.removeprefix("old_"), tree)
                measured[name].append({"images": m, **result})
                print(json.dumps({"case": name, "images": m, **result}), file=sys.stderr)
    predicted = {}
    for name, rows in measured.items():
        peak_a, peak_b = fit([(r["images"], r["host_peak_bytes"]) for r in rows])
        kept_a, kept_b = fit([(r["images"], r["host_after_bytes"]) for r in rows])
        bank_per_image = rows[-1]["bank_bytes"] / rows[-1]["images"]
        predicted[name] = {
            "host_peak_bytes_per_image": peak_b, "host_kept_bytes_per_image": kept_b,
            "where_the_bank_is": rows[-1]["device"],
            **{f"{m}": {"host_peak_gib_per_process": max(peak_a + peak_b * m, kept_a + kept_b * m) / GIB,
                        "host_kept_gib_per_process": (kept_a + kept_b * m) / GIB,
                        "host_peak_gib_per_node": args.ranks_per_node * max(peak_a + peak_b * m,
                                                                            kept_a + kept_b * m) / GIB,
                        "bank_gib_per_process": bank_per_image * m / GIB} for m in args.predict},
        }
    print(json.dumps({"dim": args.dim, "part_size": args.part_size, "ranks_per_node": args.ranks_per_node,
                      "measured": measured, "predicted": predicted,
                      "formula": "host peak = max(a + b * M fitted to the peaks, c + d * M fitted to what is kept "
                                 "after the read); bank = M x dim x element size, on the host for host_fp32 and "
                                 "on the device for bank_*; node = ranks_per_node x per process"}, indent=2))


if __name__ == "__main__":
    main()
