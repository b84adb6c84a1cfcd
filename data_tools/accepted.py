"""The light columns of every accepted record (location, query, caption, image digest, pHash, colour
signature, shard and row), read back from the shard files for the global stages (data_tools.selection)
and held in arrays, not as a Python object per value: Arrow buffers for strings and bytes, numpy for
numbers, a code per record for the query.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from data_tools.shards import read_light


class _Column(Sequence):
    """One string or bytes column of every accepted record, kept in Arrow's buffers: a value costs its
    bytes and an 8-byte offset, where a Python str or bytes object costs 33-74 bytes more. Python
    objects are made only for the values asked for, a batch at a time (`take`, slices)."""

    def __init__(self, pieces: list[pa.Array], kind: pa.DataType) -> None:
        # 64-bit offsets: a 100M-record crawl's captions pass 2 GiB
        self._array = pa.concat_arrays([piece.cast(kind) for piece in pieces]) if pieces else pa.array([], type=kind)

    def __len__(self) -> int:
        return len(self._array)

    def __getitem__(self, number):
        if isinstance(number, slice):
            return self._array[number].to_pylist()
        return self._array[number].as_py()

    def __iter__(self) -> Iterator[Any]:
        for start in range(0, len(self._array), 65536):
            yield from self._array[start:start + 65536].to_pylist()

    def take(self, numbers: Sequence[int] | np.ndarray) -> list[Any]:
        return self._array.take(pa.array(numbers, type=pa.int64())).to_pylist()


class _Queries(Sequence):
    """Each record's query as a code into the distinct queries (4 bytes a record; crawls repeat a query
    thousands of times)."""

    def __init__(self) -> None:
        self._code: dict[str, int] = {}  # while reading: each distinct query's code
        self._pieces: list[np.ndarray] = []
        self.codes = np.empty(0, dtype=np.int32)
        self.names = np.empty(0, dtype=object)  # the distinct queries, indexable by an array of codes

    def extend(self, column: pa.ChunkedArray) -> None:
        encoded = column.combine_chunks().dictionary_encode()
        mapping = np.array([self._code.setdefault(name, len(self._code)) for name in encoded.dictionary.to_pylist()],
                           dtype=np.int32)
        self._pieces.append(mapping[encoded.indices.to_numpy(zero_copy_only=False)] if len(mapping) else
                            np.empty(0, dtype=np.int32))

    def finish(self) -> None:
        self.names = np.array(list(self._code), dtype=object)
        self.codes = np.concatenate(self._pieces) if self._pieces else np.empty(0, dtype=np.int32)
        self._code, self._pieces = {}, []

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, number):
        return self.take(number) if isinstance(number, slice) else self.names[self.codes[number]]

    def take(self, numbers: Sequence[int] | np.ndarray | slice) -> list[str]:
        """The queries of these records: references to the distinct query strings, no copies."""
        return self.names[self.codes[numbers]].tolist()

    def __iter__(self) -> Iterator[str]:
        return iter(self.take(slice(None)))


@dataclass
class AcceptedRecords:
    """The light columns of every accepted record, in input order, as arrays: about 190 bytes a record
    (benchmarks/scale.py's captions), where a Python object per value took about 450 at 1M records
    (tests/test_scale_costs.py bounds it)."""

    shard: np.ndarray  # int32: the record's shard file
    row: np.ndarray  # int32: its row there
    location: _Column
    query: _Queries
    text: _Column
    sha: _Column
    phash: np.ndarray  # uint64
    colour: _Column

    def __len__(self) -> int:
        return len(self.shard)


def read_accepted(shard_paths: list[Path], progress: bool) -> tuple[AcceptedRecords, list[int]]:
    """The light columns of every accepted record, shard after shard, and each shard's record count."""
    columns: dict[str, list[pa.Array]] = {"location": [], "text": [], "sha": [], "colour": []}
    queries, phashes, counts = _Queries(), [], []
    for path in tqdm(shard_paths, desc="dedup", unit="shard", file=sys.stderr, disable=not progress):
        table = read_light(path)
        counts.append(table.num_rows)
        for name, pieces in columns.items():
            pieces.append(table.column(name).combine_chunks())
        queries.extend(table.column("query"))
        phashes.append(table.column("phash").to_numpy())
    queries.finish()
    records = AcceptedRecords(
        shard=np.repeat(np.arange(len(counts), dtype=np.int32), counts),
        row=np.concatenate([np.arange(count, dtype=np.int32) for count in counts]) if counts else np.empty(0, np.int32),
        location=_Column(columns["location"], pa.large_string()), query=queries,
        text=_Column(columns["text"], pa.large_string()), sha=_Column(columns["sha"], pa.large_binary()),
        phash=np.concatenate(phashes).astype(np.uint64, copy=False) if phashes else np.empty(0, np.uint64),
        colour=_Column(columns["colour"], pa.large_binary()))
    return records, counts
