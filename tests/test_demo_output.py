"""The offline demo, run exactly as README says: it prints what README shows, and fine-tuning
improves held-out retrieval far beyond chance on its learnable data set."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`python -m cnclip.finetune recipes/demo.yaml` in a fresh directory (the recipe's paths are relative)."""
    work = tmp_path_factory.mktemp("demo")
    (work / "recipes").symlink_to(REPO / "recipes")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "cnclip.finetune", "recipes/demo.yaml"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work, proc.stdout


def readme_demo_output() -> list[str]:
    section = (REPO / "README.md").read_text(encoding="utf-8").split("## What the demo shows", 1)[1]
    return section.split("```\n", 2)[1].splitlines()


def test_the_demo_prints_what_readme_shows(demo_run):
    _, stdout = demo_run
    lines = stdout.rstrip().splitlines()
    summary = lines[len(lines) - lines[::-1].index(""):-1]  # after the last epoch's table, before the JSON line
    assert summary == readme_demo_output()
    assert json.loads(lines[-1])["run_dir"] == "runs/demo"


def test_fine_tuning_improves_held_out_retrieval_far_beyond_chance(demo_run):
    work, _ = demo_run
    summary = json.loads((work / "runs" / "demo" / "summary.json").read_text(encoding="utf-8"))
    images = summary["best"]["valid"]["num_images"]
    chance = sum(100 * k / images for k in (1, 5, 10)) / 3  # mean recall of a random ranking: 5.93 for 90
    assert images == 90 and summary["best"]["valid"]["num_texts"] == 90  # new drawings, unseen wordings
    assert summary["before"]["mean_recall"] < 2 * chance
    assert summary["after"]["mean_recall"] > 5 * chance and summary["best"]["valid"]["mean_recall"] > 8 * chance
