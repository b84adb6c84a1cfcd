"""Logging for commands and training runs: one format, stderr plus an optional log file."""

from __future__ import annotations

import logging
import sys
from pathlib import Path


# `log.info(..., extra=FILE_ONLY)`: for the log file only (what the console already shows, printed).
FILE_ONLY = {"file_only": True}


def setup_logging(log_file: Path | None = None) -> None:
    console = logging.StreamHandler(sys.stderr)
    console.addFilter(lambda record: not getattr(record, "file_only", False))
    handlers: list[logging.Handler] = [console]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=handlers, force=True)
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub", "modelscope"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
