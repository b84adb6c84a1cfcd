"""Reading tar archives without trusting their headers: the one path by which every tar is read
(training's and search's webdataset shards, cnclip.data_formats; build-pairs' crawl dumps,
data_tools.readers).

A tar header states a member's size, and `tarfile` believes it: a 10 KB archive with a GNU
sparse member that claims 1.5 GB of zeros makes `extractfile(member).read()` build 1.5 GB in
memory. Here, whatever the archive claims:

* a member's data is read only on request, in pieces of at most CHUNK_BYTES, and only if its
  declared size is within the limit its reader set for it (`read` holds at most that limit;
  `chunks` holds one piece at a time);
* a member is never read when it has a problem (`MemberProblem`), reported with the member
  instead: a name that is absolute or climbs out with `..`; a link, device or FIFO (nothing is
  ever extracted, but such a member has no data of its own to give); a sparse file (a few bytes
  of data standing for any number of zeros); a declared size over the reader's limit;
* directories are passed over (they are not part of any sample);
* headers `tarfile` cannot parse (a truncated, corrupt or hostile archive) end the walk with
  TarReadError naming the archive, never another exception, and never silently: `tarfile` takes
  a corrupt header after the first for the end of the archive, which would drop every member
  after it unseen. Memory for headers stays flat however many members an archive has (`tarfile`
  would otherwise keep every header it read).
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from .image_sources import MAX_IMAGE_FILE_BYTES, escapes, webdataset_key

CHUNK_BYTES = 1 << 20
# Largest image member read by the training reader (build-pairs passes its image.max_file_bytes).
MAX_IMAGE_MEMBER_BYTES = MAX_IMAGE_FILE_BYTES
# Largest caption or metadata member (.txt, .json) read into memory by the training reader.
MAX_TEXT_MEMBER_BYTES = 2**20


class MemberProblem(StrEnum):
    """Why a member is not read; the value is the reason it is counted under in a SkipLog."""

    UNSAFE_NAME = "unsafe tar member name"  # absolute, a drive letter, or `..` among its parts
    NOT_REGULAR = "tar member not a regular file"  # symlink, hard link, device, FIFO, unknown type
    SPARSE = "sparse tar member"
    TOO_LARGE = "tar member too large"


class TarReadError(Exception):
    """The archive stopped being readable (truncated, corrupt or malformed headers)."""


@dataclass(frozen=True)
class TarMember:
    """One member, as far as its header goes; `problem` set means its data is never read."""

    name: str
    key: str  # its webdataset sample key (cnclip.image_sources.webdataset_key)
    ext: str  # the rest of the base name after the key, lower case: "jpg", "txt", "seg.png"
    size: int  # as declared (for a sparse member: the size it claims to expand to)
    offset: int  # where its data starts in the archive, for reading in place later
    limit: int | None  # the reader's limit for it (None: the reader only streams it)
    problem: MemberProblem | None = None
    detail: str = ""
    info: tarfile.TarInfo | None = field(default=None, repr=False, compare=False)


def _problem_of(info: tarfile.TarInfo, limit: int | None) -> tuple[MemberProblem | None, str]:
    if escapes(info.name):
        return MemberProblem.UNSAFE_NAME, f"{info.name!r} leaves the archive"
    if not info.isreg():
        kind = "symlink" if info.issym() else "hard link" if info.islnk() else f"type {info.type!r}"
        return MemberProblem.NOT_REGULAR, f"{info.name}: {kind}"
    if info.issparse():
        return MemberProblem.SPARSE, f"{info.name}: sparse, claims {info.size} bytes"
    if limit is not None and info.size > limit:
        return MemberProblem.TOO_LARGE, f"{info.name}: {info.size} bytes > {limit}"
    return None, ""


class _CheckedTarInfo(tarfile.TarInfo):
    """Remembers, on the TarFile, the header error that `TarFile.next` would otherwise swallow."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except (tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError) as exc:
            tar.cnclip_header_error = (tar.offset, exc)
            raise


class BoundedTar:
    """An uncompressed tar read member by member (`stream=True`: any tar `tarfile` can stream,
    compressed too, read front to back once; a member's data only while it is the current one)."""

    def __init__(self, path: str | Path, stream: bool = False):
        self.path = Path(path)
        try:
            self._tar = tarfile.open(self.path, mode="r|*" if stream else "r:", tarinfo=_CheckedTarInfo)
        except Exception as exc:  # tarfile raises ValueError, EOFError... besides TarError on bad headers
            raise TarReadError(f"{self.path}: not a readable tar ({type(exc).__name__}: {exc})") from None

    def __enter__(self) -> BoundedTar:
        return self

    def __exit__(self, *exc) -> None:
        self._tar.close()

    def members(self, limit: Callable[[str], int | None]) -> Iterator[TarMember]:
        """Every member but directories, in archive order; `limit(ext)`: the largest size to read."""
        while True:
            info = self._next()
            if info is None:
                return
            self._tar.members.clear()  # tarfile keeps every header it has read; nothing here looks back
            if info.isdir():
                continue
            key, ext = webdataset_key(info.name)
            ext = ext.lower()
            member_limit = limit(ext)
            problem, detail = _problem_of(info, member_limit)
            yield TarMember(info.name, key, ext, info.size, info.offset_data, member_limit, problem, detail, info)

    def _next(self) -> tarfile.TarInfo | None:
        try:
            info = self._tar.next()
        except Exception as exc:  # a hostile header makes tarfile raise ValueError, IndexError, EOFError...
            raise TarReadError(f"{self.path}: unreadable tar header ({type(exc).__name__}: {exc})") from None
        if info is None and getattr(self._tar, "cnclip_header_error", None) is not None:
            offset, exc = self._tar.cnclip_header_error
            raise TarReadError(f"{self.path}: corrupt tar header at byte {offset} ({exc}); "
                               f"the members after it cannot be read")
        return info

    def chunks(self, member: TarMember) -> Iterator[bytes]:
        """The member's data in pieces of at most CHUNK_BYTES (its declared size in all, or TarReadError)."""
        if member.problem is not None or member.info is None:
            raise ValueError(f"{member.name}: {member.problem} is never read")
        try:
            handle = self._tar.extractfile(member.info)
            while piece := handle.read(CHUNK_BYTES):
                yield piece
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise TarReadError(f"{self.path}: {member.name} cut short ({type(exc).__name__}: {exc})") from None

    def read(self, member: TarMember) -> bytes:
        """The member's data in one piece: only for members within a limit (at most that many bytes)."""
        if member.limit is None:
            raise ValueError(f"{member.name}: no limit set, only streamed")
        return b"".join(self.chunks(member))
