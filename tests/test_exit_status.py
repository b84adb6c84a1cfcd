"""Exit statuses: the documented table (docs/exit-status.md) is cnclip.errors', and every status in it is produced by a test.

The statuses that need a real failure of their own (disk full, a dead worker, a hub outage ...) are
produced where that failure is built; `PRODUCED_BY` names those tests (or the helper a test calls to
assert it: `crash_then_rerun` serves the worker-kill test), and this module checks that
each of them exists and asserts its status. The rest are produced here.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

import cnclip.finetune
import cnclip.trainer
from cnclip.errors import (EXIT_DATA, EXIT_DISK_FULL, EXIT_DIVERGED, EXIT_HUB_FAILED, EXIT_HUB_UNREACHABLE,
                           EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_MEANINGS, EXIT_MODEL, EXIT_NO_TOKEN, EXIT_OK,
                           EXIT_REPO_CONFLICT, EXIT_TOKEN_REJECTED, EXIT_USAGE, EXIT_WORKER_CRASHED)

from conftest import DEMO_RECIPE, REPO, tiny_overrides
from doc_pages import doc_section

# status -> (constant the test asserts with, or the literal status, "file::test")
PRODUCED_BY = {
    EXIT_OK: ("== 0", "test_exit_status.py::test_ok_and_usage_error"),
    EXIT_INTERNAL: ("EXIT_INTERNAL", "test_exit_status.py::test_a_bug_keeps_its_traceback_and_exits_1"),
    EXIT_USAGE: ("EXIT_USAGE", "test_exit_status.py::test_ok_and_usage_error"),
    EXIT_DISK_FULL: ("== 3", "test_crash_resume.py::test_full_disk_keeps_the_previous_checkpoint"),
    EXIT_DATA: ("EXIT_DATA", "test_zeroshot.py::test_cli_bad_inputs_exit_4_naming_the_file"),
    EXIT_MODEL: ("EXIT_MODEL", "test_exit_status.py::test_a_model_that_cannot_be_loaded_exits_5"),
    EXIT_DIVERGED: ("EXIT_DIVERGED", "test_crash_resume.py::test_too_many_non_finite_steps_stop_with_the_last_good_checkpoint"),
    EXIT_WORKER_CRASHED: ("EXIT_WORKER_CRASHED", "test_crash_build_pairs.py::crash_then_rerun"),
    EXIT_NO_TOKEN: ("EXIT_NO_TOKEN", "test_publish.py::test_missing_token_exits_8_before_any_request"),
    EXIT_TOKEN_REJECTED: ("EXIT_TOKEN_REJECTED", "test_publish.py::test_rejected_token_exits_9_and_creates_nothing"),
    EXIT_HUB_UNREACHABLE: ("EXIT_HUB_UNREACHABLE", "test_publish.py::test_connection_refused_exits_10"),
    EXIT_REPO_CONFLICT: ("EXIT_REPO_CONFLICT", "test_publish.py::test_existing_repo_with_other_model_exits_11_unless_overwrite"),
    EXIT_HUB_FAILED: ("EXIT_HUB_FAILED", "test_publish.py::test_hub_failure_mid_upload_exits_12_and_the_rerun_completes"),
    EXIT_INTERRUPTED: ("EXIT_INTERRUPTED", "test_exit_status.py::test_ctrl_c_exits_130_with_a_resume_hint"),
}


def readme_table() -> dict[int, str]:
    section = doc_section("docs/exit-status.md", "Exit status")
    return {int(m[1]): m[2].strip() for m in re.finditer(r"^\| (\d+) \| (.+?) \|$", section, re.M)}


def test_readme_table_is_the_one_in_cnclip_errors():
    assert readme_table() == EXIT_MEANINGS


def test_every_status_is_produced_by_a_named_test():
    assert set(PRODUCED_BY) == set(EXIT_MEANINGS)
    for status, (assertion, where) in PRODUCED_BY.items():
        file, name = where.split("::")
        tree = ast.parse((REPO / "tests" / file).read_text(encoding="utf-8"))
        (fn,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
        assert assertion in ast.get_source_segment((REPO / "tests" / file).read_text(encoding="utf-8"), fn), \
            f"{where} does not assert exit status {status} ({assertion})"


def test_ok_and_usage_error(tmp_path, capsys):
    assert cnclip.finetune.main([str(tmp_path / "missing.yaml")]) == EXIT_USAGE
    assert "recipe file not found" in capsys.readouterr().err
    proc = subprocess.run([sys.executable, "-m", "cnclip", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "finetune" in proc.stdout


def test_a_bug_keeps_its_traceback_and_exits_1(tmp_path, tiny_model_dir, tiny_data_dir):
    # A planted bug in the training loop: not a user error, so Python's traceback and status 1 stay.
    code = ("import sys, cnclip.trainer\n"
            "def bug(recipe): raise ZeroDivisionError('planted bug')\n"
            "cnclip.trainer.train = bug\n"
            "import cnclip.commands.finetune as f\n"
            "f.train = bug\n"
            "sys.exit(f.main(sys.argv[1:]))\n")
    args = [str(DEMO_RECIPE), *tiny_overrides(tiny_model_dir, tiny_data_dir, tmp_path / "run")]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_INTERNAL
    assert "Traceback" in proc.stderr and "ZeroDivisionError: planted bug" in proc.stderr


def test_a_model_that_cannot_be_loaded_exits_5(tmp_path, tiny_data_dir):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "cnclip.evaluate", str(empty), "--data", str(tiny_data_dir)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == EXIT_MODEL, proc.stderr
    assert f"could not load a ChineseCLIP model from '{empty}'" in proc.stderr and "Traceback" not in proc.stderr


def test_ctrl_c_exits_130_with_a_resume_hint(tmp_path, tiny_model_dir, tiny_data_dir, monkeypatch, capsys):
    def interrupted(recipe):
        raise KeyboardInterrupt

    monkeypatch.setattr("cnclip.commands.finetune.train", interrupted)
    code = cnclip.finetune.main([str(DEMO_RECIPE), *tiny_overrides(tiny_model_dir, tiny_data_dir, tmp_path / "run")])
    assert code == EXIT_INTERRUPTED
    assert "interrupted; rerun the same command to resume" in capsys.readouterr().err
