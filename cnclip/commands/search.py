"""`cnclip search index|query|image` (also `python -m cnclip.search`): build and query a search index.

    cnclip search index SOURCE... --model MODEL_OR_RUN --out INDEX   # create, or update incrementally
    cnclip search query INDEX "红色连衣裙" -k 10 [--json]              # text -> images
    cnclip search image INDEX photo.jpg -k 10 [--json]                # image -> images
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import EXIT_DATA, EXIT_DISK_FULL, EXIT_MODEL, DataError, UsageError
from .base import parser_options, run_command

INDEX_EXITS = (EXIT_DISK_FULL, EXIT_DATA, EXIT_MODEL)
QUERY_EXITS = (EXIT_DATA, EXIT_MODEL)
EXITS = tuple(sorted({*INDEX_EXITS, *QUERY_EXITS}))
# cnclip.search_index.KINDS and APPROXIMATE_FROM, written out so that --help imports neither faiss nor torch
# (tests/test_cli_help.py compares them).
KINDS = ("auto", "exact", "ivf")
APPROXIMATE_FROM = 40_000
DEVICE_HELP = "torch device: auto (cuda when available), cpu, cuda, cuda:1, ... (the onnx backend: cpu)"
BACKEND_HELP = ("torch: --model is a run, model directory or hub id (transformers); onnx: --model is a directory "
                "written by `cnclip export RUN --format onnx` (onnxruntime, no torch needed: pip install "
                "'cnclip[serve]')")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnclip search", **parser_options(
        "Text-to-image and image-to-image search over your own images.", EXITS))
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    build = sub.add_parser("index", help="embed images and write (or update) an index", **parser_options(
        "Embed images with a model and write a search index; run again to update it incrementally (only new "
        "or changed images are embedded, the others come from the index or the embedding cache).", INDEX_EXITS))
    build.add_argument("sources", nargs="+", metavar="SOURCE",
                       help="a folder of images (recursive), a Chinese-CLIP data directory or {split}_imgs.tsv, "
                            "or build-pairs output")
    build.add_argument("--model", required=True, help="run directory (best checkpoint), model directory, Hugging "
                                                      "Face id (owner/name) or modelscope:<id>; with --backend "
                                                      "onnx, an ONNX export directory")
    build.add_argument("--backend", default="torch", choices=("torch", "onnx"),
                       help=f"{BACKEND_HELP} (default: %(default)s)")
    build.add_argument("--out", required=True, help="index directory; an existing index is updated incrementally")
    build.add_argument("--split", help="for a data directory: only this split (default: every split found)")
    build.add_argument("--kind", default="auto", choices=KINDS,
                       help="exact: every query compared with every image (always the true top k; its time grows "
                            "with the count); ivf: approximate, an inverted file (k-means cells, 8-bit codes, the "
                            "best candidates re-ranked exactly; fast at millions of images, may miss a few of the "
                            f"true top k); auto: exact below {APPROXIMATE_FROM:,} images, ivf from there on "
                            "(default: %(default)s)")
    build.add_argument("--rebuild", action="store_true", help="ignore an existing index and embed everything")
    build.add_argument("--cache-dir", default=None, help="image-embedding cache (default: the run's, or ~/.cache)")
    build.add_argument("--batch-size", type=int, default=64, help="images per model batch")
    build.add_argument("--workers", type=int, default=0, help="image-decoding worker processes (0: decode in "
                                                              "this process)")
    build.add_argument("--device", default="auto", help=DEVICE_HELP)
    build.add_argument("--json", action="store_true", help="print the build report as JSON")

    for name, what, help_text in (("query", "text", "the Chinese query text"),
                                  ("image", "image", "an image file to find similar images to")):
        about = f"search the index with {'a text' if what == 'text' else 'an image'}"
        p = sub.add_parser(name, help=about, **parser_options(about[0].upper() + about[1:] + ".", QUERY_EXITS))
        p.add_argument("index", metavar="INDEX", help="an index directory written by `cnclip search index`")
        p.add_argument(what, help=help_text)
        p.add_argument("-k", type=int, default=10, help="how many results (default 10)")
        p.add_argument("--model", help="query model (default: the one that built the index; other weights are "
                                       "refused)")
        p.add_argument("--backend", choices=("torch", "onnx"),
                       help=f"{BACKEND_HELP} (default: the backend that built the index)")
        p.add_argument("--device", default="auto", help=DEVICE_HELP)
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.action == "index":
        return run_command(lambda: _index(args))
    return run_command(lambda: _query(args))


def _index(args) -> int:
    from ..embedders import model_spec
    from ..search_index import FAISS_FILE, VECTORS, build_index, open_embedder

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    embedder = open_embedder(args.backend, model_spec(args.model), args.device)
    recipe = getattr(getattr(embedder, "loaded", None), "recipe", None)  # a torch run's own cache directory
    cache_dir = args.cache_dir or (recipe.cache.dir if recipe else None) or None
    report = build_index(args.sources, args.out, embedder, split=args.split,
                         kind=args.kind, cache_dir=cache_dir, batch_size=args.batch_size,
                         num_workers=args.workers, rebuild=args.rebuild)
    if args.json:
        print(json.dumps({"index": str(args.out), **report.to_dict()}, ensure_ascii=False))
    else:
        print(f"{args.out}: {report.total} images ({report.kind} index): {report.kept} reused from the index, "
              f"{report.from_cache} from the embedding cache, {report.embedded} embedded now; removed "
              f"{report.removed}, undecodable {report.undecodable}; {report.seconds:.1f} s")
        print(f"  memory per image: {report.index_bytes_per_image:,.0f} bytes of {report.kind} index "
              f"({FAISS_FILE}) + {report.vector_bytes_per_image:,.0f} bytes of stored vector ({VECTORS}), both "
              "held by a search")
        if "cells" in report.structure:
            ivf = report.structure
            print(f"  inverted file: {ivf['cells']:,} cells, {ivf['nprobe']} scanned a query; queries near stored "
                  f"images found {ivf['check_recall_at_10']:.1%} of their exact top 10 at build time")
    return 0


def _query(args) -> int:
    from ..search_index import Searcher

    if args.k < 1:
        raise UsageError(f"-k must be >= 1, got {args.k}")
    searcher = Searcher.open(args.index, args.model, args.device, backend=args.backend)
    if args.action == "query":
        hits = searcher.by_text(args.text, args.k)
        asked = args.text
    else:
        from ..images import decode_rgb

        path = Path(args.image)
        if not path.is_file():
            raise UsageError(f"image not found: {path}")
        try:
            image = decode_rgb(path.read_bytes())
        except ValueError as exc:
            raise DataError(f"{path}: {exc}") from None
        hits = searcher.by_image(image, args.k)
        asked = str(path)
    if args.json:
        print(json.dumps({"query": asked, "index": str(args.index), "results": [h.to_dict() for h in hits]},
                         ensure_ascii=False))
        return 0
    print(f"{len(hits)} results for {asked!r} in {args.index}:")
    print(f"{'rank':>4}  {'score':>7}  image")
    for h in hits:
        shown = h.ref if h.ref == h.caption or not h.caption else f"{h.ref}  {h.caption}"
        print(f"{h.rank:>4}  {h.score:7.4f}  {shown}")
    sys.stdout.flush()
    return 0
