"""Peak memory and time of the contrastive loss: the plain N x N computation vs the row-block one.

One forward + backward of the symmetric InfoNCE with the false-negative mask (cnclip.loss.clip_loss)
at global batches N (default 8192, 16384, 32768; dim 512, float32), each in a fresh process:

* "plain": the loss as it was written before it was chunked -- both N x N logit matrices through
  autograd (masked_fill, F.cross_entropy), the way open_clip computes it; what autograd saves is kept.
* "chunked": cnclip's loss with `chunk` rows per block (train.loss_chunk), which keeps only the inputs
  and recomputes each chunk x N block in backward.

Memory is the rise of the process's peak above what it held before the loss: on CPU the RSS
high-water mark (VmHWM, reset through /proc/self/clear_refs on Linux), on CUDA
torch.cuda.max_memory_allocated. Time is the median of `--repeats` forward + backward passes, and
time_ratio = chunked / plain. The plain loss is skipped (reported as its predicted size) where one
N x N float32 matrix times 5 exceeds `--max-plain-gib`; its peak grows as N^2, the chunked one's as
N x chunk. Prints one JSON document.

    python benchmarks/loss_memory.py                       # 8k/16k/32k on the CPU
    python benchmarks/loss_memory.py --sizes 2048 --chunk 256 --device cpu   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))  # peak_memory, however this file is loaded

from cnclip.loss import clip_loss, false_negative_mask  # noqa: E402
from peak_memory import PeakMemory  # noqa: E402



def plain_clip_loss(img, txt, logit_scale, image_keys, text_keys):
    """The unchunked loss: full N x N matrices in both directions, masked, through autograd."""
    img, txt = F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)
    scale = logit_scale.float().exp()
    labels = torch.arange(img.shape[0], device=img.device)
    same = false_negative_mask((image_keys, text_keys), (image_keys, text_keys), labels)
    logits_i2t = (scale * img @ txt.t()).masked_fill(same, float("-inf"))
    logits_t2i = (scale * txt @ img.t()).masked_fill(same, float("-inf"))
    return (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2


def measure(n: int, mode: str, device: torch.device, repeats: int, dim: int) -> dict:
    """One configuration in this process: peak growth of the first pass, median time of `repeats`."""
    gen = torch.Generator().manual_seed(0)
    img = torch.randn(n, dim, generator=gen).to(device).requires_grad_()
    txt = torch.randn(n, dim, generator=gen).to(device).requires_grad_()
    scale = torch.tensor(math.log(100.0), device=device).requires_grad_()
    # Every 10th pair shares its image with the one before: a real mask, as in crawled data.
    keys = torch.arange(n, device=device)
    image_keys, text_keys = keys - (keys % 10 == 1).long(), keys.clone()

    def run() -> float:
        start = time.perf_counter()
        if mode == "plain":
            loss = plain_clip_loss(img, txt, scale, image_keys, text_keys)
        else:
            loss = clip_loss(img, txt, scale, image_keys, text_keys, chunk=int(mode))
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        img.grad = txt.grad = scale.grad = None
        return time.perf_counter() - start

    with PeakMemory(device) as peak:
        first = run()
    times = [run() for _ in range(repeats - 1)] or [first]
    return {"n": n, "mode": mode, "peak_growth_bytes": peak.growth, "seconds": statistics.median(times)}


def in_fresh_process(n: int, mode: str, device: str, repeats: int, dim: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--measure", str(n), mode, "--device", device,
                          "--repeats", str(repeats), "--dim", str(dim)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--chunk", type=int, default=2048, help="rows per block (train.loss_chunk)")
    ap.add_argument("--dim", type=int, default=512, help="embedding width (512: ViT-B/16's projection)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-plain-gib", type=float, default=8.0,
                    help="skip the plain loss where 5 N x N float32 matrices exceed this")
    ap.add_argument("--measure", nargs=2, metavar=("N", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.measure:  # the worker: one configuration, one JSON line
        print(json.dumps(measure(int(args.measure[0]), args.measure[1], device, args.repeats, args.dim)))
        return
    rows = []
    for n in args.sizes:
        matrix = n * n * 4
        row = {"n": n, "chunk": args.chunk, "nxn_float32_gib": matrix / 2 ** 30}
        chunked = in_fresh_process(n, str(args.chunk), args.device, args.repeats, args.dim)
        row["chunked_peak_gib"] = chunked["peak_growth_bytes"] / 2 ** 30
        row["chunked_seconds"] = chunked["seconds"]
        if 5 * matrix <= args.max_plain_gib * 2 ** 30:
            plain = in_fresh_process(n, "plain", args.device, args.repeats, args.dim)
            row["plain_peak_gib"] = plain["peak_growth_bytes"] / 2 ** 30
            row["plain_seconds"] = plain["seconds"]
            row["memory_ratio"] = plain["peak_growth_bytes"] / max(chunked["peak_growth_bytes"], 1)
            row["time_ratio"] = chunked["seconds"] / plain["seconds"]
        else:
            row["plain_skipped"] = f"5 N x N float32 matrices exceed --max-plain-gib {args.max_plain_gib:g}"
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    print(json.dumps({"device": args.device, "dim": args.dim, "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
