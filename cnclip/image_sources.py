"""Where images come from: a Chinese-CLIP `{split}_imgs.tsv`, or a folder of class sub-folders.

Both speak one small interface, `ImageSource`: `ids`, `read(id)` -> base64 payload, `path` and a
content `fingerprint`. The image-embedding cache and its DataLoader workers serve any source the
same way, so zero-shot folders share the cache (and its guarantees) with training splits.
"""

from __future__ import annotations

import base64
import hashlib
from array import array
import os
import re
from pathlib import Path
from typing import Hashable, Iterator, Mapping, Protocol, Sequence

from .errors import DataError
from .prompts import ClassList
from .skiplog import SkipLog

# File suffixes read as images, wherever images are found by name (folders, tar members, crawl dumps).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


# Largest image file read by path (a pairs file's relative paths, a `datasets` cell's path), and
# largest image member read from a tar: build-pairs' default image.max_file_bytes.
MAX_IMAGE_FILE_BYTES = 50 * 2**20
# A URL (file://, hf://, data:...) is no path; two letters at least: "C:" is a drive, which `escapes`.
_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]+:")


def escapes(name: str) -> bool:
    """A name that is absolute, starts with a Windows drive, or climbs with `..` (either slash): it
    cannot be taken as relative to a data root. The one rule for image paths and tar member names."""
    parts = re.split(r"[\\/]", name)
    return name.startswith(("/", "\\")) or ".." in parts or re.match(r"[A-Za-z]:", name) is not None


class ImagePathRefused(ValueError):
    """An image named by a path that is not read; `reason` is what the row is counted under."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def read_image_file(name: str, root: Path, also_inside: Sequence[Path] = ()) -> bytes:
    """The image file `name`, relative to the data root `root`, read only if it is a regular file inside
    it (or, for an absolute `name`, inside `root` or one of `also_inside`) of at most MAX_IMAGE_FILE_BYTES.

    Refused with ImagePathRefused, never read: "unsafe image path" (`..`, a URL, a NUL, an absolute
    path outside the roots, a symlink resolving outside them), "image file missing" (also a
    directory, FIFO or device: never opened), "image file too large", "unreadable image file".
    """
    if "\0" in name or _URL_SCHEME.match(name) or not _encodable(name):
        raise ImagePathRefused("unsafe image path", f"not a file path: {name[:200]!r}")
    absolute = Path(name).is_absolute()
    if escapes(name) and not absolute:
        raise ImagePathRefused("unsafe image path", f"leaves the data directory: {name[:200]}")
    roots = [root] + (list(also_inside) if absolute else [])
    try:
        allowed = [r.resolve() for r in roots]
        path = (allowed[0] / name).resolve()
        if not any(path.is_relative_to(r) for r in allowed):  # an absolute path elsewhere, a symlink out
            raise ImagePathRefused("unsafe image path", f"resolves outside {', '.join(map(str, roots))}: {name[:200]}")
        if not path.is_file():
            raise ImagePathRefused("image file missing", name[:200])
        if (size := path.stat().st_size) > MAX_IMAGE_FILE_BYTES:
            raise ImagePathRefused("image file too large", f"{name[:200]}: {size} bytes > {MAX_IMAGE_FILE_BYTES}")
        with open(path, "rb") as handle:
            data = handle.read(MAX_IMAGE_FILE_BYTES + 1)  # bounded even if the file grew since stat
    except (OSError, RuntimeError) as exc:  # permissions, name too long, symlink loop
        raise ImagePathRefused("unreadable image file", f"{name[:200]}: {getattr(exc, 'strerror', None) or exc}") from None
    if len(data) > MAX_IMAGE_FILE_BYTES:
        raise ImagePathRefused("image file too large", f"{name[:200]}: more than {MAX_IMAGE_FILE_BYTES} bytes")
    return data


def _encodable(name: str) -> bool:
    """Whether the OS can be given `name` at all (a lone surrogate from a JSON escape cannot)."""
    try:
        os.fsencode(name)
    except UnicodeError:
        return False
    return True


def webdataset_key(member_name: str) -> tuple[str, str]:
    """(sample key, extension) of a tar member as webdataset groups them: members whose names agree up to
    the first dot of the base name are one sample (`a/0001.jpg`, `a/0001.txt` -> key `a/0001`)."""
    folder, _, base = member_name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


class ImageSource(Protocol):
    path: Path
    ids: Sequence[Hashable]  # every image it holds, in a fixed order
    fingerprint: str  # changes whenever any image or the id set changes (the cache key)

    def __len__(self) -> int: ...

    def read(self, image_id) -> bytes:
        """The image's bytes, base64 (urlsafe) encoded; ValueError with a short reason if unreadable."""
        ...


class PayloadSpans(Mapping[int, tuple[int, int]]):
    """image id -> (byte offset, length) of its payload in a TSV, held compactly: the offsets and lengths
    in two int64 arrays (8 bytes each per image), the id -> row dict the only per-image Python entry. A dict
    of (offset, length) tuples held a tuple and two int objects more per image (~90 bytes)."""

    def __init__(self) -> None:
        self.row: dict[int, int] = {}
        self.starts, self.lengths = array("q"), array("q")

    def add(self, image_id: int, start: int, length: int) -> None:
        self.row[image_id] = len(self.starts)
        self.starts.append(start)
        self.lengths.append(length)

    def __getitem__(self, image_id: int) -> tuple[int, int]:
        row = self.row[image_id]
        return self.starts[row], self.lengths[row]

    def __contains__(self, image_id: object) -> bool:
        return image_id in self.row

    def __iter__(self) -> Iterator[int]:
        return iter(self.row)

    def __len__(self) -> int:
        return len(self.row)


class ImageTSV:
    """Random access into a `{split}_imgs.tsv` without holding the images in memory.

    One pass records each image's byte range (`offsets`, compact: PayloadSpans) and hashes the content,
    so the cache key changes whenever any image (or the id set) changes.
    """

    def __init__(self, path: str | Path, skips: SkipLog):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"image file not found: {self.path}")
        self.offsets = PayloadSpans()
        digest = hashlib.blake2b(digest_size=16)
        with open(self.path, "rb") as fh:
            offset = 0
            for lineno, line in enumerate(fh, start=1):
                start = offset
                offset += len(line)
                body = line.rstrip(b"\r\n")
                if not body.strip():
                    continue
                key, tab, payload = body.partition(b"\t")
                where = f"{self.path}:{lineno}"
                try:
                    image_id = int(key)
                except ValueError:
                    skips.skip("malformed image line", where, "expected image_id<TAB>base64")
                    continue
                if not tab or not payload:
                    skips.skip("malformed image line", where, "expected image_id<TAB>base64")
                    continue
                if image_id in self.offsets:
                    skips.skip("duplicate image id", where, f"id {image_id} seen before; first kept")
                    continue
                self.offsets.add(image_id, start + len(key) + 1, len(payload))
                digest.update(body)
                digest.update(b"\n")
        self.ids = list(self.offsets)
        self.fingerprint = digest.hexdigest()
        self._fh = None

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, image_id: int) -> bool:
        return image_id in self.offsets

    def read(self, image_id: int) -> bytes:
        """The raw base64 payload of one image (decoding is the caller's, so it can be counted)."""
        if self._fh is None:  # opened lazily: each DataLoader worker gets its own handle
            self._fh = open(self.path, "rb")
        start, length = self.offsets[image_id]
        self._fh.seek(start)
        return self._fh.read(length)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fh"] = None
        return state

class ImageFolder:
    """DIR/<class_key>/*.jpg|png|...: one sub-folder per class, named by its key in the class list.

    Speaks ImageTSV's interface (ids, read -> base64 payload, path, fingerprint), so the on-disk
    embedding cache and its DataLoader workers serve a folder exactly as they serve a TSV split.
    Anything that is not an image of a known class is counted in the SkipLog or is an error.
    """

    def __init__(self, root: str | Path, classes: ClassList, skips: SkipLog):
        self.path = Path(root)
        if not self.path.is_dir():
            raise DataError(f"image folder not found: {self.path}")
        index = classes.index()
        files: list[Path] = []
        labels: list[int] = []
        for entry in sorted(self.path.iterdir()):
            if entry.name.startswith("."):
                skips.skip("hidden entry", str(entry))
            elif not entry.is_dir():
                skips.skip("file outside a class folder", str(entry), "images go in DIR/<class_key>/")
            elif entry.name not in index:
                shown = ", ".join(classes.keys[:8]) + (", ..." if len(classes) > 8 else "")
                raise DataError(f"class folder {entry} has no entry in the class list {classes.path} "
                                f"(keys there: {shown}); add a line '{entry.name}: 名称' or remove the folder")
            else:
                found = self._images_of(entry, skips)
                if not found:
                    raise DataError(f"class folder {entry} has no images "
                                    f"({', '.join(sorted(IMAGE_EXTENSIONS))})")
                files.extend(found)
                labels.extend([index[entry.name]] * len(found))
        if not files:
            raise DataError(f"{self.path} has no class folders with images (expected DIR/<class_key>/*.jpg)")
        self.files, self.labels = files, labels
        self.ids = list(range(len(files)))
        self.fingerprint = self._fingerprint()

    @staticmethod
    def _images_of(folder: Path, skips: SkipLog) -> list[Path]:
        found = []
        for f in sorted(folder.iterdir()):
            if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_EXTENSIONS:
                found.append(f)
            else:
                skips.skip("not an image file", str(f), "folder" if f.is_dir() else f"suffix {f.suffix or 'none'}")
        return found

    def _fingerprint(self) -> str:
        """Content hash of every image and its class folder: any change makes a new cache entry."""
        h = hashlib.blake2b(digest_size=16)
        for f in self.files:
            h.update(str(f.relative_to(self.path)).encode())
            h.update(b"\0")
            try:
                h.update(f.read_bytes())
            except OSError:
                h.update(b"<unreadable>")
        return h.hexdigest()

    def __len__(self) -> int:
        return len(self.files)

    def read(self, i: int) -> bytes:
        try:
            return base64.urlsafe_b64encode(self.files[i].read_bytes())
        except OSError as exc:
            raise ValueError(f"unreadable file: {exc}") from None
