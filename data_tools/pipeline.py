"""build-pairs, top to bottom.

1. read      main process slices each dump into shards of raw items (streaming)
2. per-record  workers parse, clean and choose text, check relevance, decode and hash images;
               each shard's result lands atomically in DIR/.work (reused by reruns)
3. dedup     one pass over all accepted records in input order (exact, near, (query, text))
4. cap       at most N pairs per query, chosen by a seeded content hash
5. split     train/valid/test by a seeded hash of the image
6. write     the chosen format and report.json under temporary names, all complete on disk
               before the first is renamed into place; report.json is renamed last

Steps 3-6 see records in input order whatever the number of workers, so the output bytes do
not depend on --workers, and a resumed run writes the same bytes as an uninterrupted one.

Crash safety: a file under its final name is always complete. While outputs are being renamed
into place, report.json is absent (moved to DIR/.work/previous-report.json, which remembers the
old outputs so a rerun can still remove the ones it no longer writes): a DIR holding report.json
holds exactly the complete outputs that report lists. A run killed anywhere leaves only
temporary names, removed by the next run, which resumes from the finished shards.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from cnclip.errors import WorkerCrashed
from cnclip.faults import crash_point
from data_tools.cap import CapCandidate, cap_per_query, pair_priority
from data_tools.config import FilterConfig
from data_tools.dedup import Deduplicator
from data_tools.files import StagedFiles, remove_temporaries
from data_tools.readers import InputFile, InputReadError, discover_inputs, iter_items
from data_tools.records import RawItem, Reason
from data_tools.report import Tally, build_report
from data_tools.shards import ShardTask, WorkDir, fingerprint, process_shard, read_light, read_rows, read_tally
from data_tools.split import assign_split
from data_tools.stages import RecordProcessor
from data_tools.writers import Pair, Writer, make_writer

DEFAULT_SPLITS = (("train", 0.98), ("valid", 0.01), ("test", 0.01))
REPORT_NAME = "report.json"
PARKED_REPORT = "previous-report.json"  # in DIR/.work while outputs are being replaced


@dataclass(frozen=True)
class BuildOptions:
    """Everything a build depends on. `workers` and `progress` never change the output."""

    inputs: tuple[str, ...]
    out: Path
    config: FilterConfig = field(default_factory=FilterConfig)
    per_query_cap: int = 20_000  # 0: no cap
    splits: tuple[tuple[str, float], ...] = DEFAULT_SPLITS
    format: str = "cnclip"
    seed: int = 0
    shard_size: int = 2_000
    workers: int = 1
    progress: bool = True


@dataclass(frozen=True)
class BuildResult:
    report: dict[str, Any]
    shards_total: int
    shards_computed: int  # the rest were reused from DIR/.work


@dataclass(frozen=True)
class ShardRef:
    path: Path
    file: str  # the input file's display name, for accounting


@dataclass(slots=True)
class _Survivor:
    """A deduplicated record waiting for the cap and the split (small: images stay on disk)."""

    shard: int
    row: int
    query: str
    sha: bytes


def build_pairs(options: BuildOptions) -> BuildResult:
    """Run the whole pipeline; raises readers.InputError for unusable INPUT paths."""
    inputs = discover_inputs(list(options.inputs), exclude=options.out)
    options.out.mkdir(parents=True, exist_ok=True)
    remove_temporaries(options.out)  # what a killed run left half-written
    work = WorkDir(options.out / ".work", fingerprint(inputs, options.config, options.shard_size))
    tally = Tally()
    for source in inputs:
        tally.add_file(source.display)
    shards, computed, input_errors = _run_record_stages(inputs, work, options)
    for shard in shards:
        tally.merge(read_tally(shard.path))
    plan, split_counts = _select(shards, options, tally)
    parked = work.root / PARKED_REPORT
    previous = _listed_outputs(options.out / REPORT_NAME) | _listed_outputs(parked)
    writer = make_writer(options.format, options.out, _split_names(options))
    try:
        outputs = _write_outputs(writer, shards, plan, options)
        report = build_report(
            tally,
            splits=split_counts,
            outputs=outputs + [REPORT_NAME],
            input_errors=input_errors,
            settings=_settings(inputs, options),
        )
        writer.files.write(REPORT_NAME, json.dumps(report, ensure_ascii=False, indent=2) + "\n")
        writer.files.finish()
    except BaseException:
        writer.abort()  # nothing was renamed: the previous outputs are untouched
        raise
    _publish(writer.files, outputs, stale=previous - set(outputs), parked=parked)
    return BuildResult(report, shards_total=len(shards), shards_computed=computed)


# ---------------------------------------------------------------- per-record stages (parallel)


def _run_record_stages(inputs: list[InputFile], work: WorkDir, options: BuildOptions) -> tuple[list[ShardRef], int, list[str]]:
    """Process every shard that has no result yet; returns all shards in input order."""
    shards: list[ShardRef] = []
    input_errors: list[str] = []
    computed = 0
    with tqdm(desc="records", unit="rec", file=sys.stderr, disable=not options.progress) as bar:
        tasks = _pending_tasks(inputs, work, options, shards, input_errors, bar)
        for count in _execute(tasks, options.workers, options.config):
            computed += 1
            bar.update(count)
    return shards, computed, input_errors


def _pending_tasks(
    inputs: list[InputFile],
    work: WorkDir,
    options: BuildOptions,
    shards: list[ShardRef],
    input_errors: list[str],
    bar: tqdm,
) -> Iterator[ShardTask]:
    """Slice the inputs into shards; yield those without a finished result, skip (and list) the rest."""
    for file_index, source in enumerate(inputs):
        chunks = _chunks(source, options.shard_size, options.config.image.max_file_bytes, input_errors)
        for chunk_index, items in enumerate(chunks):
            path = work.shard_path(file_index, chunk_index)
            shards.append(ShardRef(path, source.display))
            if path.exists():
                bar.update(len(items))
                continue
            yield ShardTask(source, items, path)


def _chunks(source: InputFile, size: int, max_member_bytes: int, input_errors: list[str]) -> Iterator[list[RawItem]]:
    """Consecutive items of one file, `size` at a time; a file that breaks part-way is noted, not fatal."""
    chunk: list[RawItem] = []
    try:
        for item in iter_items(source, max_member_bytes):
            chunk.append(item)
            if len(chunk) == size:
                yield chunk
                chunk = []
    except InputReadError as err:
        input_errors.append(str(err))
    if chunk:
        yield chunk


def _execute(tasks: Iterator[ShardTask], workers: int, config: FilterConfig) -> Iterator[int]:
    """Run shard tasks in this process or a process pool; yields each finished shard's record count.

    At most 2 x workers shards are in flight, so memory stays bounded however large the input.
    """
    if workers == 1:
        processor = RecordProcessor(config)
        for task in tasks:
            yield process_shard(task, processor)
        return
    context = multiprocessing.get_context("spawn")  # no inherited locks or threads; same on every OS
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(config,)) as pool:
        pending: deque[Future[int]] = deque()
        try:
            for task in tasks:
                pending.append(pool.submit(_process_in_worker, task))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except BrokenProcessPool:
            raise WorkerCrashed("a worker process died unexpectedly (killed by a signal or out of memory)") from None


_worker_processor: RecordProcessor | None = None


def _init_worker(config: FilterConfig) -> None:
    """Build the stages (jieba, OpenCC tables) once per worker process, not once per shard."""
    global _worker_processor
    _worker_processor = RecordProcessor(config)


def _process_in_worker(task: ShardTask) -> int:
    assert _worker_processor is not None, "worker not initialised"
    return process_shard(task, _worker_processor)


# ---------------------------------------------------------------- global stages (input order)


def _select(shards: list[ShardRef], options: BuildOptions, tally: Tally) -> tuple[dict[int, list[tuple[int, str, int]]], dict[str, int]]:
    """Dedup, cap and split; returns per shard the (row, split, id) of each kept pair, and split sizes."""
    survivors = _deduplicate(shards, options, tally)
    capped = _apply_cap(survivors, shards, options, tally)
    plan: dict[int, list[tuple[int, str, int]]] = {}
    split_counts = {name: 0 for name, fraction in options.splits if fraction > 0}
    next_id = 1
    for order, survivor in enumerate(survivors):
        if order in capped:
            continue
        split = assign_split(survivor.sha, options.splits, options.seed)
        plan.setdefault(survivor.shard, []).append((survivor.row, split, next_id))
        split_counts[split] += 1
        tally.add_kept(shards[survivor.shard].file, survivor.query)
        next_id += 1
    return plan, split_counts


def _deduplicate(shards: list[ShardRef], options: BuildOptions, tally: Tally) -> list[_Survivor]:
    dedup = Deduplicator(options.config.dedup.phash_max_distance)
    survivors: list[_Survivor] = []
    queries: dict[str, str] = {}  # one string object per distinct query
    for shard_index, shard in enumerate(tqdm(shards, desc="dedup", unit="shard", file=sys.stderr, disable=not options.progress)):
        columns = read_light(shard.path)
        rows = zip(columns["location"], columns["query"], columns["text"], columns["sha"], columns["phash"])
        for row, (location, query, text, sha, phash) in enumerate(rows):
            reason = dedup.check(sha, phash, query, text)
            if reason is not None:
                tally.add_rejected(shard.file, query, reason, location)
            else:
                survivors.append(_Survivor(shard_index, row, queries.setdefault(query, query), sha))
    return survivors


def _apply_cap(survivors: list[_Survivor], shards: list[ShardRef], options: BuildOptions, tally: Tally) -> set[int]:
    """Positions (in `survivors`) dropped by the per-query cap, already counted in the tally."""
    candidates = (
        CapCandidate(order, survivor.query, pair_priority(options.seed, survivor.sha))
        for order, survivor in enumerate(survivors)
    )
    capped, capped_per_query = cap_per_query(candidates, options.per_query_cap)
    for order in sorted(capped):
        survivor = survivors[order]
        tally.add_rejected(shards[survivor.shard].file, survivor.query, Reason.QUERY_CAP, None)
    for query, count in capped_per_query.items():
        tally.add_example(Reason.QUERY_CAP, f"query {query!r}: {count} pairs over the cap of {options.per_query_cap}")
    return capped


# ---------------------------------------------------------------- output


def _split_names(options: BuildOptions) -> tuple[str, ...]:
    return tuple(name for name, fraction in options.splits if fraction > 0)


def _write_outputs(writer: Writer, shards: list[ShardRef], plan: dict[int, list[tuple[int, str, int]]], options: BuildOptions) -> list[str]:
    """Every output file, complete on disk under its temporary name; returns the names."""
    for shard_index in tqdm(sorted(plan), desc="write", unit="shard", file=sys.stderr, disable=not options.progress):
        rows = plan[shard_index]
        records = read_rows(shards[shard_index].path, [row for row, _, _ in rows])
        for (_, split, pair_id), record in zip(rows, records):
            writer.add(Pair(pair_id, split, record["text"], record["query"], record["jpeg"], _pair_meta(record)))
        crash_point("pairs-output")  # part of the output written, under temporary names
    return writer.finish()


def _publish(files: StagedFiles, outputs: list[str], stale: set[str], parked: Path) -> None:
    """Rename the finished outputs into place, drop the previous run's leftovers, then the report.

    Only renames and deletions happen here, so a full disk can no longer interrupt it; a kill can,
    and the rerun finishes the job (the old report's list of outputs survives in `parked`).
    """
    report = files.out / REPORT_NAME
    if report.exists():
        os.replace(report, parked)  # from now until the new report lands, DIR reads as incomplete
    files.publish(outputs)
    for name in sorted(stale):
        (files.out / name).unlink(missing_ok=True)
    crash_point("pairs-report")  # every output in place, the report not yet
    files.publish([REPORT_NAME])
    parked.unlink(missing_ok=True)


def _pair_meta(record: dict[str, Any]) -> dict[str, Any]:
    """Provenance kept beside each pair: where it came from and the input's unknown fields."""
    return {
        "url": record["url"],
        "page_url": record["page_url"],
        "source": record["location"],
        "text_field": record["text_field"],
        "width": record["width"],
        "height": record["height"],
        "extra": json.loads(record["meta"]),
    }


def _settings(inputs: list[InputFile], options: BuildOptions) -> dict[str, Any]:
    return {
        "inputs": [source.display for source in inputs],
        "format": options.format,
        "per_query_cap": options.per_query_cap,
        "splits": dict(options.splits),
        "seed": options.seed,
        "shard_size": options.shard_size,
        "filters": options.config.to_dict(),
    }


def _listed_outputs(report: Path) -> set[str]:
    """Output files a previous run's report lists (so that a rerun writing fewer, e.g. tar shards, removes the rest)."""
    try:
        previous = json.loads(report.read_text(encoding="utf-8"))["outputs"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    if not isinstance(previous, list):
        return set()
    return {
        name for name in previous
        if isinstance(name, str) and name != REPORT_NAME and "/" not in name and "\\" not in name and not name.startswith(".")
    }
