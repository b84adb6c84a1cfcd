"""Output formats: Chinese-CLIP layout, pairs JSONL, webdataset tar shards.

Every file is written under a temporary name in the output directory; the pipeline renames them
into place only once all of them are complete (data_tools.files.StagedFiles), so an interrupted
or out-of-space run never leaves a half-written split that looks complete.
"""

from __future__ import annotations

import base64
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_tools.files import StagedFiles, with_name

FORMATS = ("cnclip", "pairs", "webdataset")
SAMPLES_PER_TAR = 10_000


@dataclass(frozen=True)
class Pair:
    """One output pair. In this data set every kept image carries exactly one text, so one id serves both."""

    id: int
    split: str
    text: str
    query: str
    jpeg: bytes
    meta: dict[str, Any] = field(default_factory=dict)  # url, page_url, source and unknown input fields


class Writer:
    """Base: collects pairs per split into staged files (see data_tools.files.StagedFiles)."""

    def __init__(self, out: Path) -> None:
        self.files = StagedFiles(out)

    def add(self, pair: Pair) -> None:
        raise NotImplementedError

    def finish(self) -> list[str]:
        """Complete every file on disk under its temporary name; returns the names to publish."""
        return self.files.finish()

    def abort(self) -> None:
        self.files.abort()


class CnclipWriter(Writer):
    """Chinese-CLIP layout: `{split}_imgs.tsv`, `{split}_texts.jsonl`, plus `{split}_meta.jsonl` provenance.

    All three files are created for every split, even when empty, so the layout is always complete.
    """

    def __init__(self, out: Path, splits: tuple[str, ...]) -> None:
        super().__init__(out)
        for split in splits:
            for suffix in ("imgs.tsv", "texts.jsonl", "meta.jsonl"):
                self.files.get(f"{split}_{suffix}")

    def add(self, pair: Pair) -> None:
        image = base64.urlsafe_b64encode(pair.jpeg).decode("ascii")
        self.files.write(f"{pair.split}_imgs.tsv", f"{pair.id}\t{image}\n")
        text = {"text_id": pair.id, "text": pair.text, "image_ids": [pair.id]}
        self.files.write(f"{pair.split}_texts.jsonl", _json_line(text))
        meta = {"text_id": pair.id, "image_id": pair.id, "query": pair.query, **pair.meta}
        self.files.write(f"{pair.split}_meta.jsonl", _json_line(meta))


class PairsWriter(Writer):
    """`{split}_pairs.jsonl` lines `{"id", "image" (urlsafe base64 JPEG), "text", "query", "meta"}`."""

    def __init__(self, out: Path, splits: tuple[str, ...]) -> None:
        super().__init__(out)
        for split in splits:
            self.files.get(f"{split}_pairs.jsonl")

    def add(self, pair: Pair) -> None:
        image = base64.urlsafe_b64encode(pair.jpeg).decode("ascii")
        line = {"id": str(pair.id), "image": image, "text": pair.text, "query": pair.query, "meta": pair.meta}
        self.files.write(f"{pair.split}_pairs.jsonl", _json_line(line))


class WebdatasetWriter(Writer):
    """`{split}-{n:05d}.tar` shards of `{id:09d}.jpg/.txt/.json`, byte-identical across reruns."""

    def __init__(self, out: Path, splits: tuple[str, ...]) -> None:
        super().__init__(out)
        self._counts = {split: 0 for split in splits}
        self._tars: dict[str, tarfile.TarFile] = {}  # the open shard of each split
        self._tar_names: dict[str, str] = {}

    def add(self, pair: Pair) -> None:
        count = self._counts[pair.split]
        name = f"{pair.split}-{count // SAMPLES_PER_TAR:05d}.tar"
        if count % SAMPLES_PER_TAR == 0:
            self._close_tar(pair.split)
            handle = self.files.get(name, binary=True)
            self._tars[pair.split] = tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT)
            self._tar_names[pair.split] = name
        self._counts[pair.split] = count + 1
        key = f"{pair.id:09d}"
        info = {"id": str(pair.id), "text": pair.text, "query": pair.query, **pair.meta}
        tar = self._tars[pair.split]
        try:
            for member, data in ((f"{key}.jpg", pair.jpeg), (f"{key}.txt", pair.text.encode()), (f"{key}.json", _json_line(info).encode())):
                _add_member(tar, member, data)
        except OSError as err:
            raise with_name(err, self.files.out / self._tar_names[pair.split]) from None

    def finish(self) -> list[str]:
        for split in list(self._tars):
            self._close_tar(split)
        return super().finish()

    def abort(self) -> None:
        self._tars.clear()  # their handles are closed (and the temporaries deleted) by StagedFiles.abort
        super().abort()

    def _close_tar(self, split: str) -> None:
        tar = self._tars.pop(split, None)
        if tar is not None:
            try:
                tar.close()  # writes the end-of-archive blocks
            except OSError as err:
                raise with_name(err, self.files.out / self._tar_names[split]) from None
            self.files.close(self._tar_names[split])


def make_writer(fmt: str, out: Path, splits: tuple[str, ...]) -> Writer:
    writers = {"cnclip": CnclipWriter, "pairs": PairsWriter, "webdataset": WebdatasetWriter}
    return writers[fmt](out, splits)


def _json_line(value: dict[str, Any]) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=False) + "\n"


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))
