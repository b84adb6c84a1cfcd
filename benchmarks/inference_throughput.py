"""CPU inference speed of the two towers: PyTorch eager vs ONNX Runtime fp32 vs ONNX Runtime int8; prints JSON.

The model is a ChineseCLIPModel with random weights at the shapes of chinese-clip-vit-base-patch16 (ViT-B/16 image
tower at 224 px, RoBERTa-base text tower, 512-d projection), texts of 52 tokens (Chinese-CLIP's context length).
Random weights run exactly as fast as trained ones. The ONNX graphs are what `cnclip export --format onnx` writes
(cnclip.onnx_export.export_graphs, then quantize_int8 for int8).

Each runtime is measured in its own fresh process, so its peak RSS (VmHWM, which exec resets) and import time are
its own: the time to import what it needs to run (torch + transformers' model class, or onnxruntime), then per
tower and batch size, after one warm-up call, the latency of `repeats` calls (median, nearest-rank p95) and
samples/s = batch / median. The ONNX workers never import torch (reported as torch_imported). Threads: torch's
intra-op threads, or onnxruntime's intra_op_num_threads (inter-op 1).

    python benchmarks/inference_throughput.py                 # base shapes, 1 and 2 threads (~13 min on 2 cores)
    python benchmarks/inference_throughput.py --threads 1     # one thread only
    python benchmarks/inference_throughput.py --small         # tiny shapes (smoke test, seconds)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUNTIMES = ("pytorch", "onnx_fp32", "onnx_int8")
TOWERS = ("image", "text")
BASE = {
    "text_config": dict(vocab_size=21128, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, max_position_embeddings=512, type_vocab_size=2),
    "vision_config": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          image_size=224, patch_size=16),
    "projection_dim": 512, "context_length": 52,
}
SMALL = {
    "text_config": dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64),
    "vision_config": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          image_size=32, patch_size=8),
    "projection_dim": 16, "context_length": 16,
}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: a reported p95 is a latency that happened)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def timings(call, batch: int, repeats: int) -> dict:
    call()  # warm-up: allocator, thread pool, onnxruntime's first-run graph work
    ms = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        ms.append((time.perf_counter() - start) * 1000)
    median = round(statistics.median(ms), 4)  # rounded first, so the document's rate is batch / its median
    return {"runs": repeats, "median_ms": median, "p95_ms": round(percentile(ms, 95), 4),
            "samples_per_s": round(batch / (median / 1000), 3)}


def inputs(spec: dict, batch: int, seed: int = 0):
    """Random pixels and full-length token ids (numpy), the same for every runtime."""
    import numpy as np

    rng = np.random.default_rng(seed)
    size, length = spec["vision_config"]["image_size"], spec["context_length"]
    pixels = rng.standard_normal((batch, 3, size, size), dtype=np.float32)
    ids = rng.integers(5, spec["text_config"]["vocab_size"], size=(batch, length), dtype=np.int64)
    ids[:, 0], ids[:, -1] = 101 % spec["text_config"]["vocab_size"], 102 % spec["text_config"]["vocab_size"]
    return pixels, ids, np.ones_like(ids)


def build_model(spec: dict):
    import torch
    from transformers import ChineseCLIPConfig, ChineseCLIPModel

    config = ChineseCLIPConfig(text_config=spec["text_config"], vision_config=spec["vision_config"],
                               projection_dim=spec["projection_dim"], attn_implementation="sdpa")
    torch.manual_seed(0)
    return ChineseCLIPModel(config).eval()


# ---------------------------------------------------------------- workers (one fresh process per runtime)


def work_pytorch(spec: dict, threads: int, batches: list[int], repeats: dict, _: Path) -> dict:
    start = time.perf_counter()
    import torch
    from transformers import ChineseCLIPModel  # noqa: F401 - part of what it takes to run

    import_s = time.perf_counter() - start
    torch.set_num_threads(threads)
    sys.path.insert(0, str(REPO))
    from cnclip.onnx_export import ImageEncoder, TextEncoder

    clip = build_model(spec)
    image, text = ImageEncoder(clip).eval(), TextEncoder(clip).eval()
    out = {"import_s": round(import_s, 3), "threads": torch.get_num_threads()}
    with torch.inference_mode():
        for tower in TOWERS:
            out[tower] = {}
            for batch in batches:
                pixels, ids, mask = (torch.from_numpy(a) for a in inputs(spec, batch))
                call = (lambda: image(pixels)) if tower == "image" else (lambda: text(ids, mask))
                out[tower][str(batch)] = timings(call, batch, repeats[str(batch)])
    return out


def work_onnx(precision: str, spec: dict, threads: int, batches: list[int], repeats: dict, model_dir: Path) -> dict:
    start = time.perf_counter()
    import onnxruntime as ort

    import_s = time.perf_counter() - start
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    sessions = {tower: ort.InferenceSession(str(model_dir / precision / f"{tower}_encoder.onnx"), options,
                                            providers=["CPUExecutionProvider"]) for tower in TOWERS}
    out = {"import_s": round(import_s, 3), "threads": threads}
    for tower in TOWERS:
        out[tower] = {}
        for batch in batches:
            pixels, ids, mask = inputs(spec, batch)
            feeds = {"pixel_values": pixels} if tower == "image" else {"input_ids": ids, "attention_mask": mask}
            out[tower][str(batch)] = timings(lambda: sessions[tower].run(None, feeds), batch, repeats[str(batch)])
    return out


def peak_rss_mb() -> float:
    """This process's peak resident set since exec (VmHWM). Not getrusage's ru_maxrss: Linux carries that across
    exec, so a worker started from the parent (torch loaded) would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)  # kB
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # not Linux: no exec carry-over


def worker(args) -> int:
    job = json.loads(args.worker)
    spec, model_dir = job["spec"], Path(job["dir"])
    run = (work_pytorch if job["runtime"] == "pytorch"
           else lambda *a: work_onnx(job["runtime"].split("_", 1)[1], *a))
    out = run(spec, job["threads"], job["batches"], job["repeats"], model_dir)
    out["peak_rss_mb"] = peak_rss_mb()
    out["torch_imported"] = "torch" in sys.modules
    print(json.dumps(out))
    return 0


def run_worker(runtime: str, spec: dict, threads: int, batches: list[int], repeats: dict, model_dir: Path) -> dict:
    job = json.dumps({"runtime": runtime, "spec": spec, "threads": threads, "batches": batches, "repeats": repeats,
                      "dir": str(model_dir)})
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", job], capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{runtime} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- parent


def export(spec: dict, model_dir: Path) -> dict:
    """fp32 graphs from cnclip's exporter, then int8; their sizes and agreement with PyTorch."""
    import torch

    sys.path.insert(0, str(REPO))
    from cnclip.onnx_export import agreement, export_graphs, quantize_int8

    clip = build_model(spec)
    size, length = spec["vision_config"]["image_size"], spec["context_length"]
    start = time.perf_counter()
    (model_dir / "fp32").mkdir(parents=True)
    (model_dir / "int8").mkdir()
    export_graphs(clip, model_dir / "fp32", size, length)
    export_s = time.perf_counter() - start
    for name in ("image_encoder.onnx", "text_encoder.onnx"):
        quantize_int8(model_dir / "fp32" / name, model_dir / "int8" / name)
    pixels, ids, mask = (torch.from_numpy(a) for a in inputs(spec, 4, seed=1))
    tokens = {"input_ids": ids, "attention_mask": mask}
    sizes = {p: {t: (model_dir / p / f"{t}_encoder.onnx").stat().st_size for t in TOWERS} for p in ("fp32", "int8")}
    return {"export_s": round(export_s, 1), "file_bytes": sizes,
            "max_abs_diff_vs_pytorch": {p: agreement(clip, model_dir / p, tokens, pixels) for p in ("fp32", "int8")}}


def ratios(results: dict, batches: list[int]) -> dict:
    """PyTorch median latency / each ONNX runtime's median: >1 means faster than PyTorch."""
    out = {}
    for tower in TOWERS:
        out[tower] = {}
        for b in map(str, batches):
            torch_ms = results["pytorch"][tower][b]["median_ms"]
            out[tower][b] = {f"{r}_speedup_vs_pytorch": round(torch_ms / results[r][tower][b]["median_ms"], 3)
                             for r in RUNTIMES[1:]}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes (a smoke test)")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    parser.add_argument("--batches", default="1,32", help="comma-separated batch sizes (default 1,32)")
    parser.add_argument("--repeats", default=None, help="timed calls per batch size, e.g. 1:20,32:3 "
                                                        "(default 1:20,32:3; --small 1:5,32:3)")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    spec = SMALL if args.small else BASE
    batches = [int(b) for b in args.batches.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    given = dict(pair.split(":") for pair in (args.repeats or ("1:5,32:3" if args.small else "1:20,32:3")).split(","))
    repeats = {str(b): int(given.get(str(b), min(map(int, given.values())))) for b in batches}
    with tempfile.TemporaryDirectory(prefix="cnclip-inference-bench-") as tmp:
        model_dir = Path(tmp)
        exported = export(spec, model_dir)
        by_threads = {}
        for n in threads:
            results = {r: run_worker(r, spec, n, batches, repeats, model_dir) for r in RUNTIMES}
            by_threads[str(n)] = {"results": results, "ratios": ratios(results, batches)}
    import onnxruntime
    import torch

    doc = {
        "benchmark": "inference_throughput", "small": args.small,
        "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "onnxruntime": onnxruntime.__version__},
        "shapes": {"image": {"image_size": spec["vision_config"]["image_size"],
                             "patch_size": spec["vision_config"]["patch_size"],
                             "hidden_size": spec["vision_config"]["hidden_size"],
                             "layers": spec["vision_config"]["num_hidden_layers"]},
                   "text": {"tokens": spec["context_length"], "hidden_size": spec["text_config"]["hidden_size"],
                            "layers": spec["text_config"]["num_hidden_layers"]},
                   "projection_dim": spec["projection_dim"]},
        "batches": batches, "repeats": repeats, "runtimes": list(RUNTIMES),
        "export": exported, "threads": by_threads,
    }
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
