"""Crawl dump readers: JSONL, Parquet and webdataset tars, streamed record by record.

Reading is split in two on purpose. `iter_items` runs in the main process and only slices the
input into raw items (a line, a row, a tar sample), which is cheap and keeps memory flat;
`parse_item` runs in the workers and turns a raw item into a `Record`, rejecting malformed
input with a reason instead of raising.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from data_tools.records import RawItem, Reason, Record, Rejected

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".tar": "tar"}
KNOWN_FIELDS = ("query", "url", "image", "alt", "title", "context", "page_url")
TEXT_FIELDS = ("alt", "title", "context")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
PARQUET_BATCH_ROWS = 1024


class InputError(ValueError):
    """A path the user passed cannot be used as input; the message names it."""


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
    """Stands in for a tar member too large to read into memory."""

    size: int


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
            raise InputError(f"input not found: {arg}")
        if path.is_dir():
            files = _dump_files_in(path, skip)
            if not files:
                raise InputError(f"no .jsonl, .parquet or .tar files in directory: {arg}")
        else:
            if path.suffix.lower() not in SUFFIXES:
                raise InputError(f"unsupported input file (expected .jsonl, .ndjson, .parquet or .tar): {arg}")
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
            yield from _jsonl_items(source)
        elif source.kind == "parquet":
            yield from _parquet_items(source)
        else:
            yield from _tar_items(source, max_member_bytes)
    except (OSError, tarfile.TarError, ValueError, EOFError) as err:  # pyarrow errors are OSError/ValueError
        raise InputReadError(f"{source.display}: {type(err).__name__}: {err}") from err


def _jsonl_items(source: InputFile) -> Iterator[RawItem]:
    with open(source.path, "rb") as handle:
        for line_no, line in enumerate(handle, start=1):
            if line_no == 1:
                line = line.removeprefix(b"\xef\xbb\xbf")  # UTF-8 byte order mark
            if line.strip():  # blank lines are not records
                yield RawItem(f"{source.display}:{line_no}", line.rstrip(b"\r\n"))


def _parquet_items(source: InputFile) -> Iterator[RawItem]:
    row_no = 0
    for batch in pq.ParquetFile(source.path).iter_batches(batch_size=PARQUET_BATCH_ROWS):
        for row in batch.to_pylist():
            row_no += 1
            yield RawItem(f"{source.display}:row {row_no}", row)


def _tar_items(source: InputFile, max_member_bytes: int) -> Iterator[RawItem]:
    """webdataset samples: consecutive members sharing a key (name up to the first dot)."""
    key, sample = None, {}
    with tarfile.open(source.path, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            folder, _, base = member.name.rpartition("/")
            stem, _, ext = base.partition(".")
            member_key = f"{folder}/{stem}" if folder else stem
            if member_key != key and sample:
                yield RawItem(f"{source.display}:{key}", sample)
                sample = {}
            key = member_key
            ext = ext.lower()
            if ext in IMAGE_EXTENSIONS and member.size > max_member_bytes:
                sample[ext] = OversizedMember(member.size)
            else:
                sample[ext] = tar.extractfile(member).read()
        if sample:
            yield RawItem(f"{source.display}:{key}", sample)


def parse_item(item: RawItem, kind: str, base_dir: Path) -> Record:
    """Turn a raw item into a Record, or raise Rejected with the malformed-input reason."""
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
    except json.JSONDecodeError as err:
        raise Rejected(Reason.MALFORMED_JSON, str(err)) from None
    if not isinstance(value, dict):
        raise Rejected(Reason.NOT_AN_OBJECT, f"JSON {type(value).__name__}, expected an object")
    return value


def _tar_mapping(sample: dict[str, Any]) -> dict[str, Any]:
    """img2dataset layout: metadata in .json, caption in .txt (used as `alt`), image bytes."""
    mapping = _json_object(sample["json"], what=".json") if "json" in sample else {}
    if "txt" in sample:
        try:
            mapping["alt"] = sample["txt"].decode("utf-8")
        except UnicodeDecodeError as err:
            raise Rejected(Reason.INVALID_UTF8, f".txt: {err}") from None
    elif isinstance(mapping.get("caption"), str) and "alt" not in mapping:
        mapping["alt"] = mapping.pop("caption")
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
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
