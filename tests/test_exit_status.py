"""Exit statuses: the documented table (docs/exit-status.md) is cnclip.errors', and every status in it is
produced here, for real.

`SCENARIOS` maps each status of the table to the cheapest real run into the failure that gives it: a
command with a missing file, a full disk (RLIMIT_FSIZE), a worker killed with SIGKILL, NaN gradients,
a stand-in ModelScope on 127.0.0.1 (tests/fake_modelscope.py) ... One parametrized test runs each
scenario and checks the status and the message; a status without a scenario fails it. The same
failures are tested in depth beside the code they concern (test_crash_resume.py,
test_crash_build_pairs.py, test_publish.py, test_zeroshot.py); the scenarios reuse those files' helpers.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import pytest

import cnclip.finetune
from cnclip.errors import (EXIT_DATA, EXIT_DISK_FULL, EXIT_DIVERGED, EXIT_HUB_FAILED, EXIT_HUB_UNREACHABLE,
                           EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_MEANINGS, EXIT_MODEL, EXIT_NO_TOKEN, EXIT_OK,
                           EXIT_REPO_CONFLICT, EXIT_TOKEN_REJECTED, EXIT_USAGE, EXIT_WORKER_CRASHED)

from conftest import DEMO_RECIPE, tiny_overrides
from doc_pages import doc_section
from test_crash_build_pairs import FILTERS, _jpeg_or_png
from test_crash_build_pairs import command as build_pairs_command
from test_crash_build_pairs import run as run_build_pairs
from test_crash_resume import _nan_gradients_on
from test_publish import REPO as HUB_REPO
from test_publish import TOKEN, FakeModelScope, make_model_folder, run_publish


class Outcome(NamedTuple):
    status: int
    output: str  # stderr (stdout for status 0)
    expect: str  # a fragment the output must hold


Scenario = Callable[[pytest.FixtureRequest, Path], Outcome]
SCENARIOS: dict[int, Scenario] = {}


def produces(status: int):
    def register(fn: Scenario) -> Scenario:
        SCENARIOS[status] = fn
        return fn
    return register


def documented_table() -> dict[int, str]:
    section = doc_section("docs/exit-status.md", "Exit status")
    return {int(m[1]): m[2].strip() for m in re.finditer(r"^\| (\d+) \| (.+?) \|$", section, re.M)}


def test_documented_table_is_the_one_in_cnclip_errors():
    assert documented_table() == EXIT_MEANINGS


def test_every_status_in_the_table_has_a_scenario():
    assert set(SCENARIOS) == set(EXIT_MEANINGS)


@pytest.mark.parametrize("status", sorted(EXIT_MEANINGS))
def test_each_status_is_produced(status, request, tmp_path, capsys):  # capsys: what in-process scenarios print
    outcome = SCENARIOS[status](request, tmp_path)
    assert outcome.status == status, outcome.output[-3000:]
    assert outcome.expect in outcome.output, outcome.output[-3000:]
    if status == EXIT_INTERNAL:  # a bug keeps Python's traceback
        assert "Traceback" in outcome.output
    else:
        assert "Traceback" not in outcome.output, outcome.output[-3000:]
    if status not in (EXIT_OK, EXIT_INTERNAL, EXIT_INTERRUPTED):  # a user's error: one `error: ...` line
        assert re.search(r"^error: \S", outcome.output, re.M), outcome.output[-3000:]


def _stderr(request) -> str:
    return request.getfixturevalue("capsys").readouterr().err


# ---- cnclip's own commands


@produces(EXIT_OK)
def _help(request, tmp_path) -> Outcome:
    proc = subprocess.run([sys.executable, "-m", "cnclip", "--help"], capture_output=True, text=True, timeout=120)
    return Outcome(proc.returncode, proc.stdout, "finetune")


@produces(EXIT_INTERNAL)
def _planted_bug(request, tmp_path) -> Outcome:
    """A bug in the training loop is not a user error: Python's traceback and status 1 stay."""
    code = ("import sys, cnclip.trainer\n"
            "def bug(recipe): raise ZeroDivisionError('planted bug')\n"
            "cnclip.trainer.train = bug\n"
            "import cnclip.commands.finetune as f\n"
            "f.train = bug\n"
            "sys.exit(f.main(sys.argv[1:]))\n")
    args = [str(DEMO_RECIPE), *tiny_overrides(request.getfixturevalue("tiny_model_dir"),
                                              request.getfixturevalue("tiny_data_dir"), tmp_path / "run")]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    return Outcome(proc.returncode, proc.stderr, "ZeroDivisionError: planted bug")


@produces(EXIT_USAGE)
def _missing_recipe(request, tmp_path) -> Outcome:
    code = cnclip.finetune.main([str(tmp_path / "missing.yaml")])
    return Outcome(code, _stderr(request), "recipe file not found")


@produces(EXIT_DATA)
def _empty_data_folder(request, tmp_path) -> Outcome:
    from cnclip.commands.evaluate import main as evaluate_main

    (tmp_path / "data").mkdir()
    code = evaluate_main([str(request.getfixturevalue("tiny_model_dir")), "--data", str(tmp_path / "data")])
    return Outcome(code, _stderr(request), str(tmp_path / "data"))


@produces(EXIT_MODEL)
def _not_a_model(request, tmp_path) -> Outcome:
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "cnclip.evaluate", str(empty), "--data",
                           str(request.getfixturevalue("tiny_data_dir"))],
                          capture_output=True, text=True, env=env, timeout=300)
    return Outcome(proc.returncode, proc.stderr, f"could not load a ChineseCLIP model from '{empty}'")


@produces(EXIT_DIVERGED)
def _nan_gradients(request, tmp_path) -> Outcome:
    """Every step's gradient NaN and no bad step allowed: the first step stops the run."""
    _nan_gradients_on(set(range(1, 100)), request.getfixturevalue("monkeypatch"))
    code = cnclip.finetune.main([str(DEMO_RECIPE), *tiny_overrides(
        request.getfixturevalue("tiny_model_dir"), request.getfixturevalue("tiny_data_dir"), tmp_path / "run",
        **{"train.max_bad_steps": 0, "train.epochs": 1, "eval.before_training": False})])
    return Outcome(code, _stderr(request), "1 steps had a non-finite loss or gradient (train.max_bad_steps=0)")


@produces(EXIT_INTERRUPTED)
def _ctrl_c(request, tmp_path) -> Outcome:
    def interrupted(recipe):
        raise KeyboardInterrupt

    request.getfixturevalue("monkeypatch").setattr("cnclip.commands.finetune.train", interrupted)
    code = cnclip.finetune.main([str(DEMO_RECIPE), *tiny_overrides(
        request.getfixturevalue("tiny_model_dir"), request.getfixturevalue("tiny_data_dir"), tmp_path / "run")])
    return Outcome(code, _stderr(request), "interrupted; rerun the same command to resume")


# ---- data_tools build-pairs (tests/test_crash_build_pairs.py's command and runner, on 4 records)


def _small_dump(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    lines = []
    for i in range(4):
        (root / "images" / f"{i}.png").write_bytes(_jpeg_or_png(i, "PNG"))
        lines.append(json.dumps({"query": "复古台灯", "image": f"images/{i}.png", "alt": f"复古台灯第{i}款"},
                                ensure_ascii=False))
    (root / "dump.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root.parent / "filters.yaml").write_text(FILTERS)
    return root


@produces(EXIT_DISK_FULL)
def _disk_full(request, tmp_path) -> Outcome:
    cmd = build_pairs_command(_small_dump(tmp_path / "dump"), tmp_path / "out")
    proc = run_build_pairs(cmd, file_size_limit=100)  # below any file it writes
    return Outcome(proc.returncode, proc.stderr, "earlier checkpoints and outputs are intact")


@produces(EXIT_WORKER_CRASHED)
def _worker_killed(request, tmp_path) -> Outcome:
    cmd = build_pairs_command(_small_dump(tmp_path / "dump"), tmp_path / "out", "--workers", "2")
    proc = run_build_pairs(cmd, crash_at="pairs-record:1")  # SIGKILL in a worker, at its first record
    return Outcome(proc.returncode, proc.stderr, "a worker process died unexpectedly")


# ---- cnclip publish against a stand-in ModelScope (tests/test_publish.py's helpers)


def _publish(tmp_path: Path, hub: FakeModelScope | None = None, endpoint: str | None = None,
             **kwargs) -> subprocess.CompletedProcess:
    folder = tmp_path / "out"
    if not folder.exists():
        make_model_folder(folder)
    return run_publish(tmp_path, endpoint or hub.endpoint, str(folder), HUB_REPO, **kwargs)


@produces(EXIT_NO_TOKEN)
def _no_token(request, tmp_path) -> Outcome:
    with FakeModelScope(TOKEN) as hub:
        proc = _publish(tmp_path, hub, token=None)
    return Outcome(proc.returncode, proc.stderr, "no ModelScope token")


@produces(EXIT_TOKEN_REJECTED)
def _wrong_token(request, tmp_path) -> Outcome:
    with FakeModelScope(TOKEN) as hub:
        proc = _publish(tmp_path, hub, token="ms-wrong-token-000")
    return Outcome(proc.returncode, proc.stderr, "rejected the token")


@produces(EXIT_HUB_UNREACHABLE)
def _nobody_listening(request, tmp_path) -> Outcome:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _publish(tmp_path, endpoint=f"http://127.0.0.1:{port}")
    return Outcome(proc.returncode, proc.stderr, "could not reach ModelScope")


@produces(EXIT_REPO_CONFLICT)
def _someone_elses_repo(request, tmp_path) -> Outcome:
    with FakeModelScope(TOKEN) as hub:
        hub.add_repo(HUB_REPO, {"model.safetensors": b"someone else's weights", ".gitattributes": b"*"})
        proc = _publish(tmp_path, hub)
    return Outcome(proc.returncode, proc.stderr, "already exists with different contents")


@produces(EXIT_HUB_FAILED)
def _commit_refused(request, tmp_path) -> Outcome:
    with FakeModelScope(TOKEN) as hub:
        hub.fail_commits = True
        no_retries = {"MODELSCOPE_UPLOAD_COMMIT_MAX_ATTEMPTS": "1", "MODELSCOPE_UPLOAD_FAILED_FILE_MAX_RETRY_ROUNDS": "0",
                      "MODELSCOPE_UPLOAD_RECOVERY_ENABLED": "0"}  # the SDK would otherwise back off for a minute
        proc = _publish(tmp_path, hub, extra_env=no_retries)
    return Outcome(proc.returncode, proc.stderr, "error: ")
