"""`cnclip finetune RECIPE.yaml [key=value ...]` (also `python -m cnclip.finetune`): train, then print the results."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..recipe import load_recipe
from ..trainer import train
from .base import run_command


def report(summary: dict, run_dir: Path) -> None:
    before, after, best = summary.get("before"), summary.get("after"), summary.get("best")
    if before and after:
        print(f"mean recall before training: {before['mean_recall']:.2f}  after: {after['mean_recall']:.2f}")
        if "zeroshot" in before and "zeroshot" in after:
            print(f"zero-shot top-1 before training: {before['zeroshot']['top1']:.2f}  "
                  f"after: {after['zeroshot']['top1']:.2f}")
    if best:
        print(f"best checkpoint: epoch {best['epoch']} -> {run_dir / 'best'}")
    print(json.dumps({"run_dir": str(run_dir), "before": before and before["mean_recall"],
                      "after": after and after["mean_recall"], "steps": summary.get("steps")}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cnclip finetune",
        description="Fine-tune a Chinese CLIP: image tower locked (its embeddings cached on disk), text tower "
                    "LoRA-tuned under a symmetric contrastive loss. Running the same command again on an "
                    "existing run directory resumes it.",
        epilog="example: python -m cnclip.finetune recipes/muge.yaml train.lr=1e-4 run_dir=runs/muge-lr1e-4",
    )
    parser.add_argument("recipe", help="YAML recipe (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of recipe keys, e.g. train.epochs=5")
    args = parser.parse_args(argv)
    return run_command(lambda: _finetune(args))


def _finetune(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    summary = train(recipe)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the job
        report(summary, Path(recipe.run_dir))
    return 0
