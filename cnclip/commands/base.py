"""What every command shares: one wrapper from errors to exit status, and the status help text.

A command parses its arguments, then hands its work to `run_command`. Errors a user can cause or
fix (`cnclip.errors.CnclipError`, a full disk, a missing file, Ctrl-C) become one `error: ...`
line on stderr and the exit status that `cnclip.errors` assigns to them; anything else is a bug
and keeps Python's traceback and status 1.
"""

from __future__ import annotations

import logging
import sys
from typing import Callable

from ..errors import (EXIT_DISK_FULL, EXIT_INTERRUPTED, EXIT_MEANINGS, EXIT_USAGE, CnclipError, disk_full_message,
                      is_disk_full)
from ..log_setup import setup_logging


def run_command(fn: Callable[[], int], *, resume_hint: str = "rerun the same command to resume") -> int:
    """Run a command's work; user errors print `error: ...` and return their exit status, no traceback."""
    if not logging.getLogger().handlers:
        setup_logging()
    try:
        return fn()
    except CnclipError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_status
    except FileNotFoundError as exc:
        print(f"error: {exc.strerror or 'not found'}: {exc.filename or exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        print(f"error: {disk_full_message(exc)}", file=sys.stderr)
        return EXIT_DISK_FULL
    except KeyboardInterrupt:
        print(f"interrupted; {resume_hint}", file=sys.stderr)
        return EXIT_INTERRUPTED


def exit_status_help(statuses: tuple[int, ...]) -> str:
    """An epilog for --help listing the exit statuses a command can give (0 and 1 always)."""
    shown = sorted({0, 1, *statuses})
    return "exit status: " + "; ".join(f"{s} {EXIT_MEANINGS[s]}" for s in shown)
