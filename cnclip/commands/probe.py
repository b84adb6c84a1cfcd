"""`cnclip probe` (also `python -m cnclip.probe`): linear probe and few-shot curves beside zero-shot.

    cnclip probe --model RUN_OR_MODEL --train DIR --test DIR [--classes FILE] [--shots 1,2,4,8,16]
                 [--seeds 5] [--out DIR]

TRAIN and TEST are folders of class sub-folders, as `cnclip zeroshot --images` reads them. The
class list is `--classes` (the zero-shot format), else the run's `zeroshot.classes`, else the
training folder's sub-folder names (each its own class name). Zero-shot accuracy is scored on the
same test images with the same class list. The library part is `cnclip.linear_probe`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import EXIT_DATA, EXIT_DISK_FULL, EXIT_MODEL, DataError, UsageError
from .base import parser_options, run_command
from .zeroshot import TOP_K

if TYPE_CHECKING:  # only for annotations: torch is imported when the command runs, not for --help
    from ..prompts import ClassList

EXITS = (EXIT_DISK_FULL, EXIT_DATA, EXIT_MODEL)
# cnclip.linear_probe.HELD_OUT and MAX_ITER, written out so that --help does not import torch or scikit-learn
# (tests/test_cli_help.py compares them).
HELD_OUT = 0.2
MAX_ITER = 1000
PROBE_JSON, PROBE_PNG = "probe.json", "probe.png"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cnclip probe", **parser_options(
        "Linear probe on frozen image embeddings (L2-regularised logistic regression, scikit-learn L-BFGS; C chosen "
        "on held-out training images by the CLIP paper's search over 1e-6..1e6), and k-shot probes over several "
        "seeds, printed beside zero-shot accuracy on the same test images and class list. Writes probe.json and, "
        "with --shots, the few-shot curve probe.png.", EXITS,
        epilog="examples:\n  cnclip probe --model runs/demo --train data/probe/train --test data/probe/test\n"
               "  cnclip probe --model OFA-Sys/chinese-clip-vit-base-patch16 --classes cifar10 "
               "--train data/cifar10/train --test data/cifar10/test --shots 1,2,4,8,16 --seeds 5"))
    p.add_argument("--model", required=True, help="run directory (its best checkpoint), model directory, Hugging "
                                                   "Face id (owner/name) or modelscope:<id>")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best", help="which checkpoint of a run directory")
    p.add_argument("--train", required=True, help="training images: one sub-folder of images per class key")
    p.add_argument("--test", required=True, help="test images, the same layout (may lack some classes)")
    p.add_argument("--classes", help="class list 'key: 名称1, 名称2' or a shipped list (cifar10) (default: the run's "
                                     "zeroshot.classes, else the --train sub-folder names, each its own name)")
    p.add_argument("--templates", help="zero-shot templates file (default: the 23 shipped templates)")
    p.add_argument("--zeroshot", action=argparse.BooleanOptionalAction, default=True,
                   help="score zero-shot on the test images too (--no-zeroshot: the probe only)")
    p.add_argument("--shots", metavar="K,K,...",
                   help="few-shot curve: k-shot probes for these k (e.g. 1,2,4,8,16); each draws k images per class "
                        "to fit and k others to choose C on, so every class needs 2 x the largest k (default: none, "
                        "the full probe only)")
    p.add_argument("--seeds", type=int, default=5, help="draws (seeds 0..N-1) per k-shot point")
    p.add_argument("--held-out", type=float, default=HELD_OUT,
                   help="full probe: share of each class's training images held out to choose C")
    p.add_argument("--max-iter", type=int, default=MAX_ITER, help="L-BFGS iterations per fit at most")
    p.add_argument("--out", help="output folder (default RUN/probe, or ./probe)")
    p.add_argument("--cache-dir", help="embedding cache folder (default: the run's cache.dir, or ~/.cache/cnclip)")
    p.add_argument("--batch-size", type=int, default=64, help="images or prompts per model batch")
    p.add_argument("--context-length", type=int, help="tokens per prompt (default: the run's data.context_length, "
                                                      "or 52)")
    p.add_argument("--device", default="auto", help="torch device: auto (cuda when available), cpu, cuda, ...")
    p.add_argument("--workers", type=int, default=2, help="image decoding worker processes")
    return p


def parse_shots(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4] (sorted, without repeats); UsageError naming the flag otherwise."""
    try:
        shots = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise UsageError(f"--shots: expected positive whole numbers separated by commas (1,2,4,8,16), got {text!r}") from None
    if any(k < 1 for k in shots):
        raise UsageError(f"--shots: every k must be >= 1, got {text!r}")
    return shots


def check_args(args: argparse.Namespace) -> list[int]:
    """Flag values checked before any data or model is read; the parsed --shots."""
    if args.seeds < 1 or args.batch_size < 1 or args.max_iter < 1:
        raise UsageError("--seeds, --batch-size and --max-iter must be >= 1")
    if not 0.0 < args.held_out < 1.0:
        raise UsageError(f"--held-out must be between 0 and 1 (a share of each class's images), got {args.held_out}")
    if args.workers < 0 or (args.context_length is not None and args.context_length < 1):
        raise UsageError("--workers must be >= 0 and --context-length >= 1")
    return parse_shots(args.shots or "")


def _class_folders(root: Path) -> list[str]:
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    return sorted(e.name for e in root.iterdir() if e.is_dir() and not e.name.startswith("."))


def folder_classes(train: Path, test: Path) -> ClassList:
    """The training folder's class sub-folders as a class list, each key its own name; the test folder's
    must be among them."""
    from ..prompts import ClassList

    keys = tuple(_class_folders(train))
    if len(keys) < 2:
        raise DataError(f"{train}: a probe needs two classes at least, found {len(keys)} class folder(s) "
                        f"({', '.join(keys) or 'none'}); put each class's images in {train}/<class>/")
    unknown = [k for k in _class_folders(test) if k not in keys]
    if unknown:
        raise DataError(f"class folder {test / unknown[0]} has no training folder {train / unknown[0]}: the probe "
                        f"cannot learn a class it has no images of (or pass --classes FILE)")
    return ClassList(train, keys, tuple((k,) for k in keys))


def run(args: argparse.Namespace) -> dict:
    from .. import linear_probe
    from ..atomic import atomic_file, write_json
    from ..classifier import class_cache_dir, class_embeddings, folder_embeddings, score, similarities
    from ..data import ImageTransform
    from ..image_sources import ImageFolder
    from ..inference import RECIPE_FILE, is_run_dir, load_for_inference
    from ..plots import figure, png_bytes
    from ..prompts import load_classes, load_templates
    from ..recipe import load_recipe
    from ..runtime import pick_runtime
    from ..skiplog import SkipLog

    shots = check_args(args)
    recipe = load_recipe(Path(args.model) / RECIPE_FILE, check_data=False) if is_run_dir(args.model) else None
    class_file = args.classes or (recipe.zeroshot.classes if recipe else "")
    cache_dir = args.cache_dir or (recipe.cache.dir if recipe else None)
    context_length = args.context_length or (recipe.data.context_length if recipe else 52)

    # Every input is read and checked before the model is loaded.
    skips = SkipLog()
    classes = load_classes(class_file) if class_file else folder_classes(Path(args.train), Path(args.test))
    templates = (load_templates(args.templates or (recipe.zeroshot.templates if recipe else None) or None)
                 if args.zeroshot else [])
    train_folder = ImageFolder(args.train, classes, skips)
    test_folder = ImageFolder(args.test, classes, skips)
    linear_probe.check_classes(train_folder.labels, classes.keys, str(train_folder.path))
    linear_probe.check_shots(train_folder.labels, classes.keys, shots, str(train_folder.path))

    loaded = load_for_inference(args.model, checkpoint=args.checkpoint, what="--model")
    runtime = pick_runtime(args.device, recipe.train.precision if recipe else "auto")
    clip = loaded.clip.to(runtime.device).eval()
    transform = ImageTransform(loaded.preprocess)
    train, test = (folder_embeddings(f, clip, transform, runtime, cache_dir, args.batch_size, args.workers, skips)
                   for f in (train_folder, test_folder))
    # Undecodable images are dropped (and counted): the checks again, on what is left.
    linear_probe.check_classes(train.labels.tolist(), classes.keys, str(train_folder.path))
    linear_probe.check_shots(train.labels.tolist(), classes.keys, shots, str(train_folder.path))

    report: dict = {"model": args.model, "checkpoint": args.checkpoint if recipe else None,
                    "train": str(train_folder.path), "test": str(test_folder.path),
                    "classes": str(classes.path) if class_file else None, "class_keys": list(classes.keys),
                    "num_train": len(train.files), "num_test": len(test.files),
                    "solver": {"library": "scikit-learn", "version": _sklearn_version(), "method": "lbfgs",
                               "max_iter": args.max_iter}}
    if args.zeroshot:
        class_emb = class_embeddings(clip, loaded.tokenizer, templates, classes, runtime, context_length,
                                     args.batch_size, class_cache_dir(cache_dir))
        report["zeroshot"] = {**score(similarities(test.embeddings, class_emb), test.labels, classes.keys),
                              "templates": templates}
    full = linear_probe.probe(train.embeddings, train.labels, test.embeddings, test.labels, classes.keys, seed=0,
                              held_out=args.held_out, max_iter=args.max_iter)
    report["probe"] = {**full.report, "held_out_fraction": args.held_out}
    if shots:
        report["few_shot"] = linear_probe.few_shot(train.embeddings, train.labels, test.embeddings, test.labels,
                                                   classes.keys, shots, list(range(args.seeds)), args.max_iter)
    report["skipped"] = skips.summary()

    out_dir = Path(args.out) if args.out else (Path(args.model) / "probe" if recipe else Path("probe"))
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"linear probe: {args.model}; train {train_folder.path} ({len(train.files)} images), test "
          f"{test_folder.path} ({len(test.files)} images), {len(classes)} classes"
          + ("" if class_file else " (the training sub-folder names)"))
    print(format_report(report, classes))
    if skips.total:
        print(f"skipped {skips.total} items: {dict(skips.counts)} (examples in {out_dir / PROBE_JSON})")
    write_json(out_dir / PROBE_JSON, report)
    with atomic_file(out_dir / "predictions.jsonl", "w", encoding="utf-8") as fh:
        for f, label, row in zip(test.files, test.labels.tolist(), full.probabilities.tolist()):
            top = sorted(range(len(row)), key=lambda c: -row[c])[:TOP_K]
            fh.write(json.dumps({"image": str(f), "label": classes.keys[label],
                                 "top": [{"key": classes.keys[c], "probability": row[c]} for c in top]},
                                ensure_ascii=False) + "\n")
    print(f"wrote {out_dir / PROBE_JSON}")
    if shots:
        series = linear_probe.few_shot_series(report)
        with atomic_file(out_dir / PROBE_PNG, "wb") as fh:
            fh.write(png_bytes(figure(series), series))
        print(f"wrote {out_dir / PROBE_PNG}")
    return report


def _sklearn_version() -> str:
    import sklearn

    return sklearn.__version__


def format_report(report: dict, classes: ClassList) -> str:
    """Accuracy table (zero-shot, k-shot means with their spread, the full probe) and per-class top-1."""
    from .zeroshot import _table

    rows = [["", "top-1", "top-5", "C"]]
    zs, full = report.get("zeroshot"), report["probe"]
    if zs:
        rows.append(["zero-shot", f"{zs['top1']:.2f}", f"{zs['top5']:.2f}", "-"])
    for row in report.get("few_shot", {}).get("summary", []):
        cs = [r["C"] for r in report["few_shot"]["runs"] if r["shots"] == row["shots"]]
        rows.append([f"{row['shots']}-shot probe ({row['seeds']} seeds)",
                     f"{row['top1_mean']:.2f} ± {row['top1_std']:.2f}", f"{row['top5_mean']:.2f} ± {row['top5_std']:.2f}",
                     f"{min(cs):.3g}..{max(cs):.3g}" if min(cs) != max(cs) else f"{cs[0]:.3g}"])
    rows.append([f"linear probe ({report['num_train']} images)", f"{full['top1']:.2f}", f"{full['top5']:.2f}",
                 f"{full['C']:.3g}"])
    lines = [_table(rows), ""]
    header = ["class", "test images"] + (["top-1 zero-shot"] if zs else []) + ["top-1 probe"]
    rows = [header]
    for c, key in enumerate(classes.keys):
        if key in full["per_class"]:
            rows.append([classes.label(c), str(full["per_class"][key]["images"])]
                        + ([f"{zs['per_class'][key]['top1']:.2f}"] if zs else [])
                        + [f"{full['per_class'][key]['top1']:.2f}"])
    lines += ["per class:", _table(rows)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: (run(args), 0)[1])
