"""Data-parallel training on 2 CPU processes (gloo, launched by torchrun) equals one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import cnclip.finetune
import cnclip.trainer
from cnclip import distributed
from cnclip.checkpoint import trainable_state
from cnclip.data import tokenize
from cnclip.runtime import pick_runtime, resolve_device
from cnclip.finetune import main as finetune_main
from cnclip.models import attach_text_tuning, load_base_model, lock_image_tower
from cnclip.recipe import ModelConfig
from cnclip.train_step import contrastive_step

from conftest import (DEMO_RECIPE, clamp_that_stops_in_step, lora_model_with_gradients, make_tiny_dataset,
                      tiny_overrides)

DRIVER = Path(__file__).with_name("dist_driver.py")
# Entries 1 (rank 0) and 6 (rank 1) share an image; 0 (rank 0) and 5 (rank 1) share a caption:
# masking these false negatives needs the other rank's keys.
CAPTIONS = ["一个红色的圆形", "左上角有一个蓝色的正方形", "猫", "高级感托特包斜挎",
            "一个红色的圆形", "白色连衣裙", "手机壳上画着一只狗", "黄色的花朵照片"]
IMAGE_KEYS = [0, 1, 2, 3, 4, 5, 1, 7]
TEXT_KEYS = [0, 1, 2, 3, 0, 5, 6, 7]


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in distributed.LAUNCH_VARS}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         str(DRIVER), *args],
        env=env, capture_output=True, text=True, timeout=240,
    )


def test_plain_process_needs_no_launcher(monkeypatch):
    for var in distributed.LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    info = distributed.init_distributed("cpu")
    assert (info.rank, info.world_size, info.backend) == (0, 1, None)
    assert distributed.is_main() and not distributed.is_distributed()
    t = torch.randn(3, 2, requires_grad=True)
    assert distributed.all_gather(t) is t  # no-ops for a world of one
    assert resolve_device("cpu") == "cpu"


def make_step_inputs(model_dir: Path, out: Path):
    """A global batch of 8, LoRA weights with non-zero B, and the one-process loss and gradients."""
    model, base = lora_model_with_gradients(model_dir, 0.0, ["query", "value", "dense"])
    save_file(trainable_state(model), str(out / "trainable.safetensors"))
    tokens = tokenize(base.tokenizer, CAPTIONS, 16)
    data = {"model_dir": str(model_dir), "trainable": str(out / "trainable.safetensors"), "tokens": tokens,
            "image_emb": torch.randn(len(CAPTIONS), 16, generator=torch.Generator().manual_seed(1)),
            "image_keys": torch.tensor(IMAGE_KEYS), "text_keys": torch.tensor(TEXT_KEYS)}
    data["image_emb"][6] = data["image_emb"][1]
    data["full"] = True  # the step with the whole text tower trained, too (under DDP on 2 processes)
    torch.save(data, out / "inputs.pt")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    loss = contrastive_step(base.clip, list(params.values()), tokens, data["image_emb"], data["image_keys"],
                            data["text_keys"], pick_runtime("cpu"))
    return loss.item(), {n: p.grad for n, p in params.items()}


def full_tuning_step(model_dir: Path, out: Path):
    """The one-process loss and gradients of the global batch in inputs.pt with model.text_tuning=full."""
    data = torch.load(out / "inputs.pt", weights_only=True)
    cfg = ModelConfig(base=str(model_dir), text_tuning="full")
    clip = load_base_model(cfg).clip
    attach_text_tuning(clip, cfg)
    clip.train()
    lock_image_tower(clip)
    params = {n: p for n, p in clip.named_parameters() if p.requires_grad}
    loss = contrastive_step(clip, list(params.values()), data["tokens"], data["image_emb"], data["image_keys"],
                            data["text_keys"], pick_runtime("cpu"))
    return loss.item(), {n: p.grad for n, p in params.items()}


@pytest.fixture(scope="module")
def two_process_launch(tiny_model_no_dropout_dir, tmp_path_factory):
    """One torchrun launch (worker start-up is the slow part): the one-step check, then a fine-tuning
    run on 2 processes that dies in step 3, after its step-2 checkpoint."""
    root = tmp_path_factory.mktemp("two_procs")
    expected = make_step_inputs(tiny_model_no_dropout_dir, root)
    expected_full = full_tuning_step(tiny_model_no_dropout_dir, root)
    data = make_tiny_dataset(root / "data")
    run_dir = root / "run"
    overrides = run_overrides(tiny_model_no_dropout_dir, data, run_dir)
    proc = torchrun("--step", str(root / "inputs.pt"), str(root), "--count-image-reads", str(root), "--stop-after", "3",
                    str(DEMO_RECIPE), *overrides)
    return {"root": root, "expected": expected, "expected_full": expected_full, "proc": proc, "run_dir": run_dir,
            "overrides": overrides}


def test_one_step_on_two_processes_equals_one_process(two_process_launch):
    root, (loss, expected) = two_process_launch["root"], two_process_launch["expected"]
    assert all(g.abs().max() > 0 for g in expected.values())
    for rank in (0, 1):
        assert (root / f"rank-{rank}.pt").is_file(), two_process_launch["proc"].stderr[-3000:]
        result = torch.load(root / f"rank-{rank}.pt", weights_only=True)
        for mode in ("chunk0", "chunk2"):  # plain, and gradient caching in chunks of 2 per rank
            got = result[mode]
            assert abs(got["loss"].item() - loss) < 1e-5, (rank, mode)
            assert got["grads"].keys() == expected.keys()
            diff = max((got["grads"][n] - g).abs().max().item() for n, g in expected.items())
            assert diff < 1e-5, (rank, mode, diff)


def test_full_text_tuning_under_ddp_on_two_processes_equals_one_process(two_process_launch):
    """model.text_tuning=full on 2 processes: DDP all-reduces the text tower's gradients in buckets
    during backward (gradient caching: once, after the last chunk), and the flat all-reduce after
    backward carries only what lies outside the tower (the logit scale), not the tower's 21,824
    parameters; loss and gradients equal one process's on the global batch."""
    root, (loss, expected) = two_process_launch["root"], two_process_launch["expected_full"]
    tower = sum(g.numel() for n, g in expected.items() if n.startswith("text_"))
    assert tower > 10_000 and all(g.abs().max() > 0 for g in expected.values())
    for rank in (0, 1):
        assert (root / f"rank-{rank}.pt").is_file(), two_process_launch["proc"].stderr[-3000:]
        result = torch.load(root / f"rank-{rank}.pt", weights_only=True)
        for mode in ("full0", "full2"):
            got = result[mode]
            assert got["largest_flat_all_reduce"] == 1, (rank, mode)  # the logit scale alone
            assert abs(got["loss"].item() - loss) < 1e-5, (rank, mode)
            assert got["grads"].keys() == expected.keys()
            diff = max((got["grads"][n] - g).abs().max().item() for n, g in expected.items())
            assert diff < 1e-5, (rank, mode, diff)


def test_rank_0_alone_reads_and_hashes_the_images(two_process_launch):
    """Indexing an images TSV reads and hashes the whole file (the cache key): rank 0 does it once per
    split and sends the index to the others, who read no TSV at start-up (before: every rank read both)."""
    root = two_process_launch["root"]
    reads = {r: json.loads(p.read_text()) if (p := root / f"image-reads-rank-{r}.json").is_file() else []
             for r in (0, 1)}
    assert reads == {0: ["train_imgs.tsv", "valid_imgs.tsv"], 1: []}, (reads, two_process_launch["proc"].stderr[-3000:])


# ---- whole runs: interrupted on N processes, resumed on M, equal to an uninterrupted run

def run_overrides(model_dir, data_dir, run_dir):
    return tiny_overrides(model_dir, data_dir, run_dir, **{
        "model.lora_dropout": 0.0, "data.num_workers": 0, "train.save_every": 2, "eval.before_training": False})


def losses(run_dir: Path) -> dict[int, float]:
    entries = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {e["step"]: e["loss"] for e in entries if "loss" in e}


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run_dir / "checkpoints" / latest / "trainable.safetensors"))


def assert_same_run(run_dir: Path, reference: Path) -> None:
    got, want = losses(run_dir), losses(reference)
    assert sorted(got) == sorted(want) == list(range(1, 9))  # 17 pairs, batch 4: 4 steps x 2 epochs
    assert max(abs(got[s] - want[s]) for s in want) < 1e-4, (got, want)
    a, b = final_weights(run_dir), final_weights(reference)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 8
    assert (run_dir / "best" / "adapter_model.safetensors").is_file()


@pytest.fixture(scope="module")
def reference_run(tiny_model_no_dropout_dir, tmp_path_factory) -> Path:
    """The same recipe, one process, never interrupted."""
    root = tmp_path_factory.mktemp("reference")
    run_dir = root / "run"
    overrides = run_overrides(tiny_model_no_dropout_dir, make_tiny_dataset(root / "data"), run_dir)
    assert finetune_main([str(DEMO_RECIPE), *overrides]) == 0
    return run_dir


def test_two_processes_interrupted_then_resumed_on_one(two_process_launch, reference_run):
    proc, run_dir = two_process_launch["proc"], two_process_launch["run_dir"]
    assert proc.returncode != 0  # killed in step 3
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000002", proc.stderr[-3000:]
    assert "2 process(es)" in (run_dir / "train.log").read_text()
    assert sorted(losses(run_dir)) == [1, 2]  # only rank 0 wrote metrics
    # Cached once, by rank 0, for the train and valid splits.
    assert len([p for p in (run_dir.parent / "cache").iterdir() if p.is_dir()]) == 2

    assert finetune_main([str(DEMO_RECIPE), *two_process_launch["overrides"]]) == 0  # one plain process resumes
    assert_same_run(run_dir, reference_run)


def test_one_process_interrupted_then_resumed_on_two(tiny_model_no_dropout_dir, reference_run, tmp_path,
                                                     monkeypatch):
    run_dir = tmp_path / "run"
    overrides = run_overrides(tiny_model_no_dropout_dir, make_tiny_dataset(tmp_path / "data"), run_dir)
    # in step 5, after the epoch-1 checkpoint (step 4)
    monkeypatch.setattr(cnclip.trainer, "clamp_logit_scale", clamp_that_stops_in_step(5))
    with pytest.raises(SystemExit):
        finetune_main([str(DEMO_RECIPE), *overrides])
    monkeypatch.undo()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000004"

    proc = torchrun(str(DEMO_RECIPE), *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in (run_dir / "train.log").read_text()
    assert_same_run(run_dir, reference_run)
    assert '"steps": 8' in proc.stdout and proc.stdout.count('"run_dir"') == 1  # rank 0 alone reports


def test_full_text_tuning_trains_on_two_processes_like_one(tiny_model_no_dropout_dir, tmp_path):
    """The trainer's full-tuning path on 2 processes (DDP over the text tower, gradient caching in
    chunks of 1: DDP's no_sync for the first chunk of each rank) against one plain process: the same
    losses and final weights (the whole text tower) within 1e-4."""
    data = make_tiny_dataset(tmp_path / "data")
    extra = {"model.text_tuning": "full", "train.epochs": 1, "train.grad_cache_chunk": 1}
    one, two = tmp_path / "one" / "run", tmp_path / "two" / "run"
    assert finetune_main([str(DEMO_RECIPE), *run_overrides(tiny_model_no_dropout_dir, data, one), *
                          [f"{k}={v}" for k, v in extra.items()]]) == 0
    proc = torchrun(str(DEMO_RECIPE), *run_overrides(tiny_model_no_dropout_dir, data, two),
                    *[f"{k}={v}" for k, v in extra.items()])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "text tower gradients: all-reduced by DDP" in (two / "train.log").read_text()
    got, want = losses(two), losses(one)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4] and max(abs(got[s] - want[s]) for s in want) < 1e-4, (got, want)
    a, b = final_weights(two), final_weights(one)
    assert a.keys() == b.keys() and any(k.startswith("text_model.encoder") for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
