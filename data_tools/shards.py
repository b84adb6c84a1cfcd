"""Per-shard intermediate results in DIR/.work: what makes build-pairs parallel and resumable.

A shard is `shard_size` consecutive records of one input file. Its result (accepted records with
their JPEG and hashes, plus the shard's Tally in the file metadata) is one Parquet file written
to a temporary name and renamed, so a shard is either finished or absent: a rerun after an
interruption computes only the missing shards. The global stages read only the small columns back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cnclip.faults import crash_point
from data_tools.config import FilterConfig
from data_tools.files import remove_temporaries, write_atomic
from data_tools.readers import InputFile, meta_json
from data_tools.records import RawItem, Reason, Rejected
from data_tools.report import Tally
from data_tools.stages import RecordProcessor

WORK_FORMAT = 2  # bump when the shard file layout or a per-record stage changes behaviour
_TALLY_KEY = b"data_tools.tally"
SCHEMA = pa.schema(
    [
        ("location", pa.string()),
        ("query", pa.string()),
        ("text", pa.string()),
        ("text_field", pa.string()),
        ("sha", pa.binary()),
        ("phash", pa.uint64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("jpeg", pa.binary()),
        ("url", pa.string()),
        ("page_url", pa.string()),
        ("meta", pa.string()),  # JSON of the unknown input fields
    ]
)
LIGHT_COLUMNS = ["location", "query", "text", "sha", "phash"]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardTask:
    """Work for one process: the raw items of one shard and where its result goes."""

    source: InputFile
    items: list[RawItem]
    result_path: Path


class WorkDir:
    """DIR/.work: a manifest with the fingerprint of everything the shard results depend on, and the shards."""

    def __init__(self, root: Path, fingerprint: str) -> None:
        self.root = root
        self.shards = root / "shards"
        manifest = root / "manifest.json"
        if _read_fingerprint(manifest) != fingerprint:
            shutil.rmtree(self.shards, ignore_errors=True)  # results of other inputs or settings
        self.shards.mkdir(parents=True, exist_ok=True)
        remove_temporaries(root, self.shards)  # shard results a killed run did not finish
        data = json.dumps({"fingerprint": fingerprint}).encode()
        write_atomic(manifest, lambda handle: handle.write(data))

    def shard_path(self, file_index: int, chunk_index: int) -> Path:
        return self.shards / f"{file_index:05d}-{chunk_index:06d}.parquet"


def fingerprint(inputs: list[InputFile], config: FilterConfig, shard_size: int) -> str:
    """Identity of the per-record work: input files (path, size, mtime), per-record settings, shard size.

    Dedup, cap, split and output format are not part of it: changing those reuses every shard.
    """
    files = []
    for source in inputs:
        stat = source.path.stat()
        files.append([str(source.path.resolve()), stat.st_size, stat.st_mtime_ns])
    settings = config.to_dict()
    identity = {
        "format": WORK_FORMAT,
        "inputs": files,
        "shard_size": shard_size,
        "per_record": {key: settings[key] for key in ("text", "relevance", "image")},
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def process_shard(task: ShardTask, processor: RecordProcessor) -> int:
    """Run the per-record stages over one shard and write its result; returns the number of records."""
    tally = Tally()
    rows: dict[str, list[Any]] = {name: [] for name in SCHEMA.names}
    file = task.source.display
    for item in task.items:
        crash_point("pairs-record")
        try:
            record = processor.process(item, task.source.kind, task.source.base_dir)
            meta = meta_json(record.meta)
        except Rejected as rejection:
            query = rejection.query
            tally.add_read(file, query)
            tally.add_rejected(file, query, rejection.reason, _example(item.location, rejection.detail))
            continue
        except Exception as err:  # a bug or an input no stage foresaw: count it, never lose the run
            log.warning("unexpected error on %s: %s: %s", item.location, type(err).__name__, err)
            tally.add_read(file, None)
            tally.add_rejected(file, None, Reason.UNEXPECTED_ERROR, _example(item.location, f"{type(err).__name__}: {err}"))
            continue
        tally.add_read(file, record.query)
        for name, value in (
            ("location", record.location),
            ("query", record.query),
            ("text", record.text),
            ("text_field", record.text_field),
            ("sha", record.image_sha),
            ("phash", record.phash),
            ("width", record.width),
            ("height", record.height),
            ("jpeg", record.jpeg),
            ("url", record.url),
            ("page_url", record.page_url),
            ("meta", meta),
        ):
            rows[name].append(value)
    write_shard(task.result_path, pa.table(rows, schema=SCHEMA), tally)
    crash_point("pairs-shard")  # between shards: this one is finished, the next not started
    return len(task.items)


def _example(location: str, detail: str) -> str:
    return f"{location}: {detail[:300]}" if detail else location


def write_shard(path: Path, table: pa.Table, tally: Tally) -> None:
    """Write atomically: readers only ever see complete shard files."""
    metadata = {_TALLY_KEY: json.dumps(tally.to_dict(), ensure_ascii=False).encode()}
    table = table.replace_schema_metadata(metadata)
    write_atomic(path, lambda handle: pq.write_table(table, handle, compression="none"), crash_before_rename="pairs-shard-write")


def read_tally(path: Path) -> Tally:
    return Tally.from_dict(json.loads(pq.read_schema(path).metadata[_TALLY_KEY]))


def read_light(path: Path) -> dict[str, list[Any]]:
    """The columns dedup and the cap need; images stay on disk."""
    return pq.read_table(path, columns=LIGHT_COLUMNS).to_pydict()


def read_rows(path: Path, rows: list[int]) -> list[dict[str, Any]]:
    """Full rows (with the JPEG) of the selected record indices, in the given order."""
    return pq.read_table(path).take(rows).to_pylist()


def _read_fingerprint(manifest: Path) -> str | None:
    try:
        return json.loads(manifest.read_text())["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
