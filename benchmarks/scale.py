"""Growth table: time, per-item cost and peak RSS of every stage as the work grows; prints one JSON document.

Three parts, each run once per size in a fresh child process (so one size's memory never
inflates the next one's peak):

* build: `data_tools build-pairs` (one worker, in-process) over a generated crawl: tiny inline
  JPEGs (16x16), about 8% exact repeats and 5% near repeats
  (the same picture with a white corner pixel)
  of earlier records, captions that repeat, boilerplate alts, Zipf-distributed queries (one per
  50 records, so the popular ones hit the per-query cap). Stages are the pipeline's own
  functions, timed by wrapping them: per_record (parse, text, relevance, image decode and
  hashes, shard files), read (the light columns back), dedup, cap, account, split, write.
* global: the stages that decode no image, over precomputed hashes: text (parse, cleaning,
  text rules, relevance: RecordProcessor.check_fields + choose_text), then selection.select over
  shard files written beforehand with random pHashes (near repeats planted: 1-3 bits flipped),
  colour signatures and captions, with the same stage wrappers; semantic_split is the split
  stage's image-embedding neighbourhoods (data_tools.semantic.similar_pairs) over clustered
  random vectors (`--semantic-dim`, 0: off).
* train: a tiny ChineseCLIP (recipes/models/tiny at 32x32 pixels, random weights) on a
  generated Chinese-CLIP-layout data set of N pairs (32x32 images, captions of 6-14 characters;
  valid split N/10, at least 16): image cache build (train and valid), tokenising the pairs, one epoch
  (batch 256; per-step cpu times: the median of the first tenth, after the first step, and of the last),
  evaluation on the valid split, and `cnclip search index` over the training images (their
  embeddings come from the training run's cache, as when indexing what was trained on). One torch
  thread, so that cpu seconds count work, not threads waiting for a core.

For every stage: seconds (wall), cpu_seconds (this process and its children), items (the
size the stage's cost is divided by: input records, images, pairs), per_item_us (cpu seconds per
item), items_per_s_per_core, peak_rss_mib: the process' peak RSS during that stage alone
(Linux: VmHWM is reset through /proc/self/clear_refs before each stage; where that is refused
the figure is the peak so far, flagged by "peak_rss_is_cumulative"), and end_rss_mib: what is
resident when the stage returns (VmRSS), so the differences between stages say what each keeps.
The train part also gives the largest resident size after a step in the epoch's first and last
tenth (step_rss_mib_max_*): equal if the loop keeps nothing per step. `growth` compares the largest
size's per-item cpu cost with the smallest's, per stage.

    python benchmarks/scale.py                               # seconds: small sizes
    python benchmarks/scale.py --build 10000,100000,1000000 --global 10000,100000,1000000,10000000 \\
        --train 100000,1000000 --out scale.json
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import io
import json
import os
import platform
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PARTS = ("build", "global", "train")
DEFAULT_SIZES = {"build": "500", "global": "2000", "train": "1000"}
QUERY_EVERY = 50  # one query per this many records
PER_QUERY_CAP = 200


# ---------------------------------------------------------------- per-stage measurement


def _reset_peak() -> bool:
    """Reset this process' VmHWM (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    try:
        with open("/proc/self/status") as status:
            return int(re.search(r"VmHWM:\s+(\d+)", status.read()).group(1)) / 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mib() -> float:
    """This process' resident memory now (VmRSS; Linux), 0 where it cannot be read."""
    try:
        with open("/proc/self/status") as status:
            return int(re.search(r"VmRSS:\s+(\d+)", status.read()).group(1)) / 1024
    except (OSError, AttributeError):
        return 0.0


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class StageClock:
    """Wall and CPU time and peak RSS per named stage; a stage entered twice adds up (peak: the larger)."""

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, Any]] = {}
        self.cumulative_peak = False
        self._replaced: list[tuple[Any, str, Any]] = []
        self._open: list[float] = []

    def __enter__(self) -> StageClock:
        return self

    def __exit__(self, *exc: object) -> None:
        """Put back every function `wrap` or `replace` replaced (the pipeline is left as it was)."""
        while self._replaced:
            owner, name, original = self._replaced.pop()
            setattr(owner, name, original)

    def replace(self, owner: Any, name: str, make: Callable[[Any], Any]) -> None:
        """owner.name becomes make(original) until the clock's `with` block ends."""
        original = getattr(owner, name)
        self._replaced.append((owner, name, original))
        setattr(owner, name, make(original))

    @contextlib.contextmanager
    def measure(self, label: str) -> Iterator[None]:
        """Time the block as stage `label`. Stages may nest (a total around its parts): resetting the peak
        for an inner stage would hide it from the outer one, so each inner peak is carried outwards."""
        self.cumulative_peak |= not _reset_peak()
        self._open.append(0.0)  # the largest peak of the stages nested in this one
        wall, cpu = time.perf_counter(), _cpu_seconds()
        try:
            yield
        finally:
            peak = max(_peak_rss_mib(), self._open.pop())
            if self._open:
                self._open[-1] = max(self._open[-1], peak)
            entry = self.stages.setdefault(label, {"seconds": 0.0, "cpu_seconds": 0.0, "peak_rss_mib": 0.0, "calls": 0})
            entry["seconds"] += time.perf_counter() - wall
            entry["cpu_seconds"] += _cpu_seconds() - cpu
            entry["peak_rss_mib"] = max(entry["peak_rss_mib"], peak)
            entry["end_rss_mib"] = _rss_mib()  # what the stage leaves resident (its last call's)
            entry["calls"] += 1

    def wrap(self, owner: Any, name: str, label: str) -> None:
        """Time every call of owner.name (a module function or a class method) as stage `label`.

        The callers look the name up at call time, so the pipeline runs its own code, timed."""

        def make(original: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(original)
            def timed(*args: Any, **kwargs: Any) -> Any:
                with self.measure(label):
                    return original(*args, **kwargs)

            return timed

        self.replace(owner, name, make)

    def table(self, items: dict[str, int]) -> dict[str, dict[str, Any]]:
        """The stages with their per-item costs; `items` maps a stage to its work size."""
        out = {}
        for label, entry in self.stages.items():
            n = items.get(label, 0)
            row = {"items": n, "seconds": round(entry["seconds"], 3), "cpu_seconds": round(entry["cpu_seconds"], 3),
                   "peak_rss_mib": round(entry["peak_rss_mib"], 1), "end_rss_mib": round(entry["end_rss_mib"], 1)}
            if n:
                row["per_item_us"] = round(entry["cpu_seconds"] / n * 1e6, 2)
                row["items_per_s_per_core"] = round(n / max(entry["cpu_seconds"], 1e-9), 1)
            out[label] = row
        return out


# ---------------------------------------------------------------- generated crawl


def _words() -> tuple[list[str], list[str]]:
    from benchmarks.build_pairs_throughput import ADJECTIVES, WORDS

    return ADJECTIVES, WORDS


def _queries(n: int, rng: random.Random) -> list[str]:
    adjectives, words = _words()
    count = max(10, n // QUERY_EVERY)
    return [f"{rng.choice(adjectives)}{rng.choice(words)}{k}" for k in range(count)]


def _zipf_pick(rng: random.Random, count: int) -> int:
    """Index in [0, count), low indices far more often (a few popular queries, a long tail)."""
    return min(count - 1, int(count * rng.random() ** 3))


def tiny_jpeg(seed: int, grain_seed: int, side: int = 16, mark: bool = False) -> bytes:
    """A smooth random picture plus grain; with `mark`, a white corner pixel (a watermark): a near
    repeat (other pixels, about the same pHash and colours)."""
    from PIL import Image

    base = np.random.default_rng(seed).integers(0, 255, (4, 4, 3), dtype=np.uint8)
    low = np.asarray(Image.fromarray(base).resize((side, side), Image.Resampling.BICUBIC), dtype=np.int16)
    grain = np.random.default_rng(grain_seed).integers(-4, 5, (side, side, 3))
    pixels = low + grain
    if mark:
        pixels[0, 0] = 255
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def caption(rng: random.Random, query: str, i: int) -> str:
    adjectives, words = _words()
    text = f"{rng.choice(adjectives)}{query}{rng.choice(words)}"
    if rng.random() < 0.8:
        text += f"第{i}款"  # most captions are distinct; the rest repeat across pictures
    return text


def crawl_lines(n: int, seed: int, with_images: bool) -> Iterator[str]:
    """JSONL records of a crawl: see the module docstring for what is planted."""
    from benchmarks.build_pairs_throughput import BOILERPLATE

    rng = random.Random(seed)
    queries = _queries(n, rng)
    recent: list[tuple[int, bytes]] = []  # (picture seed, bytes) of the last records, for repeats
    for i in range(n):
        query = queries[_zipf_pick(rng, len(queries))]
        title = caption(rng, query, i)
        record: dict[str, Any] = {"query": query, "url": f"https://img.example.com/{i}.jpg",
                                  "alt": rng.choice(BOILERPLATE) if rng.random() < 0.05 else title, "title": title}
        if with_images:
            roll = rng.random()
            if roll < 0.08 and recent:
                picture, data = rng.choice(recent)  # exact repeat
            elif roll < 0.13 and recent:
                picture = rng.choice(recent)[0]
                data = tiny_jpeg(picture, picture, mark=True)  # near repeat: the picture, watermarked
            else:
                picture, data = i, tiny_jpeg(i, i)
            recent.append((picture, data))
            if len(recent) > 1000:
                recent.pop(0)
            record["image"] = base64.b64encode(data).decode()
        yield json.dumps(record, ensure_ascii=False)


def write_crawl(path: Path, n: int, seed: int, with_images: bool) -> None:
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "crawl.jsonl", "w", encoding="utf-8") as handle:
        for line in crawl_lines(n, seed, with_images):
            handle.write(line + "\n")


# ---------------------------------------------------------------- part: build


def _wrap_global_stages(clock: StageClock) -> None:
    from data_tools import selection

    for name, label in (("read_accepted", "read"), ("_group", "dedup"), ("cap_groups", "cap"),
                        ("_account", "account"), ("_leak_free_splits", "split")):
        clock.wrap(selection, name, label)


def run_build(n: int, work: Path) -> dict[str, Any]:
    from data_tools import pipeline
    from data_tools.config import config_from_dict
    from data_tools.pipeline import BuildOptions

    start = time.perf_counter()
    write_crawl(work / "dump", n, seed=1, with_images=True)
    generate_s = time.perf_counter() - start
    config = config_from_dict({"image": {"min_side": 8}})
    options = BuildOptions(inputs=(str(work / "dump"),), out=work / "out", config=config, per_query_cap=PER_QUERY_CAP,
                           progress=False, workers=1)
    with StageClock() as clock:
        clock.wrap(pipeline, "_run_record_stages", "per_record")
        clock.wrap(pipeline, "_write_outputs", "write")
        _wrap_global_stages(clock)
        with clock.measure("total"):
            report = pipeline.build_pairs(options).report
    kept = report["kept"]
    stages = clock.table({label: n for label in clock.stages})
    return {"records": n, "kept": kept, "rejected": report["rejected"], "generate_seconds": round(generate_s, 1),
            "stages": stages, "peak_rss_is_cumulative": clock.cumulative_peak,
            "driver_peak_rss_mib": max(row["peak_rss_mib"] for row in stages.values())}


# ---------------------------------------------------------------- part: global (no image decoding)


def _text_stage(n: int, clock: StageClock) -> int:
    from data_tools.config import FilterConfig
    from data_tools.readers import parse_item
    from data_tools.records import RawItem, Rejected
    from data_tools.stages import RecordProcessor

    processor = RecordProcessor(FilterConfig())
    base = Path(".")
    warm = parse_item(RawItem("w:1", json.dumps({"query": "红色连衣裙", "alt": "红色连衣裙新款"}).encode()), "jsonl", base)
    processor.choose_text(warm)  # jieba loads its dictionary on first use: not part of the per-record cost
    passed = 0
    lines = crawl_lines(n, seed=2, with_images=False)
    with clock.measure("text"):
        for i, line in enumerate(lines):
            record = parse_item(RawItem(f"crawl.jsonl:{i + 1}", line.encode()), "jsonl", base)
            try:
                processor.check_fields(record)
                processor.choose_text(record)
                passed += 1
            except Rejected:
                pass
    return passed


def write_light_shards(folder: Path, n: int, seed: int, shard_size: int = 100_000) -> list[Path]:
    """Shard files as the per-record stages leave them, without images: random pHashes with near
    repeats (1-3 bits flipped, same colours) and exact repeats (same sha) of earlier records planted."""
    import pyarrow as pa

    from data_tools.download_stats import DownloadStats
    from data_tools.report import Tally
    from data_tools.shards import SCHEMA, write_shard

    rng = np.random.default_rng(seed)
    text_rng = random.Random(seed)
    queries = _queries(n, text_rng)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, lo in enumerate(range(0, n, shard_size)):
        m = min(shard_size, n - lo)
        picture = np.arange(lo, lo + m)
        roll = rng.random(m)
        earlier = np.maximum(picture - rng.integers(1, 1000, m), 0)
        repeat = (roll < 0.13) & (earlier < picture)
        picture[repeat] = earlier[repeat]  # same picture as an earlier record (within this shard or before)
        phash = _picture_hash(picture, seed)
        near = repeat & (roll >= 0.08)
        flips = np.zeros(m, dtype=np.uint64)
        for _ in range(3):
            bit = rng.integers(0, 64, m).astype(np.uint64)
            flips ^= np.where(near & (rng.random(m) < 0.7), np.uint64(1) << bit, np.uint64(0))
        phash ^= flips
        # an exact repeat shares its picture's sha; a near repeat has its own (it is other pixels)
        sha = [int(p).to_bytes(8, "little") * 2 if not near[k] else int(p).to_bytes(8, "little") + int(lo + k).to_bytes(8, "little")
               for k, p in enumerate(picture)]
        colour = [_colour(int(p)) for p in picture]
        query = [queries[_zipf_pick(text_rng, len(queries))] for _ in range(m)]
        text = [caption(text_rng, q, lo + k) for k, q in enumerate(query)]
        columns = {
            "item": pa.array(np.arange(m, dtype=np.int32)), "location": [f"crawl.jsonl:{lo + k + 1}" for k in range(m)],
            "query": query, "text": text, "text_field": ["alt"] * m, "sha": sha, "phash": pa.array(phash),
            "colour": colour, "width": pa.array(np.full(m, 16, dtype=np.int32)),
            "height": pa.array(np.full(m, 16, dtype=np.int32)), "jpeg": [b""] * m, "url": [None] * m,
            "page_url": [None] * m, "meta": ["{}"] * m,
        }
        path = folder / f"00000-{index:06d}.parquet"
        write_shard(path, pa.table(columns, schema=SCHEMA), Tally(), DownloadStats(), [])
        paths.append(path)
    return paths


def _picture_hash(picture: np.ndarray, seed: int) -> np.ndarray:
    """A random 64-bit pHash per picture number (a fixed function of it: repeats share it)."""
    x = picture.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed)
    x ^= x >> np.uint64(31)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    return x ^ (x >> np.uint64(29))


def _colour(picture: int) -> bytes:
    return random.Random(picture).randbytes(32)


def _semantic_stage(n: int, dim: int, clock: StageClock) -> int:
    """Pairs the split's semantic neighbourhoods find over n clustered unit vectors (clusters of ~4)."""
    from data_tools import semantic

    rng = np.random.default_rng(3)
    centres = rng.standard_normal((max(1, n // 4), dim)).astype(np.float32)
    vectors = centres[rng.integers(0, len(centres), n)] + 0.05 * rng.standard_normal((n, dim)).astype(np.float32)
    vectors = semantic.normalise(vectors)
    with clock.measure("semantic_split"):  # pairs come a batch at a time: the search runs as they are counted
        return sum(len(left) for left, _ in semantic.similar_pairs(vectors, 0.9))


def _global_config(hamming: bool) -> Any:
    """The default filters; without `hamming`, dedup and split skip the pHash neighbourhood search
    (everything else of both stages still runs)."""
    from data_tools.config import config_from_dict

    off = {"dedup": {"phash_max_distance": None}, "split": {"phash_max_distance": None}}
    return config_from_dict({} if hamming else off)


def run_global(n: int, work: Path, text: bool, semantic_dim: int, hamming: bool = True) -> dict[str, Any]:
    from data_tools import selection
    from data_tools.pipeline import DEFAULT_SPLITS
    from data_tools.report import Tally

    clock = StageClock()
    result: dict[str, Any] = {"records": n}
    if text:
        result["passed_text_stages"] = _text_stage(n, clock)
    start = time.perf_counter()
    paths = write_light_shards(work / "shards", n, seed=4)
    result["generate_seconds"] = round(time.perf_counter() - start, 1)
    tally = Tally()
    with clock:
        _wrap_global_stages(clock)
        with clock.measure("select_total"):
            chosen = selection.select(paths, ["crawl.jsonl"] * len(paths), "scale", config=_global_config(hamming),
                                      splits=DEFAULT_SPLITS, seed=0, per_query_cap=PER_QUERY_CAP, scoring=None,
                                      tally=tally, progress=False)
    result["kept"] = sum(chosen.split_counts.values())
    result["rejected"] = {reason: count for counts in tally.files.values() for reason, count in counts["rejected"].items()}
    if semantic_dim:
        result["semantic_pairs"] = _semantic_stage(n, semantic_dim, clock)
    result["stages"] = clock.table({label: n for label in clock.stages})
    result["peak_rss_is_cumulative"] = clock.cumulative_peak
    return result


# ---------------------------------------------------------------- part: train


TRAIN_CHARS = ("左右上下角中间有一个的红绿蓝黄紫黑白色圆形正方三角在位于图片画着是高级感托特包斜挎连衣裙男女鞋帽子手机壳猫狗汽车"
               "花朵照片张")


def tiny_model(out: Path, side: int) -> Path:
    """recipes/models/tiny at `side` pixels, its random weights saved (a run's best/ then loads like a real one)."""
    import torch
    from transformers import ChineseCLIPConfig, ChineseCLIPModel

    shutil.copytree(REPO / "recipes" / "models" / "tiny", out)
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    config["vision_config"]["image_size"] = side
    torch.manual_seed(0)
    ChineseCLIPModel(ChineseCLIPConfig.from_dict(config)).save_pretrained(out)
    (out / "tokenizer_config.json").write_text(json.dumps(  # the slow BERT tokenizer: needs no converter
        {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "tokenize_chinese_chars": True}), encoding="utf-8")
    pre = json.loads((out / "preprocessor_config.json").read_text(encoding="utf-8"))
    pre["size"] = pre["crop_size"] = {"height": side, "width": side}
    (out / "preprocessor_config.json").write_text(json.dumps(pre), encoding="utf-8")
    return out


def write_pairs(root: Path, split: str, n: int, first_id: int, seed: int, side: int) -> None:
    """n images (side x side JPEGs) with one caption each, in the Chinese-CLIP layout."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{split}_imgs.tsv", "w", encoding="utf-8") as images, \
            open(root / f"{split}_texts.jsonl", "w", encoding="utf-8") as texts:
        for k in range(n):
            image_id = first_id + k
            data = tiny_jpeg(image_id, image_id, side)
            images.write(f"{image_id}\t{base64.urlsafe_b64encode(data).decode()}\n")
            text = "".join(rng.choice(TRAIN_CHARS) for _ in range(rng.randint(6, 14)))
            texts.write(json.dumps({"text_id": image_id, "text": text, "image_ids": [image_id]}, ensure_ascii=False) + "\n")


def run_train(n: int, work: Path, side: int, batch: int) -> dict[str, Any]:
    from cnclip import trainer
    from cnclip.global_state import torch_threads
    from cnclip.commands import search
    from cnclip.recipe import load_recipe

    valid = max(16, n // 10)
    start = time.perf_counter()
    data, model = work / "data", tiny_model(work / "model", side)
    write_pairs(data, "train", n, 0, seed=5, side=side)
    write_pairs(data, "valid", valid, 10**9, seed=6, side=side)
    generate_s = time.perf_counter() - start
    overrides = {
        "model.base": model, "model.random_init": False, "data.root": data, "data.generate": None, "run_dir": work / "run",
        "cache.dir": work / "cache", "train.epochs": 1, "train.batch_size": batch, "train.log_every": 10**9,
        "train.save_every": 10**9, "eval.before_training": False, "zeroshot.images": "", "zeroshot.classes": "",
        "zeroshot.templates": "", "train.wise": None,
    }
    recipe = load_recipe(REPO / "recipes" / "demo.yaml",
                         [f"{k}={'null' if v is None else v}" for k, v in overrides.items()])
    run = trainer.FinetuneRun
    steps: list[float] = []  # cpu seconds of each optimizer step (robust to other processes on the machine)
    step_rss: list[float] = []  # resident MiB right after each step (before anything the loop frees after it)
    labels = iter(("cache_train", "cache_valid"))

    def image_features(original: Callable[..., Any]) -> Callable[..., Any]:
        def measured(self: Any, *args: Any, **kwargs: Any) -> Any:
            with clock.measure(next(labels)):
                return original(self, *args, **kwargs)
        return measured

    def step(original: Callable[..., Any]) -> Callable[..., Any]:
        def measured(self: Any, idx: Any) -> Any:
            cpu = _cpu_seconds()
            out = original(self, idx)
            steps.append(_cpu_seconds() - cpu)
            step_rss.append(_rss_mib())
            return out
        return measured

    with StageClock() as clock, contextlib.redirect_stdout(io.StringIO()), torch_threads(1):
        clock.wrap(run, "_read_splits", "read_splits")
        clock.replace(run, "_image_features", image_features)
        clock.wrap(trainer, "build_pairs", "tokenise_pairs")
        clock.wrap(run, "train_epoch", "epoch")
        clock.wrap(run, "validate", "evaluate")
        clock.replace(run, "_step", step)
        trainer.train(recipe)
        with clock.measure("search_index"):
            code = search.main(["index", str(data / "train_imgs.tsv"), "--out", str(work / "index"), "--model",
                                str(work / "model"), "--cache-dir", str(work / "cache"), "--json"])
    if code != 0:
        raise RuntimeError(f"cnclip search index exited {code}")
    tenth = max(1, len(steps) // 10)
    first, last = sorted(steps[1:tenth + 1] or steps), sorted(steps[-tenth:])
    items = {"read_splits": n + valid, "cache_train": n, "cache_valid": valid, "tokenise_pairs": n, "epoch": n,
             "evaluate": valid, "search_index": n}
    stages = clock.table(items)
    return {
        "pairs": n, "valid_pairs": valid, "image_side": side, "batch": batch, "generate_seconds": round(generate_s, 1),
        "steps": len(steps), "step_cpu_ms_median_first_tenth": round(first[len(first) // 2] * 1e3, 2),
        "step_cpu_ms_median_last_tenth": round(last[len(last) // 2] * 1e3, 2),
        # flat if the loop keeps no more memory as it goes: the largest resident size after a step, per tenth
        "step_rss_mib_max_first_tenth": round(max(step_rss[:tenth]), 1),
        "step_rss_mib_max_last_tenth": round(max(step_rss[-tenth:]), 1),
        "stages": stages, "peak_rss_is_cumulative": clock.cumulative_peak,
        "peak_rss_mib": max(row["peak_rss_mib"] for row in stages.values()),
    }


# ---------------------------------------------------------------- driver


def child_main(argv: list[str]) -> None:
    """One part at one size, in this (fresh) process; prints its JSON."""
    part, n, options = argv[0], int(argv[1]), json.loads(argv[2])
    with tempfile.TemporaryDirectory(prefix=f"scale-{part}-{n}-", dir=options.get("tmp")) as tmp:
        if part == "build":
            result = run_build(n, Path(tmp))
        elif part == "global":
            result = run_global(n, Path(tmp), text=n <= options["text_max"], semantic_dim=options["semantic_dim"],
                                hamming=options["hamming"])
        else:
            result = run_train(n, Path(tmp), options["image_side"], options["batch"])
    print(json.dumps(result))


def run_child(part: str, n: int, options: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", part, str(n), json.dumps(options)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # local models only: never wait on a network
    start = time.perf_counter()
    try:
        child = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"records" if part != "train" else "pairs": n, "unfinished": f"over the {timeout:.0f} s limit"}
    if child.returncode != 0:
        raise RuntimeError(f"scale {part} {n} failed:\n{child.stderr[-4000:]}")
    result = json.loads(child.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    return result


def growth(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Per stage: per-item cpu cost at the largest finished size over that at the smallest."""
    done = [run for run in runs if "stages" in run]
    if len(done) < 2:
        return {}
    small, large = done[0]["stages"], done[-1]["stages"]
    return {label: round(large[label]["per_item_us"] / small[label]["per_item_us"], 2)
            for label in large if label in small and small[label].get("per_item_us") and large[label].get("per_item_us")}


def parse_sizes(text: str) -> list[int]:
    return sorted(int(float(part)) for part in text.split(",") if part.strip()) if text else []


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        child_main(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for part in PARTS:
        parser.add_argument(f"--{part}", default=DEFAULT_SIZES[part], metavar="N,N,...",
                            help=f"sizes of the {part} part, comma-separated; empty: skip it (default: %(default)s)")
    parser.add_argument("--text-max", type=int, default=2_000_000, help="global part: run the text stage only up to this size")
    parser.add_argument("--semantic-dim", type=int, default=32, help="global part: embedding size for semantic_split; 0: off")
    parser.add_argument("--no-hamming", action="store_true",
                        help="global part: dedup and split without the pHash neighbourhood search (the rest of both stages runs)")
    parser.add_argument("--image-side", type=int, default=32, help="train part: image and model input side")
    parser.add_argument("--batch", type=int, default=256, help="train part: batch size")
    parser.add_argument("--timeout", type=float, default=None, help="seconds one size may take; beyond it, reported unfinished")
    parser.add_argument("--tmp", default=None, help="where the generated data goes (default: the system's temp dir)")
    parser.add_argument("--out", type=Path, help="also write the JSON here, after each size")
    args = parser.parse_args(argv)
    options = {"text_max": args.text_max, "semantic_dim": args.semantic_dim, "hamming": not args.no_hamming, "image_side": args.image_side,
               "batch": args.batch, "tmp": args.tmp}
    result: dict[str, Any] = {"cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
                              "options": options}
    for part in PARTS:
        sizes = parse_sizes(getattr(args, part))
        if not sizes:
            continue
        runs: list[dict[str, Any]] = []
        result[part] = {"runs": runs}
        for n in sizes:
            runs.append(run_child(part, n, options, args.timeout))
            result[part]["growth_per_item_largest_over_smallest"] = growth(runs)
            if args.out:
                args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
