"""Shared command-line plumbing: logging, and turning user errors into one clear line."""

from __future__ import annotations

import errno
import logging
import sys
from pathlib import Path
from typing import Callable


def _user_errors() -> tuple[type[BaseException], ...]:
    from .data import DataError
    from .finetune import TrainingDiverged
    from .models import ModelLoadError
    from .recipe import RecipeError

    return (RecipeError, DataError, ModelLoadError, FileNotFoundError, TrainingDiverged)


def setup_logging(log_file: Path | None = None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=handlers, force=True)
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub", "modelscope"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_cli(fn: Callable[[], int]) -> int:
    """Run a command; a mistake the user can fix prints `error: ...` and exits 2 (3: disk full), no traceback."""
    if not logging.getLogger().handlers:
        setup_logging()
    try:
        return fn()
    except _user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise
        # Every write goes through a temporary file and a rename, so what was there before is intact.
        print(f"error: out of disk space writing {exc.filename or 'output'} ({exc.strerror}); earlier "
              f"checkpoints and outputs are intact: free space and rerun the same command to resume",
              file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
