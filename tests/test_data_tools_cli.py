"""`data_tools build-pairs` command line: help, user errors (exit 2, no traceback), a small run."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from data_tools.cli import main

REPO = Path(__file__).resolve().parent.parent


def run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_tools", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_help_explains_every_option():
    result = run_module("build-pairs", "--help")
    assert result.returncode == 0
    for option in ("--out", "--per-query-cap", "--splits", "--workers", "--config", "--format", "--seed", "--shard-size", "--no-progress"):
        assert option in result.stdout
    assert "cnclip,pairs,webdataset" in result.stdout and "report.json" in result.stdout


def test_missing_input_is_a_clean_error(tmp_path):
    result = run_module("build-pairs", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert f"error: input not found: {tmp_path / 'nope.jsonl'}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.fixture()
def dump(tmp_path):
    image = Image.new("RGB", (40, 40), (200, 30, 30))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    (tmp_path / "cat.png").write_bytes(buffer.getvalue())
    records = [{"query": "可爱小猫", "image": "cat.png", "alt": "一只可爱的小猫"}, {"query": "可爱小猫", "alt": "只有文字的小猫"}]
    path = tmp_path / "dump.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--splits", "0.9,0.1"], "argument --splits: expected 3 comma-separated fractions"),
        (["--splits", "0.9,0.2,0.1"], "fractions must be >= 0 and sum to 1"),
        (["--workers", "0"], "argument --workers: expected an integer >= 1, got '0'"),
        (["--per-query-cap", "-1"], "argument --per-query-cap: expected an integer >= 0"),
        (["--format", "csv"], "argument --format: invalid choice: 'csv'"),
        (["--config", "missing.yaml"], "filter config file not found: missing.yaml"),
    ],
)
def test_bad_arguments_exit_2(dump, tmp_path, capsys, extra, message):
    try:  # argparse's own checks exit from parse_args; the rest come back through run_command
        code = main(["build-pairs", str(dump), "--out", str(tmp_path / "out"), *extra])
    except SystemExit as caught:
        code = caught.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_bad_config_key_names_the_key(dump, tmp_path, capsys):
    (tmp_path / "filters.yaml").write_text("image:\n  min_sid: 10\n")
    code = main(["build-pairs", str(dump), "--out", str(tmp_path / "out"), "--config", str(tmp_path / "filters.yaml")])
    assert code == 2
    assert "unknown filter config key 'image.min_sid'" in capsys.readouterr().err


def test_out_must_be_a_directory(dump, tmp_path, capsys):
    assert main(["build-pairs", str(dump), "--out", str(dump)]) == 2
    assert "--out is not a directory" in capsys.readouterr().err


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "build-pairs" in capsys.readouterr().err


def test_small_run_prints_a_summary(dump, tmp_path, capsys):
    (tmp_path / "filters.yaml").write_text("image:\n  min_side: 32\n")
    out = tmp_path / "out"
    code = main(["build-pairs", str(dump), "--out", str(out), "--config", str(tmp_path / "filters.yaml"), "--splits", "1,0,0", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr()
    assert "records read: 2" in printed.out and "no_image" in printed.out and f"report: {out / 'report.json'}" in printed.out
    assert printed.err == ""  # --no-progress: nothing on stderr
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert (report["kept"], report["rejected"]) == (1, {"no_image": 1})
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["report.json", "train_imgs.tsv", "train_meta.jsonl", "train_texts.jsonl"]
