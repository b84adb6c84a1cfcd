"""`cnclip finetune RECIPE.yaml [key=value ...]` (also `python -m cnclip.finetune`): train, then print the results."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..errors import EXIT_DATA, EXIT_DISK_FULL, EXIT_DIVERGED, EXIT_MODEL, EXIT_WORKER_CRASHED
from ..recipe import load_recipe
from .base import parser_options, run_command

EXITS = (EXIT_DISK_FULL, EXIT_DATA, EXIT_MODEL, EXIT_DIVERGED, EXIT_WORKER_CRASHED)


def train(recipe):
    """cnclip.trainer.train, imported when a run starts: `--help` does not load torch."""
    from ..trainer import train as run_training

    return run_training(recipe)


def report(summary: dict, run_dir: Path) -> None:
    from ..trainer import summary_lines

    for line in summary_lines(summary, run_dir):
        print(line)
    before, after = summary.get("before"), summary.get("after")
    best = (summary.get("best") or {}).get("valid")
    print(json.dumps({"run_dir": str(run_dir), "before": before and before["mean_recall"],
                      "after": after and after["mean_recall"], "best": best and best["mean_recall"],
                      "best_epoch": (summary.get("best") or {}).get("epoch"), "steps": summary.get("steps"),
                      "steps_this_run": summary.get("steps_this_run")}))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnclip finetune", **parser_options(
        "Fine-tune a Chinese CLIP: image tower locked (its embeddings cached on disk), text tower LoRA-tuned "
        "under a symmetric contrastive loss. Running the same command again on an existing run directory "
        "resumes it.", EXITS,
        epilog="example:\n  python -m cnclip.finetune recipes/muge.yaml train.lr=1e-4 run_dir=runs/muge-lr1e-4"))
    parser.add_argument("recipe", help="YAML recipe (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of recipe keys, e.g. train.epochs=5 "
                                                     "(the value is YAML: null, 1e-4, [query, value])")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _finetune(args))


def _finetune(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    summary = train(recipe)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the job
        report(summary, Path(recipe.run_dir))
    return 0
