"""Every tar is read through cnclip.tar_members, bounded whatever its headers claim: training's and
search's webdataset reader (cnclip.data_formats) and build-pairs' dump reader (data_tools.readers)
reject the same hostile members, count them, and never hold more than a member's limit."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from cnclip.data_formats import WebDatasetShards
from cnclip.errors import DataError
from cnclip.skiplog import SkipLog
from cnclip.tar_members import BoundedTar, MemberProblem, TarReadError
from conftest import REPO, image_bytes
from data_tools.readers import InputReadError, discover_inputs, iter_items, parse_item
from data_tools.records import Reason, Rejected

CLAIMED = 1_500_000_000  # what the sparse member says it expands to


def add(tar: tarfile.TarFile, name: str, data: bytes, **attrs) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in attrs.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data) if data else None)


def sparse_header(name: str, stored: int, claimed: int) -> bytes:
    """An old-GNU sparse header: `stored` bytes of data in the archive stand for `claimed` bytes."""
    info = tarfile.TarInfo(name)
    info.size = stored
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[156:157] = tarfile.GNUTYPE_SPARSE
    header[386:398] = b"%011o\0" % 0  # one data region at offset 0 ...
    header[398:410] = b"%011o\0" % stored  # ... of `stored` bytes
    header[483:495] = b"%011o\0" % claimed  # real size
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header[:512])
    return bytes(header[:512])


def write_bomb(path: Path, claimed: int = CLAIMED) -> Path:
    """A 10 KB shard: sample 0001 is a sparse image claiming `claimed` bytes, sample 0002 is fine."""
    with open(path, "wb") as fh:
        tar = tarfile.open(fileobj=fh, mode="w", format=tarfile.GNU_FORMAT)
        add(tar, "0001.txt", "一个炸弹".encode())
        fh.write(sparse_header("0001.jpg", 512, claimed) + b"\xff" * 512)
        tar.offset += 1024
        add(tar, "0002.jpg", image_bytes(fmt="JPEG"))
        add(tar, "0002.txt", "一个红色的圆形".encode())
        tar.close()
    assert path.stat().st_size < 20_000
    return path


def test_the_bomb_is_what_it_claims(tmp_path):
    """The test archive really holds a sparse member that tarfile would expand to 1.5 GB."""
    with tarfile.open(write_bomb(tmp_path / "train-00000.tar")) as tar:
        bomb = tar.getmember("0001.jpg")
    assert bomb.issparse() and bomb.isreg() and bomb.size == CLAIMED


def build_pairs_outcomes(path: Path, max_member_bytes: int) -> list:
    (source,) = discover_inputs([str(path)])
    outcomes = []
    for item in iter_items(source, max_member_bytes):
        try:
            outcomes.append(parse_item(item, source.kind, source.base_dir).candidates["alt"])
        except Rejected as rejection:
            outcomes.append(rejection.reason)
    return outcomes


def test_the_training_reader_skips_and_counts_a_sparse_member(tmp_path):
    skips = SkipLog()
    shards = WebDatasetShards([write_bomb(tmp_path / "train-00000.tar")], skips)
    assert [t[1] for t in shards.texts] == ["一个红色的圆形"]
    assert skips.counts == {MemberProblem.SPARSE.value: 1}
    assert "claims 1500000000 bytes" in skips.examples[MemberProblem.SPARSE.value][0]


@pytest.mark.parametrize("limit", [50 * 2**20, 4 * 2**30])  # build-pairs' default, and a user's generous one
def test_build_pairs_rejects_a_sparse_member_whatever_its_limit(tmp_path, limit):
    outcomes = build_pairs_outcomes(write_bomb(tmp_path / "shard.tar"), limit)
    assert outcomes == [Reason.UNSUPPORTED_TAR_MEMBER, "一个红色的圆形"]


def test_a_small_sparse_member_is_rejected_too(tmp_path):
    """Under every size limit: a sparse member is never expanded, whatever it claims."""
    path = write_bomb(tmp_path / "train-00000.tar", claimed=4096)
    assert build_pairs_outcomes(path, 50 * 2**20) == [Reason.UNSUPPORTED_TAR_MEMBER, "一个红色的圆形"]
    skips = SkipLog()
    WebDatasetShards([path], skips)
    assert skips.counts == {MemberProblem.SPARSE.value: 1}


MEASURE = """
import sys
from pathlib import Path


def peak_mb():
    # VmHWM: this process's own peak resident memory. (getrusage's ru_maxrss is no good here: a child
    # starts from its parent's peak at fork, so a test process that once held a lot would mask growth.)
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) // 1024


which, path = sys.argv[1:3]
if which == "training":
    from cnclip.data_formats import WebDatasetShards
    from cnclip.skiplog import SkipLog
    before = peak_mb()
    WebDatasetShards([Path(path)], SkipLog())
else:
    from data_tools.readers import discover_inputs, iter_items, parse_item
    from data_tools.records import Rejected
    before = peak_mb()
    (source,) = discover_inputs([path])
    for item in iter_items(source, 4 * 2**30):
        try:
            parse_item(item, source.kind, source.base_dir)
        except Rejected:
            pass
print(peak_mb() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="measures memory through Linux's /proc")
@pytest.mark.parametrize("which", ["training", "build-pairs"])
def test_reading_the_bomb_keeps_memory_flat(tmp_path, which):
    path = write_bomb(tmp_path / "train-00000.tar")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", MEASURE, which, str(path)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.strip().splitlines()[-1]) < 200  # MB of peak memory growth, for a 1.5 GB claim


def write_members(path: Path, members: list[tuple]) -> Path:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data, *attrs in members:
            add(tar, name, data, **(attrs[0] if attrs else {}))
    return path


HOSTILE = [
    ("a.jpg", image_bytes(fmt="JPEG")), ("a.txt", "好的样本".encode()),
    ("b.jpg", b"", {"type": tarfile.SYMTYPE, "linkname": "/etc/hostname"}), ("b.txt", "符号链接".encode()),
    ("c.jpg", b"", {"type": tarfile.LNKTYPE, "linkname": "a.jpg"}), ("c.txt", "硬链接".encode()),
    ("d.jpg", b"", {"type": tarfile.FIFOTYPE}), ("d.txt", "管道".encode()),
    ("../../e.jpg", image_bytes(fmt="JPEG")), ("../../e.txt", "逃出去".encode()),
    ("dir", b"", {"type": tarfile.DIRTYPE}),
    ("dir/f.jpg", image_bytes(fmt="JPEG")), ("dir/f.txt", "目录里的".encode()),
]


def test_links_devices_and_escaping_names_are_counted_never_read(tmp_path):
    path = write_members(tmp_path / "train-00000.tar", HOSTILE)
    skips = SkipLog()
    shards = WebDatasetShards([path], skips)
    assert sorted(t[1] for t in shards.texts) == ["好的样本", "目录里的"]  # the directory entry itself is no sample
    assert skips.counts == {MemberProblem.NOT_REGULAR.value: 3, MemberProblem.UNSAFE_NAME.value: 1}
    assert build_pairs_outcomes(path, 2**20) == [
        "好的样本", Reason.UNSUPPORTED_TAR_MEMBER, Reason.UNSUPPORTED_TAR_MEMBER, Reason.UNSUPPORTED_TAR_MEMBER,
        Reason.UNSAFE_IMAGE_PATH, "目录里的"]


def test_members_over_their_limit_are_never_read(tmp_path, monkeypatch):
    import cnclip.data_formats as data_formats

    monkeypatch.setattr(data_formats, "MAX_IMAGE_MEMBER_BYTES", 1000)
    path = write_members(tmp_path / "train-00000.tar", [
        ("a.jpg", b"\xff" * 1001), ("a.txt", "大图".encode()),
        ("b.jpg", b"\xff" * 10), ("b.txt", "长".encode() * 400_000),  # a 1.2 MB caption
        ("c.jpg", b"\xff" * 10), ("c.txt", "好".encode()), ("c.cls", b"\0" * 3_000_000)])  # unused: streamed
    read = []
    original = BoundedTar.read
    monkeypatch.setattr(BoundedTar, "read", lambda self, member: read.append(member.name) or original(self, member))
    skips = SkipLog()
    shards = WebDatasetShards([path], skips)
    assert [t[1] for t in shards.texts] == ["好"]
    assert skips.counts == {MemberProblem.TOO_LARGE.value: 2}
    assert read == ["c.txt"]


def test_non_utf8_member_names_are_read(tmp_path):
    path = tmp_path / "train-00000.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        add(tar, "caf\xe9.jpg", image_bytes(fmt="JPEG"))  # stored as the single byte 0xe9: not UTF-8
        add(tar, "caf\xe9.txt", "咖啡".encode())
    shards = WebDatasetShards([path], SkipLog())
    assert [t[1] for t in shards.texts] == ["咖啡"]


def corrupt_second_header(path: Path) -> Path:
    """Garbage in place of the second member's header: tarfile alone would stop there and report nothing."""
    data = bytearray(path.read_bytes())
    with tarfile.open(path) as tar:
        second = tar.getmembers()[1].offset
    data[second:second + 512] = b"\x07" * 512
    path.write_bytes(bytes(data))
    return path


def test_a_corrupt_header_part_way_is_an_error_not_the_end(tmp_path):
    path = corrupt_second_header(write_members(tmp_path / "train-00000.tar", [
        ("a.jpg", image_bytes(fmt="JPEG")), ("a.txt", "一".encode()), ("b.jpg", image_bytes(fmt="JPEG")),
        ("b.txt", "二".encode())]))
    with tarfile.open(path) as tar:
        assert len(tar.getmembers()) == 1  # what tarfile makes of it: one member, no error
    with pytest.raises(DataError, match="corrupt tar header at byte 1536"):
        WebDatasetShards([path], SkipLog())
    (source,) = discover_inputs([str(path)])
    with pytest.raises(InputReadError, match="corrupt tar header"):
        list(iter_items(source, 2**20))


@pytest.mark.parametrize("garbage", [
    b"\0" * 512,  # zero blocks only: an empty archive
    b"x" * 700,  # no tar at all
    sparse_header("a.jpg", 0, 10)[:300],  # a truncated first header
    b"%d GNU.sparse.major=1\n" % 23,
])
def test_garbage_is_a_read_error_never_another_exception(tmp_path, garbage):
    path = tmp_path / "train-00000.tar"
    path.write_bytes(garbage)
    try:
        with BoundedTar(path) as tar:
            members = list(tar.members(lambda ext: 100))
    except TarReadError:
        return
    assert members == []


def test_a_hostile_pax_sparse_map_is_a_read_error(tmp_path):
    """A 1.0 sparse map that never ends: tarfile raises ValueError from deep inside its parser."""
    path = tmp_path / "train-00000.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("a.jpg")
        info.size = 512
        info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "a.jpg",
                            "GNU.sparse.realsize": str(CLAIMED)}
        tar.addfile(info, io.BytesIO(b"99999999\n" + b"7" * 503))  # claims 10^8 regions, gives no newline
    with pytest.raises(DataError, match="train-00000.tar: .*ValueError"):
        WebDatasetShards([path], SkipLog())
    (source,) = discover_inputs([str(path)])
    with pytest.raises(InputReadError):
        list(iter_items(source, 2**20))


def test_search_indexes_a_shard_without_its_hostile_samples(tmp_path):
    from cnclip.search_index import discover

    write_bomb(tmp_path / "train-00000.tar")
    skips = SkipLog()
    items = discover([tmp_path / "train-00000.tar"], None, skips)
    assert [item.caption for item in items] == ["一个红色的圆形"]
    assert skips.counts == {MemberProblem.SPARSE.value: 1}
    assert json.loads(json.dumps(skips.summary()))["total"] == 1
