"""`cnclip convert SRC --to OUT_DIR [--arch ViT-B-16]` (also `python -m cnclip.convert`).

Converts an original-format Chinese-CLIP checkpoint (a cn_clip `.pt`, or a ModelScope-layout directory)
into a transformers ChineseCLIP directory (`cnclip.original_format`). Training and evaluation do not
need this: `model.base` takes those checkpoints directly and converts them in memory.
"""

from __future__ import annotations

import argparse

from ..errors import EXIT_DISK_FULL, EXIT_MODEL
from ..recipe import ORIGINAL_ARCHS
from .base import parser_options, run_command
from .publish import print_json

EXITS = (EXIT_DISK_FULL, EXIT_MODEL)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnclip convert", **parser_options(
        "Convert a cn_clip .pt checkpoint or a ModelScope-layout Chinese-CLIP directory into a directory plain "
        "transformers loads (ChineseCLIPModel + tokenizer + image processor). The conversion is checked: every "
        "tensor is used and converts back bit for bit.", EXITS))
    parser.add_argument("src", help="a cn_clip checkpoint (.pt) or a ModelScope-layout directory (pytorch_model.bin, "
                                    "vision_model_config.json, text_model_config.json, vocab.txt)")
    parser.add_argument("--to", required=True, metavar="OUT_DIR", help="new or empty directory to write")
    parser.add_argument("--arch", choices=ORIGINAL_ARCHS, default=None,
                        help="architecture of a .pt (default: inferred from its tensor shapes)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: print_json(_convert(args)))


def _convert(args: argparse.Namespace) -> dict:
    from ..conversion import convert_to_transformers

    return convert_to_transformers(args.src, args.to, args.arch)
