"""build-pairs --download: SIGKILL mid-download and rerun gives the uninterrupted run's bytes, without
fetching again what finished shards hold nor the journaled downloads of the shard cut short; 1 and 2
workers give the same bytes. Server on 127.0.0.1 only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from image_server import ImageServer

REPO = Path(__file__).resolve().parent.parent
RECORDS = 30
SHARD_SIZE = 10
FILTERS = "image:\n  min_side: 32\n  max_side: 64\nrelevance:\n  mode: 'off'\n"


@pytest.fixture()
def server():
    with ImageServer() as running:
        yield running


def write_crawl(root: Path, server: ImageServer) -> Path:
    root.mkdir(parents=True)
    lines = []
    for i in range(RECORDS):
        url = server.url(path(i))
        lines.append(json.dumps({"query": f"查询{i % 4}", "url": url, "alt": f"可爱小猫图片{i}号"}, ensure_ascii=False))
    (root / "crawl.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "filters.yaml").write_text(FILTERS)
    return root


def path(i: int) -> str:
    return f"/img/{i}.jpg" if i % 7 != 3 else f"/404/{i}"


def run(crawl: Path, out: Path, *extra: str, crash_at: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CNCLIP_CRASH_AT"}
    if crash_at:
        env["CNCLIP_CRASH_AT"] = crash_at
    cmd = [sys.executable, "-m", "data_tools", "build-pairs", str(crawl / "crawl.jsonl"), "--out", str(out),
           "--config", str(crawl / "filters.yaml"), "--shard-size", str(SHARD_SIZE), "--splits", "0.8,0.1,0.1",
           "--no-progress", "--download", "--allow-private-network", "--download-concurrency", "4", *extra]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_sigkill_during_downloads_resumes_without_refetching(server, tmp_path):
    crawl = write_crawl(tmp_path / "crawl", server)
    reference = tmp_path / "reference"
    assert run(crawl, reference).returncode == 0
    expected = tree(reference)
    report = json.loads(expected["report.json"])
    assert report["records_read"] == RECORDS and report["rejected"] == {"http_404": 4}
    assert report["kept"] == RECORDS - 4 and report["downloads"]["attempted"] == RECORDS

    with server.lock:
        server.counts.clear()
    out = tmp_path / "out"
    killed = run(crawl, out, crash_at="pairs-download:15")  # 10 of shard 0 done, 5 of shard 1
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / "report.json").exists()
    assert sorted(p.name for p in (out / ".work" / "shards").iterdir()) == ["00000-000000.parquet", "00000-000001.journal"]
    after_kill = dict(server.counts)
    rerun = run(crawl, out)
    assert rerun.returncode == 0, rerun.stderr
    assert tree(out) == expected  # every byte, DIR/.work included
    # Shard 0 (records 0-9) was finished before the kill: its URLs were fetched exactly once in all.
    assert all(server.counts[path(i)] == after_kill[path(i)] == 1 for i in range(SHARD_SIZE))
    # Shard 1 was cut short after 5 of its downloads were journaled: the rerun fetched only those that
    # were still in flight at the kill (at most the 4 download slots), nothing that had finished.
    shard1 = range(SHARD_SIZE, 2 * SHARD_SIZE)
    assert sum(1 for i in shard1 if after_kill.get(path(i), 0)) >= 5
    assert all(server.counts[path(i)] >= 1 for i in shard1)
    assert sum(server.counts[path(i)] - 1 for i in shard1) <= 4
    # Shard 2 had not started: fetched only by the rerun.
    assert all(after_kill.get(path(i), 0) == 0 and server.counts[path(i)] == 1 for i in range(2 * SHARD_SIZE, RECORDS))


def test_two_workers_write_the_same_bytes(server, tmp_path):
    crawl = write_crawl(tmp_path / "crawl", server)
    one, two = tmp_path / "one", tmp_path / "two"
    assert run(crawl, one).returncode == 0
    result = run(crawl, two, "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert tree(one) == tree(two)
