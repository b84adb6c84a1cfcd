"""An empty split is found where it is made: build-pairs warns (stdout and report.json) and says how to
fix it; fine-tuning refuses a needed split that is empty before it loads the model or caches images."""

import json

import pytest

import cnclip.trainer
from cnclip.errors import EXIT_DATA
from cnclip.finetune import main as finetune_main
from data_tools.cli import main as data_tools_main

from conftest import DEMO_RECIPE, tiny_overrides
from test_data_tools_finetune import write_crawl


def must_not_run(what: str):
    def fail(*args, **kwargs):
        raise AssertionError(f"{what} before the empty split was refused")
    return fail


@pytest.fixture
def filters(tmp_path):
    path = tmp_path / "filters.yaml"
    path.write_text("text:\n  min_chars: 3\nimage:\n  min_side: 32\n", encoding="utf-8")
    return path


def test_build_pairs_warns_about_each_empty_split_and_says_how_to_fix_it(tmp_path, filters, capsys):
    write_crawl(tmp_path / "crawl")  # 24 pairs: 1% of them is 0.24, and here no group lands in valid or test
    out = tmp_path / "pairs"
    assert data_tools_main(["build-pairs", str(tmp_path / "crawl"), "--out", str(out), "--config", str(filters),
                            "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["splits"] == {"train": 24, "valid": 0, "test": 0}
    assert len(report["warnings"]) == 2
    for name, warning in zip(("valid", "test"), report["warnings"]):
        assert warning.startswith(f"split '{name}' is empty: 1% of the 24 pairs kept is 0.2 pairs")
        assert "--splits" in warning
    printed = capsys.readouterr().out
    assert [line for line in printed.splitlines() if line.startswith("warning: ")] == \
        [f"warning: {warning}" for warning in report["warnings"]]


def test_no_warning_when_every_split_has_pairs_or_was_not_asked_for(tmp_path, filters):
    write_crawl(tmp_path / "crawl")
    out = tmp_path / "pairs"
    assert data_tools_main(["build-pairs", str(tmp_path / "crawl"), "--out", str(out), "--config", str(filters),
                            "--splits", "0.7,0.3,0", "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["splits"]["valid"] > 0 and "test" not in report["splits"]
    assert report["warnings"] == []


def test_finetune_refuses_an_empty_validation_split_before_any_expensive_work(tiny_model_dir, tmp_path, filters,
                                                                             monkeypatch, capsys):
    write_crawl(tmp_path / "crawl")
    data = tmp_path / "pairs"
    assert data_tools_main(["build-pairs", str(tmp_path / "crawl"), "--out", str(data), "--config", str(filters),
                            "--no-progress"]) == 0
    assert (data / "valid_texts.jsonl").read_text(encoding="utf-8") == ""
    monkeypatch.setattr(cnclip.trainer, "load_base_model", must_not_run("loading the model"))
    monkeypatch.setattr(cnclip.trainer, "split_image_features", must_not_run("building the image cache"))
    run_dir = tmp_path / "run"
    assert finetune_main([str(DEMO_RECIPE), *tiny_overrides(tiny_model_dir, data, run_dir)]) == EXIT_DATA
    assert not (tmp_path / "cache").exists()
    assert f"error: split 'valid' has no usable texts: {data / 'valid_texts.jsonl'}" in capsys.readouterr().err
