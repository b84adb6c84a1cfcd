"""build-pairs, top to bottom.

1. read      main process slices each dump into shards of raw items (streaming)
2. per-record  workers parse, clean and choose text, check relevance, decode and hash images;
               each shard's result lands atomically in DIR/.work (reused by reruns); with
               --download, URL-only records that pass the text stages are fetched first
               (data_tools.download); shards run here, in a process pool or on Ray (data_tools.engines)
3. score     (with --model) image-text similarity through cnclip's image-embedding cache;
               --min-similarity / --keep-top drop low scorers (data_tools.scoring)
4. dedup     duplicate groups over all accepted records in input order (exact, pHash, semantic
               with --model, (query, text)) (data_tools.dedup)
5. cap       at most N pairs per query by a seeded content hash; a group refused by one query
               is offered to the query of its next copy (data_tools.cap)
6. split     leak-free groups (shared caption, pHash and semantic neighbours) to one split each
               (data_tools.split); steps 3-6 are orchestrated by data_tools.selection
7. write     the chosen format and report.json under temporary names, all complete on disk
               before the first is renamed into place; report.json is renamed last

Steps 3-7 see records in input order whatever the number of workers, so the output bytes do
not depend on --workers, and a resumed run writes the same bytes as an uninterrupted one.

Crash safety: a file under its final name is always complete. While outputs are being renamed
into place, report.json is absent (moved to DIR/.work/previous-report.json, which remembers the
old outputs so a rerun can still remove the ones it no longer writes): a DIR holding report.json
holds exactly the complete outputs that report lists. A run killed anywhere leaves only
temporary names, removed by the next run, which resumes from the finished shards.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from cnclip.faults import crash_point
from data_tools.config import FilterConfig
from data_tools.files import StagedFiles, remove_temporaries
from data_tools.readers import InputFile, InputReadError, discover_inputs, iter_items
from data_tools.records import RawItem
from data_tools.report import Tally, build_report
from data_tools.scoring import ScoringOptions
from data_tools.selection import Choice, select
from data_tools.download import DownloadOptions
from data_tools.download_stats import DownloadStats
from data_tools.engines import StageSettings, run_shards
from data_tools.shards import ShardTask, WorkDir, fingerprint, read_download_stats, read_retryable, read_rows, read_tally
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
    scoring: ScoringOptions | None = None  # --model and its filters; None: no model stage
    download: DownloadOptions | None = None  # --download: fetch URL-only records (data_tools.download)
    retry_failed: bool = False  # rerun the finished shards' retryable download failures
    engine: str = "local"  # or "ray" (data_tools.engines); never changes the output
    ray_address: str | None = None


@dataclass(frozen=True)
class BuildResult:
    report: dict[str, Any]
    shards_total: int
    shards_computed: int  # the rest were reused from DIR/.work


@dataclass(frozen=True)
class ShardRef:
    path: Path
    file: str  # the input file's display name, for accounting


def build_pairs(options: BuildOptions) -> BuildResult:
    """Run the whole pipeline; raises readers.InputError for unusable INPUT paths."""
    inputs = discover_inputs(list(options.inputs), exclude=options.out)
    options.out.mkdir(parents=True, exist_ok=True)
    remove_temporaries(options.out)  # what a killed run left half-written
    work_identity = fingerprint(inputs, options.config, options.shard_size, options.download)
    work = WorkDir(options.out / ".work", work_identity)
    tally = Tally()
    for source in inputs:
        tally.add_file(source.display)
    shards, computed, input_errors = _run_record_stages(inputs, work, options)
    downloads = DownloadStats()
    for shard in shards:
        tally.merge(read_tally(shard.path))
        downloads.merge(read_download_stats(shard.path))
    selection = select([shard.path for shard in shards], [shard.file for shard in shards], work_identity,
                       config=options.config, splits=options.splits, seed=options.seed,
                       per_query_cap=options.per_query_cap, scoring=options.scoring, tally=tally,
                       progress=options.progress)
    parked = work.root / PARKED_REPORT
    previous = _listed_outputs(options.out / REPORT_NAME) | _listed_outputs(parked)
    writer = make_writer(options.format, options.out, _split_names(options))
    try:
        outputs = _write_outputs(writer, shards, selection.plan, options)
        report = build_report(
            tally,
            splits=selection.split_counts,
            split_fractions=dict(options.splits),
            outputs=outputs + [REPORT_NAME],
            input_errors=input_errors,
            settings=_settings(inputs, options),
        )
        report.update(selection.report)  # similarity histogram, split groups
        if options.download is not None:
            report["downloads"] = downloads.to_report()  # success rate, per-host top failures
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
        settings = StageSettings(options.config, options.download)
        for count in run_shards(tasks, settings, options.engine, options.workers, options.ray_address):
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
                retry = len(read_retryable(path)) if options.retry_failed else 0
                bar.update(len(items) - retry)
                if retry:
                    yield ShardTask(source, items, path, retry=True)  # only its retryable failures
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


# ---------------------------------------------------------------- global stages (input order)


# ---------------------------------------------------------------- output


def _split_names(options: BuildOptions) -> tuple[str, ...]:
    return tuple(name for name, fraction in options.splits if fraction > 0)


def _write_outputs(writer: Writer, shards: list[ShardRef], plan: dict[int, list[Choice]], options: BuildOptions) -> list[str]:
    """Every output file, complete on disk under its temporary name; returns the names."""
    for shard_index in tqdm(sorted(plan), desc="write", unit="shard", file=sys.stderr, disable=not options.progress):
        choices = plan[shard_index]
        records = read_rows(shards[shard_index].path, [choice.row for choice in choices])
        for choice, record in zip(choices, records):
            meta = _pair_meta(record)
            if choice.similarity is not None:
                meta["similarity"] = choice.similarity
            writer.add(Pair(choice.id, choice.split, record["text"], record["query"], record["jpeg"], meta))
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
        "scoring": _scoring_settings(options.scoring),
        "download": dataclasses.asdict(options.download) if options.download is not None else None,
    }


def _scoring_settings(scoring: ScoringOptions | None) -> dict[str, Any] | None:
    if scoring is None:
        return None
    return {"model": scoring.model, "min_similarity": scoring.min_similarity, "keep_top": scoring.keep_top,
            "per_query": scoring.per_query, "precision": scoring.precision}


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
