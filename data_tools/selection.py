"""The global stages of build-pairs, over every accepted record in input order.

1. score    (with --model) image-text similarity of every record; --min-similarity / --keep-top
            drop records as `low_similarity` (a property of the record itself, like its caption,
            so it runs before dedup: a copy with a better caption can still be kept)
2. group    duplicate groups: identical image, pHash and colour neighbour, semantic neighbour (with --model),
            same (query, text); the first record of a group is its representative
3. cap      per query over groups; a group refused by its representative's query is offered to
            the query of its next copy (data_tools.cap), so a picture survives when any copy can
4. account  every record gets exactly one fate, in input order: kept; `query_cap` when its
            query refused its group; else the duplicate reason relating it to its group
5. split    leak-free groups (shared caption, pHash-and-colour and semantic neighbourhoods) go whole to
            one split (data_tools.split)

Memory: a few small fields per accepted record (hashes, query, caption), held in arrays, and, with
--model, its image embedding; never the images.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_tools.accepted import AcceptedRecords, read_accepted
from data_tools.cap import CapGroups, cap_groups, pair_priority
from data_tools.dedup import DEDUP_BATCH, Deduplicator
from data_tools.records import Reason
from data_tools.report import MAX_EXAMPLES, Tally
from data_tools.scoring import (
    Embeddings,
    ScoringOptions,
    WorkImages,
    embed_records,
    histogram,
    select_by_similarity,
)
from data_tools.semantic import SemanticIndex, similar_pairs
from data_tools.split import assign_split, colour_array, leak_free_groups

_FATES = (None, *Reason)  # a record's fate as a small integer: its index here (0: kept)
_FATE_CODE = {fate: code for code, fate in enumerate(_FATES)}
_KEPT, _QUERY_CAP, _LOW_SIMILARITY = 0, _FATE_CODE[Reason.QUERY_CAP], _FATE_CODE[Reason.LOW_SIMILARITY]


@dataclass(frozen=True)
class Choice:
    row: int
    split: str
    id: int
    similarity: float | None


@dataclass
class Selection:
    plan: dict[int, list[Choice]]  # shard index -> kept rows, in input order
    split_counts: dict[str, int]
    report: dict[str, Any] = field(default_factory=dict)  # extra report.json sections


def select(shard_paths: list[Path], shard_files: list[str], work_identity: str, *, config, splits, seed: int,
           per_query_cap: int, scoring: ScoringOptions | None, tally: Tally, progress: bool) -> Selection:
    records, counts = read_accepted(shard_paths, progress)
    report: dict[str, Any] = {}
    embeddings: Embeddings | None = None
    passed = np.ones(len(records), dtype=bool)
    if scoring is not None and len(records):
        images = WorkImages(shard_paths, counts, records.sha, work_identity)
        embeddings = embed_records(images, records.text, scoring, shard_paths[0].parent.parent / "image_features",
                                   progress)
        passed = select_by_similarity(embeddings.similarity, records.query, scoring)
        report["similarity"] = {
            "model": scoring.model, "min_similarity": scoring.min_similarity, "keep_top": scoring.keep_top,
            "per_query": scoring.per_query, "removed": int((~passed).sum()),
            "histogram": histogram(embeddings.similarity),
        }

    group_of, duplicate_reason = _group(records, passed, embeddings, config.dedup)
    groups, members = _cap_groups(records, group_of, seed)
    keep = cap_groups(groups, per_query_cap)
    fate, kept_copy = _fates(groups, members, keep, duplicate_reason, len(records))
    del group_of, duplicate_reason, groups, members, keep
    kept = _account(records, fate, kept_copy, shard_files, tally, per_query_cap)

    selection = Selection({}, {name: 0 for name, fraction in splits if fraction > 0}, report)
    split_of = _leak_free_splits(records, kept, embeddings, config.split, splits, seed, report)
    rows = zip(kept.tolist(), records.shard[kept].tolist(), records.row[kept].tolist(), split_of)
    for pair_id, (number, shard, row, split) in enumerate(rows, start=1):
        similarity = float(embeddings.similarity[number]) if embeddings is not None else None
        selection.plan.setdefault(shard, []).append(Choice(row, split, pair_id, similarity))
        selection.split_counts[split] += 1
    return selection


def _group(records: AcceptedRecords, passed: np.ndarray, embeddings: Embeddings | None, dedup_config) -> tuple[np.ndarray, np.ndarray]:
    """Each record's duplicate group (-1: it did not pass scoring; groups are numbered in the order of
    their representatives, the first record of each) and, for the other members, the duplicate reason
    (a _FATES code)."""
    semantic = None
    if embeddings is not None and dedup_config.semantic_threshold is not None:
        semantic = SemanticIndex(embeddings.images.shape[1], dedup_config.semantic_threshold)
    dedup = Deduplicator(dedup_config.phash_max_distance, semantic, dedup_config.colour_max_distance)
    group_of = np.full(len(records), -1, dtype=np.int64)
    reason = np.zeros(len(records), dtype=np.int8)
    groups = 0
    numbers = np.flatnonzero(passed).tolist()
    for start in range(0, len(numbers), DEDUP_BATCH):
        batch = numbers[start:start + DEDUP_BATCH]
        duplicates = dedup.check_many(batch, records.sha.take(batch), records.phash[batch].tolist(),
                                      records.query.take(batch), records.text.take(batch),
                                      embeddings.images[batch] if embeddings is not None else None,
                                      records.colour.take(batch))
        for number, duplicate in zip(batch, duplicates):
            if duplicate is None:
                group_of[number] = groups
                groups += 1
            else:
                group_of[number] = group_of[duplicate.of]
                reason[number] = _FATE_CODE[duplicate.reason]
    return group_of, reason


def _cap_groups(records: AcceptedRecords, group_of: np.ndarray, seed: int) -> tuple[CapGroups, np.ndarray]:
    """The groups as the cap needs them (each member's query, the representative's rank) and their
    members' record numbers in the same order: group after group, each group's in input order."""
    members = np.flatnonzero(group_of >= 0)
    members = members[np.argsort(group_of[members], kind="stable")]
    starts = np.searchsorted(group_of[members], np.arange(int(group_of.max(initial=-1)) + 2))
    representatives = members[starts[:-1]]
    priority = np.empty(len(representatives), dtype=np.uint64)
    for lo in range(0, len(representatives), 65536):  # a batch of image digests as bytes objects at a time
        shas = records.sha.take(representatives[lo:lo + 65536])
        priority[lo:lo + len(shas)] = [pair_priority(seed, sha) for sha in shas]
    return CapGroups(priority, records.query.codes[members].astype(np.int64), starts), members


def _fates(groups: CapGroups, members: np.ndarray, keep: np.ndarray, duplicate_reason: np.ndarray,
           n: int) -> tuple[np.ndarray, np.ndarray]:
    """Every record's fate (a _FATES code) and, for a duplicate dropped in favour of its group's kept
    copy, that copy's record number (-1 elsewhere). In a group the cap kept through member k, the
    members before k were refused by their queries, so every member sharing one of those queries is
    `query_cap` (the representative, when not kept, always is); the others are duplicates of the kept
    copy. A group the cap dropped is `query_cap` throughout. Records that never reached dedup keep
    `low_similarity`."""
    group, position, first_position = groups.layout
    kept_at = keep[group]
    limit = np.where(kept_at >= 0, kept_at, np.diff(groups.starts)[group])  # the positions that refused the group
    refused = first_position < limit  # the member's query is one of theirs
    kept = position == kept_at
    fate = np.full(n, _LOW_SIMILARITY, dtype=np.int8)
    fate[members] = np.where(kept, _KEPT, np.where(refused, _QUERY_CAP, duplicate_reason[members]))
    kept_copy = np.full(n, -1, dtype=np.int64)
    duplicate = ~kept & ~refused
    kept_copy[members[duplicate]] = members[groups.starts[group[duplicate]] + kept_at[duplicate]]
    return fate, kept_copy


def _account(records: AcceptedRecords, fate: np.ndarray, kept_copy: np.ndarray, shard_files: list[str], tally: Tally,
             cap: int) -> np.ndarray:
    """Count every record's fate (`fate`: indices into _FATES) per file and per query, with the first
    examples of each reason in input order; returns the kept record numbers. Counted with bincount, not
    a Python step per record."""
    code = {name: at for at, name in enumerate(dict.fromkeys(shard_files))}  # input files, in input order
    files = list(code)
    file_of = np.array([code[name] for name in shard_files], dtype=np.int64)[records.shard]
    per_file = np.bincount(file_of * len(_FATES) + fate, minlength=len(files) * len(_FATES)).reshape(len(files), len(_FATES))
    for file, counts in zip(files, per_file.tolist()):
        tally.add_counts(file, counts[_KEPT], {_FATES[f]: n for f, n in enumerate(counts) if f != _KEPT and n})
    query_of, names = records.query.codes, records.query.names
    kept_q, rejected_q, capped_q = (np.bincount(query_of[mask], minlength=len(names)).tolist()
                                    for mask in (fate == _KEPT, fate != _KEPT, fate == _QUERY_CAP))
    for name, kept_n, rejected_n, capped_n in zip(names, kept_q, rejected_q, capped_q):
        if kept_n or rejected_n:
            tally.add_query_counts(name, kept_n, rejected_n, capped_n)
    for f in np.unique(fate).tolist():
        if f in (_KEPT, _QUERY_CAP):
            continue
        for number in np.flatnonzero(fate == f)[:MAX_EXAMPLES].tolist():
            if not tally.wants_example(_FATES[f]):
                break
            example = records.location[number]
            if kept_copy[number] >= 0:
                example = f"{example}: repeats {records.location[int(kept_copy[number])]}"
            tally.add_example(_FATES[f], example)
    capped = np.flatnonzero(fate == _QUERY_CAP)
    codes, first = np.unique(query_of[capped], return_index=True)
    for code in codes[np.argsort(first)][:MAX_EXAMPLES].tolist():  # queries in the order they were first capped
        tally.add_example(Reason.QUERY_CAP, f"query {names[code]!r}: {capped_q[code]} pairs over the cap of {cap}")
    return np.flatnonzero(fate == _KEPT)


def _leak_free_splits(records: AcceptedRecords, kept: np.ndarray, embeddings: Embeddings | None, split_config, splits, seed: int,
                      report: dict[str, Any]) -> list[str]:
    """The split of each kept record: its leak-free group's, decided by the group's first image."""
    semantic_pairs: Iterable[tuple[np.ndarray, np.ndarray]] = ()
    if embeddings is not None and split_config.semantic_threshold is not None and len(kept):
        semantic_pairs = similar_pairs(embeddings.images[kept], split_config.semantic_threshold)
    groups = leak_free_groups(records.text.take(kept), records.phash[kept], split_config.phash_max_distance,
                              semantic_pairs, colours=colour_array(records.colour.take(kept)),
                              colour_max_distance=split_config.colour_max_distance)
    roots = [groups.find(i) for i in range(len(kept))]
    sizes: dict[int, int] = {}
    for root in roots:
        sizes[root] = sizes.get(root, 0) + 1
    report["split_groups"] = {"groups": len(sizes), "largest": max(sizes.values(), default=0),
                              "pairs_in_shared_groups": sum(n for n in sizes.values() if n > 1)}
    shas = records.sha.take(kept)
    return [assign_split(shas[root], splits, seed) for root in roots]
