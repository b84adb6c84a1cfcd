"""`cnclip publish OUT_DIR owner/name [--private] [--dry-run] [--overwrite]` (also `python -m cnclip.publish`).

Uploads a directory `cnclip export` wrote; the library part is `cnclip.modelscope_upload`.
"""

from __future__ import annotations

import argparse
import json

from ..errors import (EXIT_HUB_FAILED, EXIT_HUB_UNREACHABLE, EXIT_NO_TOKEN, EXIT_REPO_CONFLICT,
                      EXIT_TOKEN_REJECTED, EXIT_USAGE)
from ..modelscope_upload import TOKEN_ENV, publish
from .base import parser_options, run_command

UPLOAD_EXITS = (EXIT_USAGE, EXIT_NO_TOKEN, EXIT_TOKEN_REJECTED, EXIT_HUB_UNREACHABLE, EXIT_REPO_CONFLICT,
                EXIT_HUB_FAILED)


def print_json(result: dict) -> int:
    print(json.dumps(result, ensure_ascii=False))
    return 0


def add_upload_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--private", action="store_true", help="create the repository as private (default public)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the files and sizes that would be uploaded, send nothing")
    parser.add_argument("--overwrite", action="store_true",
                        help="upload even when the repository already holds different files (ours replace "
                             "theirs; files only on ModelScope stay)")


EXITS = UPLOAD_EXITS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnclip publish", **parser_options(
        "Upload a directory written by `python -m cnclip.export` to a ModelScope model repository. "
        f"Token: ${TOKEN_ENV} or the SDK's saved login. Rerun after a failure to resume.", EXITS))
    parser.add_argument("folder", help="the exported model directory (OUT_DIR of cnclip.export)")
    parser.add_argument("repo_id", metavar="OWNER/NAME", help="the ModelScope model repository to upload to")
    add_upload_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: print_json(publish(args.folder, args.repo_id, private=args.private,
                                                  overwrite=args.overwrite, dry_run=args.dry_run,
                                                  repo_argument="the OWNER/NAME argument")))

