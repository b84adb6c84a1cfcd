"""`data_tools` command line. Errors become a one-line message and their exit status through
`cnclip.commands.base.run_command`, the wrapper every cnclip command uses; never a traceback."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from cnclip.commands.base import parser_options, run_command
from cnclip.errors import (EXIT_DATA, EXIT_DISK_FULL, EXIT_MODEL, EXIT_USAGE, EXIT_WORKER_CRASHED, UsageError,
                           WorkerCrashed, is_disk_full)
from cnclip.model_reference import parse_model_reference
from data_tools.split import parse_splits
from data_tools.writers import FORMATS

if TYPE_CHECKING:  # the stages (pyarrow, httpx, ...) are imported when a command runs, not for --help
    from data_tools.download import DownloadOptions
    from data_tools.pipeline import BuildResult
    from data_tools.scoring import ScoringOptions

BUILD_PAIRS_DESCRIPTION = """\
Turn query-based crawl dumps into clean Chinese image-text pairs.

Each INPUT is a JSONL or Parquet file of crawl records, an img2dataset-style webdataset .tar,
or a directory searched recursively for them. A record has `query` (the search query that found
it), `image` (a path relative to the dump's directory, or base64 bytes), candidate captions
`alt`, `title`, `context`, and optionally `url` (http/https) and `page_url`; other fields are
kept as metadata. A record with only a `url` is rejected as no_image unless --download fetches it
(locally or on Ray with --engine ray; see the downloading options below).

Stages: parse -> clean and choose a caption (full-width, HTML, URLs, emoji, Traditional ->
Simplified, length, Chinese ratio, boilerplate) -> query relevance (jieba) -> image checks
(path safety, size, aspect ratio, decompression bombs, decode, RGB, EXIF orientation, resize)
-> with --model, the CLIP score (--min-similarity / --keep-top) -> dedup (exact, perceptual,
semantic with --model, (query, text)) -> per-query cap (a picture capped in one query is kept
through its copy in another) -> split by leak-free group (shared caption, near images) -> write.

DIR/report.json accounts for every record read: kept, or rejected with exactly one reason.
Per-shard results are kept in DIR/.work, so an interrupted run resumes where it stopped and a
rerun with other --per-query-cap/--splits/--format/--seed reuses all per-record work.

Crash safety: outputs are written under temporary names and renamed into place only when all
of them are complete; report.json comes last, so a DIR with report.json holds exactly the
complete outputs it lists. Killed at any point, the same command resumes and writes the same
bytes.
"""
BUILD_PAIRS_EXITS = (EXIT_DISK_FULL, EXIT_MODEL, EXIT_WORKER_CRASHED)
FROM_HF_EXITS = (EXIT_DATA, EXIT_DISK_FULL)
# data_tools.engines.ENGINES, written out so that --help does not import pyarrow (tests/test_cli_help.py).
ENGINES = ("local", "ray")
# The seed keys blake2b hashes as 8 signed bytes (data_tools.split, data_tools.selection).
SEED_MIN, SEED_MAX = -2**63, 2**63 - 1

FORMAT_HELP = (
    "output layout: 'cnclip' = Chinese-CLIP {split}_imgs.tsv + {split}_texts.jsonl (+ {split}_meta.jsonl), "
    "usable as data.root for python -m cnclip.finetune; 'pairs' = {split}_pairs.jsonl with base64 images; "
    "'webdataset' = {split}-NNNNN.tar shards (default: %(default)s)"
)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return run_command(lambda: args.run(args), resume_hint=getattr(args, "resume_hint", "rerun the same command"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="data_tools", **parser_options(
        "Data preparation tools for cnclip.", (*BUILD_PAIRS_EXITS, *FROM_HF_EXITS)))
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    build = commands.add_parser(
        "build-pairs",
        help="crawl dumps -> clean Chinese image-text pairs + report.json",
        **parser_options(BUILD_PAIRS_DESCRIPTION, BUILD_PAIRS_EXITS),
    )
    build.add_argument("inputs", nargs="+", metavar="INPUT", help="crawl dump files (.jsonl, .ndjson, .parquet, .tar) or directories of them")
    build.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory (created if missing); report.json and DIR/.work go here")
    build.add_argument(
        "--per-query-cap", type=_non_negative_int, default=20_000, metavar="N",
        help="keep at most N pairs per query, chosen by a seeded hash so reruns agree; 0 = no cap (default: %(default)s, as CLIP)",
    )
    build.add_argument(
        "--splits", type=_splits, default="0.98,0.01,0.01", metavar="TRAIN,VALID,TEST",
        help="fractions of images for train,valid,test, summing to 1; assigned per image by a seeded hash (default: %(default)s)",
    )
    build.add_argument("--workers", type=_positive_int, default=1, metavar="N", help="processes for the per-record stages; the output does not depend on N (default: %(default)s)")
    build.add_argument("--config", type=Path, metavar="FILTERS.yaml", help="filter thresholds (sections text, relevance, image, dedup); unknown keys are errors (default: built-in defaults)")
    build.add_argument("--format", choices=FORMATS, default="cnclip", help=FORMAT_HELP)
    build.add_argument("--seed", type=_seed, default=0, metavar="S", help="seed for the per-query cap and the split assignment (default: %(default)s)")
    build.add_argument("--shard-size", type=_positive_int, default=2_000, metavar="N", help="records per shard, the unit of parallel work and of resuming (default: %(default)s)")
    build.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    _add_download_arguments(build)
    scoring = build.add_argument_group(
        "model stage (CLIP score, semantic dedup, semantic split grouping)",
        "With --model, every accepted pair gets its Chinese-CLIP image-text similarity (stored in the meta "
        "output, histogram in report.json), near-identical images by embedding are removed as "
        "semantic_duplicate (dedup.semantic_threshold) and kept from straddling splits (split.semantic_threshold). "
        "Thresholds do not carry over between models: run once without a filter, read the histogram, then rerun "
        "(shards and image embeddings are reused).")
    scoring.add_argument("--model", metavar="MODEL", help="a Chinese CLIP: model directory, Hugging Face id, modelscope:<id>, or a cnclip run directory")
    scoring.add_argument("--min-similarity", type=float, metavar="X", help="drop pairs whose image-text cosine similarity is below X (low_similarity)")
    scoring.add_argument("--keep-top", type=float, metavar="FRACTION", help="keep only this fraction of the best-scoring pairs (low_similarity for the rest)")
    scoring.add_argument("--similarity-per-query", action="store_true", help="apply --keep-top within each query instead of over all pairs")
    scoring.add_argument("--embedding-cache", type=Path, metavar="DIR", help="image-embedding cache (default: DIR/.work/image_features)")
    scoring.add_argument("--device", default="auto", help="torch device for the model (default: %(default)s = cuda when available)")
    scoring.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="fp32 gives the same scores on CPU and GPU (default: %(default)s)")
    scoring.add_argument("--embed-batch-size", type=_positive_int, default=64, metavar="N", help="images or captions per model batch (default: %(default)s)")
    build.set_defaults(run=lambda args: _build_pairs(args, build),
                       resume_hint="finished shards are kept in DIR/.work: rerun the same command to resume")

    hf = commands.add_parser(
        "from-hf",
        help="a Hugging Face `datasets` image-text set -> one split in the Chinese-CLIP layout",
        **parser_options(
            "Write one split of an image-text data set in Hugging Face `datasets` form (a Hub id, a save_to_disk "
            "directory, or a .parquet/.jsonl/.csv file) as {split}_imgs.tsv + {split}_texts.jsonl, usable as "
            "data.root for python -m cnclip.finetune. Identical images share one image id (several captions of one "
            "picture are positives of the same image); rows without a caption or with an undecodable image are "
            "skipped and counted in DIR/{split}_from_hf_report.json.", FROM_HF_EXITS),
    )
    hf.add_argument("source", metavar="DATASET", help="Hub id, save_to_disk directory, or a data file")
    hf.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory (created if missing)")
    hf.add_argument("--split", default="train", help="split to read (default: %(default)s)")
    hf.add_argument("--as-split", metavar="NAME", help="split name to write (default: the same as --split)")
    hf.add_argument("--config", metavar="NAME", help="the data set's configuration name, for Hub data sets")
    hf.add_argument("--image-column", default="image", help="column with the image (default: %(default)s)")
    hf.add_argument("--text-column", default="text",
                    help="column with the caption, or a list of captions (default: %(default)s)")
    hf.add_argument("--limit", type=_positive_int, metavar="N", help="convert only the first N rows")
    hf.set_defaults(run=lambda args: _from_hf(args, hf))
    return parser


def _from_hf(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from data_tools.hf_dataset import convert, open_rows

    base_dir = Path(args.source) if Path(args.source).is_dir() else Path(args.source).parent
    split = args.as_split or args.split
    rows = open_rows(args.source, args.split, args.config, args.image_column)
    result = convert(rows, args.out, split, args.image_column, args.text_column, base_dir, args.limit)
    print(f"{result.rows} rows -> {result.images} images, {result.texts} captions in {args.out} "
          f"(split '{split}'); skipped: {dict(result.skipped) or 'none'}")
    return 0


def _build_pairs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from data_tools.config import load_config
    from data_tools.pipeline import BuildOptions, build_pairs

    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out is not a directory: {args.out}")
    config = load_config(args.config)
    options = BuildOptions(
        inputs=tuple(args.inputs),
        out=args.out,
        config=config,
        per_query_cap=args.per_query_cap,
        splits=args.splits,
        format=args.format,
        seed=args.seed,
        shard_size=args.shard_size,
        workers=args.workers,
        progress=not args.no_progress,
        scoring=_scoring_options(args),
        download=_download_options(args),
        retry_failed=args.retry_failed,
        engine=args.engine,
        ray_address=args.ray_address,
    )
    try:
        result = build_pairs(options)
    except WorkerCrashed as err:
        raise WorkerCrashed(f"{err}; finished shards are kept in {args.out / '.work'}: rerun the same command to "
                            "resume") from None
    except OSError as err:
        if err.filename is None or isinstance(err, FileNotFoundError) or is_disk_full(err):
            raise  # disk full and missing files: the wrapper's messages
        raise UsageError(f"{err.strerror}: {err.filename}") from None  # e.g. --out not writable, or under a file
    _print_summary(result, args.out)
    return 0


def _scoring_options(args: argparse.Namespace) -> ScoringOptions | None:
    if args.model is None:
        if args.min_similarity is not None or args.keep_top is not None or args.similarity_per_query:
            raise UsageError("--min-similarity, --keep-top and --similarity-per-query need --model MODEL")
        return None
    from data_tools.scoring import ScoringOptions

    parse_model_reference(args.model, "--model")  # a mistyped local path fails now, before any stage runs
    return ScoringOptions(model=args.model, min_similarity=args.min_similarity, keep_top=args.keep_top,
                          per_query=args.similarity_per_query, cache_dir=args.embedding_cache, device=args.device,
                          precision=args.precision, batch_size=args.embed_batch_size)


def _add_download_arguments(build: argparse.ArgumentParser) -> None:
    group = build.add_argument_group(
        "downloading (--download) and scale-out (--engine ray)",
        "With --download, records with a `url` (or an http(s) `image`) but no image bytes are fetched once their "
        "text passes; the normalised images are kept in DIR/.work, so a rerun fetches nothing already done. "
        "Addresses that are not public (loopback, private, link-local, cloud metadata...) are refused at connect "
        "time (blocked_address) unless --allow-private-network.")
    group.add_argument("--download", action="store_true", help="fetch the images of URL-only records (without it they are rejected as no_image)")
    group.add_argument("--download-concurrency", type=_positive_int, default=64, metavar="N", help="downloads in flight per worker (default: %(default)s)")
    group.add_argument("--per-host-connections", type=_positive_int, default=8, metavar="N", help="downloads in flight per host and worker (default: %(default)s)")
    group.add_argument("--per-host-rate", type=_positive_float, metavar="R", help="at most R requests per second per host and worker (default: no limit)")
    group.add_argument("--connect-timeout", type=_positive_float, default=10.0, metavar="S", help="seconds to connect (default: %(default)s)")
    group.add_argument("--read-timeout", type=_positive_float, default=20.0, metavar="S", help="longest wait for the next bytes (default: %(default)s)")
    group.add_argument("--download-timeout", type=_positive_float, default=60.0, metavar="S", help="one request, body included, from its start (not the wait for its host's turn) (default: %(default)s)")
    group.add_argument("--retries", type=_non_negative_int, default=3, metavar="N", help="retries after a timeout, connection error, 429 or 5xx, with exponential backoff or Retry-After (default: %(default)s)")
    group.add_argument("--user-agent", metavar="UA", help="User-Agent header (default: 'cnclip-data_tools/VERSION (...; honours X-Robots-Tag noai)')")
    group.add_argument("--allow-private-network", action="store_true", help="also download from loopback, private and link-local addresses (off: such URLs are blocked_address)")
    group.add_argument("--retry-failed", action="store_true", help="rerun only the finished shards' retryable failures (timeouts, connection errors, 429, 5xx)")
    group.add_argument("--engine", choices=ENGINES, default="local", help="where the per-shard stages run: local processes or Ray tasks; the output is the same (default: %(default)s)")
    group.add_argument("--ray-address", metavar="ADDR", help="Ray cluster to use with --engine ray (default: $RAY_ADDRESS, else a local Ray with --workers CPUs)")


def _download_options(args: argparse.Namespace) -> DownloadOptions | None:
    if not args.download:
        if args.retry_failed or args.allow_private_network:
            raise UsageError("--retry-failed and --allow-private-network need --download")
        return None
    from data_tools.download import DEFAULT_USER_AGENT, DownloadOptions

    return DownloadOptions(
        concurrency=args.download_concurrency, per_host_connections=args.per_host_connections,
        per_host_rate=args.per_host_rate, connect_timeout=args.connect_timeout, read_timeout=args.read_timeout,
        total_timeout=args.download_timeout, retries=args.retries, user_agent=args.user_agent or DEFAULT_USER_AGENT,
        allow_private_network=args.allow_private_network,
    )


def _print_summary(result: BuildResult, out: Path) -> None:
    from data_tools.download_stats import summary_lines as download_summary
    from data_tools.report import summary

    print(summary(result.report))
    if "downloads" in result.report:
        print("\n".join(download_summary(result.report["downloads"])))
    reused = result.shards_total - result.shards_computed
    print(f"shards: {result.shards_total} ({result.shards_computed} computed, {reused} reused from {out / '.work'})")
    print(f"report: {out / 'report.json'}")


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _seed(text: str) -> int:
    value = _int(text)
    if not SEED_MIN <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected an integer from {SEED_MIN} to {SEED_MAX} (64 bits), got {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _splits(text: str) -> tuple[tuple[str, float], ...]:
    try:
        return parse_splits(text)
    except UsageError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
