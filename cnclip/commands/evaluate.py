"""`cnclip evaluate RUN_OR_MODEL [--data DIR] [--split valid]` (also `python -m cnclip.evaluate`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..data_formats import FORMATS
from ..errors import EXIT_DATA, EXIT_DISK_FULL, EXIT_MODEL, UsageError
from ..skiplog import SkipLog
from .base import parser_options, run_command

EXITS = (EXIT_DISK_FULL, EXIT_DATA, EXIT_MODEL)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnclip evaluate", **parser_options(
        "Retrieval Recall@1/5/10 and mean recall of a fine-tuned run or a model directory, plus "
        "Chinese-CLIP-compatible prediction and result files.", EXITS))
    parser.add_argument("model", help="a run directory written by cnclip.finetune (its best checkpoint is used), "
                                      "a model directory, a Hugging Face id (owner/name) or modelscope:<id>; "
                                      "a path that does not exist is an error, never a Hub lookup")
    parser.add_argument("--data", help="data directory in the Chinese-CLIP layout (default: the run's data.root)")
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="format of --data (cnclip/data_formats.py; default: the run's data.format, or cnclip)")
    parser.add_argument("--split", default=None, help="split to evaluate (default: the run's valid split, or 'valid')")
    parser.add_argument("--out", help="where prediction and result files go (default: RUN/eval, or ./eval)")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best",
                        help="which checkpoint of a run directory to use")
    parser.add_argument("--alpha", type=float, metavar="A",
                        help="run directories: evaluate the model at WiSE-FT alpha A between the base (0) and the "
                             "fine-tuned weights (1) instead of the alpha best/ holds")
    parser.add_argument("--batch-size", type=int, default=256, help="images or captions per model batch")
    parser.add_argument("--context-length", type=int, default=None,
                        help="tokens per caption (default: the run's data.context_length, or 52)")
    parser.add_argument("--device", default="auto", help="torch device: auto (cuda when available), cpu, cuda, "
                                                          "cuda:1, ...")
    parser.add_argument("--cache-dir", default=None, help="image-embedding cache (default: the run's, or ~/.cache)")
    report = parser.add_argument_group("HTML report (cnclip/eval_report.py)")
    report.add_argument("--report", nargs="?", const="", default=None, metavar="FILE",
                        help="also write a self-contained HTML page (default FILE: OUT/report.html)")
    report.add_argument("--report-sample", type=int, default=12, help="random queries shown (seeded; default 12)")
    report.add_argument("--report-worst", type=int, default=8, help="worst-ranked queries shown (default 8)")
    report.add_argument("--seed", type=int, default=0, help="seed of the query sample")
    report.add_argument("--zeroshot-images", help="classification folder for the report's confusion matrix "
                                                 "(default: the run's zeroshot.images)")
    report.add_argument("--zeroshot-classes", help="its class list (default: the run's zeroshot.classes)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _evaluate(args))


def _evaluate(args) -> int:
    from ..data import ImageTransform, load_split
    from ..image_cache import split_image_features
    from ..inference import load_for_inference
    from ..models import image_tower_fingerprint
    from ..retrieval import evaluate_split, format_metrics, write_outputs
    from ..runtime import pick_runtime

    if args.alpha is not None and not 0.0 <= args.alpha <= 1.0:
        raise UsageError(f"--alpha must be in [0, 1] (0 = the base model, 1 = fine-tuned), got {args.alpha}")
    loaded = load_for_inference(args.model, checkpoint=args.checkpoint, alpha=args.alpha)
    recipe = loaded.recipe
    data_root = args.data or (recipe.data.root if recipe else None)
    if not data_root:
        raise UsageError("--data DIR is required when evaluating a model directory (it has no recipe naming its data)")
    split_name = args.split or (recipe.data.valid_split if recipe and recipe.data.valid_split else "valid")
    context_length = args.context_length or (recipe.data.context_length if recipe else 52)
    cache_dir = args.cache_dir or (recipe.cache.dir if recipe else None)
    out_dir = Path(args.out) if args.out else (Path(args.model) / "eval" if recipe else Path("eval"))
    runtime = pick_runtime(args.device, recipe.train.precision if recipe else "auto")
    clip = loaded.clip.to(runtime.device).eval()

    skips = SkipLog()
    fmt = args.format or (recipe.data.format if recipe else "cnclip")
    columns = (recipe.data.image_column, recipe.data.text_column) if recipe else ("image", "text")
    split = load_split(data_root, split_name, skips, fmt, *columns)
    transform = ImageTransform(loaded.preprocess)
    features = split_image_features(split.images, clip, transform, image_tower_fingerprint(clip), runtime,
                                    cache_dir, args.batch_size, 0, skips)
    result = evaluate_split(clip, loaded.tokenizer, split, features, runtime, context_length, args.batch_size,
                            skips)
    written = write_outputs(result, out_dir, split_name)
    if skips.total:
        print(f"skipped {skips.total} bad items: {dict(skips.counts)} (details in the log above)")
    if result.metrics is None:
        print(f"split '{split_name}' has no labels (every image_ids list is empty): wrote predictions for "
              f"submission, no recall computed")
    else:
        print(format_metrics(result.metrics))
        print(json.dumps({"split": split_name, **result.metrics}, ensure_ascii=False))
    for path in written:
        print(f"wrote {path}")
    if args.report is not None:
        _report(args, loaded, clip, split, features, runtime, context_length, cache_dir, result.metrics, out_dir,
                split_name)
    return 0


def _report(args, loaded, clip, split, features, runtime, context_length, cache_dir, metrics, out_dir,
            split_name) -> None:
    from ..eval_report import write_evaluation_report, zeroshot_scores

    z = loaded.recipe.zeroshot if loaded.recipe else None
    images = args.zeroshot_images or (z.images if z else "")
    classes = args.zeroshot_classes or (z.classes if z else "")
    if bool(images) != bool(classes):
        raise UsageError("--zeroshot-images and --zeroshot-classes go together (a folder DIR/<class_key>/*.jpg "
                         "and its class list)")
    zeroshot = (zeroshot_scores(clip, loaded.tokenizer, loaded.preprocess, images, classes, z.templates if z else None,
                                runtime, context_length, args.batch_size, cache_dir, SkipLog()) if images else None)
    summary = write_evaluation_report(
        Path(args.report) if args.report else out_dir / "report.html", title=f"cnclip evaluation: {args.model}, "
        f"split {split_name}", clip=clip, tokenizer=loaded.tokenizer, split=split, features=features, runtime=runtime,
        context_length=context_length, batch_size=args.batch_size, metrics=metrics, zeroshot=zeroshot,
        sample=args.report_sample, worst=args.report_worst, seed=args.seed,
        notes=[f"model {args.model} ({args.checkpoint} checkpoint), data {split.images.path}"])
    print(f"wrote {summary['report']} ({summary['examples']} example queries"
          f"{', zero-shot confusion matrix' if zeroshot else ''})")
