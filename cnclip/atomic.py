"""Crash-safe file writes: write beside the target, fsync, then rename over it.

A reader (or a resumed run) therefore sees either the old file or the new one, never half of one.

Temporaries are named after the process writing them (`.NAME.tmp-HOST-PID`, HOST a short hash of
the host name), so several processes can share a directory (two runs, or a run and an evaluate,
sharing one image cache): `remove_stale_temporaries` deletes only what a process that no longer
exists left behind, never another live process's write in flight.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .counts import parse_count

# A temporary written by another host cannot be checked for liveness: it is left alone this long.
FOREIGN_TEMPORARY_MAX_AGE_S = 24 * 3600


def _host_tag() -> str:
    return hashlib.blake2b(socket.gethostname().encode(), digest_size=4).hexdigest()


def owner_tag() -> str:
    """This process, as it appears in its temporaries' names."""
    return f"{_host_tag()}-{os.getpid()}"


def temporary_path(path: str | os.PathLike, kind: str = "tmp") -> Path:
    """Where this process writes `path` before renaming it into place (kind: tmp, or old for atomic_dir)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{kind}-{owner_tag()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    except OSError:
        return False
    return True


def writer_alive(temporary: Path) -> bool:
    """Whether the process that named `temporary` may still be writing it.

    `.x.tmp-PID` (older names, and data_tools' own) and `.x.tmp-HOST-PID` from this host: its PID is
    checked. From another host (a shared filesystem): alive until FOREIGN_TEMPORARY_MAX_AGE_S old.
    """
    owner = temporary.name.rsplit(".tmp-", 1)[-1] if ".tmp-" in temporary.name else \
        temporary.name.rsplit(".old-", 1)[-1]
    host, _, pid_text = owner.rpartition("-")
    pid = parse_count(pid_text)  # ASCII digits only: a name holding '²' is nobody's pid
    if pid is None or not 0 < pid < 2**31:  # pid 0 is our process group; os.kill overflows past a C int
        return False
    if pid == os.getpid() and host in ("", _host_tag()):
        return False  # our own leftover from an earlier, failed write: nothing of ours is in flight
    if host in ("", _host_tag()):
        return _pid_alive(pid)
    try:
        return time.time() - temporary.lstat().st_mtime < FOREIGN_TEMPORARY_MAX_AGE_S
    except OSError:
        return False


def fsync_directory(path: Path) -> None:
    """Make renames inside `path` durable (a power cut after a rename must not undo it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator:
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_directory(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_tensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """safetensors, serialised in memory and written by Python, so a full disk raises OSError (ENOSPC /
    EFBIG) like every other write instead of a library-specific error."""
    from safetensors.torch import save

    Path(path).write_bytes(save(tensors, metadata=metadata))


def save_torch(obj, path: str | os.PathLike) -> None:
    """torch.save through memory, for the same reason as save_tensors (torch's own writer reports a
    full disk as an opaque RuntimeError)."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    Path(path).write_bytes(buf.getvalue())


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_file(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, ensure_ascii=False, indent=2)
        fh.write("\n")


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Fill a temporary directory, then swap it in for `path` (the old one is removed after)."""
    path = Path(path)
    tmp, old = temporary_path(path), temporary_path(path, "old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_directory(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_temporaries(directory: str | os.PathLike) -> None:
    """Leftovers of a write whose process was killed midway: never valid, safe to delete.

    A temporary whose writer is still running (another process sharing the directory) is left alone.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return
    for p in sorted(directory.iterdir()):
        if not p.name.startswith(".") or (".tmp-" not in p.name and ".old-" not in p.name) or writer_alive(p):
            continue
        if ".old-" in p.name:
            # Killed between moving the old copy aside and moving the new one in: restore the old.
            target = directory / p.name[1:].rsplit(".old-", 1)[0]
            if not target.exists():
                os.replace(p, target)
                continue
        if ".tmp-" in p.name or ".old-" in p.name:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
