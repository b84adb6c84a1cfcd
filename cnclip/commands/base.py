"""What every command shares: one wrapper from errors to exit status, and how --help is written.

A command parses its arguments, then hands its work to `run_command`. Errors a user can cause or
fix (`cnclip.errors.CnclipError`, a full disk, a missing file, Ctrl-C) become one `error: ...`
line on stderr and the exit status that `cnclip.errors` assigns to them; anything else is a bug
and keeps Python's traceback and status 1.

Every command builds its parser with `parser_options(description, EXITS)`: its --help then lists the exit
statuses it declares (with the meanings in `cnclip.errors.EXIT_MEANINGS`) and every option's default.
Command modules import torch and the other heavy libraries only inside the function that runs the
command, so `--help` answers without loading them.
"""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from typing import Callable, Iterable

from ..errors import (EXIT_DISK_FULL, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_MEANINGS, EXIT_OK, EXIT_USAGE,
                      CnclipError, disk_full_message, is_disk_full)
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


# Every command can give these: argparse's own errors are 2, and run_command turns Ctrl-C into 130.
ALWAYS_EXITS = (EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INTERRUPTED)


def exit_statuses(statuses: Iterable[int]) -> list[int]:
    """The statuses a command declares, plus those every command can give, in order."""
    return sorted({*ALWAYS_EXITS, *statuses})


def exit_status_help(statuses: Iterable[int]) -> str:
    """The `exit status:` block of a command's --help, one line per status, from cnclip.errors.EXIT_MEANINGS."""
    return "exit status:\n" + "\n".join(f"  {s:<3}  {EXIT_MEANINGS[s]}" for s in exit_statuses(statuses))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default shown (unless its help already says it, or there is none), and description and
    epilog text reflowed by paragraph while indented lines (examples, the exit statuses) keep their own line."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False) or isinstance(action.default, (list, tuple)):
            return text
        return super()._get_help_string(action)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out: list[str] = []
        for paragraph in text.strip("\n").split("\n\n"):
            prose: list[str] = []
            for line in paragraph.splitlines() + [" "]:  # the sentinel flushes the last run of prose
                if line[:1].isspace():
                    if prose:
                        out.append(textwrap.fill(" ".join(prose), width, initial_indent=indent,
                                                 subsequent_indent=indent))
                        prose = []
                    if line.strip():
                        lead = indent + line[:len(line) - len(line.lstrip())]
                        out.append(textwrap.fill(line.strip(), width, initial_indent=lead,
                                                 subsequent_indent=lead + " " * 5, break_on_hyphens=False,
                                                 break_long_words=False))
                else:
                    prose.append(line.strip())
            out.append("")
        return "\n".join(out).rstrip("\n")


def parser_options(description: str, exits: Iterable[int], epilog: str = "") -> dict:
    """Keyword arguments for an ArgumentParser or a subparser: description, exit statuses, our formatter."""
    return {"description": description, "formatter_class": HelpFormatter,
            "epilog": (epilog + "\n\n" if epilog else "") + exit_status_help(exits)}
