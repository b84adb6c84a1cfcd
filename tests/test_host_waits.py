"""Multi-process robustness of cnclip.distributed (2 gloo processes on a CPU, each started by the
test as two nodes would be): a rank that dies early cannot leave the others waiting on the host,
and the model is loaded by the first rank of a node before the others."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

from cnclip import distributed
from cnclip.errors import UsageError

DRIVER = Path(__file__).with_name("rank_driver.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, out: Path, timeout: float = 120, **env_extra) -> list[subprocess.CompletedProcess | None]:
    """Both ranks of `scenario`; a rank still running after `timeout` seconds is killed (None)."""
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = {k: v for k, v in os.environ.items() if k not in distributed.LAUNCH_VARS}
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", **env_extra)
        procs.append(subprocess.Popen([sys.executable, str(DRIVER), scenario, str(out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline, results = time.monotonic() + timeout, []
    for proc in procs:
        try:
            out_, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out_, err))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            results.append(None)
    return results


def test_a_rank_that_dies_before_the_first_host_wait_stops_the_other_at_once(tmp_path):
    """The host group is made in init_distributed, while both ranks live: rank 0's host wait then
    fails as soon as it starts (rank 1's connections are closed), with WorkerCrashed, although the
    host wait timeout is hours. (Made at the first wait, the group's rendezvous waited for rank 1
    until the timeout: 7 days before.)"""
    rank0, rank1 = launch("dies-early", tmp_path, timeout=90)
    assert rank1 is not None and rank1.returncode == 3
    assert rank0 is not None, "rank 0 still waited after 90 s"
    result = json.loads((tmp_path / "rank-0.json").read_text())
    assert distributed.host_wait_timeout() >= timedelta(hours=1)
    assert result["seconds"] < 30, result
    assert result["error"].startswith("WorkerCrashed: rank 0 of 2: another rank stopped"), result
    assert "rerun to resume" in result["error"]


def test_the_first_rank_of_a_node_loads_first_and_every_rank_shares_one_decision(tmp_path):
    """local_main_first: rank 1 starts loading only once rank 0 has finished. In the same launch:
    ranks that disagree all stop (ConfigError naming each rank's value), and an error rank 0 meets
    while reading for everyone (computed_on_main) is raised on every rank, not only on rank 0."""
    rank0, rank1 = launch("helpers", tmp_path)
    assert rank0.returncode == 0 and rank1.returncode == 0, (rank0.stderr[-2000:], rank1.stderr[-2000:])
    first, second = (json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1))
    assert first["end"] - first["start"] >= 1
    assert second["start"] >= first["end"]
    for result in (first, second):
        assert result["errors"] == ["ConfigError: the ranks disagree on the rank: rank 0: 0, rank 1: 1",
                                    "DataError: split 'train' has no images: read by rank 0"]


def test_the_host_wait_timeout_is_hours_unless_set(monkeypatch):
    monkeypatch.delenv(distributed.HOST_TIMEOUT_ENV, raising=False)
    assert timedelta(hours=1) <= distributed.host_wait_timeout() <= timedelta(hours=6)
    assert distributed.DEFAULT_TIMEOUT < distributed.host_wait_timeout()
    monkeypatch.setenv(distributed.HOST_TIMEOUT_ENV, "90")
    assert distributed.host_wait_timeout() == timedelta(minutes=90)
    for bad in ("0", "-5", "soon", "nan"):
        monkeypatch.setenv(distributed.HOST_TIMEOUT_ENV, bad)
        with pytest.raises(UsageError, match=distributed.HOST_TIMEOUT_ENV):
            distributed.host_wait_timeout()
