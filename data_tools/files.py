"""Crash-safe writes for build-pairs: temporary names, fsync, rename; full disks reported by file name.

A file under its final name is always complete: it is written as `.{name}.tmp-{pid}` (the
naming of `cnclip.atomic`), flushed to disk, then renamed. A run killed at any instant leaves at
most such temporaries, which the next run deletes before it starts (`remove_temporaries`).

Writes go through Python file objects (pyarrow writes into one too), so a full disk or a
file-size limit surfaces as one `OSError` with errno ENOSPC/EFBIG/EDQUOT whatever library
produced the bytes; `named` adds the file's name when the error lacks it, so the CLI can say
which file did not fit.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from cnclip.faults import crash_point
from cnclip.atomic import atomic_file, fsync_directory, remove_stale_temporaries


def with_name(err: OSError, path: Path) -> OSError:
    """`err` with `path` as its file name unless it has one (`fh.write` never sets one)."""
    if err.filename is None:
        err.filename = str(path)
    return err


@contextmanager
def named(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as err:
        raise with_name(err, path)


def write_atomic(path: Path, write: Callable[[IO[bytes]], Any], crash_before_rename: str | None = None) -> None:
    """Write a binary file through `write(handle)`; readers see the old file or the complete new one."""
    with named(path), atomic_file(path, "wb") as handle:
        write(handle)
        if crash_before_rename:
            crash_point(crash_before_rename)


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def remove_temporaries(*directories: Path) -> None:
    """Delete what a killed run left behind; never valid, always safe to delete (one run per --out at a time)."""
    for directory in directories:
        remove_stale_temporaries(directory)


class StagedFiles:
    """Several files written under temporary names, then published together.

    `finish()` flushes and fsyncs them all, so every byte that needs disk space is on disk before
    the first rename: a full disk fails the run while all earlier outputs are still in place.
    `publish()` then only renames, which needs no space.
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        self._open: dict[str, IO[Any]] = {}
        self._names: list[str] = []  # every file ever opened, for abort

    def get(self, name: str, binary: bool = False) -> IO[Any]:
        if name not in self._open:
            tmp = temporary_name(self.out / name)
            self._open[name] = open(tmp, "wb") if binary else open(tmp, "w", encoding="utf-8", newline="\n")
            self._names.append(name)
        return self._open[name]

    def write(self, name: str, data: str | bytes, binary: bool = False) -> None:
        handle = self.get(name, binary)
        try:
            handle.write(data)
        except OSError as err:
            raise with_name(err, self.out / name) from None

    def close(self, name: str) -> None:
        """Finish one file early (a completed tar shard), freeing its buffer."""
        self._finish(name)

    def finish(self) -> list[str]:
        """Flush, fsync and close every file; returns their names in sorted order."""
        for name in list(self._open):
            self._finish(name)
        return sorted(self._names)

    def publish(self, names: list[str]) -> None:
        """Rename finished files into place, in the given order (`pairs-publish` is a crash point before each)."""
        for name in names:
            crash_point("pairs-publish")
            os.replace(temporary_name(self.out / name), self.out / name)
        fsync_directory(self.out)

    def abort(self) -> None:
        """Close and delete every temporary; never raises (it runs while another error propagates)."""
        for name in self._names:
            handle = self._open.pop(name, None)
            if handle is not None:
                try:
                    handle.close()
                except OSError:  # the final flush of a full disk fails again
                    pass
            temporary_name(self.out / name).unlink(missing_ok=True)
        self._names.clear()

    def _finish(self, name: str) -> None:
        handle = self._open.pop(name)
        with named(self.out / name):
            try:
                handle.flush()
                os.fsync(handle.fileno())
            finally:
                handle.close()
