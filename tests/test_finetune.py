import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import cnclip.image_cache
import cnclip.finetune
import cnclip.trainer
from cnclip.finetune import main as finetune_main
from cnclip.evaluate import main as evaluate_main

from conftest import DEMO_RECIPE, REPO, image_bytes, make_tiny_model, tiny_overrides


def run_finetune(model_dir, data_dir, run_dir, **extra):
    assert finetune_main([str(DEMO_RECIPE), *tiny_overrides(model_dir, data_dir, run_dir, **extra)]) == 0


def final_weights(run_dir):
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run_dir / "checkpoints" / latest / "trainable.safetensors"))


def test_finetune_then_evaluate_end_to_end(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_finetune(tiny_model_dir, tiny_data_dir, run_dir)
    out = capsys.readouterr().out
    assert "validation recall before training" in out and "mean recall before training" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 * (17 // 4)  # 17 pairs, batch 4, last partial batch dropped
    assert (run_dir / "best" / "adapter_model.safetensors").is_file()
    assert (run_dir / "best" / "adapter_config.json").is_file()
    log = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [e for e in log if "loss" in e]
    assert len(steps) == summary["steps"] and all(e["samples_per_s"] > 0 and e["lr"] > 0 for e in steps)
    assert all(e["logit_scale"] <= 100.0 for e in steps)

    assert evaluate_main([str(run_dir), "--split", "valid"]) == 0
    printed = capsys.readouterr().out
    assert "text_to_image" in printed and "image_to_text" in printed
    preds = [json.loads(l) for l in (run_dir / "eval" / "valid_predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 8 and all(len(set(p["image_ids"])) == min(10, 8) for p in preds)
    result = json.loads((run_dir / "eval" / "valid_text_to_image_result.json").read_text())
    assert result["success"] is True and set(result["scoreJson"]) == {"score", "mean_recall", "r1", "r5", "r10"}
    # The evaluation of the best checkpoint agrees with what training recorded for it.
    metrics = json.loads((run_dir / "eval" / "valid_metrics.json").read_text())
    best = json.loads((run_dir / "best" / "metrics.json").read_text())
    assert abs(metrics["mean_recall"] - best["valid"]["mean_recall"]) < 1e-6


def test_interrupted_run_resumes_to_identical_weights(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    run_finetune(tiny_model_dir, tiny_data_dir, straight, **{"train.epochs": 3})

    class Killed(Exception):
        pass

    real_save, saves = cnclip.trainer.save_checkpoint, []

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        saves.append(1)
        if len(saves) == 2:  # mid-epoch 2: one epoch-end and one mid-epoch checkpoint exist
            raise Killed()

    monkeypatch.setattr(cnclip.trainer, "save_checkpoint", save_then_die)
    resumed = tmp_path / "resumed"
    with pytest.raises(Killed):
        cnclip.trainer.train(cnclip.trainer.load_recipe(
            DEMO_RECIPE, tiny_overrides(tiny_model_dir, tiny_data_dir, resumed, **{"train.epochs": 3})))
    monkeypatch.setattr(cnclip.trainer, "save_checkpoint", real_save)
    run_finetune(tiny_model_dir, tiny_data_dir, resumed, **{"train.epochs": 3})

    a, b = final_weights(straight), final_weights(resumed)
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert torch.equal(a[name], b[name]), name
    log = lambda d: [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log(straight)] == [e["step"] for e in log(resumed)]


def test_second_run_never_touches_the_image_tower(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    run_finetune(tiny_model_dir, tiny_data_dir, tmp_path / "first", **{"train.epochs": 1})

    def forbidden(*args, **kwargs):
        raise AssertionError("image tower ran although its embeddings are cached")

    monkeypatch.setattr(cnclip.image_cache, "encode_images", forbidden)
    run_finetune(tiny_model_dir, tiny_data_dir, tmp_path / "second", **{"train.epochs": 1})


def _cache_keys(tmp_path):
    return {p.name for p in (tmp_path / "cache").iterdir()}


def test_cache_is_invalidated_by_model_preprocessing_and_data(tiny_model_dir, tiny_data_dir, tmp_path):
    run_finetune(tiny_model_dir, tiny_data_dir, tmp_path / "a", **{"train.epochs": 1})
    keys = _cache_keys(tmp_path)
    assert len(keys) == 2  # train + valid

    other_model = make_tiny_model(tmp_path / "other_model", seed=1)  # different image-tower weights
    run_finetune(other_model, tiny_data_dir, tmp_path / "b", **{"train.epochs": 1})
    keys_b = _cache_keys(tmp_path)
    assert len(keys_b) == 4

    crop_model = make_tiny_model(tmp_path / "crop_model", seed=0, center_crop=True, shortest_edge=40)
    run_finetune(crop_model, tiny_data_dir, tmp_path / "c", **{"train.epochs": 1})
    assert len(_cache_keys(tmp_path)) == 6  # same weights, other preprocessing

    with open(tiny_data_dir / "valid_imgs.tsv", "a") as fh:  # one more valid image
        import base64
        fh.write(f"999\t{base64.urlsafe_b64encode(image_bytes((9, 9, 9))).decode()}\n")
    run_finetune(tiny_model_dir, tiny_data_dir, tmp_path / "d", **{"train.epochs": 1})
    assert len(_cache_keys(tmp_path)) == 7  # only the valid split changed


def test_corrupt_image_and_dangling_id_are_skipped_and_counted(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    import base64
    with open(tiny_data_dir / "train_imgs.tsv", "a") as fh:
        fh.write(f"777\t{base64.urlsafe_b64encode(image_bytes(fmt='JPEG')[:120]).decode()}\n")
    with open(tiny_data_dir / "train_texts.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"text_id": 50, "text": "一个红色的圆形", "image_ids": [777, 4242]}, ensure_ascii=False) + "\n")
        fh.write("{broken json\n")
    with open(tiny_data_dir / "valid_imgs.tsv", "a") as fh:  # a validation text whose only image is corrupt
        fh.write(f"778\t{base64.urlsafe_b64encode(b'not an image').decode()}\n")
    with open(tiny_data_dir / "valid_texts.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"text_id": 950, "text": "一个蓝色的圆形", "image_ids": [778]}, ensure_ascii=False) + "\n")
    run_finetune(tiny_model_dir, tiny_data_dir, tmp_path / "run", **{"train.epochs": 1})
    skipped = json.loads((tmp_path / "run" / "summary.json").read_text())["skipped"]
    assert skipped["by_reason"] == {"malformed text line": 1, "image id without image": 1,
                                    "undecodable image": 2, "pair with undecodable image": 1,
                                    "text without a decodable image": 1}
    assert any("train_texts.jsonl:11" in e for e in skipped["examples"]["malformed text line"])


def test_changed_recipe_on_existing_run_dir_is_refused(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    run_finetune(tiny_model_dir, tiny_data_dir, tmp_path / "run", **{"train.epochs": 1})
    code = finetune_main([str(DEMO_RECIPE), *tiny_overrides(tiny_model_dir, tiny_data_dir, tmp_path / "run",
                                                             **{"train.epochs": 1, "train.lr": 0.5})])
    assert code == 2
    assert "different recipe (changed: train.lr)" in capsys.readouterr().err


def test_cli_reports_bad_recipe_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cnclip.finetune", str(DEMO_RECIPE), "train.bogus=1"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert "unknown recipe key 'train.bogus'" in proc.stderr and "Traceback" not in proc.stderr


def test_demo_recipe_generates_its_data_and_model(tmp_path):
    """The demo's own path: random-init tiny model from the shipped config, generated data set."""
    from cnclip.demo_data import demo_vocabulary
    vocab = set((REPO / "recipes" / "models" / "tiny" / "vocab.txt").read_text(encoding="utf-8").split())
    assert set(demo_vocabulary()) <= vocab
    code = finetune_main([str(DEMO_RECIPE), f"run_dir={tmp_path / 'run'}", f"data.root={tmp_path / 'data'}",
                          f"cache.dir={tmp_path / 'cache'}", "train.epochs=1",
                          f"zeroshot.images={tmp_path / 'data' / 'zeroshot'}",
                          f"zeroshot.classes={tmp_path / 'data' / 'zeroshot_classes.txt'}"])
    assert code == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["before"]["num_texts"] == 90 and summary["after"] is not None
    assert summary["after"]["zeroshot"]["num_images"] == 36  # the generated colour folders, tracked


def test_best_adapter_loads_with_plain_peft(tiny_model_dir, tiny_data_dir, tmp_path):
    """best/ is a standard peft adapter: PeftModel.from_pretrained gives the trained text tower."""
    from peft import PeftModel
    from transformers import AutoTokenizer, ChineseCLIPModel

    from cnclip.models import encode_texts
    from cnclip.inference import load_run

    run_finetune(tiny_model_dir, tiny_data_dir, tmp_path / "run", **{"train.epochs": 1})
    ours, base, _ = load_run(tmp_path / "run")
    plain = PeftModel.from_pretrained(ChineseCLIPModel.from_pretrained(tiny_model_dir), tmp_path / "run" / "best").eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)(["一个红色的圆形", "蓝色正方形"], padding=True, return_tensors="pt")
    with torch.no_grad():
        a = encode_texts(ours.base_model.model, **tok)
        b = encode_texts(plain.base_model.model, **tok)
        untrained = encode_texts(ChineseCLIPModel.from_pretrained(tiny_model_dir), **tok)
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(a, untrained, atol=1e-4)


def test_the_adapter_config_is_written_the_same_in_every_process(tmp_path, monkeypatch):
    """peft keeps target_modules as a set, whose order string hashing changes from process to process:
    best/adapter_config.json lists them sorted, so reruns of a recipe write the same bytes."""
    import peft
    from peft import LoraConfig

    from cnclip.checkpoint import save_best

    class Adapter(torch.nn.Module):  # the part of a peft model that save_best reads
        def __init__(self, order):
            super().__init__()
            self.peft_config = {"default": LoraConfig(r=2, target_modules=list(order))}
            self.peft_config["default"].target_modules = list(order)  # the order one process's set gave

    monkeypatch.setattr(peft, "get_peft_model_state_dict", lambda model: {})  # no LoRA weights to save here
    written = []
    for n, order in enumerate((["value", "dense", "query", "key"], ["key", "query", "dense", "value"])):
        save_best(tmp_path / f"run{n}", Adapter(order), {"epoch": 1})
        written.append((tmp_path / f"run{n}" / "best" / "adapter_config.json").read_bytes())
    assert written[0] == written[1]
    assert json.loads(written[0])["target_modules"] == ["dense", "key", "query", "value"]
