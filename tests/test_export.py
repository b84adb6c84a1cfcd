"""`python -m cnclip.export`: the merged model loads in plain transformers (no cnclip) and embeds exactly
like the trained, unmerged model; the adapter, configuration.json and model card are right; the CLI
refuses bad input and publishes through the same upload path test_publish.py covers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from conftest import DEMO_RECIPE, image_bytes, make_tiny_dataset, tiny_overrides
from fake_modelscope import PRIVATE, FakeModelScope
from PIL import Image
from safetensors.torch import load_file

from cnclip.data import ImageTransform, tokenize
from cnclip.export import main as export_main
from cnclip.finetune import main as finetune_main
from cnclip.model_card import (CardInputs, base_model_id, configuration_json, read_run_metrics,
                               render_card)
from cnclip.models import encode_images, encode_texts
from cnclip.modelscope_upload import folder_files
from cnclip.inference import load_run

TEXTS = ["一个红色的圆形", "一个蓝色的正方形", "左上角有一个绿色的三角形", "黄色的猫", "高级感托特包斜挎"]
COLORS = [(220, 30, 30), (30, 60, 220), (30, 170, 60), (230, 210, 30)]
TOKEN = "ms-export-token-91b7c3"

# Loads the export with cnclip made unimportable, embeds texts and images with the saved processor, then runs
# the usage snippet from the generated model card.
PLAIN_LOAD = textwrap.dedent('''
    import importlib.abc, json, re, sys
    class NoCnclip(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "cnclip" or name.startswith("cnclip."):
                raise ImportError("an export must load without cnclip")
    sys.meta_path.insert(0, NoCnclip())
    import torch
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import AutoProcessor, ChineseCLIPModel, ChineseCLIPProcessor

    out, texts, images, max_length, result = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    model = ChineseCLIPModel.from_pretrained(out).eval()
    processor = ChineseCLIPProcessor.from_pretrained(out)
    auto = AutoProcessor.from_pretrained(out)
    t = processor(text=texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    i = processor(images=[Image.open(p) for p in images], return_tensors="pt")
    with torch.no_grad():
        te, ie = model.get_text_features(**t), model.get_image_features(**i)
    te, ie = getattr(te, "pooler_output", te), getattr(ie, "pooler_output", ie)
    save_file({**{k: t[k] for k in ("input_ids", "attention_mask", "token_type_ids")},
               "pixel_values": i["pixel_values"], "text_emb": te.contiguous(), "image_emb": ie.contiguous()}, result)
    print("LOADED", json.dumps({"image_processor": type(processor.image_processor).__name__,
                                "auto_processor": type(auto).__name__}))

    card = open(out + "/README.md", encoding="utf-8").read()
    snippet = re.search(r"```python\\n(.*?)```", card, re.S).group(1)
    snippet = re.sub(r"model_dir = snapshot_download\\(.*\\)", "model_dir = " + repr(out), snippet)
    exec(compile(snippet, "card-snippet", "exec"), {})
    print("CNCLIP_IMPORTED", any(m == "cnclip" or m.startswith("cnclip.") for m in sys.modules))
''')


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("export_run")
    data = make_tiny_dataset(root / "data")
    run_dir = root / "run"
    assert finetune_main([str(DEMO_RECIPE), *tiny_overrides(tiny_model_dir, data, run_dir, **{"train.epochs": 1})]) == 0
    return run_dir


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export_out") / "model"
    assert export_main([str(trained_run), "--to", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def plain_load(exported, tmp_path_factory):
    """Outputs of the export loaded by plain transformers in a fresh interpreter that cannot import cnclip."""
    work = tmp_path_factory.mktemp("plain_load")
    images = []
    for k, color in enumerate(COLORS):
        path = work / f"img{k}.png"
        path.write_bytes(image_bytes(color, (40 + 6 * k, 30 + 3 * k), "circle" if k % 2 else "square"))
        images.append(str(path))
    (work / "example.jpg").write_bytes(image_bytes((200, 30, 30), (48, 36), "circle", fmt="JPEG"))
    max_length = yaml.safe_load((exported / "README.md").read_text(encoding="utf-8").split("```yaml\n")[1]
                                .split("```")[0])["data"]["context_length"]
    proc = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(exported), json.dumps(TEXTS, ensure_ascii=False),
                           json.dumps(images), str(max_length), str(work / "result.safetensors")],
                          cwd=work, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(str(work / "result.safetensors")), images, max_length, proc.stdout


def test_export_loads_without_cnclip(plain_load, exported):
    _, _, _, stdout = plain_load
    info = json.loads(stdout.split("LOADED ", 1)[1].splitlines()[0])
    # No torchvision here: transformers picks the PIL processor for the portable type name we save.
    assert info["image_processor"].startswith("ChineseCLIPImageProcessor")
    assert info["auto_processor"] == "ChineseCLIPProcessor"
    assert "CNCLIP_IMPORTED False" in stdout
    assert re.search(r"tensor\(\[\[[0-9.e-]+, [0-9.e-]+\]\]\)", stdout), "the card's usage snippet did not run"
    names = {f.path for f in folder_files(exported)}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
            "preprocessor_config.json", "configuration.json", "README.md", "adapter/adapter_config.json",
            "adapter/adapter_model.safetensors", "recall.png"} == names  # recall.png: the card's plot


def test_exported_embeddings_equal_trained_unmerged_model(plain_load, trained_run, tiny_model_dir):
    got, images, max_length, _ = plain_load
    peft_model, base, recipe = load_run(trained_run)  # LoRA layers still separate
    assert any("lora_A" in n for n, _ in peft_model.named_parameters())
    # the saved processor tokenizes and preprocesses exactly as training did
    assert torch.equal(got["input_ids"], tokenize(base.tokenizer, TEXTS, max_length)["input_ids"])
    transform = ImageTransform(base.preprocess)
    arrays = torch.stack([torch.from_numpy(transform.pil_to_array(Image.open(p)).copy()) for p in images])
    assert (transform.normalize(arrays) - got["pixel_values"]).abs().max().item() < 1e-5

    with torch.no_grad():
        text = encode_texts(base.clip, got["input_ids"], got["attention_mask"], got["token_type_ids"])
        image = encode_images(base.clip, got["pixel_values"])
    text_diff = (text - got["text_emb"]).abs().max().item()
    image_diff = (image - got["image_emb"]).abs().max().item()
    print(f"\nexported vs trained (unmerged): max abs diff text {text_diff:.2e}, image {image_diff:.2e} "
          f"({len(TEXTS)} texts, {len(images)} images)")
    assert text_diff < 1e-4 and image_diff < 1e-4

    # ... and training changed the text tower, so the comparison above is not trivially true
    from transformers import ChineseCLIPModel

    untouched = ChineseCLIPModel.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        base_text = encode_texts(untouched, got["input_ids"], got["attention_mask"], got["token_type_ids"])
        base_image = encode_images(untouched, got["pixel_values"])
    assert (base_text - got["text_emb"]).abs().max().item() > 1e-2
    assert (base_image - got["image_emb"]).abs().max().item() < 1e-5  # the image tower was locked


def test_exported_tokenizer_is_clean_and_cuts_at_the_trained_context_length(exported, trained_run):
    """No truncation or padding of training stored in tokenizer.json; model_max_length is the trained
    context length: long text with plain transformers is cut there with truncation=True, and only
    padded as asked."""
    from transformers import AutoTokenizer, ChineseCLIPModel

    context_length = yaml.safe_load((trained_run / "recipe.yaml").read_text())["data"]["context_length"]
    stored = json.loads((exported / "tokenizer.json").read_text(encoding="utf-8"))
    assert stored["truncation"] is None and stored["padding"] is None
    assert json.loads((exported / "tokenizer_config.json").read_text())["model_max_length"] == context_length

    tok = AutoTokenizer.from_pretrained(str(exported))
    long = "左上角有一个红色的圆形" * 20
    assert len(tok(long)["input_ids"]) == 20 * 11 + 2  # not silently cut
    batch = tok([long, "猫"], padding=True, truncation=True, return_tensors="pt")
    assert batch["input_ids"].shape == (2, context_length)
    assert tok(["猫", "一个红色的圆形"], padding=True, return_tensors="pt")["input_ids"].shape == (2, 9)
    model = ChineseCLIPModel.from_pretrained(str(exported)).eval()
    with torch.no_grad():
        emb = model.get_text_features(**batch)
    assert torch.isfinite(getattr(emb, "pooler_output", emb)).all()


def test_adapter_on_base_model_matches_merged(exported, tiny_model_dir, plain_load):
    from peft import PeftModel
    from transformers import ChineseCLIPModel

    got = plain_load[0]
    model = PeftModel.from_pretrained(ChineseCLIPModel.from_pretrained(tiny_model_dir), str(exported / "adapter"))
    with torch.no_grad():
        text = encode_texts(model.eval().base_model.model, got["input_ids"], got["attention_mask"],
                            got["token_type_ids"])
    assert (text - got["text_emb"]).abs().max().item() < 1e-4
    assert json.loads((exported / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    assert not (exported / "adapter" / "README.md").exists()


def test_model_card_and_configuration_come_from_the_run(exported, trained_run):
    assert json.loads((exported / "configuration.json").read_text()) == {
        "framework": "pytorch", "task": "multi-modal-embedding", "model": {"type": "clip-multi-modal-embedding"},
        "pipeline": {"type": "multi-modal-embedding"}}
    card = (exported / "README.md").read_text(encoding="utf-8")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["tasks"] == ["multi-modal-embedding"] and front["language"] == ["zh"]
    assert front["license"] == "apache-2.0" and front["datasets"] == {"train": ["data"], "evaluation": ["data"]}
    assert "base_model" not in front  # the base is a local directory: no hub id to name

    best = json.loads((trained_run / "best" / "metrics.json").read_text())
    before = json.loads((trained_run / "summary.json").read_text())["before"]
    for metrics, label in ((best["valid"], ""), (before, " (base model, before fine-tuning)")):
        for key, name in (("text_to_image", "text → image"), ("image_to_text", "image → text")):
            m = metrics[key]
            row = f"| {name}{label} | {m['r1']:.2f} | {m['r5']:.2f} | {m['r10']:.2f} | {m['mean_recall']:.2f} |"
            assert row in card
    assert f"**{best['valid']['mean_recall']:.2f}**" in card
    assert f"`{best['split']}` split" in card and f"epoch {best['epoch']}" in card

    recipe_in_card = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    saved = yaml.safe_load((trained_run / "recipe.yaml").read_text())
    assert recipe_in_card["train"] == saved["train"] and recipe_in_card["model"]["lora_r"] == saved["model"]["lora_r"]
    assert recipe_in_card["run_dir"] == ".../run"  # absolute local paths are not published
    assert str(trained_run.parent) not in card


def test_card_without_validation_metrics_says_so(tmp_path):
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "metrics.json").write_text(json.dumps({"epoch": 3, "step": 9, "split": None, "valid": None}))
    metrics = read_run_metrics(tmp_path, weights_from_best=True)
    recipe = {"model": {"base": "OFA-Sys/chinese-clip-vit-base-patch16", "lora_r": 16, "lora_alpha": 32,
                        "target_modules": ["query", "value"]}, "data": {"context_length": 52}}
    card = render_card(CardInputs(title="t", repo_id="alice/m", recipe=recipe, metrics=metrics, dataset="muge",
                                  license="mit", checkpoint="best checkpoint (best/)"))
    assert "No retrieval metrics: the run had no validation split" in card and "| R@1 |" not in card
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == ["AI-ModelScope/chinese-clip-vit-base-patch16"]
    assert "evaluation" not in front["datasets"]
    assert 'snapshot_download("alice/m")' in card and "max_length=52" in card
    assert read_run_metrics(tmp_path, weights_from_best=False) is None
    assert "has no recorded validation metrics" in render_card(CardInputs(
        title="t", repo_id=None, recipe=recipe, metrics=None, dataset="muge", license="mit", checkpoint="latest"))


def test_base_model_id():
    assert base_model_id("OFA-Sys/chinese-clip-vit-large-patch14") == "AI-ModelScope/chinese-clip-vit-large-patch14"
    assert base_model_id("modelscope:AI-ModelScope/chinese-clip-vit-huge-patch14") == \
        "AI-ModelScope/chinese-clip-vit-huge-patch14"
    assert base_model_id("/home/someone/models/clip") is None
    assert base_model_id("someone/clip") == "someone/clip"
    assert configuration_json()["pipeline"] == {"type": "multi-modal-embedding"}


def test_cli_user_errors_exit_2(trained_run, tmp_path, capsys):
    assert export_main([str(tmp_path / "nope"), "--to", str(tmp_path / "o1")]) == 2
    assert "not a cnclip run directory" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert export_main([str(trained_run), "--to", str(foreign)]) == 2
    assert "not an earlier cnclip export" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert export_main([str(trained_run), "--to", str(tmp_path / "o2"), "--upload", "no-slash"]) == 2
    assert "expected owner/name" in capsys.readouterr().err and not (tmp_path / "o2").exists()
    assert export_main([str(trained_run), "--to", str(tmp_path / "o3"), "--private"]) == 2
    assert "--private and --overwrite go with --upload" in capsys.readouterr().err


def _hub_env(monkeypatch, tmp_path, endpoint: str) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", endpoint)
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", TOKEN)
    monkeypatch.setenv("MODELSCOPE_HOME", str(tmp_path / "ms_home"))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms_cache"))


def test_dry_run_over_an_earlier_export_replaces_it_and_sends_nothing(trained_run, tmp_path, monkeypatch, capfd):
    out = tmp_path / "model"
    assert export_main([str(trained_run), "--to", str(out)]) == 0
    (out / "stale.bin").write_bytes(b"left over")
    with FakeModelScope(TOKEN) as hub:
        _hub_env(monkeypatch, tmp_path, hub.endpoint)
        capfd.readouterr()
        assert export_main([str(trained_run), "--to", str(out), "--upload", "alice/demo-clip", "--private",
                            "--dry-run"]) == 0
        assert hub.requests == []
    stdout, stderr = capfd.readouterr()
    assert "dry run: would upload 11 files" in stdout  # with recall.png and "alice/demo-clip (private)" in stdout
    assert re.search(r"\d+\.\d kB  model\.safetensors", stdout)
    assert "a real upload would use the token from $MODELSCOPE_API_TOKEN" in stdout
    assert not (out / "stale.bin").exists()  # the earlier export was replaced whole
    assert 'snapshot_download("alice/demo-clip")' in (out / "README.md").read_text(encoding="utf-8")
    assert TOKEN not in stdout + stderr


def test_export_and_upload_end_to_end(trained_run, tmp_path, monkeypatch, capfd):
    out = tmp_path / "model"
    with FakeModelScope(TOKEN) as hub:
        _hub_env(monkeypatch, tmp_path, hub.endpoint)
        assert export_main([str(trained_run), "--to", str(out), "--upload", "alice/demo-clip", "--private"]) == 0
        repo = hub.repos["alice/demo-clip"]
        assert repo.visibility == PRIVATE
        assert repo.files == {f.path: f.source.read_bytes() for f in folder_files(out)}
    stdout, stderr = capfd.readouterr()
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report["publish"]["uploaded"] and report["export"]["merge_max_abs_diff"] < 1e-4
    assert TOKEN not in stdout + stderr
    for path in tmp_path.rglob("*"):
        assert not path.is_file() or TOKEN.encode() not in path.read_bytes(), path
