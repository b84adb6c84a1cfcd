"""Crash-safe file writes: write beside the target, fsync, then rename over it.

A reader (or a resumed run) therefore sees either the old file or the new one, never half of one.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


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
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
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


def save_tensors(tensors: dict, path: str | os.PathLike) -> None:
    """safetensors, serialised in memory and written by Python, so a full disk raises OSError (ENOSPC /
    EFBIG) like every other write instead of a library-specific error."""
    from safetensors.torch import save

    Path(path).write_bytes(save(tensors))


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
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
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
    """Leftovers of a write that was killed midway: never valid, always safe to delete."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for p in sorted(directory.iterdir()):
        if not p.name.startswith("."):
            continue
        if ".old-" in p.name:
            # Killed between moving the old copy aside and moving the new one in: restore the old.
            target = directory / p.name[1:].rsplit(".old-", 1)[0]
            if not target.exists():
                os.replace(p, target)
                continue
        if ".tmp-" in p.name or ".old-" in p.name:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
