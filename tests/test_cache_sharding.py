"""Sharded image-cache building under torchrun: each rank embeds its own parts, the parts merge into
the same cache a single process writes, and a run killed mid-cache resumes from the parts on disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cnclip import distributed
from conftest import make_tiny_dataset

DRIVER = Path(__file__).with_name("cache_driver.py")
PART_SIZE = 3  # the tiny train split has 16 images: 6 parts


def driver_command(model_dir: Path, data: Path, cache: Path, out: Path, nproc: int,
                   crash_at: str | None = None) -> tuple[list[str], dict]:
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in distributed.LAUNCH_VARS}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    if crash_at:
        env["CNCLIP_CRASH_AT"] = crash_at
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    return [*launcher, str(DRIVER), str(model_dir), str(data), str(cache), str(PART_SIZE), str(out)], env


def run_driver(model_dir: Path, data: Path, cache: Path, out: Path, nproc: int, crash_at: str | None = None):
    command, env = driver_command(model_dir, data, cache, out, nproc, crash_at)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)


def entry_files(cache: Path) -> dict[str, bytes]:
    """Every file of the cache's entries (lock files aside), by path relative to the cache."""
    return {str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.rglob("*"))
            if p.is_file() and not p.name.endswith(".lock")}


def reports(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank-*.json"))]


@pytest.fixture(scope="module")
def single_process_cache(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_single")
    data = make_tiny_dataset(root / "data")
    proc = run_driver(tiny_model_dir, data, root / "cache", root / "out", nproc=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return data, entry_files(root / "cache"), reports(root / "out")


def test_two_ranks_build_the_same_cache_as_one_process(single_process_cache, tiny_model_dir, tmp_path):
    data, expected, (single,) = single_process_cache
    assert single == {"embedded": 16, "images": 16, "world": 1}
    assert sum(name.endswith(".safetensors") for name in expected) == 6
    proc = run_driver(tiny_model_dir, data, tmp_path / "cache", tmp_path / "out", nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert entry_files(tmp_path / "cache") == expected  # same entry, same parts, same manifest, byte for byte
    ranks = reports(tmp_path / "out")
    assert [r["world"] for r in ranks] == [2, 2] and all(r["images"] == 16 for r in ranks)
    assert [r["embedded"] for r in ranks] == [9, 7]  # parts 0, 2, 4 (3+3+3) and 1, 3, 5 (3+3+1): each its own share


def test_a_cache_killed_midway_resumes_from_its_parts(single_process_cache, tiny_model_dir, tmp_path):
    data, expected, _ = single_process_cache
    killed = run_driver(tiny_model_dir, data, tmp_path / "cache", tmp_path / "out1", nproc=1, crash_at="cache-part:2")
    assert killed.returncode == -9  # SIGKILL right after its second part
    written = entry_files(tmp_path / "cache")
    assert sum(name.endswith(".safetensors") for name in written) == 2
    assert not any(name.endswith("manifest.json") for name in written)

    resumed = run_driver(tiny_model_dir, data, tmp_path / "cache", tmp_path / "out2", nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert entry_files(tmp_path / "cache") == expected
    assert sum(r["embedded"] for r in reports(tmp_path / "out2")) == 16 - 2 * PART_SIZE  # finished parts are not redone


def test_a_torchrun_job_waits_for_the_entry_lock_like_any_process(single_process_cache, tiny_model_dir, tmp_path):
    """Rank 0 holds the entry's lock for the job: a job never computes an entry beside another process."""
    from filelock import FileLock

    data, expected, _ = single_process_cache
    key = next(iter(expected)).split("/")[0]
    (tmp_path / "cache" / key).mkdir(parents=True)
    lock = FileLock(str(tmp_path / "cache" / key / ".lock"))  # another process computing this entry
    lock.acquire()
    command, env = driver_command(tiny_model_dir, data, tmp_path / "cache", tmp_path / "out", nproc=2)
    with open(tmp_path / "stderr.txt", "w") as stderr:
        job = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "waiting for it" not in (tmp_path / "stderr.txt").read_text() and time.monotonic() < deadline:
            assert job.poll() is None, "the job finished while another process held the entry's lock"
            time.sleep(0.2)
        assert "waiting for it" in (tmp_path / "stderr.txt").read_text()
        time.sleep(2)
        assert job.poll() is None and not list((tmp_path / "cache" / key).glob("part-*"))  # nothing written
    except BaseException:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)  # torchrun and its ranks
        raise
    finally:
        lock.release()
    assert job.wait(timeout=240) == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    assert entry_files(tmp_path / "cache") == expected
    assert [r["embedded"] for r in reports(tmp_path / "out")] == [9, 7]
