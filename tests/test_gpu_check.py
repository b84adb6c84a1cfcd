"""benchmarks/gpu_check.py: its CPU mode runs every check on small shapes and each reports ok (or, for
what only CUDA can measure, a stated skip); and a check fed a wrong computation reports failed."""

from __future__ import annotations

import json

import pytest

from conftest import load_benchmark

GPU_ONLY = {"syncs_per_step"}  # counts CUDA synchronisations: nothing to count on a CPU


@pytest.fixture(scope="module")
def gpu_check():
    return load_benchmark("gpu_check")


@pytest.fixture()
def ctx(gpu_check, tmp_path):
    from cnclip.runtime import pick_runtime

    return gpu_check.Context(cpu=True, runtime=pick_runtime("cpu"), shapes=gpu_check.CPU_SHAPES, work=tmp_path)


def test_cpu_mode_runs_every_check_and_each_passes(gpu_check, tmp_path, capsys):
    out = tmp_path / "check.json"
    code = gpu_check.main(["--cpu", "--work-dir", str(tmp_path / "work"), "--out", str(out)])
    summary = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == summary  # the JSON on stdout is the summary
    assert summary["mode"] == "cpu" and list(summary["checks"]) == list(gpu_check.CHECKS)
    for name, result in summary["checks"].items():
        if name in GPU_ONLY:
            assert result["status"] == "skipped" and "CUDA" in result["reason"], (name, result)
        else:
            assert result["status"] == "ok", (name, result)
    assert code == 0 and summary["failed"] == [] and set(summary["skipped"]) == GPU_ONLY
    checks = summary["checks"]
    # The numbers behind each "ok": two computations compared, and what was compared is really there.
    assert checks["packed_text"]["padding_fraction"] > 0.2 and checks["packed_text"]["fp32_relative_diff"]["gradient"] < 1e-4
    assert 0 < checks["grad_cache"]["bf16_gradient_relative_diff"] < checks["grad_cache"]["bf16_vs_fp32_gradient_relative_diff"]
    assert all(row["full"]["relative_diff_vs_float64"] < 1e-4 for row in checks["loss_memory"]["sizes"].values())
    demo = checks["demo"]
    assert demo["mean_recall_after"] > demo["mean_recall_before"] and demo["rerun_steps_this_run"] == 0
    assert demo["rerun_files_unchanged"] is True
    assert checks["sigkill_resume"]["bit_identical"] is True and checks["sigkill_resume"]["tensors"] > 0
    assert set(checks["compile"]["lengths"]) and checks["compile"]["max_relative_diff"] < 1e-4
    assert checks["throughput"]["scenarios"]["short"]["speedup"] > 0  # its size is a timing: the benchmark reports it


def test_packed_text_check_fails_when_the_packed_path_computes_something_else(gpu_check, ctx, monkeypatch):
    real = gpu_check.encode_texts_packed
    monkeypatch.setattr(gpu_check, "encode_texts_packed", lambda clip, **tokens: real(clip, **tokens) * 1.001)
    result = gpu_check.check_packed_text(ctx)
    assert result["status"] == "failed" and result["fp32_relative_diff"]["embedding"] > 1e-4, result


def test_packed_text_check_fails_when_the_packed_path_is_not_taken(gpu_check, ctx, monkeypatch):
    """A model the packed path does not support falls back to the plain forward: plain == plain proves nothing."""
    monkeypatch.setattr(gpu_check, "supports_packing", lambda clip: False)
    result = gpu_check.check_packed_text(ctx)
    assert result["status"] == "failed" and "supports_packing" in result["reason"]


def test_grad_cache_check_fails_on_a_wrong_chunked_gradient(gpu_check, ctx, monkeypatch):
    real = gpu_check.contrastive_step

    def off_when_chunked(clip, params, *args, grad_cache_chunk=0, **kwargs):
        loss = real(clip, params, *args, grad_cache_chunk=grad_cache_chunk, **kwargs)
        if grad_cache_chunk:
            for p in params:
                p.grad.mul_(1.01)
        return loss

    monkeypatch.setattr(gpu_check, "contrastive_step", off_when_chunked)
    result = gpu_check.check_grad_cache(ctx)
    assert result["status"] == "failed" and result["fp32_gradient_relative_diff"] > 1e-4, result


def test_loss_check_fails_when_the_loss_is_not_the_reference(gpu_check, ctx, monkeypatch):
    real = gpu_check.clip_loss
    monkeypatch.setattr(gpu_check, "clip_loss", lambda *args, **kwargs: real(*args, **kwargs) * 1.001)
    result = gpu_check.check_loss_memory(ctx)
    assert result["status"] == "failed" and "float64 reference" in result["reason"], result


def test_loss_check_compares_a_chunked_loss_with_the_full_one(gpu_check, ctx, monkeypatch):
    """The blocked loss's value and gradient must equal the one-block loss's: a stand-in whose blocked
    result is off fails, a correct one passes."""
    real = gpu_check.clip_loss

    def with_chunk(image, text, scale, image_keys=None, text_keys=None, chunk=0, error=0.0):
        return real(image, text, scale, image_keys, text_keys) * (1 + (error if chunk else 0.0))

    monkeypatch.setattr(gpu_check, "clip_loss", with_chunk)
    good = gpu_check.check_loss_memory(ctx)
    assert good["status"] == "ok" and good["chunk"] == ctx.shapes.loss_chunk, good
    assert all(row["chunked_vs_full"]["loss"] < 1e-6 for row in good["sizes"].values())
    monkeypatch.setattr(gpu_check, "clip_loss", lambda *a, chunk=0, **k: with_chunk(*a, chunk=chunk, error=1e-3, **k))
    bad = gpu_check.check_loss_memory(ctx)
    assert bad["status"] == "failed" and "chunked" in bad["reason"], bad


def test_unknown_check_names_are_refused(gpu_check, capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--cpu", "--only", "environment,warp_drive"])
    assert exc.value.code == 2 and "warp_drive" in capsys.readouterr().err


def test_a_check_that_raises_is_reported_failed_not_fatal(gpu_check, ctx, monkeypatch):
    def broken(_ctx):
        raise RuntimeError("kernel image not available")

    monkeypatch.setitem(gpu_check.CHECKS, "environment", broken)
    result = gpu_check.run_check("environment", ctx)
    assert result["status"] == "failed" and "kernel image not available" in result["reason"]
    assert "traceback" in result and "seconds" in result
