"""Guarantees where a real user's machine differs from a one-process fp32 CPU run: several processes
with dropout on, ranks on nodes without a shared disk, bf16, GPU-only code paths (exercised with
faked devices), the logit-scale cap, a rerun of a finished run."""

import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file

import cnclip.trainer
from cnclip import checkpoint, distributed
from cnclip.determinism import deterministic_algorithms, step_seed
from cnclip.errors import ConfigError
from cnclip.finetune import main as finetune_main
from cnclip.recipe import dump_recipe, load_recipe
from cnclip.runtime import native_bf16, pick_runtime, resolve_device

from conftest import DEMO_RECIPE, clamp_that_stops_in_step, in_fresh_process, make_tiny_dataset, tiny_overrides
from test_distributed import final_weights, losses, torchrun


def run_overrides(model_dir, data_dir, run_dir, **extra):
    return tiny_overrides(model_dir, data_dir, run_dir, **{
        "data.num_workers": 0, "train.save_every": 2, "eval.before_training": False, **extra})


# ---- determinism by design: per-(seed, rank, step) random streams


STEP_SEEDS = "import json; from cnclip.determinism import step_seed; " \
             "print(json.dumps([step_seed(s, r, k) for s in (0, 1) for r in (0, 1, 2) for k in range(50)]))"


def test_step_seeds_depend_on_seed_rank_and_step_only():
    """Distinct for every triple, and nothing else enters: the same in another process (another str-hash
    salt, fresh random state) and after this one's torch/random state moved, as a resumed run needs."""
    torch.manual_seed(987)
    random.seed(987)
    here = [step_seed(s, r, k) for s in (0, 1) for r in (0, 1, 2) for k in range(50)]
    assert len(set(here)) == 2 * 3 * 50 and all(0 <= x < 2 ** 63 for x in here)  # a valid torch.manual_seed
    assert in_fresh_process(STEP_SEEDS) == here


def test_two_processes_with_dropout_on_resume_bit_identically(tiny_model_dir, tmp_path):
    """2 gloo processes, the tower's dropout 0.1 and LoRA dropout 0.1: killed in step 3 (after the
    step-2 checkpoint) and rerun, the run equals an uninterrupted one bit for bit."""
    config = json.loads((tiny_model_dir / "config.json").read_text())["text_config"]
    assert config["hidden_dropout_prob"] > 0 and config["attention_probs_dropout_prob"] > 0
    data = make_tiny_dataset(tmp_path / "data")
    reference, run = tmp_path / "reference", tmp_path / "run"
    proc = torchrun(str(DEMO_RECIPE), *run_overrides(tiny_model_dir, data, reference, **{"model.lora_dropout": 0.1}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    overrides = run_overrides(tiny_model_dir, data, run, **{"model.lora_dropout": 0.1})
    proc = torchrun("--stop-after", "3", str(DEMO_RECIPE), *overrides)
    assert proc.returncode != 0 and (run / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    proc = torchrun(str(DEMO_RECIPE), *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(run) == losses(reference) and sorted(losses(run)) == list(range(1, 9))
    got, want = final_weights(run), final_weights(reference)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_ranks_that_see_different_run_dirs_refuse_to_resume(tiny_model_no_dropout_dir, tmp_path, monkeypatch):
    """Multi-node without a shared filesystem: rank 1 finds no checkpoint where rank 0 resumes from
    step 4. Every rank stops with the reason before anything else: the file rank 0 wrote in run_dir
    is not seen by rank 1."""
    run_dir = tmp_path / "run"
    overrides = run_overrides(tiny_model_no_dropout_dir, make_tiny_dataset(tmp_path / "data"), run_dir)
    # in step 5, after the epoch-1 checkpoint (step 4)
    monkeypatch.setattr(cnclip.trainer, "clamp_logit_scale", clamp_that_stops_in_step(5))
    with pytest.raises(SystemExit):
        finetune_main([str(DEMO_RECIPE), *overrides])
    monkeypatch.undo()
    proc = torchrun("--node-local-dirs", str(DEMO_RECIPE), *overrides)
    assert proc.returncode != 0
    # Both ranks stop with the message (torchrun then reports the failed workers).
    assert proc.stderr.count(f"error: a file rank 0 wrote is not seen by every rank: run_dir {run_dir} ") == 2, \
        proc.stderr[-3000:]
    assert "filesystem every node shares" in proc.stderr
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000004"  # untouched


def test_ranks_without_a_shared_filesystem_stop_with_one_message_before_any_work(tiny_model_no_dropout_dir,
                                                                                  tmp_path):
    """A fresh run whose run_dir and cache.dir are each node's own: before the demo data, the model or
    the image cache, every rank stops with exit 2 and one message naming both directories and what
    they need (before: the cache's manifest writer failed on a part it could not see, a traceback)."""
    run_dir, cache_dir = tmp_path / "run", tmp_path / "cache"
    overrides = run_overrides(tiny_model_no_dropout_dir, make_tiny_dataset(tmp_path / "data"), run_dir,
                              **{"cache.dir": str(cache_dir)})
    proc = torchrun("--node-local-dirs", str(DEMO_RECIPE), *overrides)
    assert proc.returncode != 0
    message = (f"error: a file rank 0 wrote is not seen by every rank: run_dir {run_dir} (rank 0's): not seen by "
               f"rank 1 (its run_dir: {run_dir}-rank1); cache.dir {cache_dir} (rank 0's): not seen by rank 1 "
               f"(its cache.dir: {cache_dir}-rank1). A job on several nodes needs these directories on a "
               "filesystem every node shares")
    assert proc.stderr.count(message) == 2, proc.stderr[-3000:]
    assert "exitcode  : 2" in proc.stderr  # UsageError's status, on both ranks
    # The workers print the error line, no traceback (torchrun's own report of failed workers has one).
    assert proc.stderr.count("Traceback") == proc.stderr.count("ChildFailedError:") == 1
    assert "FileNotFoundError" not in proc.stderr and "AttributeError" not in proc.stderr
    assert not any(cache_dir.glob("*/part-*")) and not (run_dir / "checkpoints").exists()
    assert not list(run_dir.glob(".cnclip-shared-check-*"))  # the probe is removed


def test_a_changed_packed_text_or_compile_is_refused_on_resume(tmp_path):
    """Packing changes which dropout masks are drawn: a resumed run would not be the same run."""
    recipe = load_recipe(DEMO_RECIPE, [f"run_dir={tmp_path}"], check_data=False)
    dump_recipe(recipe, tmp_path / "recipe.yaml")
    for key in ("train.packed_text=false", "train.compile=true"):
        with pytest.raises(ConfigError, match=key.split("=")[0].replace(".", r"\.")):
            cnclip.trainer.check_run_dir(tmp_path, load_recipe(DEMO_RECIPE, [f"run_dir={tmp_path}", key],
                                                               check_data=False))
    # How a step is computed, not what: allowed.
    cnclip.trainer.check_run_dir(tmp_path, load_recipe(DEMO_RECIPE, [f"run_dir={tmp_path}", "train.grad_cache_chunk=8"],
                                                       check_data=False))


def test_deterministic_switch_turns_torch_deterministic_algorithms_on_for_the_run_only():
    assert not torch.are_deterministic_algorithms_enabled()
    with deterministic_algorithms(True, torch.device("cpu")):
        assert torch.are_deterministic_algorithms_enabled()
    assert not torch.are_deterministic_algorithms_enabled()


# ---- bf16 on a CPU (torch's CPU autocast): training, caching, evaluation; a finished run rerun


def test_bf16_training_caching_and_evaluation_then_a_rerun_trains_nothing(tiny_model_dir, tiny_data_dir, tmp_path,
                                                                         capsys):
    from cnclip.commands.evaluate import main as evaluate_main

    run_dir = tmp_path / "run"
    overrides = tiny_overrides(tiny_model_dir, tiny_data_dir, run_dir, **{
        "train.precision": "bf16", "train.deterministic": True, "data.num_workers": 0})
    assert finetune_main([str(DEMO_RECIPE), *overrides]) == 0
    first = capsys.readouterr().out
    log = (run_dir / "train.log").read_text()
    assert "precision bf16, 1 process(es), deterministic algorithms" in log
    # The image cache was computed under bf16 autocast: every embedding is a bf16 value.
    for part in (tmp_path / "cache").glob("*/part-*.safetensors"):
        emb = load_file(str(part))["embeddings"]
        assert torch.equal(emb, emb.bfloat16().float()) and torch.isfinite(emb).all()
    steps = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(e["loss"]) for e in steps if "loss" in e)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps_this_run"] == summary["steps"] == 8 and summary["last_epoch"] == 2
    # train.log holds the per-epoch results and the summary the console shows.
    assert "epoch 2 validation recall (valid)" in log and "mean recall after training: last epoch (2)" in log
    assert "mean recall after training: last epoch (2)" in first and "best epoch (" in first

    caches = sorted((tmp_path / "cache").iterdir())
    assert evaluate_main([str(run_dir), "--split", "valid"]) == 0  # the run's precision: bf16
    # The cache key holds the precision: evaluation in fp32 would have computed a cache of its own.
    assert sorted((tmp_path / "cache").iterdir()) == caches
    metrics = json.loads((run_dir / "eval" / "valid_metrics.json").read_text())
    assert metrics["num_texts"] == metrics["num_images"] == 8  # 4 colours x 2 shapes, one image each
    assert_recalls_are_those_of_the_rankings(run_dir / "eval", tiny_data_dir, metrics)

    capsys.readouterr()
    assert finetune_main([str(DEMO_RECIPE), *overrides]) == 0  # the same command again
    again = capsys.readouterr().out
    assert again.startswith(f"nothing to train: {run_dir} had already finished all 8 steps")
    assert json.loads((run_dir / "summary.json").read_text())["steps_this_run"] == 0
    assert "nothing to train" in (run_dir / "train.log").read_text()


def assert_recalls_are_those_of_the_rankings(eval_dir, data_dir, metrics) -> None:
    """The recalls in valid_metrics.json, recounted by hand from the rankings evaluate wrote beside them."""
    truth = {}  # text id -> its image ids
    for line in (data_dir / "valid_texts.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        truth[row["text_id"]] = set(row["image_ids"])
    rankings = {"text_to_image": [], "image_to_text": []}  # (ranked ids, the right ones)
    for line in (eval_dir / "valid_predictions.jsonl").read_text().splitlines():
        row = json.loads(line)
        rankings["text_to_image"].append((row["image_ids"], truth[row["text_id"]]))
    for line in (eval_dir / "valid_image_predictions.jsonl").read_text().splitlines():
        row = json.loads(line)
        rankings["image_to_text"].append((row["text_ids"], {t for t, images in truth.items() if row["image_id"] in images}))
    for direction, ranked in rankings.items():
        assert len(ranked) == 8 and all(len(ids) == 8 for ids, _ in ranked)  # every query, the whole gallery ranked
        for k in (1, 5, 10):
            hits = sum(bool(set(ids[:k]) & right) for ids, right in ranked)
            assert metrics[direction][f"r{k}"] == pytest.approx(100 * hits / len(ranked)), (direction, k)
        assert metrics[direction]["r10"] == 100  # 8 candidates: the right one is always in the top 10
        assert metrics[direction]["mean_recall"] == pytest.approx(sum(metrics[direction][f"r{k}"] for k in (1, 5, 10)) / 3)
    assert metrics["mean_recall"] == pytest.approx((metrics["text_to_image"]["mean_recall"]
                                                    + metrics["image_to_text"]["mean_recall"]) / 2)


def test_the_logit_scale_is_held_at_its_cap_of_100(tiny_model_dir, tiny_data_dir, tmp_path):
    """A model whose temperature starts above the cap (scale 165): every logged step shows 100."""
    from transformers import ChineseCLIPModel

    model = ChineseCLIPModel.from_pretrained(str(tiny_model_dir))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0) + 0.5)
    hot = tmp_path / "hot_model"
    model.save_pretrained(hot)
    for name in ("vocab.txt", "tokenizer_config.json", "preprocessor_config.json"):
        (hot / name).write_bytes((tiny_model_dir / name).read_bytes())
    run_dir = tmp_path / "run"
    assert finetune_main([str(DEMO_RECIPE), *tiny_overrides(hot, tiny_data_dir, run_dir, **{
        "train.epochs": 1, "train.lr": 0.05})]) == 0
    scales = [json.loads(ln)["logit_scale"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()
              if "logit_scale" in ln]
    assert len(scales) == 4 and max(scales) == pytest.approx(100.0, abs=1e-3)
    assert all(s <= 100.0 + 1e-4 for s in scales)


def test_packing_falls_back_where_the_attention_module_is_not_the_one_it_mirrors(tiny_model_dir):
    """transformers 4's BERT attention has no `attention_dropout`: the plain path runs, no crash."""
    from cnclip.models import load_clip
    from cnclip.packed_text import supports_packing

    clip = load_clip(str(tiny_model_dir))
    assert supports_packing(clip)
    del clip.text_model.encoder.layer[0].attention.self.attention_dropout
    assert not supports_packing(clip)


# ---- GPU-only code paths, with faked devices


def test_checkpoint_rng_state_is_the_own_gpus_and_loads_with_fewer_gpus(monkeypatch, tmp_path):
    states = {i: torch.full((16,), i, dtype=torch.uint8) for i in range(4)}
    set_calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: states[device].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: set_calls.append((device, state)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)  # rank 3 of a 4-GPU job saves
    checkpoint.save_torch(checkpoint._rng_state(), tmp_path / "rng.pt")
    saved = torch.load(tmp_path / "rng.pt", weights_only=True)
    assert torch.equal(saved["cuda"], states[3])

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # resumed as a 1-GPU debug run
    checkpoint._set_rng_state(saved)
    assert [(d, s.tolist()) for d, s in set_calls] == [(0, states[3].tolist())]
    # A checkpoint of the older layout (one state per GPU rank 0 saw) on fewer GPUs: no IndexError.
    set_calls.clear()
    older = {"torch": torch.get_rng_state(), "cuda": [states[i] for i in range(4)]}
    checkpoint._set_rng_state(older)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 5)
    checkpoint._set_rng_state(older)
    assert [d for d, _ in set_calls] == [0]


def fake_gpus(monkeypatch, capabilities: list[tuple[int, int]]) -> list:
    """CUDA calls answered as on a machine whose process sees GPUs of these compute capabilities;
    returns the log of set_device calls and capability queries."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", torch.device(device))))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")

    def capability(device=None):
        calls.append(("capability", torch.device(device)))
        return capabilities[torch.device(device).index]

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    # What native_bf16 used to ask: the *current* device's answer, whatever device it was given.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: capabilities[0][0] >= 8)
    return calls


def test_bf16_is_chosen_only_on_gpus_with_native_bf16(monkeypatch):
    fake_gpus(monkeypatch, [(7, 5)])  # a T4
    runtime = pick_runtime("cuda", "auto")
    assert (str(runtime.device), runtime.precision) == ("cuda:0", "fp16")  # with a loss scaler (test_precision.py)
    with pytest.raises(ConfigError, match="Tesla T4 .* has no native bf16"):
        pick_runtime("cuda", "bf16")
    fake_gpus(monkeypatch, [(8, 0)])  # an A100
    assert pick_runtime("cuda", "auto").precision == "bf16"
    assert pick_runtime("cpu", "bf16").autocast_dtype == torch.bfloat16  # CPU autocast has bf16
    assert pick_runtime("cpu", "auto").precision == "fp32"


def test_device_id_is_passed_only_where_init_process_group_takes_it():
    def torch_2_2(backend=None, timeout=None, rank=-1, world_size=-1):  # no device_id before torch 2.3
        pass

    def torch_2_3(backend=None, timeout=None, device_id=None):
        pass

    cuda = torch.device("cuda:1")
    assert distributed.process_group_kwargs(cuda, torch_2_2) == {}
    assert distributed.process_group_kwargs(cuda, torch_2_3) == {"device_id": cuda}
    assert distributed.process_group_kwargs(torch.device("cpu"), torch_2_3) == {}
    assert distributed.DEFAULT_TIMEOUT.total_seconds() <= 30 * 60 < distributed.HOST_WAIT_TIMEOUT.total_seconds()


@pytest.mark.parametrize("local_rank, visible, expected", [(3, 4, "cuda:3"), (3, 1, "cuda:0"), (5, 2, "cuda:1")])
def test_each_process_drives_local_rank_modulo_the_gpus_it_sees(monkeypatch, local_rank, visible, expected):
    """All of the node's GPUs visible: cuda:LOCAL_RANK; one GPU per process (CUDA_VISIBLE_DEVICES set
    per process by a scheduler): cuda:0, not a cuda:3 that does not exist there."""
    calls = fake_gpus(monkeypatch, [(8, 0)] * visible)
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    assert resolve_device("auto") == resolve_device("cuda") == expected
    assert str(pick_runtime("auto", "auto").device) == expected
    assert calls[0] == ("set_device", torch.device(expected))


def test_native_bf16_asks_the_gpu_it_is_given_after_set_device(monkeypatch):
    """Rank 1 of a node whose cuda:0 is an A100 and cuda:1 a T4 (or whose current device is not yet
    its own): the answer is cuda:1's, asked after the process made cuda:1 its device."""
    calls = fake_gpus(monkeypatch, [(8, 0), (7, 5)])
    monkeypatch.setenv("LOCAL_RANK", "1")
    runtime = pick_runtime("auto", "auto")
    assert (str(runtime.device), runtime.precision) == ("cuda:1", "fp16")  # fp16 with a loss scaler: a T4 has no native bf16
    # set_device first, then every capability query (native_bf16's; on a CUDA build also the build check's) for cuda:1
    assert calls[0] == ("set_device", torch.device("cuda:1")) and len(calls) >= 2, calls
    assert all(call == ("capability", torch.device("cuda:1")) for call in calls[1:]), calls
    assert native_bf16(torch.device("cuda:0")) and not native_bf16(torch.device("cuda:1"))
