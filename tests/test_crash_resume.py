"""Crash anywhere, resume exactly: SIGKILL during caching, mid-epoch and mid-checkpoint-write, a full
disk, and non-finite steps. Each interrupted run, rerun with the same command, ends with weights
bit-identical to an uninterrupted run's, and no checkpoint is ever left half-written."""

import json
import os
import resource
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import cnclip.finetune
import cnclip.trainer
from cnclip.errors import EXIT_DIVERGED
from cnclip.checkpoint import latest_checkpoint

from conftest import DEMO_RECIPE, tiny_overrides

EXTRA = {"train.epochs": 3, "cache.part_size": 5, "train.save_every": 2}


def command(model_dir, data_dir, run_dir):
    return [sys.executable, "-m", "cnclip.finetune", str(DEMO_RECIPE),
            *tiny_overrides(model_dir, data_dir, run_dir, **EXTRA)]


def run(cmd, crash_at=None, file_size_limit=None):
    env = {k: v for k, v in os.environ.items() if k != "CNCLIP_CRASH_AT"}
    if crash_at:
        env["CNCLIP_CRASH_AT"] = crash_at

    def limit():
        if file_size_limit:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of a signal
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run(cmd, env=env, capture_output=True, text=True, preexec_fn=limit)


def final_weights(run_dir):
    return load_file(str(latest_checkpoint(run_dir) / "trainable.safetensors"))


def assert_same_weights(a_dir, b_dir):
    a, b = final_weights(a_dir), final_weights(b_dir)
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name


def assert_no_half_checkpoint(run_dir):
    """Every visible checkpoint is complete; anything else is a temporary name the next run removes."""
    root = run_dir / "checkpoints"
    for entry in root.iterdir():
        if entry.name == "latest":
            continue
        if entry.name.startswith("step-"):
            assert {p.name for p in entry.iterdir()} == {"trainable.safetensors", "optimizer.pt", "rng.pt",
                                                          "state.json"}, entry
        else:
            assert entry.name.startswith(".") and ".tmp-" in entry.name, entry


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, tiny_model_dir):
    from conftest import make_tiny_dataset

    root = tmp_path_factory.mktemp("straight")
    data = make_tiny_dataset(root / "data")
    result = run(command(tiny_model_dir, data, root / "run"))
    assert result.returncode == 0, result.stderr[-2000:]
    return data, root / "run"


@pytest.mark.parametrize("crash_at", ["cache-part:2", "train-step:6", "checkpoint-write:3"])
def test_sigkill_then_rerun_gives_identical_weights(straight_run, tiny_model_dir, tmp_path, crash_at):
    data, straight = straight_run
    cmd = command(tiny_model_dir, data, tmp_path / "run")
    killed = run(cmd, crash_at=crash_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    if (tmp_path / "run" / "checkpoints").exists():
        assert_no_half_checkpoint(tmp_path / "run")
    resumed = run(cmd)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    if crash_at != "cache-part:2":
        assert "resuming from" in resumed.stderr
    assert_same_weights(straight, tmp_path / "run")
    assert_no_half_checkpoint(tmp_path / "run")
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if ".tmp-" in p.name]


def test_full_disk_keeps_the_previous_checkpoint(straight_run, tiny_model_dir, tmp_path):
    data, straight = straight_run
    run_dir = tmp_path / "run"
    cmd = command(tiny_model_dir, data, run_dir)
    assert run(cmd, crash_at="train-step:5").returncode == -signal.SIGKILL
    before = latest_checkpoint(run_dir)
    saved = load_file(str(before / "trainable.safetensors"))
    optimizer_size = (before / "optimizer.pt").stat().st_size
    full = run(cmd, file_size_limit=optimizer_size - 1)  # the next optimizer-state write cannot finish
    assert full.returncode == 3, full.stderr[-2000:]
    assert "error: out of disk space writing" in full.stderr and "Traceback" not in full.stderr
    after = latest_checkpoint(run_dir)
    assert after == before  # `latest` still names the last complete checkpoint
    for name, tensor in load_file(str(after / "trainable.safetensors")).items():
        assert torch.equal(tensor, saved[name])
    assert_no_half_checkpoint(run_dir)
    assert run(cmd).returncode == 0
    assert_same_weights(straight, run_dir)


def _nan_gradients_on(calls_to_poison, monkeypatch):
    real, calls = cnclip.trainer.contrastive_step, []

    def poisoned(clip, params, *args, **kwargs):
        loss = real(clip, params, *args, **kwargs)
        calls.append(1)
        if len(calls) in calls_to_poison:
            for p in params:
                p.grad.fill_(float("nan"))
        return loss

    monkeypatch.setattr(cnclip.trainer, "contrastive_step", poisoned)


def test_non_finite_steps_are_skipped_and_counted(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    _nan_gradients_on({2, 5}, monkeypatch)
    run_dir = tmp_path / "run"
    code = cnclip.finetune.main([str(DEMO_RECIPE), *tiny_overrides(tiny_model_dir, tiny_data_dir, run_dir,
                                                                    **{"train.max_bad_steps": 3})])
    assert code == 0
    skipped = [e for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "skipped" in e]
    assert [e["step"] for e in skipped] == [2, 5]
    state = json.loads((latest_checkpoint(run_dir) / "state.json").read_text())
    assert state["bad_steps"] == 2
    assert all(torch.isfinite(t).all() for t in final_weights(run_dir).values())


def test_too_many_non_finite_steps_stop_with_the_last_good_checkpoint(tiny_model_dir, tiny_data_dir, tmp_path,
                                                                      monkeypatch, capsys):
    _nan_gradients_on(set(range(6, 100)), monkeypatch)
    run_dir = tmp_path / "run"
    code = cnclip.finetune.main([str(DEMO_RECIPE), *tiny_overrides(tiny_model_dir, tiny_data_dir, run_dir,
                                                                    **{"train.max_bad_steps": 1})])
    assert code == EXIT_DIVERGED
    err = capsys.readouterr().err
    assert "2 steps had a non-finite loss or gradient (train.max_bad_steps=1)" in err
    assert "last good checkpoint" in err
    assert all(torch.isfinite(t).all() for t in final_weights(run_dir).values())
