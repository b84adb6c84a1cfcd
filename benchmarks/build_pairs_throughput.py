"""build-pairs throughput and memory; prints one JSON document.

* text_records_per_s_per_core: the text stages alone (parse, query/field checks, cleaning,
  Traditional -> Simplified, text rules, jieba relevance) in one process over synthetic
  Chinese crawl records. Target: >= 3000.
* image_records_per_s_per_core: every per-record stage for records carrying a base64 JPEG.
* memory: peak RSS (VmHWM) of a full `data_tools build-pairs` run (a child process, workers=1) as the
  input grows 10x, once for text-only records (which stream through and are rejected as
  no_image) and once for records with images (which reach dedup/cap/split). Streaming should
  keep the first flat; the second grows only by the few bytes per kept record the global
  stages hold.

* download (--download): `build-pairs --download` against a local HTTP server (127.0.0.1, its own
  process, started here) serving photo-like JPEGs with a set latency (0, 50, 200 ms) and failure
  rate, side by side with img2dataset on the same URL list, server and concurrency (one process
  each, --retries 0 for both, images resized to 512 on the long side and re-encoded at quality 90).
  records/s per core = URLs / CPU seconds of the tool's whole process tree. Peak RSS of ours for
  N and 10N URLs shows memory flat in the number of URLs. img2dataset runs from its own
  interpreter (--img2dataset-python, default: the `img2dataset` on PATH's), since its pins clash
  with cnclip's; without one the comparison says why it was skipped.

    python benchmarks/build_pairs_throughput.py [--small]
    python benchmarks/build_pairs_throughput.py --download [--small] [--img2dataset-python PY]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import opencc
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.image_http_server import ImageHTTPServer, failure_kind  # noqa: E402
from data_tools.config import FilterConfig  # noqa: E402
from data_tools.readers import parse_item  # noqa: E402
from data_tools.records import RawItem, Rejected  # noqa: E402
from data_tools.stages import RecordProcessor  # noqa: E402

WORDS = (
    "连衣裙 半身裙 衬衫 外套 羽绒服 卫衣 牛仔裤 运动鞋 跑鞋 皮鞋 凉鞋 背包 钱包 手提包 帽子 围巾 手表 项链 耳环 眼镜 "
    "手机壳 耳机 键盘 鼠标 显示器 台灯 沙发 餐桌 椅子 书架 地毯 窗帘 花瓶 茶具 碗 杯子 锅 刀具 毛巾 枕头 "
    "小猫 小狗 兔子 熊猫 金鱼 鹦鹉 山水 风景 海边 森林 城市 夜景 雪山 草原 花朵 樱花 玫瑰 绿植 盆栽 水果 蛋糕"
).split()
ADJECTIVES = "红色 白色 黑色 蓝色 粉色 复古 简约 可爱 时尚 韩版 宽松 修身 加厚 轻薄 大号 小号 高清 精美 夏季 冬季".split()
BOILERPLATE = ["图片", "IMG_2023.jpg", "商品图", "点击查看大图", "DSC_0001.JPG"]


def synthetic_records(n: int, seed: int, image_field: str | None = None) -> list[dict]:
    """Crawl-like records: 200 queries, titles with shop words, 10% Traditional, some junk alts."""
    rng = random.Random(seed)
    queries = [f"{rng.choice(ADJECTIVES)}{rng.choice(WORDS)}" for _ in range(200)]
    to_traditional = opencc.OpenCC("s2t")
    traditional = {}
    records = []
    for i in range(n):
        query = rng.choice(queries)
        words = [rng.choice(ADJECTIVES), rng.choice(WORDS), rng.choice(WORDS)]
        if rng.random() < 0.8:
            words.insert(rng.randrange(len(words) + 1), query[2:])  # the query's noun: relevant
        title = "".join(words) + rng.choice(["", " 新款", " 包邮", f" {rng.randrange(100)}款"])
        if rng.random() < 0.1:
            title = traditional.setdefault(title, to_traditional.convert(title))
        if rng.random() < 0.05:
            title += " 😀 https://shop.example.com/item?id=%d" % i
        alt = rng.choice(BOILERPLATE) if rng.random() < 0.3 else title
        record = {"query": query, "url": f"https://img.example.com/{i}.jpg", "alt": alt, "title": title, "shop_id": i}
        if image_field is not None:
            record["image"] = image_field
        records.append(record)
    return records


def jsonl_items(records: list[dict]) -> list[RawItem]:
    return [RawItem(f"bench.jsonl:{i + 1}", json.dumps(r, ensure_ascii=False).encode()) for i, r in enumerate(records)]


def text_stage_rate(n: int) -> dict:
    """Records/s through parse + field checks + caption choice (text rules and relevance), one core."""
    processor = RecordProcessor(FilterConfig())
    items = jsonl_items(synthetic_records(n, seed=1))
    kept = 0
    base = Path(".")
    processor.choose_text(parse_item(items[0], "jsonl", base))  # warm up jieba outside the timing
    start = time.perf_counter()
    for item in items:
        record = parse_item(item, "jsonl", base)
        try:
            processor.check_fields(record)
            processor.choose_text(record)
            kept += 1
        except Rejected:
            pass
    elapsed = time.perf_counter() - start
    return {"records": n, "seconds": round(elapsed, 3), "records_per_s_per_core": round(n / elapsed), "passed_text_stages": kept}


def photo_like_jpeg(seed: int, size: int) -> bytes:
    """Smooth colour fields plus grain: compresses and decodes like a photo, unlike pure noise."""
    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
    pixels = np.asarray(low, dtype=np.int16) + rng.integers(-12, 12, (size, size, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def image_stage_rate(n: int, size: int) -> dict:
    """Records/s through every per-record stage for records with an inline base64 JPEG, one core."""
    processor = RecordProcessor(FilterConfig())
    pool = [base64.b64encode(photo_like_jpeg(seed, size)).decode() for seed in range(16)]
    records = synthetic_records(n, seed=2)
    for i, record in enumerate(records):
        record["image"] = pool[i % len(pool)]
        record["alt"] = record["title"]  # measure images, not text rejections
    items = jsonl_items(records)
    processed = 0
    start = time.perf_counter()
    for item in items:
        try:
            processor.process(item, "jsonl", Path("."))
            processed += 1
        except Rejected:
            pass
    elapsed = time.perf_counter() - start
    return {"records": n, "image_side": size, "seconds": round(elapsed, 3), "records_per_s_per_core": round(n / elapsed), "images_processed": processed}


def write_dump(path: Path, n: int, with_images: bool, image_size: int) -> None:
    """A dump on disk; images are distinct files so that all of them reach the global stages."""
    path.mkdir(parents=True)
    with open(path / "crawl.jsonl", "w", encoding="utf-8") as handle:
        for i, record in enumerate(synthetic_records(n, seed=3)):
            if with_images:
                name = f"{i}.jpg"
                (path / name).write_bytes(photo_like_jpeg(i, image_size))
                record["image"], record["alt"] = name, record["title"]
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


# The child reports VmHWM (its own peak RSS) itself: ru_maxrss from wait4 would include the
# benchmark's own RSS at fork time, which Linux carries across exec.
CHILD = """
import re, sys
from data_tools.cli import main
code = main(sys.argv[1:])
with open("/proc/self/status") as status:
    print("peak_kib", re.search(r"VmHWM:\\s+(\\d+)", status.read()).group(1), file=sys.stderr)
sys.exit(code)
"""


def peak_rss_of_build(dump: Path, out: Path, min_side: int, shard_size: int) -> dict:
    """Run build-pairs (workers=1) in a child process that reports its own peak RSS."""
    config = out.parent / f"{out.name}.yaml"
    config.write_text(f"image:\n  min_side: {min_side}\n")
    args = ["build-pairs", str(dump), "--out", str(out), "--no-progress", "--config", str(config), "--shard-size", str(shard_size)]
    start = time.perf_counter()
    child = subprocess.run([sys.executable, "-c", CHILD, *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if child.returncode != 0:
        raise RuntimeError(f"build-pairs failed: {child.stderr[-2000:]}")
    peak_kib = int(child.stderr.split("peak_kib")[-1])
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    return {
        "records": report["records_read"],
        "kept": report["kept"],
        "seconds": round(time.perf_counter() - start, 2),
        "peak_rss_mib": round(peak_kib / 1024, 1),
    }


def memory_growth(n: int, with_images: bool, image_size: int) -> dict:
    """Peak RSS for n and 10n records with shards of n records: per-shard buffers are the same size in
    both runs, so any growth comes from state that scales with the input."""
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in (n, 10 * n):
            dump = Path(tmp) / f"dump{size}"
            write_dump(dump, size, with_images, image_size)
            runs.append(peak_rss_of_build(dump, Path(tmp) / f"out{size}", min_side=max(1, min(image_size, 200)), shard_size=n))
    return {"shard_size": n, "runs": runs, "rss_ratio_10x_input": round(runs[1]["peak_rss_mib"] / runs[0]["peak_rss_mib"], 2)}


def opencc_skip_gain(n: int) -> dict:
    """Why Simplifier skips OpenCC for text without convertible characters: per-caption cost both ways."""
    from data_tools.text import Simplifier

    simplify = Simplifier()
    titles = [r["title"] for r in synthetic_records(n, seed=4)]
    start = time.perf_counter()
    for title in titles:
        simplify(title)
    with_skip = time.perf_counter() - start
    start = time.perf_counter()
    for title in titles:
        simplify._converter.convert(title)
    always = time.perf_counter() - start
    return {"captions": n, "us_per_caption_with_skip": round(with_skip / n * 1e6, 1), "us_per_caption_always_convert": round(always / n * 1e6, 1)}


# ---------------------------------------------------------------- download scenario

I2D_CHILD = """
import json, re, resource, sys
from img2dataset import download
args = json.loads(sys.argv[1])
download(**args)
with open("/proc/self/status") as status:
    own = int(re.search(r"VmHWM:\\s+(\\d+)", status.read()).group(1))
print("peak_kib", max(own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss), file=sys.stderr)
"""


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed(cmd: list[str], cwd: Path) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds of the whole process tree, and the peak RSS (KiB) the child reports."""
    cpu, start = _children_cpu(), time.perf_counter()
    child = subprocess.run(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall, used = time.perf_counter() - start, _children_cpu() - cpu
    if child.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {child.stderr[-2000:]}")
    return wall, used, int(child.stderr.split("peak_kib")[-1])


def run_ours(urls: list[str], work: Path, concurrency: int, shard_size: int) -> dict:
    """build-pairs --download, one worker process, as a user would run it."""
    work.mkdir(parents=True)
    with open(work / "urls.jsonl", "w", encoding="utf-8") as handle:
        for i, url in enumerate(urls):
            query = WORDS[i % len(WORDS)]
            handle.write(json.dumps({"query": query, "url": url, "alt": f"{query}商品图片{i}号"}, ensure_ascii=False) + "\n")
    (work / "filters.yaml").write_text("image:\n  max_side: 512\n  jpeg_quality: 90\n")
    args = ["build-pairs", str(work / "urls.jsonl"), "--out", str(work / "out"), "--no-progress", "--config", str(work / "filters.yaml"),
            "--download", "--allow-private-network", "--download-concurrency", str(concurrency),
            "--per-host-connections", str(concurrency), "--retries", "0", "--shard-size", str(shard_size)]
    wall, cpu, peak = _timed([sys.executable, "-c", CHILD, *args], REPO)
    report = json.loads((work / "out" / "report.json").read_text(encoding="utf-8"))
    downloads = report["downloads"]
    return {"urls": len(urls), "fetched": downloads["fetched"], "failed": downloads["failed"], "seconds": round(wall, 2),
            "cpu_seconds": round(cpu, 2), "records_per_s": round(len(urls) / wall, 1),
            "records_per_s_per_core": round(len(urls) / cpu, 1), "peak_rss_mib": round(peak / 1024, 1)}


def run_img2dataset(python: str, urls: list[str], work: Path, concurrency: int) -> dict:
    """img2dataset on the same URLs: one process, `concurrency` threads, no retries, webdataset output."""
    work.mkdir(parents=True)
    (work / "urls.txt").write_text("\n".join(urls) + "\n")
    args = dict(url_list=str(work / "urls.txt"), output_folder=str(work / "out"), input_format="txt", output_format="webdataset",
                processes_count=1, thread_count=concurrency, image_size=512, resize_mode="keep_ratio_largest",
                resize_only_if_bigger=True, encode_quality=90, timeout=10, retries=0, enable_wandb=False,
                number_sample_per_shard=10_000, distributor="multiprocessing")
    wall, cpu, peak = _timed([python, "-c", I2D_CHILD, json.dumps(args)], work)
    stats = [json.loads(p.read_text()) for p in sorted((work / "out").glob("*_stats.json"))]
    return {"urls": len(urls), "fetched": sum(s["successes"] for s in stats),
            "failed": sum(s["failed_to_download"] + s["failed_to_resize"] for s in stats), "seconds": round(wall, 2),
            "cpu_seconds": round(cpu, 2), "records_per_s": round(len(urls) / wall, 1),
            "records_per_s_per_core": round(len(urls) / cpu, 1), "peak_rss_mib": round(peak / 1024, 1)}


def find_img2dataset(python: str | None) -> tuple[str | None, str]:
    """The interpreter that has img2dataset, or None and why not."""
    if python is None:
        script = shutil.which("img2dataset")
        if script is None:
            return None, "img2dataset is not installed (pip install 'cnclip[bench]', or into its own venv and pass --img2dataset-python)"
        python = str(Path(script).parent / "python")
    probe = subprocess.run([python, "-c", "import img2dataset"], capture_output=True, text=True)
    if probe.returncode != 0:
        return None, f"{python} cannot import img2dataset: {probe.stderr.strip().splitlines()[-1:]}"
    return python, ""


def download_comparison(n: int, memory_n: int, concurrency: int, failure_percent: int, image_side: int, i2d_python: str | None) -> dict:
    python, why_not = find_img2dataset(i2d_python)
    pool = [photo_like_jpeg(seed, image_side) for seed in range(32)]
    rows = []
    with ImageHTTPServer(pool) as server, tempfile.TemporaryDirectory() as tmp:
        for latency in (0, 50, 200):
            urls = [server.url(i, latency, failure_percent) for i in range(n)]
            row = {"latency_ms": latency, "cnclip": run_ours(urls, Path(tmp) / f"ours{latency}", concurrency, shard_size=1000)}
            row["img2dataset"] = run_img2dataset(python, urls, Path(tmp) / f"i2d{latency}", concurrency) if python else {"skipped": why_not}
            if python:
                row["per_core_ratio_cnclip_over_img2dataset"] = round(
                    row["cnclip"]["records_per_s_per_core"] / row["img2dataset"]["records_per_s_per_core"], 2)
            rows.append(row)
        memory = [run_ours([server.url(i, 0, failure_percent) for i in range(size)], Path(tmp) / f"mem{size}", concurrency,
                           shard_size=memory_n) for size in (memory_n, 10 * memory_n)]
    expected_failures = sum(1 for i in range(n) if failure_kind(i, failure_percent))
    return {
        "urls": n, "concurrency": concurrency, "failure_percent": failure_percent, "expected_failures": expected_failures,
        "image_side": image_side, "resized_to": 512, "cpu_count": os.cpu_count(), "scenarios": rows,
        "memory_flat_in_urls": {"runs": memory, "rss_ratio_10x_urls": round(memory[1]["peak_rss_mib"] / memory[0]["peak_rss_mib"], 2)},
    }


def driver_memory(sizes: tuple[int, ...], engine: str, with_images: bool = False) -> dict:
    """Peak RSS of the driver (the build-pairs process itself; Ray workers are other processes) as the
    input grows, text-only records (all rejected as no_image) or records with tiny inline images
    (all kept: what dedup, cap and split hold per pair). Per million records = the slope."""
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            dump = Path(tmp) / f"dump{size}"
            dump.mkdir()
            with open(dump / "crawl.jsonl", "w", encoding="utf-8") as handle:
                for i, record in enumerate(synthetic_records(size, seed=5)):
                    if with_images:  # distinct 16x16 images and captions: every record is kept
                        record.update(image=base64.b64encode(photo_like_jpeg(i, 16)).decode(), alt=f"{record['query']}第{i}款")
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            config = Path(tmp) / "filters.yaml"
            config.write_text("image:\n  min_side: 8\nrelevance:\n  mode: 'off'\ndedup:\n  phash_max_distance: null\n")
            out = Path(tmp) / f"out{size}"
            args = ["build-pairs", str(dump), "--out", str(out), "--no-progress", "--config", str(config), "--engine", engine,
                    "--workers", "2", "--per-query-cap", "0"]
            wall, cpu, peak = _timed([sys.executable, "-c", CHILD, *args], REPO)
            report = json.loads((out / "report.json").read_text(encoding="utf-8"))
            runs.append({"records": size, "kept": report["kept"], "seconds": round(wall, 1), "driver_peak_rss_mib": round(peak / 1024, 1)})
    slope = (runs[-1]["driver_peak_rss_mib"] - runs[0]["driver_peak_rss_mib"]) / (sizes[-1] - sizes[0]) * 1e6
    return {"engine": engine, "with_images": with_images, "runs": runs, "driver_mib_per_million_records": round(slope, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="smaller inputs; finishes in under a minute")
    parser.add_argument("--download", action="store_true", help="only the download scenario, side by side with img2dataset")
    parser.add_argument("--img2dataset-python", metavar="PY", help="interpreter with img2dataset installed (default: next to `img2dataset` on PATH)")
    parser.add_argument("--concurrency", type=int, default=64, help="downloads in flight, both tools (default: %(default)s)")
    parser.add_argument("--driver-memory", action="store_true", help="only the driver's peak RSS per million records, local and Ray engines")
    args = parser.parse_args()
    if args.driver_memory:
        text_sizes, image_sizes = ((20_000, 100_000), (5_000, 20_000)) if args.small else ((100_000, 1_000_000), (20_000, 100_000))
        result = {engine: {"text_only": driver_memory(text_sizes, engine), "kept_pairs": driver_memory(image_sizes, engine, with_images=True)}
                  for engine in ("local", "ray")}
        print(json.dumps(result, indent=2))
        return
    if args.download:
        n, memory_n = (300, 200) if args.small else (2_000, 1_000)
        result = download_comparison(n, memory_n, args.concurrency, failure_percent=10, image_side=768, i2d_python=args.img2dataset_python)
        print(json.dumps(result, indent=2))
        return
    sizes = (
        dict(text=5_000, images=300, image_side=256, mem_text=2_000, mem_images=500, mem_image_side=64)
        if args.small
        else dict(text=50_000, images=2_000, image_side=512, mem_text=20_000, mem_images=2_000, mem_image_side=96)
    )
    result = {
        "cpu_count": os.cpu_count(),
        "text_stages": text_stage_rate(sizes["text"]),
        "opencc": opencc_skip_gain(sizes["text"] // 5),
        "image_stages": image_stage_rate(sizes["images"], sizes["image_side"]),
        "memory_text_only_records": memory_growth(sizes["mem_text"], with_images=False, image_size=0),
        "memory_records_with_images": memory_growth(sizes["mem_images"], with_images=True, image_size=sizes["mem_image_side"]),
        "target_text_records_per_s_per_core": 3000,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
