"""`cnclip zeroshot` (also `python -m cnclip.zeroshot`): zero-shot classification from the command line.

    cnclip zeroshot --model RUN_OR_MODEL --classes classes.txt --images DIR [--templates FILE]
                    [--single-template] [--compare-base] [--out DIR] [--predict IMG ...]
    cnclip zeroshot recipes/zeroshot/demo.yaml [--flag ...]      (flags override the file)

The config file is typed like a training recipe (`cnclip.typed_config`); the library part is
`cnclip.classifier`.
"""

from __future__ import annotations

import argparse
import json
import unicodedata
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import EXIT_DATA, EXIT_DISK_FULL, EXIT_MODEL, ConfigError
from ..prompts import ClassList
from ..recipe import Recipe
from ..typed_config import build_config, read_yaml_mapping
from .base import parser_options, run_command

if TYPE_CHECKING:  # only for annotations: torch is imported when the command runs, not for --help
    import torch

    from ..classifier import FolderEmbeddings
    from ..skiplog import SkipLog

EXITS = (EXIT_DISK_FULL, EXIT_DATA, EXIT_MODEL)
# cnclip.classifier.TOP_K, written out so that --help does not import torch (tests/test_cli_help.py compares them).
TOP_K = 5


@dataclass
class ZeroShotRun:
    """The keys of a zero-shot config file (recipes/zeroshot/demo.yaml); each is also a command-line flag (a flag wins over the file)."""

    # A run directory of cnclip.finetune, or a model directory / hub id.
    model: str = ""
    # Which checkpoint of a run directory: best or last.
    checkpoint: str = "best"
    # Class list (key: 名称1, 名称2); default: the run's zeroshot.classes.
    classes: str = ""
    # DIR/<class_key>/*.jpg to score; default: the run's zeroshot.images.
    images: str = ""
    # Templates file; default: the run's zeroshot.templates, else the shipped templates.
    templates: str = ""
    # Only the first template (一张{}的照片) instead of the ensemble.
    single_template: bool = False
    # Score the run's base model too, side by side.
    compare_base: bool = False
    # Images to label one by one (top-k classes with probabilities).
    predict: list[str] = field(default_factory=list)
    top_k: int = TOP_K
    # Output folder; default RUN/zeroshot for a run, ./zeroshot otherwise.
    out: str = ""
    # Embedding caches; default: the run's cache.dir, else ~/.cache/cnclip.
    cache_dir: str = ""
    batch_size: int = 64
    # Tokens per prompt; default: the run's data.context_length, else 52.
    context_length: int = 0
    device: str = "auto"
    workers: int = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cnclip zeroshot", **parser_options(
        "Zero-shot image classification with Chinese prompt templates (prompt ensembling on by default): "
        "accuracy, per-class accuracy and confusion matrix for a folder of class sub-folders, or top-k labels "
        "for single images.", EXITS,
        epilog="examples:\n  python -m cnclip.zeroshot --model runs/demo --compare-base\n"
               "  python -m cnclip.zeroshot --model OFA-Sys/chinese-clip-vit-base-patch16 "
               "--classes cifar10 --images data/cifar10/test\n"
               "  cnclip zeroshot recipes/zeroshot/demo.yaml --predict cat.jpg"))
    p.add_argument("recipe", nargs="?", help="optional YAML file with the keys below (see recipes/zeroshot/demo.yaml)")
    p.add_argument("--model", help="run directory (its best checkpoint), model directory, Hugging Face id "
                                   "(owner/name) or modelscope:<id>")
    p.add_argument("--checkpoint", choices=("best", "last"), help="which checkpoint of a run directory "
                                                                  f"(default: {ZeroShotRun.checkpoint})")
    p.add_argument("--classes", help="class list: lines 'key: 名称1, 名称2' (key = image sub-folder name), or a shipped list by name: cifar10")
    p.add_argument("--images", help="folder with one sub-folder of images per class key")
    p.add_argument("--templates", help="templates file, one per line with {} (default: the 23 shipped templates)")
    p.add_argument("--single-template", action=argparse.BooleanOptionalAction, default=None,
                   help="use only the first template instead of the ensemble")
    p.add_argument("--compare-base", action=argparse.BooleanOptionalAction, default=None,
                   help="score the run's base model too and print both side by side")
    p.add_argument("--predict", nargs="+", metavar="IMG", help="label these images (top-k with probabilities)")
    p.add_argument("--top-k", type=int, help=f"classes listed per --predict image (default: {ZeroShotRun.top_k})")
    p.add_argument("--out", help="output folder (default RUN/zeroshot, or ./zeroshot)")
    p.add_argument("--cache-dir", help="embedding cache folder (default: the run's cache.dir, or ~/.cache/cnclip)")
    p.add_argument("--batch-size", type=int, help=f"images or prompts per model batch (default: {ZeroShotRun.batch_size})")
    p.add_argument("--context-length", type=int, help="tokens per prompt (default: the run's "
                                                      "data.context_length, or 52)")
    p.add_argument("--device", help="torch device: auto (cuda when available), cpu, cuda, ... "
                                    f"(default: {ZeroShotRun.device})")
    p.add_argument("--workers", type=int, help=f"image decoding worker processes (default: {ZeroShotRun.workers})")
    return p


def load_run_config(args: argparse.Namespace) -> ZeroShotRun:
    """The YAML file (if any), then every flag given on the command line, validated."""
    raw: dict = read_yaml_mapping(args.recipe, "zero-shot config") if args.recipe else {}
    for f in fields(ZeroShotRun):
        value = getattr(args, f.name, None)
        if value is not None:
            raw[f.name] = value
    try:
        cfg = build_config(ZeroShotRun, raw, "zero-shot config")
    except ConfigError as exc:
        raise ConfigError(f"{args.recipe or 'command line'}: {exc}") from None
    if not cfg.model:
        raise ConfigError("no model: pass --model RUN_OR_MODEL_DIR (or 'model:' in the recipe)")
    if cfg.checkpoint not in ("best", "last"):
        raise ConfigError(f"zero-shot config key 'checkpoint': got {cfg.checkpoint!r}, accepted: best, last")
    for key in ("top_k", "batch_size"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"zero-shot config key '{key}' must be >= 1, got {getattr(cfg, key)}")
    if cfg.workers < 0 or cfg.context_length < 0:
        raise ConfigError("recipe keys 'workers' and 'context_length' must be >= 0")
    return cfg


def _fill_from_run(cfg: ZeroShotRun) -> Recipe | None:
    """Defaults from a run directory's recipe: its zero-shot folder, class list, templates, cache."""
    from ..inference import RECIPE_FILE, is_run_dir
    from ..recipe import load_recipe

    if not is_run_dir(cfg.model):
        return None
    recipe = load_recipe(Path(cfg.model) / RECIPE_FILE, check_data=False)
    z = recipe.zeroshot
    cfg.classes = cfg.classes or z.classes
    cfg.images = cfg.images or (z.images if not cfg.predict else "")
    cfg.templates = cfg.templates or z.templates
    cfg.cache_dir = cfg.cache_dir or recipe.cache.dir
    cfg.context_length = cfg.context_length or recipe.data.context_length
    return recipe


@dataclass
class ModelResult:
    name: str
    metrics: dict | None
    sims: torch.Tensor | None
    logit_scale: float


def _score_model(name: str, clip, tokenizer, preprocess, cfg: ZeroShotRun, templates, classes, folder,
                 runtime, skips: SkipLog) -> tuple[ModelResult, torch.Tensor, FolderEmbeddings | None]:
    from ..classifier import class_cache_dir, class_embeddings, folder_embeddings, logit_scale_of, score, similarities
    from ..data import ImageTransform

    clip = clip.to(runtime.device).eval()
    class_emb = class_embeddings(clip, tokenizer, templates, classes, runtime, cfg.context_length, cfg.batch_size,
                                 class_cache_dir(cfg.cache_dir or None))
    metrics = sims = images = None
    if folder is not None:
        images = folder_embeddings(folder, clip, ImageTransform(preprocess), runtime, cfg.cache_dir or None,
                                   cfg.batch_size, cfg.workers, skips)
        sims = similarities(images.embeddings, class_emb)
        metrics = score(sims, images.labels, classes.keys)
    return ModelResult(name, metrics, sims, logit_scale_of(clip)), class_emb, images


# ---------------------------------------------------------------- printouts


def _width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _pad(text: str, width: int, right: bool = False) -> str:
    fill = " " * max(0, width - _width(text))
    return fill + text if right else text + fill


def _table(rows: list[list[str]], left: tuple[int, ...] = (0,)) -> str:
    """Columns sized by display width (Chinese characters take two cells); numbers right-aligned."""
    widths = [max(_width(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(_pad(cell, widths[c], right=c not in left) for c, cell in enumerate(r)).rstrip()
                     for r in rows)


def _most_confused(metrics: dict, c: int) -> str:
    row = list(metrics["confusion"]["matrix"][c])
    row[c] = 0
    worst = max(range(len(row)), key=row.__getitem__)
    return f"{metrics['confusion']['labels'][worst]} ({row[worst]})" if row[worst] else "-"


def format_report(results: list[ModelResult], classes: ClassList, max_matrix: int = 12) -> str:
    """Accuracy table (models side by side, with the change when there are two), per class, confusion."""
    top_k = f"top{TOP_K}"
    lines = []
    rows = [["", "top-1", f"top-{TOP_K}"]]
    rows += [[r.name, f"{r.metrics['top1']:.2f}", f"{r.metrics[top_k]:.2f}"] for r in results]
    if len(results) == 2:
        a, b = results[0].metrics, results[1].metrics
        rows.append(["change", f"{b['top1'] - a['top1']:+.2f}", f"{b[top_k] - a[top_k]:+.2f}"])
    lines += [_table(rows), ""]

    last = results[-1].metrics
    header = ["class", "images"] + [f"top-1 {r.name}" for r in results] + ["most often taken for"]
    rows = [header]
    for c, key in enumerate(classes.keys):
        if key not in last["per_class"]:
            continue
        rows.append([classes.label(c), str(last["per_class"][key]["images"])]
                    + [f"{r.metrics['per_class'][key]['top1']:.2f}" for r in results] + [_most_confused(last, c)])
    lines += ["per class:", _table(rows, left=(0, len(header) - 1)), ""]

    matrix = last["confusion"]["matrix"]
    if len(classes) <= max_matrix:
        rows = [["true \\ predicted"] + list(classes.keys)]
        rows += [[key] + [str(v) for v in matrix[c]] for c, key in enumerate(classes.keys) if key in last["per_class"]]
        lines += [f"confusion matrix ({results[-1].name}; rows: true class, columns: predicted):", _table(rows)]
    else:
        pairs = sorted(((matrix[t][p], t, p) for t in range(len(matrix)) for p in range(len(matrix)) if t != p),
                       reverse=True)[:10]
        rows = [["true", "predicted", "images"]] + [[classes.keys[t], classes.keys[p], str(n)] for n, t, p in pairs if n]
        lines += [f"most frequent confusions ({results[-1].name}; full matrix in the JSON):", _table(rows, (0, 1))]
    return "\n".join(lines)


def format_predictions(predictions: list[dict], classes: ClassList) -> str:
    index = classes.index()
    lines = []
    for p in predictions:
        lines.append(p["image"])
        if "error" in p:
            lines.append(f"  skipped: {p['error']}")
            continue
        for t in p["top"]:
            lines.append(f"  {t['probability']:7.4f}  {classes.label(index[t['key']])}")
    return "\n".join(lines)


# ---------------------------------------------------------------- the command


def run(cfg: ZeroShotRun) -> dict:
    from ..atomic import atomic_file, write_json
    from ..classifier import predict_images
    from ..image_sources import ImageFolder
    from ..inference import load_for_inference
    from ..models import load_base_model
    from ..prompts import load_classes, load_templates
    from ..runtime import pick_runtime
    from ..skiplog import SkipLog

    recipe = _fill_from_run(cfg)
    if not cfg.classes:
        raise ConfigError("no class list: pass --classes classes.txt (lines 'key: 名称1, 名称2')")
    if not cfg.images and not cfg.predict:
        raise ConfigError("nothing to classify: pass --images DIR (one sub-folder per class) and/or --predict IMG ...")
    if cfg.compare_base and not cfg.images:
        raise ConfigError("--compare-base compares accuracy on an image folder: pass --images DIR as well")
    if cfg.compare_base and recipe is None:
        raise ConfigError(f"--compare-base needs a run directory (its recipe names the base model); "
                          f"{cfg.model} is a model directory")
    cfg.context_length = cfg.context_length or 52

    # Every input is read and checked before any model is loaded.
    skips = SkipLog()
    classes = load_classes(cfg.classes)
    templates = load_templates(cfg.templates or None, single=cfg.single_template)
    folder = ImageFolder(cfg.images, classes, skips) if cfg.images else None

    runtime = pick_runtime(cfg.device, recipe.train.precision if recipe else "auto")
    results: list[ModelResult] = []
    if cfg.compare_base:
        base = load_base_model(recipe.model, recipe.seed)
        result, _, _ = _score_model("base", base.clip, base.tokenizer, base.preprocess, cfg, templates, classes,
                                    folder, runtime, SkipLog(max_examples=0))
        results.append(result)
        del base
    loaded = load_for_inference(cfg.model, checkpoint=cfg.checkpoint, what="--model")
    name = "tuned" if recipe is not None else "model"
    result, class_emb, images = _score_model(name, loaded.clip, loaded.tokenizer, loaded.preprocess, cfg, templates,
                                             classes, folder, runtime, skips)
    results.append(result)

    out_dir = Path(cfg.out) if cfg.out else (Path(cfg.model) / "zeroshot" if recipe is not None else Path("zeroshot"))
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "model": cfg.model, "checkpoint": cfg.checkpoint if recipe is not None else None,
        "classes": str(classes.path), "images": str(folder.path) if folder else None,
        "templates": templates, "ensemble": len(templates) > 1,
        "results": {r.name: r.metrics for r in results if r.metrics is not None},
        "logit_scale": {r.name: r.logit_scale for r in results},
        "skipped": skips.summary(),
    }
    if folder is not None:
        header = (f"zero-shot classification: {cfg.model} on {folder.path}\n"
                  f"{len(images.files)} images, {len(classes)} classes ({classes.path}), "
                  + (f"{len(templates)} templates averaged" if len(templates) > 1 else f"one template {templates[0]}"))
        print(header)
        print(format_report(results, classes))
        with atomic_file(out_dir / "predictions.jsonl", "w", encoding="utf-8") as fh:
            top = result.sims.topk(min(TOP_K, len(classes)), dim=1).indices.tolist()
            for f, label, row in zip(images.files, images.labels.tolist(), top):
                fh.write(json.dumps({"image": str(f), "label": classes.keys[label],
                                     "top": [classes.keys[i] for i in row]}, ensure_ascii=False) + "\n")
    if cfg.predict:
        report["predictions"] = predict_images(cfg.predict, loaded.clip, loaded.preprocess, class_emb, classes,
                                               runtime, cfg.top_k, skips)
        print(format_predictions(report["predictions"], classes))
    report["skipped"] = skips.summary()
    if skips.total:
        print(f"skipped {skips.total} items: {dict(skips.counts)} (examples in {out_dir / 'zeroshot.json'})")
    write_json(out_dir / "zeroshot.json", report)
    print(f"wrote {out_dir / 'zeroshot.json'}")
    summary: dict = {r.name: {"top1": r.metrics["top1"], f"top{TOP_K}": r.metrics[f"top{TOP_K}"]}
                     for r in results if r.metrics is not None}
    if cfg.predict:
        summary["predictions"] = report["predictions"]
    print(json.dumps(summary, ensure_ascii=False))
    return report


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: (run(load_run_config(args)), 0)[1])

