"""Per-shard intermediate results in DIR/.work: what makes build-pairs parallel and resumable.

A shard is `shard_size` consecutive records of one input file. Its result (accepted records with
their JPEG and hashes, plus the shard's Tally in the file metadata) is one Parquet file written
to a temporary name and renamed, so a shard is either finished or absent: a rerun after an
interruption computes only the missing shards. The global stages read only the small columns back.

With --download the fetched images are part of the shard result (normalised, in the `jpeg`
column), so a rerun after a kill fetches nothing a finished shard holds; while a shard is in
progress, each finished download is journaled (data_tools.fetch_journal), so nothing finished
in an unfinished shard is fetched again either. The shard also keeps
its download accounting (per-host DownloadStats) and the list of records whose failure was
retryable (timeout, connection error, 429, 5xx): `--retry-failed` reprocesses exactly those
records of each finished shard and merges them into it, by their position in the shard.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cnclip.faults import crash_point
from data_tools.config import FilterConfig
from data_tools.download import Downloader, DownloadOptions, Fetched
from data_tools.download_stats import DownloadStats
from data_tools.fetch_journal import FetchJournal
from data_tools.files import remove_temporaries, write_atomic
from data_tools.readers import InputFile, meta_json
from data_tools.records import RawItem, Reason, Record, Rejected
from data_tools.report import Tally
from data_tools.stages import RecordProcessor

WORK_FORMAT = 4  # bump when the shard file layout or a per-record stage changes behaviour (4: colour column)
_TALLY_KEY = b"data_tools.tally"
_DOWNLOADS_KEY = b"data_tools.downloads"  # DownloadStats of the shard
_RETRY_KEY = b"data_tools.retryable"  # records whose failure --retry-failed reruns
SCHEMA = pa.schema(
    [
        ("item", pa.int32()),  # position of the record in its shard: orders rows merged by --retry-failed
        ("location", pa.string()),
        ("query", pa.string()),
        ("text", pa.string()),
        ("text_field", pa.string()),
        ("sha", pa.binary()),
        ("phash", pa.uint64()),
        ("colour", pa.binary()),  # colour signature: near duplicates need both it and the pHash close
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("jpeg", pa.binary()),
        ("url", pa.string()),
        ("page_url", pa.string()),
        ("meta", pa.string()),  # JSON of the unknown input fields
    ]
)
LIGHT_COLUMNS = ["location", "query", "text", "sha", "phash", "colour"]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardTask:
    """Work for one process: the raw items of one shard and where its result goes."""

    source: InputFile
    items: list[RawItem]
    result_path: Path
    retry: bool = False  # the result exists: rerun only its retryable failures


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


def fingerprint(inputs: list[InputFile], config: FilterConfig, shard_size: int, download: DownloadOptions | None = None) -> str:
    """Identity of the per-record work: input files (path, size, mtime), per-record settings, shard size,
    whether URLs are downloaded and whether private addresses may be.

    Dedup, cap, split and output format are not part of it: changing those reuses every shard. Nor
    are timeouts, concurrency or the user agent: a resumed download may change them.
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
    if download is not None:
        identity["download"] = {"allow_private_network": download.allow_private_network}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


@dataclass(slots=True)
class _Outcome:
    """What became of one record of a shard."""

    query: str | None
    reason: Reason | None = None  # None: accepted
    example: str | None = None
    row: dict[str, Any] | None = None  # the accepted record's columns
    host: str | None = None  # set when the image was downloaded (or tried)
    download_failed: bool = False  # `reason` is the download's
    retryable: bool = False


def process_shard(task: ShardTask, processor: RecordProcessor) -> int:
    """Run the per-record stages over one shard and write its result; returns the number of records."""
    if task.retry:
        return _retry_shard(task, processor)
    journal = FetchJournal(task.result_path)
    outcomes = _run_records(task, processor, range(len(task.items)), journal)
    tally, stats, retry = Tally(), DownloadStats(), []
    table = _account(task.source.display, outcomes, tally, stats, retry)
    write_shard(task.result_path, table, tally, stats, retry)
    journal.remove()
    crash_point("pairs-shard")  # between shards: this one is finished, the next not started
    return len(task.items)


def _retry_shard(task: ShardTask, processor: RecordProcessor) -> int:
    """Rerun the records of a finished shard whose failure was retryable; merge them in by position."""
    old = pq.read_table(task.result_path)
    tally, stats, retry = read_tally(task.result_path), read_download_stats(task.result_path), read_retryable(task.result_path)
    file = task.source.display
    for entry in retry:
        tally.remove_rejected(file, entry["query"], Reason(entry["reason"]), entry["example"])
        stats.remove(entry["host"], entry["reason"])
    journal = FetchJournal(task.result_path)  # bound to this state of the result: stale once it is rewritten
    outcomes = _run_records(task, processor, [entry["item"] for entry in retry], journal)
    still: list[dict[str, Any]] = []
    fresh = _account(file, outcomes, tally, stats, still)
    merged = pa.concat_tables([old.replace_schema_metadata(None), fresh])
    merged = merged.take(pc.sort_indices(merged, sort_keys=[("item", "ascending")]))
    write_shard(task.result_path, merged, tally, stats, still)
    journal.remove()
    crash_point("pairs-shard")
    return len(retry)


def _run_records(task: ShardTask, processor: RecordProcessor, indices: Any, journal: FetchJournal) -> dict[int, _Outcome]:
    """Outcomes of the records at `indices`; URL-only records are fetched concurrently, then decoded.

    Each finished download goes to the journal at once; those a killed run finished are taken from it.
    """
    outcomes: dict[int, _Outcome] = {}
    to_fetch: list[tuple[tuple[int, Record], str]] = []
    for index in indices:
        item = task.items[index]
        crash_point("pairs-record")
        try:
            record, url = processor.prepare(item, task.source.kind, task.source.base_dir)
            if url is not None:
                to_fetch.append(((index, record), url))
                continue
            processor.finish_from_dump(record)
            outcomes[index] = _accepted(record)
        except Exception as err:
            outcomes[index] = _failed(item.location, err)
    if to_fetch:
        assert processor.download is not None
        done = journal.load()
        for index, outcome in done.items():
            outcomes[index] = _Outcome(**{**outcome, "reason": Reason(outcome["reason"]) if outcome["reason"] else None})
        to_fetch = [job for job in to_fetch if job[0][0] not in done]

        def on_result(key: tuple[int, Record], fetched: Fetched) -> None:
            index, record = key
            location = task.items[index].location
            if fetched.data is None:
                outcome = _Outcome(record.query, fetched.reason, _example(location, fetched.detail), download_failed=True,
                                   retryable=fetched.retryable)
            else:
                try:
                    processor.attach_image(record, fetched.data)
                    outcome = _accepted(record)
                except Exception as err:
                    outcome = _failed(location, err)
            outcome.host = fetched.host
            outcomes[index] = outcome
            journal.add(index, {field.name: getattr(outcome, field.name) for field in dataclasses.fields(outcome)})
            crash_point("pairs-download")  # this download journaled, others in flight

        try:
            Downloader(processor.download, processor.config.image.max_file_bytes).run(to_fetch, on_result)
        finally:
            journal.close()
    return outcomes


def _accepted(record: Record) -> _Outcome:
    row = {
        "location": record.location,
        "query": record.query,
        "text": record.text,
        "text_field": record.text_field,
        "sha": record.image_sha,
        "phash": record.phash,
        "colour": record.colour,
        "width": record.width,
        "height": record.height,
        "jpeg": record.jpeg,
        "url": record.url,
        "page_url": record.page_url,
        "meta": meta_json(record.meta),
    }
    return _Outcome(record.query, row=row)


def _failed(location: str, err: Exception) -> _Outcome:
    if isinstance(err, Rejected):
        return _Outcome(err.query, err.reason, _example(location, err.detail))
    # A bug or an input no stage foresaw: count it, never lose the run.
    log.warning("unexpected error on %s: %s: %s", location, type(err).__name__, err)
    return _Outcome(None, Reason.UNEXPECTED_ERROR, _example(location, f"{type(err).__name__}: {err}"))


def _account(file: str, outcomes: dict[int, _Outcome], tally: Tally, stats: DownloadStats, retry: list[dict[str, Any]]) -> pa.Table:
    """Count the outcomes in shard order; returns the accepted rows as a table."""
    rows: dict[str, list[Any]] = {name: [] for name in SCHEMA.names}
    for index in sorted(outcomes):
        outcome = outcomes[index]
        tally.add_read(file, outcome.query)
        if outcome.host is not None:
            stats.add(outcome.host, outcome.reason.value if outcome.download_failed and outcome.reason else None)
        if outcome.reason is not None:
            tally.add_rejected(file, outcome.query, outcome.reason, outcome.example)
            if outcome.retryable:
                retry.append({"item": index, "reason": outcome.reason.value, "query": outcome.query,
                              "example": outcome.example, "host": outcome.host})
            continue
        assert outcome.row is not None
        rows["item"].append(index)
        for name, value in outcome.row.items():
            rows[name].append(value)
    return pa.table(rows, schema=SCHEMA)


def _example(location: str, detail: str) -> str:
    return f"{location}: {detail[:300]}" if detail else location


def write_shard(path: Path, table: pa.Table, tally: Tally, stats: DownloadStats, retry: list[dict[str, Any]]) -> None:
    """Write atomically: readers only ever see complete shard files."""
    metadata = {
        _TALLY_KEY: json.dumps(tally.to_dict(), ensure_ascii=False).encode(),
        _DOWNLOADS_KEY: json.dumps(stats.to_dict(), ensure_ascii=False).encode(),
        _RETRY_KEY: json.dumps(retry, ensure_ascii=False).encode(),
    }
    table = table.replace_schema_metadata(metadata)
    write_atomic(path, lambda handle: pq.write_table(table, handle, compression="none"), crash_before_rename="pairs-shard-write")


def read_tally(path: Path) -> Tally:
    return Tally.from_dict(json.loads(pq.read_schema(path).metadata[_TALLY_KEY]))


def read_download_stats(path: Path) -> DownloadStats:
    return DownloadStats.from_dict(json.loads(pq.read_schema(path).metadata[_DOWNLOADS_KEY]))


def read_retryable(path: Path) -> list[dict[str, Any]]:
    """The shard's records whose failure was retryable: item, reason, query, example, host."""
    return json.loads(pq.read_schema(path).metadata[_RETRY_KEY])


def read_light(path: Path) -> pa.Table:
    """The columns dedup and the cap need; images stay on disk."""
    return pq.read_table(path, columns=LIGHT_COLUMNS)


def read_rows(path: Path, rows: list[int]) -> list[dict[str, Any]]:
    """Full rows (with the JPEG) of the selected record indices, in the given order."""
    return pq.read_table(path).take(rows).to_pylist()


def _read_fingerprint(manifest: Path) -> str | None:
    try:
        return json.loads(manifest.read_text())["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
