"""The errors a user can cause or meet, and the exit status each one gives.

Every user-facing error derives from `CnclipError`, carries a one-line message that names the input
at fault, and its class fixes the exit status. `cnclip.commands.base.run_command` is the one place
that turns them into `error: ...` on stderr and that status; no command catches them itself.
The table in docs/exit-status.md is this module's, row for row.
"""

from __future__ import annotations

import errno

EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug: Python's own traceback and status
EXIT_USAGE = 2
EXIT_DISK_FULL = 3
EXIT_DATA = 4
EXIT_MODEL = 5
EXIT_DIVERGED = 6
EXIT_WORKER_CRASHED = 7
EXIT_NO_TOKEN = 8
EXIT_TOKEN_REJECTED = 9
EXIT_HUB_UNREACHABLE = 10
EXIT_REPO_CONFLICT = 11
EXIT_HUB_FAILED = 12
EXIT_INTERRUPTED = 130

# Status -> what it means; docs/exit-status.md's table and `--help` epilogs are generated from or checked against this.
EXIT_MEANINGS: dict[int, str] = {
    EXIT_OK: "done",
    EXIT_INTERNAL: "internal error (a bug; a traceback is printed)",
    EXIT_USAGE: "usage error: bad arguments, recipe or config key, or a path that does not exist",
    EXIT_DISK_FULL: "out of disk space; earlier checkpoints and outputs are intact",
    EXIT_DATA: "unusable input data (a missing or empty split, an image folder with no images)",
    EXIT_MODEL: "the model could not be loaded",
    EXIT_DIVERGED: "training diverged (too many non-finite steps); the last good checkpoint is kept",
    EXIT_WORKER_CRASHED: "a worker process died; finished work is kept",
    EXIT_NO_TOKEN: "no ModelScope token found",
    EXIT_TOKEN_REJECTED: "ModelScope token rejected, or not allowed to write to that owner",
    EXIT_HUB_UNREACHABLE: "ModelScope could not be reached",
    EXIT_REPO_CONFLICT: "the repository exists with different contents, or is public when --private was asked",
    EXIT_HUB_FAILED: "any other ModelScope failure (rerun to resume)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); rerun the same command to resume",
}

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class CnclipError(Exception):
    """Base of every error a user can cause or fix; `exit_status` is the process exit status."""

    exit_status = EXIT_INTERNAL


class UsageError(CnclipError, ValueError):
    """Bad command-line arguments, names or paths."""

    exit_status = EXIT_USAGE


class ConfigError(UsageError):
    """A typed config file (recipe, zero-shot file, filter file) with a bad key, type or value; names both."""


class DataError(CnclipError, ValueError):
    """Input data that cannot be used at all (missing file, empty split); names the file."""

    exit_status = EXIT_DATA


class ModelLoadError(CnclipError, RuntimeError):
    """A checkpoint, hub id or config that cannot be loaded as a Chinese CLIP."""

    exit_status = EXIT_MODEL


class TrainingDiverged(CnclipError, RuntimeError):
    """Too many steps with a non-finite loss or gradient: stop instead of training on garbage."""

    exit_status = EXIT_DIVERGED


class WorkerCrashed(CnclipError, RuntimeError):
    """A worker process died (killed, out of memory); finished shards are kept."""

    exit_status = EXIT_WORKER_CRASHED


class DiskFull(CnclipError, OSError):
    """A write failed for lack of space; every write is atomic, so what was there before is intact."""

    exit_status = EXIT_DISK_FULL


class PublishError(CnclipError):
    """An upload that cannot go ahead; the subclass names the kind of failure."""

    exit_status = EXIT_HUB_FAILED


class NoToken(PublishError):
    exit_status = EXIT_NO_TOKEN


class TokenRejected(PublishError):
    exit_status = EXIT_TOKEN_REJECTED


class HubUnreachable(PublishError):
    exit_status = EXIT_HUB_UNREACHABLE


class RepoConflict(PublishError):
    exit_status = EXIT_REPO_CONFLICT


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


def disk_full_message(exc: OSError, where: str = "output") -> str:
    return (f"out of disk space writing {exc.filename or where} ({exc.strerror}); earlier checkpoints and outputs "
            f"are intact: free space and rerun the same command to resume")
