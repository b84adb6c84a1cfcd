"""`cnclip serve INDEX [--host 127.0.0.1] [--port 7860] [--allowed-host NAME] [--backend onnx --model EXPORT]
[--workers N]` (also `python -m cnclip.serve`).

The search web app (cnclip.search_app); it answers only the Host names search_app.allowed_hosts_for gives.
One process, `--workers` embedding threads (see cnclip.search_app on why not processes).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from pathlib import Path

from ..errors import EXIT_DATA, EXIT_MODEL, UsageError
from .base import parser_options, run_command

log = logging.getLogger("cnclip.serve")
EXITS = (EXIT_DATA, EXIT_MODEL)
# cnclip.search_app.DEFAULT_MAX_UPLOAD_MB, written out so that --help does not import torch (tests/test_cli_help.py).
DEFAULT_MAX_UPLOAD_MB = 10
# Past a few per core, more embedding threads only queue inside onnxruntime and hold more activations at once.
MAX_WORKERS = 64


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnclip serve", **parser_options(
        "Serve a page to search an index with Chinese text or an image, and to classify an uploaded image "
        "zero-shot.", EXITS))
    parser.add_argument("index", help="an index written by `cnclip search index`")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: loopback only; 0.0.0.0 exposes it to the network)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on (default: %(default)s)")
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                        help="also answer requests whose Host header is NAME (repeatable; a name or address "
                             "without port, or *.example.com), e.g. the name a reverse proxy forwards. Only "
                             "127.0.0.1, localhost and [::1] are answered on loopback, plus this machine's "
                             "host name with --host 0.0.0.0: any other Host gets 400, so a web page cannot "
                             "read your images through DNS rebinding")
    parser.add_argument("--model", help="query model (default: the one that built the index; other weights are "
                                        "refused); with --backend onnx, an ONNX export directory")
    parser.add_argument("--backend", choices=("torch", "onnx"),
                        help="torch (transformers) or onnx (onnxruntime on an export of `cnclip export --format onnx`; "
                             "no torch needed: pip install 'cnclip[serve]') (default: the backend that built the index)")
    parser.add_argument("--workers", type=int, default=1,
                        help="queries embedded at the same time, each in a thread of this one process (the model is "
                             "held once); with the onnx backend each gets cores/N threads (default: %(default)s)")
    parser.add_argument("--classes", help="class list that pre-fills the zero-shot box ('key: 名称1, 名称2' lines)")
    parser.add_argument("--templates", help="prompt templates file (default: the shipped Chinese templates)")
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
                        help=f"largest accepted upload (default {DEFAULT_MAX_UPLOAD_MB} MB)")
    parser.add_argument("-k", type=int, default=12, help="results shown per query (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="torch device: auto (cuda when available), cpu, cuda, ... "
                                                          "(the onnx backend: cpu)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _serve(args))


def _serve(args) -> int:
    import uvicorn

    from ..prompts import load_classes
    from ..search_app import allowed_hosts_for, create_app
    from ..search_index import Searcher

    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be 0..65535, got {args.port}")
    if args.max_upload_mb <= 0:
        raise UsageError(f"--max-upload-mb must be > 0, got {args.max_upload_mb}")
    if not 1 <= args.workers <= MAX_WORKERS:
        raise UsageError(f"--workers must be 1..{MAX_WORKERS} (threads of this process), got {args.workers}")
    classes_text = ""
    if args.classes:
        classes = load_classes(args.classes)  # checked now: a bad file stops here, naming the line
        classes_text = "\n".join(f"{k}: {', '.join(n)}" for k, n in zip(classes.keys, classes.names))
    if args.templates and not Path(args.templates).is_file():
        raise UsageError(f"--templates: file not found: {args.templates}")
    allowed_hosts = allowed_hosts_for(args.host, args.allowed_host)
    searcher = Searcher.open(args.index, args.model, args.device, backend=args.backend,
                             threads=threads_per_worker(args.workers))
    app = create_app(searcher, classes_text=classes_text, templates_path=args.templates,
                     max_upload_bytes=int(args.max_upload_mb * 2**20), default_k=args.k,
                     allowed_hosts=allowed_hosts, workers=args.workers)
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback:
        log.warning("listening on %s: anyone who can reach this machine can search these images", args.host)
    print(f"serving {len(searcher.index)} images from {args.index} on http://{args.host}:{args.port}/ "
          f"to Host {', '.join(allowed_hosts)} ({searcher.embedder.backend} backend, {args.workers} worker "
          f"thread{'s' if args.workers > 1 else ''}; Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def threads_per_worker(workers: int) -> int | None:
    """onnxruntime threads for each of `workers` concurrent calls: the usable cores shared out (None for 1
    worker: onnxruntime's own default, every core)."""
    if workers == 1:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // workers)
