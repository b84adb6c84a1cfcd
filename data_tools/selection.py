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

Memory: a few small fields per accepted record (hashes, query, caption) and, with --model, its
image embedding; never the images.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from data_tools.cap import CapGroup, cap_groups, pair_priority
from data_tools.dedup import Deduplicator
from data_tools.records import Reason
from data_tools.report import Tally
from data_tools.scoring import Embeddings, ScoringOptions, WorkImages, embed_records, histogram, select_by_similarity
from data_tools.semantic import SemanticIndex, similar_pairs
from data_tools.shards import read_light
from data_tools.split import assign_split, colour_array, leak_free_groups

KEPT = None


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


@dataclass
class _Records:
    """The light columns of every accepted record, in input order."""

    shard: list[int] = field(default_factory=list)
    row: list[int] = field(default_factory=list)
    location: list[str] = field(default_factory=list)
    query: list[str] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    sha: list[bytes] = field(default_factory=list)
    phash: list[int] = field(default_factory=list)
    colour: list[bytes] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.shard)


def select(shard_paths: list[Path], shard_files: list[str], work_identity: str, *, config, splits, seed: int,
           per_query_cap: int, scoring: ScoringOptions | None, tally: Tally, progress: bool) -> Selection:
    records, counts = _read_records(shard_paths, progress)
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

    members, reasons = _group(records, passed, embeddings, config.dedup)
    groups = [CapGroup(pair_priority(seed, records.sha[m[0]]), tuple(records.query[i] for i in m)) for m in members]
    chosen = cap_groups(groups, per_query_cap)
    fate: list[Reason | None] = [Reason.LOW_SIMILARITY] * len(records)
    kept_copy: dict[int, int] = {}  # a dropped duplicate -> the copy of its group that is kept
    for g, group in enumerate(members):
        keep = chosen.get(g)
        refused = {groups[g].queries[p] for p in range(len(group) if keep is None else keep)}
        for position, number in enumerate(group):
            if position == keep:
                fate[number] = KEPT
            elif records.query[number] in refused:
                fate[number] = Reason.QUERY_CAP  # the representative, when not kept, is always here
            else:
                fate[number] = reasons[number]
                kept_copy[number] = group[keep]
    kept = _account(records, fate, kept_copy, shard_files, tally, per_query_cap)

    selection = Selection({}, {name: 0 for name, fraction in splits if fraction > 0}, report)
    split_of = _leak_free_splits(records, kept, embeddings, config.split, splits, seed, report)
    for pair_id, (number, split) in enumerate(zip(kept, split_of), start=1):
        similarity = float(embeddings.similarity[number]) if embeddings is not None else None
        selection.plan.setdefault(records.shard[number], []).append(Choice(records.row[number], split, pair_id, similarity))
        selection.split_counts[split] += 1
    return selection


def _read_records(shard_paths: list[Path], progress: bool) -> tuple[_Records, list[int]]:
    records = _Records()
    queries: dict[str, str] = {}  # one string object per distinct query
    counts = []
    for index, path in enumerate(tqdm(shard_paths, desc="dedup", unit="shard", file=sys.stderr, disable=not progress)):
        columns = read_light(path)
        counts.append(len(columns["sha"]))
        for row, (location, query, text, sha, phash, colour) in enumerate(zip(
                columns["location"], columns["query"], columns["text"], columns["sha"], columns["phash"],
                columns["colour"])):
            records.shard.append(index)
            records.row.append(row)
            records.location.append(location)
            records.query.append(queries.setdefault(query, query))
            records.text.append(text)
            records.sha.append(sha)
            records.phash.append(phash)
            records.colour.append(colour)
    return records, counts


def _group(records: _Records, passed: np.ndarray, embeddings: Embeddings | None, dedup_config):
    """Duplicate groups (record numbers, representative first) and each member's duplicate reason."""
    semantic = None
    if embeddings is not None and dedup_config.semantic_threshold is not None:
        semantic = SemanticIndex(embeddings.images.shape[1], dedup_config.semantic_threshold)
    dedup = Deduplicator(dedup_config.phash_max_distance, semantic, dedup_config.colour_max_distance)
    group_of: dict[int, int] = {}  # representative -> group index
    members: list[list[int]] = []
    reasons: dict[int, Reason] = {}
    for number in np.flatnonzero(passed).tolist():
        vector = embeddings.images[number] if embeddings is not None else None
        duplicate = dedup.check(number, records.sha[number], records.phash[number], records.query[number],
                                records.text[number], vector, records.colour[number])
        if duplicate is None:
            group_of[number] = len(members)
            members.append([number])
        else:
            members[group_of[duplicate.of]].append(number)
            reasons[number] = duplicate.reason
    return members, reasons


def _account(records: _Records, fate: list[Reason | None], kept_copy: dict[int, int], shard_files: list[str],
             tally: Tally, cap: int) -> list[int]:
    """Count every record's fate in input order (so the examples are the first ones); returns the kept."""
    kept = []
    capped: dict[str, int] = {}
    for number, reason in enumerate(fate):
        file, query = shard_files[records.shard[number]], records.query[number]
        if reason is KEPT:
            tally.add_kept(file, query)
            kept.append(number)
            continue
        example: str | None = records.location[number]
        if number in kept_copy:
            example = f"{example}: repeats {records.location[kept_copy[number]]}"
        elif reason is Reason.QUERY_CAP:
            capped[query] = capped.get(query, 0) + 1
            example = None
        tally.add_rejected(file, query, reason, example)
    for query, count in capped.items():
        tally.add_example(Reason.QUERY_CAP, f"query {query!r}: {count} pairs over the cap of {cap}")
    return kept


def _leak_free_splits(records: _Records, kept: list[int], embeddings: Embeddings | None, split_config, splits, seed: int,
                      report: dict[str, Any]) -> list[str]:
    """The split of each kept record: its leak-free group's, decided by the group's first image."""
    semantic_pairs: Iterable[tuple[np.ndarray, np.ndarray]] = ()
    if embeddings is not None and split_config.semantic_threshold is not None and kept:
        semantic_pairs = similar_pairs(embeddings.images[kept], split_config.semantic_threshold)
    groups = leak_free_groups([records.text[n] for n in kept], np.array([records.phash[n] for n in kept], dtype=np.uint64),
                              split_config.phash_max_distance, semantic_pairs,
                              colours=colour_array([records.colour[n] for n in kept]),
                              colour_max_distance=split_config.colour_max_distance)
    roots = [groups.find(i) for i in range(len(kept))]
    sizes: dict[int, int] = {}
    for root in roots:
        sizes[root] = sizes.get(root, 0) + 1
    report["split_groups"] = {"groups": len(sizes), "largest": max(sizes.values(), default=0),
                              "pairs_in_shared_groups": sum(n for n in sizes.values() if n > 1)}
    return [assign_split(records.sha[kept[root]], splits, seed) for root in roots]
