"""build-pairs survives SIGKILL anywhere and a full disk: the rerun's output equals an uninterrupted run's.

Every run is `python -m data_tools build-pairs` in a subprocess. Crashes are injected with
cnclip.faults (`CNCLIP_CRASH_AT=<point>:<n>`: SIGKILL on the n-th time the point is reached):

  pairs-record       before each record of a shard (mid-shard; in a worker with --workers 2)
  pairs-shard-write  a shard's result fully written under its temporary name, not yet renamed
  pairs-shard        after a shard's result is renamed into place (between shards)
  pairs-output       after each shard's pairs went into the (temporary) output files
  pairs-publish      before each rename of a finished output file into place (report.json last)
  pairs-report       every output in place, report.json not yet

Each chain below kills a run at one point, reruns the same command with the next point armed,
and so on, then reruns it clean. After every kill the directory may hold only complete files
(byte-identical to the uninterrupted run's) and temporaries; after the clean rerun it must be
byte-identical to the uninterrupted run's, all of it, DIR/.work included. The report holds no
timings or other run-dependent data, so nothing is excluded from the comparison.
"""

from __future__ import annotations

import io
import json
import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

from cnclip.errors import EXIT_DISK_FULL, EXIT_WORKER_CRASHED

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
QUERIES = ["红色连衣裙", "可爱小猫", "山水风景", "复古台灯", "运动跑鞋", "青花瓷碗"]
RECORDS_PER_FILE = 150
SHARD_SIZE = 40  # 4 shards per file, 8 in all
# Relevance off: the jieba dictionary would cost a second per process and has nothing to do with crashes.
FILTERS = "image:\n  min_side: 32\n  max_side: 64\nrelevance:\n  mode: 'off'\n"
TEMPORARY = re.compile(r"^\..+\.tmp-(?:[0-9a-f]{8}-)?\d+$")  # .NAME.tmp-PID or .NAME.tmp-HOST-PID


def _jpeg_or_png(seed: int, fmt: str) -> bytes:
    cells = np.random.default_rng(seed).integers(0, 255, (6, 6, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(cells).resize((64, 64), Image.Resampling.BICUBIC).save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def dump(tmp_path_factory) -> Path:
    """Two JSONL files, 300 records: image files, a duplicate and a few rejects in every shard."""
    root = tmp_path_factory.mktemp("crash") / "dump"
    (root / "images").mkdir(parents=True)
    for part in range(2):
        lines, previous = [], ""
        for i in range(RECORDS_PER_FILE):
            query = QUERIES[i % len(QUERIES)]
            fmt = "JPEG" if i % 2 else "PNG"
            name = f"images/{part}_{i}.{fmt.lower()}"
            (root / name).write_bytes(_jpeg_or_png(part * 1000 + i, fmt))
            caption = f"{query}第{part}-{i}款"
            record = {"query": query, "image": name, "alt": caption, "url": f"https://img.example.com/{part}/{i}.jpg"}
            if i % 17 == 16:
                record = {"query": query, "image": previous, "alt": f"{query}重复{part}-{i}"}
            if i % 23 == 5:
                record = {"query": query, "image": "../outside.png", "alt": caption}
            previous = name
            lines.append(json.dumps(record, ensure_ascii=False))
        (root / f"part{part}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root.parent / "filters.yaml").write_text(FILTERS)
    return root


def command(dump: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "data_tools", "build-pairs", str(dump), "--out", str(out),
            "--config", str(dump.parent / "filters.yaml"), "--shard-size", str(SHARD_SIZE),
            "--splits", "0.8,0.1,0.1", "--no-progress", *extra]


def run(cmd: list[str], crash_at: str | None = None, file_size_limit: int | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CNCLIP_CRASH_AT"}
    if crash_at:
        env["CNCLIP_CRASH_AT"] = crash_at

    def limit_file_size() -> None:  # a full disk, as the writing process sees it: EFBIG instead of SIGXFSZ
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
                          preexec_fn=limit_file_size if file_size_limit else None)


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def temporaries(files: dict[str, bytes]) -> list[str]:
    return [name for name in files if TEMPORARY.match(name.rsplit("/", 1)[-1])]


@pytest.fixture(scope="module")
def reference(dump, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("reference") / "out"
    result = run(command(dump, out))
    assert result.returncode == 0, result.stderr
    files = tree(out)
    report = json.loads(files["report.json"])
    assert report["kept"] > 200 and report["rejected"]["duplicate_image"] > 0 and report["rejected"]["unsafe_image_path"] > 0
    assert report["records_read"] == report["kept"] + sum(report["rejected"].values()) == 2 * RECORDS_PER_FILE
    assert len([name for name in files if name.startswith(".work/shards/")]) == 8
    assert not temporaries(files)
    return files


def assert_only_complete_files(out: Path, reference: dict[str, bytes]) -> None:
    """A killed run's leftovers: temporaries, and files byte-identical to the finished run's."""
    files = tree(out)
    for name, data in files.items():
        if name not in temporaries(files):
            assert data == reference[name], f"{name} differs from the uninterrupted run's (half-written?)"
    if "report.json" in files:  # a report is only ever next to all of its outputs
        assert {n for n in files if "/" not in n} == {n for n in reference if "/" not in n}


def crash_then_rerun(dump: Path, out: Path, reference: dict[str, bytes], points: list[str], workers: int) -> None:
    cmd = command(dump, out, "--workers", str(workers))
    left_temporaries = 0
    for point in points:
        result = run(cmd, crash_at=point)
        in_worker = workers > 1 and point.startswith(("pairs-record", "pairs-shard"))
        if in_worker:  # the pool breaks; the parent reports it and exits non-zero, no traceback
            assert result.returncode == EXIT_WORKER_CRASHED, (point, result.returncode, result.stderr)
            assert "error: a worker process died unexpectedly" in result.stderr and "rerun the same command" in result.stderr
            assert "Traceback" not in result.stderr
        else:
            assert result.returncode == -signal.SIGKILL, (point, result.returncode, result.stderr)
        assert_only_complete_files(out, reference)
        left_temporaries += len(temporaries(tree(out)))
    result = run(cmd)
    assert result.returncode == 0, result.stderr
    assert tree(out) == reference
    assert left_temporaries > 0  # the kills did land mid-write, and the reruns cleaned up


def test_sigkill_at_every_stage_resumes_to_identical_output(dump, reference, tmp_path):
    crash_then_rerun(dump, tmp_path / "out", reference, workers=1, points=[
        "pairs-record:50",  # mid second shard: one shard done
        "pairs-shard-write:2",  # the next shard finished, the one after killed before its rename
        "pairs-shard:2",  # two more shards, killed between shards
        "pairs-output:2",  # all shards done; killed while writing the output files
        "pairs-publish:3",  # two outputs renamed into place, killed before the third
        "pairs-report:1",  # every output in place, killed before report.json
    ])


def test_worker_killed_breaks_the_pool_and_the_rerun_recovers(dump, reference, tmp_path):
    crash_then_rerun(dump, tmp_path / "out", reference, workers=2, points=[
        "pairs-record:30", "pairs-shard-write:1", "pairs-shard:1",
    ])


def test_killed_while_replacing_an_earlier_output(dump, reference, tmp_path):
    """Replacing a complete cnclip output by webdataset shards: killed after the old report was moved
    aside and one tar renamed in; the rerun still removes every file of the old layout."""
    out = tmp_path / "out"
    _restore(reference, out)
    cmd = command(dump, out, "--format", "webdataset")
    killed = run(cmd, crash_at="pairs-publish:2")
    assert killed.returncode == -signal.SIGKILL
    names = {n for n in tree(out) if "/" not in n}
    assert "report.json" not in names  # a directory without report.json is visibly incomplete
    assert "train-00000.tar" in names or "test-00000.tar" in names
    assert (out / ".work" / "previous-report.json").exists()
    assert run(cmd).returncode == 0
    files = tree(out)
    report = json.loads(files["report.json"])
    assert sorted(n for n in files if "/" not in n) == sorted(report["outputs"]) == [
        "report.json", "test-00000.tar", "train-00000.tar", "valid-00000.tar"]
    assert report["kept"] == json.loads(reference["report.json"])["kept"]
    assert not temporaries(files) and not (out / ".work" / "previous-report.json").exists()


def _restore(files: dict[str, bytes], out: Path) -> None:
    for name, data in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)


def test_disk_full_while_writing_outputs_keeps_the_previous_output(dump, reference, tmp_path):
    out = tmp_path / "out"
    _restore(reference, out)  # an earlier complete run; its shards are reused, so only outputs are written
    largest = max(len(data) for name, data in reference.items() if "/" not in name)
    result = run(command(dump, out, "--seed", "7"), file_size_limit=largest // 2)
    assert result.returncode == EXIT_DISK_FULL, result.stderr
    # one line naming the output file it could not write, what is kept, and what to do
    assert re.search(r"^error: out of disk space writing \S+/(train|valid|test)_\w+\.(tsv|jsonl) \(File too large\); "
                     r"earlier checkpoints and outputs are intact: free space and rerun the same command to resume$",
                     result.stderr, re.M), result.stderr
    assert "Traceback" not in result.stderr
    assert tree(out) == reference  # nothing replaced, no temporaries left behind


def test_disk_full_in_a_worker_exits_cleanly_and_the_rerun_completes(dump, reference, tmp_path):
    out = tmp_path / "out"
    cmd = command(dump, out, "--workers", "2")
    result = run(cmd, file_size_limit=20_000)  # below one shard's result file
    assert result.returncode == EXIT_DISK_FULL, result.stderr
    assert re.search(r"error: out of disk space writing \S+/\.work/shards/\d{5}-\d{6}\.parquet \(File too large\)", result.stderr), result.stderr
    assert "Traceback" not in result.stderr
    assert not (out / "report.json").exists()
    assert run(cmd).returncode == 0
    assert tree(out) == reference
