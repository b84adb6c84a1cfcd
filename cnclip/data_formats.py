"""Training data in every format we write or users have: `data.format` cnclip | pairs | webdataset | hf.

Each format is read as an `ImageSource` (cnclip.image_sources: ids, read(id) -> base64 payload,
path, content fingerprint) plus the split's texts, so the image-embedding cache, training and
evaluation serve all of them the same way, and the cache key covers the source's content
whatever its format:

* cnclip      `{split}_imgs.tsv` + `{split}_texts.jsonl` (cnclip.image_sources.ImageTSV)
* pairs       `{split}_pairs.jsonl` as build-pairs writes it: `{"id", "image", "text", ...}`, the image
              base64 (urlsafe or standard) or a path relative to the file's directory
* webdataset  tar shards `{split}-*.tar` (build-pairs --format webdataset), or a folder `{split}/` of
              `*.tar` (an img2dataset output folder): `{key}.jpg|png|webp...` + `{key}.txt` (or a
              `caption`/`text` in `{key}.json`). One streaming pass indexes the members; images
              are then read in place from the tar by offset, never unpacked to disk
* hf          a Hugging Face `datasets` set: a Hub id, a `save_to_disk` directory, a directory of
              data files, or one .parquet/.jsonl/.csv file; `data.image_column` holds the image,
              `data.text_column` one caption or a list of them. Identical images share one id,
              so several captions of a picture are positives of the same image

Every sample without an image or a caption is counted in the SkipLog with where it was.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .errors import DataError
from .image_sources import IMAGE_EXTENSIONS, ImagePathRefused, read_image_file
from .images import decode_base64
from .skiplog import SkipLog
from .tar_members import MAX_IMAGE_MEMBER_BYTES, MAX_TEXT_MEMBER_BYTES, BoundedTar, TarMember, TarReadError

FORMATS = ("cnclip", "pairs", "webdataset", "hf")
TextTuple = tuple[int, str, tuple[int, ...]]  # (text_id, text, image_ids): cnclip.data.TextRecord's fields
DATA_FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


class _TextsMixin:
    """Sources that know their captions: `texts` is filled while indexing."""

    ids: list[int]

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, image_id: int) -> bool:
        return image_id in self._index  # type: ignore[attr-defined]


# ---------------------------------------------------------------- pairs JSONL


class PairsJSONL(_TextsMixin):
    """`{split}_pairs.jsonl`: one image and one caption per line; image id = text id = line number.

    An image path is read only inside the file's directory (cnclip.image_sources.read_image_file):
    a line whose file is refused (leaves it, missing, too large, unreadable) is skipped and counted.
    """

    def __init__(self, path: str | Path, skips: SkipLog):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"pairs file not found: {self.path}")
        self._index: dict[int, int] = {}  # image id -> byte offset of its line
        self.texts: list[TextTuple] = []
        digest = hashlib.blake2b(digest_size=16)
        with open(self.path, "rb") as fh:
            offset = 0
            for lineno, line in enumerate(fh, start=1):
                start, offset = offset, offset + len(line)
                if not line.strip():
                    continue
                where = f"{self.path}:{lineno}"
                try:
                    row = json.loads(line)
                except (UnicodeDecodeError, json.JSONDecodeError):
                    skips.skip("malformed pairs line", where, "not a UTF-8 JSON object")
                    continue
                if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not row["image"]:
                    skips.skip("malformed pairs line", where, "expected an object with an 'image' string")
                    continue
                text = row.get("text")
                if not isinstance(text, str) or not text.strip():
                    skips.skip("malformed pairs line", where, "text must be a non-empty string")
                    continue
                if not _is_base64(row["image"]):  # a path: read only inside the file's directory
                    try:
                        content = read_image_file(row["image"], self.path.parent)
                    except ImagePathRefused as refused:
                        skips.skip(refused.reason, where, refused.detail)
                        continue
                    digest.update(content)  # its content is part of the source
                digest.update(line)
                self._index[lineno] = start
                self.texts.append((lineno, text.strip(), (lineno,)))
        self.ids = list(self._index)
        self.fingerprint = digest.hexdigest()
        self._fh = None

    def read(self, image_id: int) -> bytes:
        if self._fh is None:
            self._fh = open(self.path, "rb")
        self._fh.seek(self._index[image_id])
        image = json.loads(self._fh.readline())["image"]
        if _is_base64(image):
            return image.split(",", 1)[-1].strip().encode("ascii")
        return base64.urlsafe_b64encode(read_image_file(image, self.path.parent))  # ValueError if refused

    def __getstate__(self):
        return {**self.__dict__, "_fh": None}


def _is_base64(value: str) -> bool:
    """Inline image (base64 or a data: URI) rather than a relative path: paths have a dot suffix."""
    return value.startswith("data:") or Path(value).suffix.lower() not in IMAGE_EXTENSIONS


# ---------------------------------------------------------------- webdataset


def webdataset_shards(root: str | Path, split: str) -> list[Path]:
    """`{root}/{split}-*.tar` (build-pairs), else `{root}/{split}/*.tar` (an img2dataset output folder)."""
    root = Path(root)
    shards = sorted(root.glob(f"{split}-*.tar"))
    if not shards and (root / split).is_dir():
        shards = sorted((root / split).glob("*.tar"))
    if not shards:
        raise DataError(f"no webdataset shards for split '{split}': expected {root}/{split}-*.tar or {root}/{split}/*.tar")
    return shards


class WebDatasetShards(_TextsMixin):
    """Samples of uncompressed tar shards; image ids 1..n in shard and member order.

    Members are read through cnclip.tar_members: an image is hashed as it streams past (never held
    while indexing) and read later in place, up to MAX_IMAGE_MEMBER_BYTES; a caption or .json up to
    MAX_TEXT_MEMBER_BYTES. A sample with a member that is never read (too large, sparse, a link or
    device, a name leaving the archive) is skipped whole and counted under that member's problem.
    """

    def __init__(self, shards: list[Path], skips: SkipLog, path: Path | None = None):
        self.path = Path(path) if path is not None else shards[0].parent
        self.shards = list(shards)
        self._index: dict[int, tuple[int, int, int]] = {}  # id -> (shard, data offset, size)
        self.texts: list[TextTuple] = []
        digest = hashlib.blake2b(digest_size=16)
        for shard_number, shard in enumerate(self.shards):
            for sample in self._samples(shard, skips, digest):
                where = f"{shard}:{sample.key}"
                if sample.unread is not None:  # counted under the problem of its first unread member
                    skips.skip(sample.unread.problem.value, where, sample.unread.detail)
                elif sample.image is None:
                    skips.skip("webdataset sample without an image", where)
                elif not sample.caption:
                    skips.skip("webdataset sample without a caption", where)
                else:
                    image_id = len(self._index) + 1
                    self._index[image_id] = (shard_number, *sample.image)
                    self.texts.append((image_id, sample.caption, (image_id,)))
        self.ids = list(self._index)
        self.fingerprint = digest.hexdigest()
        self._handles: dict[int, Any] = {}

    @staticmethod
    def _samples(shard: Path, skips: SkipLog, digest) -> Iterable[_Sample]:
        """Members grouped by key into samples; every member's name and data go into `digest`."""
        sample: _Sample | None = None
        try:
            with BoundedTar(shard) as tar:  # uncompressed: members can be read in place later
                for member in tar.members(_member_limit):
                    if sample is None or member.key != sample.key:
                        if sample is not None:
                            yield sample
                        sample = _Sample(member.key)
                    digest.update(member.name.encode("utf-8", "surrogateescape") + b"\0")
                    if member.problem is not None or sample.unread is not None:
                        digest.update(f"<unread:{member.size}>".encode())  # the sample is skipped: never read
                        sample.unread = sample.unread or member
                    elif _is_image_member(member.ext) and sample.image is None:
                        for piece in tar.chunks(member):
                            digest.update(piece)
                        sample.image = (member.offset, member.size)
                    elif member.ext in ("txt", "json"):
                        data = tar.read(member)
                        digest.update(data)
                        sample.add_text(member.ext, data, lambda: skips.skip(
                            "malformed webdataset json", f"{shard}:{member.name}"))
                    else:  # other members (more images, .cls, ...) are not used: hashed as they stream past
                        for piece in tar.chunks(member):
                            digest.update(piece)
        except TarReadError as exc:
            raise DataError(f"{exc} (webdataset shards are uncompressed tars)") from None
        if sample is not None:
            yield sample

    def image_range(self, image_id: int) -> tuple[int, int, int]:
        """(shard number, byte offset, size) of an image's member inside its tar: it is read in place."""
        return self._index[image_id]

    def read(self, image_id: int) -> bytes:
        shard, offset, size = self.image_range(image_id)
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = open(self.shards[shard], "rb")
        handle.seek(offset)
        return base64.urlsafe_b64encode(handle.read(size))

    def __getstate__(self):
        return {**self.__dict__, "_handles": {}}


def _member_limit(ext: str) -> int | None:
    """Members held in memory have a limit; the rest only stream through the fingerprint."""
    if _is_image_member(ext):
        return MAX_IMAGE_MEMBER_BYTES  # read whole later, by `read`
    return MAX_TEXT_MEMBER_BYTES if ext in ("txt", "json") else None


def _is_image_member(ext: str) -> bool:
    return f".{ext.rpartition('.')[2]}" in IMAGE_EXTENSIONS


@dataclass
class _Sample:
    """One webdataset sample while its members are read."""

    key: str
    image: tuple[int, int] | None = None  # (data offset, size) of its first image member
    text: str = ""  # its .txt
    meta: Any = None  # its .json
    unread: TarMember | None = None  # its first member with a problem: the sample is skipped

    @property
    def caption(self) -> str:
        return self.text or _caption_from(self.meta)

    def add_text(self, ext: str, data: bytes, malformed: Callable[[], None]) -> None:
        if ext == "txt":
            self.text = data.decode("utf-8", errors="replace").strip()
            return
        try:
            self.meta = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            malformed()


def _caption_from(meta: Any) -> str:
    if isinstance(meta, dict):
        for name in ("caption", "text"):
            if isinstance(meta.get(name), str) and meta[name].strip():
                return meta[name].strip()
    return ""


# ---------------------------------------------------------------- Hugging Face datasets


def open_hf(source: str, split: str, config: str | None, image_column: str, streaming: bool):
    """A Hub id, a `save_to_disk` directory, a directory of data files or one data file, images as bytes."""
    import datasets

    path = Path(source)
    try:
        if path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json", "dataset_dict.json")):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DataError(f"'{source}' has no split '{split}'; splits: {', '.join(loaded)}")
                loaded = loaded[split]
            ds = loaded
        elif path.is_file():
            builder = DATA_FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise DataError(f"{path}: unsupported file type; accepted: {', '.join(DATA_FILE_BUILDERS)}")
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", streaming=streaming)
        else:
            ds = datasets.load_dataset(source, config, split=split, streaming=streaming)
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"could not open data set '{source}' (split {split!r}): {exc}") from None
    columns = ds.column_names
    if columns is not None and image_column not in columns:
        raise DataError(f"'{source}' has no column '{image_column}'; columns: {', '.join(columns)}")
    if isinstance(ds.features, datasets.Features) and isinstance(ds.features.get(image_column), datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))  # keep the original bytes
    return ds


def image_bytes_of(value: Any, base_dir: Path | None, also_inside: Sequence[Path] = ()) -> bytes:
    """An image cell as bytes: datasets' {"bytes", "path"} struct, raw bytes, or base64 text.

    A path is read only inside `base_dir` (absolute paths: or inside `also_inside`), through
    cnclip.image_sources.read_image_file: ImagePathRefused (a ValueError) names why it was not.
    """
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if isinstance(data, (bytes, bytearray)) and data:
            return bytes(data)
        if isinstance(path, str) and path and base_dir is not None:
            return read_image_file(path, base_dir, also_inside)
        raise ValueError("image cell has neither bytes nor a readable path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        payload = value.split(",", 1)[-1].strip()  # a data: URI's payload follows its first comma
        return decode_base64(payload)
    raise ValueError(f"unsupported image cell of type {type(value).__name__}")


def captions_of(value: Any) -> list[str]:
    captions = value if isinstance(value, list) else [value]
    return [c.strip() for c in captions if isinstance(c, str) and c.strip()]


class HFImages(_TextsMixin):
    """One split of a `datasets` set; image id = the row of the image's first occurrence.

    A cell holding only a path is read inside the set's directory (a Hub id: the download caches),
    never elsewhere: any other path is counted as refused (`_data_roots`, read_image_file).
    """

    def __init__(self, source: str, split: str, image_column: str, text_column: str, skips: SkipLog):
        self.path = Path(source)
        self._base_dir, self._also_inside = _data_roots(self.path)
        ds = open_hf(source, split, None, image_column, streaming=False)
        if text_column not in ds.column_names:
            raise DataError(f"'{source}' has no column '{text_column}'; columns: {', '.join(ds.column_names)}")
        self._images = ds.select_columns([image_column])
        self._column = image_column
        self._index: dict[int, int] = {}
        self.texts: list[TextTuple] = []
        first_row: dict[bytes, int] = {}
        digest = hashlib.blake2b(digest_size=16)
        rows = ds.select_columns([image_column, text_column]).iter(batch_size=256)
        row = 0
        for batch in rows:
            for cell, captions in zip(batch[image_column], batch[text_column]):
                row += 1
                where = f"{source} [{split}] row {row - 1}"
                texts = captions_of(captions)
                if not texts:
                    skips.skip("row without a caption", where)
                    continue
                try:
                    data = image_bytes_of(cell, self._base_dir, self._also_inside)
                except ImagePathRefused as refused:
                    skips.skip(refused.reason, where, refused.detail)
                    continue
                except (ValueError, OSError) as exc:
                    skips.skip("row without a readable image", where, str(exc))
                    continue
                sha = hashlib.sha256(data).digest()
                image_id = first_row.setdefault(sha, row - 1)
                if image_id == row - 1:
                    self._index[image_id] = image_id
                digest.update(sha + json.dumps(texts, ensure_ascii=False).encode())
                for text in texts:
                    self.texts.append((len(self.texts) + 1, text, (image_id,)))
        self.ids = list(self._index)
        self.fingerprint = digest.hexdigest()

    def read(self, image_id: int) -> bytes:
        cell = self._images[image_id][self._column]
        return base64.urlsafe_b64encode(image_bytes_of(cell, self._base_dir, self._also_inside))


def _data_roots(source: Path) -> tuple[Path, tuple[Path, ...]]:
    """(directory relative image paths are read in, other directories absolute paths may point into).

    A local set: its directory (a data file's folder), and nothing else. A Hub id: where `datasets`
    put what it downloaded, which is where the absolute paths of its image cells point.
    """
    if source.exists():
        return (source if source.is_dir() else source.parent), ()
    import datasets
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE), (Path(datasets.config.HF_DATASETS_CACHE),)


# ---------------------------------------------------------------- dispatch


def open_split(fmt: str, root: str | Path, split: str, skips: SkipLog, image_column: str = "image",
               text_column: str = "text"):
    """(ImageSource, texts or None, where the texts came from) of a split in a non-cnclip format."""
    if fmt == "pairs":
        images = PairsJSONL(Path(root) / f"{split}_pairs.jsonl", skips)
        return images, images.texts, images.path
    if fmt == "webdataset":
        shards = webdataset_shards(root, split)
        images = WebDatasetShards(shards, skips, path=Path(root) / split)
        return images, images.texts, images.path
    if fmt == "hf":
        images = HFImages(str(root), split, image_column, text_column, skips)
        return images, images.texts, images.path
    raise DataError(f"unknown data format {fmt!r}; accepted: {', '.join(FORMATS)}")
