"""Journal of finished downloads of a shard in progress, so a killed run refetches none of them.

A shard's result is written only when all its records are done; with --download that can take
minutes, and a kill would otherwise throw away every download of the shard. Each finished record
(its image normalised, or its failure) is appended to DIR/.work/shards/NNNNN-NNNNNN.journal and
flushed at once, so it survives SIGKILL (it is in the OS's cache); the rerun of the shard reads
the journal and fetches only the rest. The journal is removed once the shard result is written.

Entries are length-prefixed JSON with a BLAKE2 checksum: a torn last entry (power loss mid-write)
is detected and dropped, never misread. The first entry names the state of the shard result the
journal extends (absent, or the size and mtime of the existing file for --retry-failed); a journal
written against another state is stale (a kill between writing the result and removing the
journal) and is ignored.
"""

from __future__ import annotations

import base64
import json
import struct
from hashlib import blake2b
from pathlib import Path
from typing import Any, BinaryIO

_HEADER = struct.Struct("<I")
_DIGEST = 16


def _base_state(result_path: Path) -> str:
    try:
        stat = result_path.stat()
    except FileNotFoundError:
        return "absent"
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _encode(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"$b64": base64.b64encode(value).decode()}
    if isinstance(value, dict):
        return {key: _encode(item) for key, item in value.items()}
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$b64"}:
            return base64.b64decode(value["$b64"])
        return {key: _decode(item) for key, item in value.items()}
    return value


class FetchJournal:
    """Append-only record of finished items of one shard: index -> a JSON-able dict (bytes allowed)."""

    def __init__(self, result_path: Path) -> None:
        self.path = result_path.with_suffix(".journal")
        self.base = _base_state(result_path)
        self._handle: BinaryIO | None = None

    def load(self) -> dict[int, dict[str, Any]]:
        """The entries of a journal written against the current result state; starts a fresh one otherwise."""
        entries: dict[int, dict[str, Any]] = {}
        valid_bytes = 0
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            data = b""
        offset, first = 0, True
        while offset + _HEADER.size <= len(data):
            (length,) = _HEADER.unpack_from(data, offset)
            end = offset + _HEADER.size + length + _DIGEST
            payload = data[offset + _HEADER.size: end - _DIGEST]
            if end > len(data) or blake2b(payload, digest_size=_DIGEST).digest() != data[end - _DIGEST: end]:
                break  # a torn tail
            entry = json.loads(payload)
            if first:
                if entry.get("base") != self.base:
                    entries, valid_bytes = {}, 0
                    break  # stale: written against another state of the result
                first = False
            else:
                entries[entry["index"]] = _decode(entry["data"])
            offset = valid_bytes = end
        self._handle = open(self.path, "r+b" if valid_bytes else "wb")
        self._handle.seek(valid_bytes)
        self._handle.truncate()
        if not valid_bytes:
            self._write({"base": self.base})
        return entries

    def add(self, index: int, data: dict[str, Any]) -> None:
        self._write({"index": index, "data": _encode(data)})

    def _write(self, entry: dict[str, Any]) -> None:
        assert self._handle is not None, "load() first"
        payload = json.dumps(entry, ensure_ascii=False).encode()
        self._handle.write(_HEADER.pack(len(payload)) + payload + blake2b(payload, digest_size=_DIGEST).digest())
        self._handle.flush()  # in the OS's cache: survives a kill of this process

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)
