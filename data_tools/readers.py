"""Crawl dump readers: JSONL, Parquet and webdataset tars, streamed record by record.

Reading is split in two on purpose. `iter_items` runs in the main process and only slices the
input into raw items (a line, a row, a tar sample), which is cheap and keeps memory flat;
`parse_item` runs in the workers and turns a raw item into a `Record`, rejecting malformed
input with a reason instead of raising.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow.parquet as pq

from cnclip.errors import UsageError
from cnclip.image_sources import IMAGE_EXTENSIONS
from cnclip.tar_members import BoundedTar, MemberProblem, TarReadError
from data_tools.records import TEXT_FIELDS, RawItem, Reason, Record, Rejected

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".tar": "tar"}
KNOWN_FIELDS = ("query", "url", "image", "alt", "title", "context", "page_url")
# Tar member suffixes taken as the sample's image, most common first.
IMAGE_SUFFIXES = tuple(sorted((e.lstrip(".") for e in IMAGE_EXTENSIONS), key=lambda e: (e != "jpg", e)))
PARQUET_BATCH_ROWS = 1024
# No caption, query or URL comes near this; a longer field is junk, rejected before any cleaning
# (which would cost seconds on megabytes of text).
MAX_FIELD_CHARS = 65_536
_MIN_RECORD_LIMIT = 2**20
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
# Sample key (extensions never contain "/") marking a member that was not read: (MemberProblem name, detail).
_UNREAD_MEMBER = "/unread-member"
_UNREAD_REASONS = {MemberProblem.UNSAFE_NAME.name: Reason.UNSAFE_IMAGE_PATH,
                   MemberProblem.NOT_REGULAR.name: Reason.UNSUPPORTED_TAR_MEMBER,
                   MemberProblem.SPARSE.name: Reason.UNSUPPORTED_TAR_MEMBER}


class InputReadError(Exception):
    """A dump stopped being readable part-way (corrupt Parquet, truncated tar)."""


@dataclass(frozen=True)
class InputFile:
    """One dump file, in the order records are numbered."""

    path: Path
    display: str  # how the user will recognise it in the report
    kind: str  # jsonl | parquet | tar

    @property
    def base_dir(self) -> Path:
        """Relative image paths in this dump are resolved inside this directory."""
        return self.path.parent


@dataclass(frozen=True)
class OversizedMember:
    """Stands in for a JSONL line or tar member too large to read into memory."""

    size: int
    limit: int = 0


def record_limit(max_image_bytes: int) -> int:
    """Largest line or metadata member read into memory: room for one base64 image of the allowed size plus text."""
    return max(2 * max_image_bytes, _MIN_RECORD_LIMIT)


def discover_inputs(paths: list[str], exclude: Path | None = None) -> list[InputFile]:
    """Expand INPUT arguments into dump files: files as given, directories searched recursively in name order.

    `exclude` (the output directory) is skipped so that a rerun never reads its own output.
    """
    found: list[InputFile] = []
    seen: set[Path] = set()
    skip = exclude.resolve() if exclude is not None else None
    for arg in paths:
        path = Path(arg)
        if not path.exists():
            raise UsageError(f"input not found: {arg}")
        if not path.is_dir() and not path.is_file():  # a FIFO or device would block or never end
            raise UsageError(f"input is not a regular file or directory: {arg}")
        if path.is_dir():
            files = _dump_files_in(path, skip)
            if not files:
                raise UsageError(f"no .jsonl, .parquet or .tar files in directory: {arg}")
        else:
            if path.suffix.lower() not in SUFFIXES:
                raise UsageError(f"unsupported input file (expected .jsonl, .ndjson, .parquet or .tar): {arg}")
            files = [path]
        for file in files:
            if file.resolve() not in seen:
                seen.add(file.resolve())
                found.append(InputFile(file, str(file), SUFFIXES[file.suffix.lower()]))
    return found


def _dump_files_in(directory: Path, skip: Path | None) -> list[Path]:
    files = []
    for path in sorted(directory.rglob("*"), key=lambda p: p.relative_to(directory).as_posix()):
        relative = path.relative_to(directory).parts
        if any(part.startswith(".") for part in relative) or not path.is_file():
            continue
        if skip is not None and path.resolve().is_relative_to(skip):
            continue
        if path.suffix.lower() in SUFFIXES:
            files.append(path)
    return files


def iter_items(source: InputFile, max_member_bytes: int) -> Iterator[RawItem]:
    """Raw items of one dump in file order; raises InputReadError if the file breaks part-way."""
    try:
        if source.kind == "jsonl":
            yield from _jsonl_items(source, record_limit(max_member_bytes))
        elif source.kind == "parquet":
            yield from _parquet_items(source)
        else:
            yield from _tar_items(source, max_member_bytes)
    except (OSError, TarReadError, ValueError, EOFError) as err:  # pyarrow errors are OSError/ValueError
        raise InputReadError(f"{source.display}: {type(err).__name__}: {err}") from err


def _jsonl_items(source: InputFile, limit: int) -> Iterator[RawItem]:
    """Lines as raw items; a line longer than `limit` is measured while skipped, never held whole."""
    with open(source.path, "rb") as handle:
        line_no = 0
        while line := handle.readline(limit + 2):
            line_no += 1
            location = f"{source.display}:{line_no}"
            if not line.endswith(b"\n") and len(line) == limit + 2:
                yield RawItem(location, OversizedMember(len(line) + _skip_line(handle), limit))
                continue
            if line_no == 1:
                line = line.removeprefix(b"\xef\xbb\xbf")  # UTF-8 byte order mark
            line = line.rstrip(b"\r\n")
            if len(line) > limit:
                yield RawItem(location, OversizedMember(len(line), limit))
            elif line.strip():  # blank lines are not records
                yield RawItem(location, line)


def _skip_line(handle: BinaryIO) -> int:
    """Read past the rest of the current line in bounded pieces; returns how many bytes it had."""
    skipped = 0
    while piece := handle.readline(2**20):
        skipped += len(piece)
        if piece.endswith(b"\n"):
            break
    return skipped


def _parquet_items(source: InputFile) -> Iterator[RawItem]:
    row_no = 0
    for batch in pq.ParquetFile(source.path).iter_batches(batch_size=PARQUET_BATCH_ROWS):
        for row in batch.to_pylist():
            row_no += 1
            yield RawItem(f"{source.display}:row {row_no}", row)


def _tar_items(source: InputFile, max_member_bytes: int) -> Iterator[RawItem]:
    """webdataset samples: consecutive members sharing a key (name up to the first dot).

    Members are read through cnclip.tar_members, into memory, never extracted: nothing in an
    archive is written to disk, and a member is read only up to its limit (images
    `max_member_bytes`, other members `record_limit`). A member that is not read (a name leaving
    the archive, a link, device or sparse file, too large) marks its sample, which parse_item
    rejects with the member's reason.
    """
    key, sample = None, {}
    text_limit = record_limit(max_member_bytes)
    with BoundedTar(source.path, stream=True) as tar:
        for member in tar.members(lambda ext: max_member_bytes if ext in IMAGE_SUFFIXES else text_limit):
            if member.key != key and sample:
                yield RawItem(f"{source.display}:{key}", sample)
                sample = {}
            key = member.key
            if _UNREAD_MEMBER in sample:  # rejected already: the rest of the sample is not read
                continue
            if member.problem is MemberProblem.TOO_LARGE:
                sample[member.ext] = OversizedMember(member.size, member.limit or 0)
            elif member.problem is not None:
                sample.setdefault(_UNREAD_MEMBER, (member.problem.name, member.detail))
            else:
                sample[member.ext] = tar.read(member)
        if sample:
            yield RawItem(f"{source.display}:{key}", sample)


def parse_item(item: RawItem, kind: str, base_dir: Path) -> Record:
    """Turn a raw item into a Record, or raise Rejected with the malformed-input reason."""
    if isinstance(item.payload, OversizedMember):
        raise Rejected(Reason.RECORD_TOO_LARGE, f"line of {item.payload.size} bytes > {item.payload.limit}")
    if kind == "jsonl":
        mapping = _json_object(item.payload)
    elif kind == "parquet":
        mapping = item.payload
    else:
        mapping = _tar_mapping(item.payload)
    return _record_from_mapping(mapping, item, base_dir)


def _json_object(line: bytes, what: str = "line") -> dict[str, Any]:
    if b"\x00" in line:
        raise Rejected(Reason.NUL_BYTE, f"NUL byte in {what}")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        raise Rejected(Reason.INVALID_UTF8, str(err)) from None
    try:
        value = json.loads(text)
    except RecursionError:
        raise Rejected(Reason.MALFORMED_JSON, "nested too deeply") from None
    except ValueError as err:  # JSONDecodeError, and integers beyond Python's digit limit
        raise Rejected(Reason.MALFORMED_JSON, str(err)) from None
    if not isinstance(value, dict):
        raise Rejected(Reason.NOT_AN_OBJECT, f"JSON {type(value).__name__}, expected an object")
    if _SURROGATE_ESCAPE.search(line):  # "\ud800" decodes to a string no UTF-8 writer accepts
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise Rejected(Reason.INVALID_UTF8, f"lone surrogate escape in {what}") from None
    return value


def _tar_mapping(sample: dict[str, Any]) -> dict[str, Any]:
    """img2dataset layout: metadata in .json, caption in .txt (used as `alt`), image bytes."""
    if _UNREAD_MEMBER in sample:
        problem, detail = sample[_UNREAD_MEMBER]
        raise Rejected(_UNREAD_REASONS[problem], detail)
    for ext, value in sample.items():
        if isinstance(value, OversizedMember) and ext not in IMAGE_SUFFIXES:
            raise Rejected(Reason.RECORD_TOO_LARGE, f".{ext} member of {value.size} bytes > {value.limit}")
    mapping = _json_object(sample["json"], what=".json") if "json" in sample else {}
    if "txt" in sample:
        try:
            mapping["alt"] = sample["txt"].decode("utf-8")
        except UnicodeDecodeError as err:
            raise Rejected(Reason.INVALID_UTF8, f".txt: {err}") from None
    elif isinstance(mapping.get("caption"), str) and "alt" not in mapping:
        mapping["alt"] = mapping.pop("caption")
    image_ext = next((ext for ext in IMAGE_SUFFIXES if ext in sample), None)
    if image_ext is not None:
        image = sample[image_ext]
        if isinstance(image, OversizedMember):
            raise Rejected(Reason.IMAGE_TOO_LARGE, f"{image_ext} member of {image.size} bytes")
        mapping["image"] = image
    return mapping


def _record_from_mapping(mapping: dict[str, Any], item: RawItem, base_dir: Path) -> Record:
    for name in KNOWN_FIELDS:
        value = mapping.get(name)
        allowed = (str, bytes) if name == "image" else (str,)
        if value is not None and not isinstance(value, allowed):
            raise Rejected(Reason.BAD_FIELD_TYPE, f"{name} is {type(value).__name__}, expected string")
    for name, value in mapping.items():
        if name != "image" and isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
            raise Rejected(Reason.FIELD_TOO_LONG, f"{name} of {len(value)} chars > {MAX_FIELD_CHARS}")
    return Record(
        location=item.location,
        base_dir=base_dir,
        query=mapping.get("query") or "",
        url=mapping.get("url"),
        page_url=mapping.get("page_url"),
        image=mapping.get("image"),
        candidates={name: mapping[name] for name in TEXT_FIELDS if mapping.get(name)},
        meta={k: v for k, v in mapping.items() if k not in KNOWN_FIELDS},
    )


def meta_json(meta: dict[str, Any]) -> str:
    """The unknown fields as strict JSON: NaN/Infinity (accepted by Python's parser, and in Parquet
    floats) become null, other non-JSON values (bytes, timestamps) their str()."""
    try:
        return json.dumps(meta, ensure_ascii=False, sort_keys=True, allow_nan=False, default=str)
    except ValueError:
        return json.dumps(_finite(meta), ensure_ascii=False, sort_keys=True, allow_nan=False, default=str)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
