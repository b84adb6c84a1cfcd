"""Compose a Chinese CLIP from a CLIP image tower and a Chinese BERT (cnclip.compose; issue: LiT recipe).

Tiny random CLIPModel / BertModel checkpoints are saved and loaded through from_pretrained, the path
real checkpoints (openai/clip-vit-base-patch16, hfl/chinese-roberta-wwm-ext) take.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import DEMO_RECIPE, REPO

from cnclip.finetune import main as finetune_main
from cnclip.models import encode_images, load_base_model
from cnclip.recipe import ComposeConfig, ModelConfig

TINY_VOCAB = REPO / "recipes" / "models" / "tiny" / "vocab.txt"


def make_tiny_clip(out: Path, *, kind: str = "clip", seed: int = 0) -> Path:
    """A tiny random OpenAI-style CLIP (its own image processor: shortest edge + centre crop)."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessorPil,
        CLIPModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    vision = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, image_size=64,
                  patch_size=8, initializer_factor=3.0, projection_dim=32)
    torch.manual_seed(seed)
    if kind == "clip":
        model = CLIPModel(CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                      num_attention_heads=2, vocab_size=99),
                                     vision_config=vision, projection_dim=32))
    else:
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision))
    model.save_pretrained(out)
    CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(out)
    return out


def make_tiny_bert(out: Path, seed: int = 1) -> Path:
    """A tiny random BERT with the demo's Chinese character vocabulary and a BERT tokenizer."""
    from transformers import BertConfig, BertModel

    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(TINY_VOCAB, out / "vocab.txt")
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
    vocab_size = len(TINY_VOCAB.read_text(encoding="utf-8").splitlines())
    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    root = tmp_path_factory.mktemp("towers")
    return make_tiny_clip(root / "clip"), make_tiny_bert(root / "bert")


def compose(image: Path, text: Path, seed: int = 0):
    return load_base_model(ModelConfig(compose=ComposeConfig(image=str(image), text=str(text))), seed=seed)


@pytest.mark.parametrize("kind", ["clip", "vision_with_projection"])
def test_composed_image_embeddings_equal_the_clips(towers, tmp_path, kind):
    from transformers import CLIPModel, CLIPVisionModelWithProjection

    image = towers[0] if kind == "clip" else make_tiny_clip(tmp_path / "vision", kind=kind)
    base = compose(image, towers[1])
    pixels = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if kind == "clip":
            reference = CLIPModel.from_pretrained(image).eval().get_image_features(pixel_values=pixels)
        else:
            reference = CLIPVisionModelWithProjection.from_pretrained(image).eval()(pixel_values=pixels).image_embeds
        reference = getattr(reference, "pooler_output", reference)
        ours = encode_images(base.clip, pixels)
    diff = (ours - reference).abs().max().item()
    print(f"composed vs {kind} image embeddings: max abs diff {diff:.2e}")
    assert diff <= 1e-5
    # The image processor is the CLIP's own: shortest edge 64, then a 64x64 centre crop.
    assert base.preprocess.shortest_edge == 64 and base.preprocess.do_center_crop


def test_text_tower_is_the_berts_and_the_projection_is_new_and_seeded(towers):
    from transformers import BertModel

    base = compose(*towers)
    bert = BertModel.from_pretrained(towers[1]).state_dict()
    ours = base.clip.text_model.state_dict()
    compared = [k for k in bert if not k.startswith("pooler.")]
    assert len(compared) > 20 and all(torch.equal(ours[k], bert[k]) for k in compared)
    assert base.tokenizer.vocab_size == bert["embeddings.word_embeddings.weight"].shape[0]
    assert math.isclose(base.clip.logit_scale.exp().item(), 1 / 0.07, rel_tol=1e-6)
    again, other = compose(*towers, seed=0), compose(*towers, seed=1)
    assert torch.equal(base.clip.text_projection.weight, again.clip.text_projection.weight)
    assert not torch.equal(base.clip.text_projection.weight, other.clip.text_projection.weight)
    std = base.clip.text_projection.weight.std().item()
    assert 0.5 < std * 64 ** 0.5 < 1.5  # normal with std hidden**-0.5, as cn_clip initialises it


def test_compose_refuses_a_text_model_that_is_not_a_bert(towers):
    from cnclip.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="model.compose.text .* expected a BERT"):
        compose(towers[0], towers[0])


def test_training_a_composed_model_learns_retrieval(towers, tmp_path, capsys):
    """The LiT recipe end to end on the generated demo set, the whole text tower trained against the
    cached image embeddings: recall climbs far above chance. (LoRA training is tested in test_finetune.)"""
    tuning, lr = "full", 1e-3
    code = finetune_main([
        str(DEMO_RECIPE), f"run_dir={tmp_path / 'run'}", f"data.root={tmp_path / 'data'}",
        f"cache.dir={tmp_path / 'cache'}", "model.random_init=false", f"model.compose.image={towers[0]}",
        f"model.compose.text={towers[1]}", f"model.text_tuning={tuning}", "train.epochs=5", f"train.lr={lr}",
        "zeroshot.images=", "zeroshot.classes=", "zeroshot.templates="])
    assert code == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    before, after = summary["before"]["mean_recall"], summary["best"]["valid"]["mean_recall"]
    chance = 100 * (1 + 5 + 10) / 3 / summary["before"]["num_images"]
    print(f"{tuning}: mean recall {before:.1f} before, {after:.1f} after (chance {chance:.1f})")
    assert after > 4 * chance and after > before + 20
    assert not (tmp_path / "run" / "best" / "adapter_config.json").exists()  # a full run has no adapter

    # The result is a plain ChineseCLIPModel: the transformers export loads without cnclip and embeds like the run.
    from transformers import AutoImageProcessor, ChineseCLIPModel

    from cnclip.export import main as export_main
    from cnclip.inference import load_for_inference
    from cnclip.models import encode_texts

    assert export_main([str(tmp_path / "run"), "--to", str(tmp_path / "out")]) == 0
    exported = ChineseCLIPModel.from_pretrained(tmp_path / "out").eval()
    run = load_for_inference(str(tmp_path / "run"))
    tokens = run.tokenizer(["左上角有一个红色的圆形"], return_tensors="pt")
    with torch.no_grad():
        diff = (encode_texts(exported, **tokens) - encode_texts(run.clip, **tokens)).abs().max().item()
    assert diff < 1e-5
    assert type(AutoImageProcessor.from_pretrained(tmp_path / "out")).__name__.startswith("CLIPImageProcessor")
    # The original layouts are served with cn_clip's fixed transform, not the CLIP's crop: said, not hidden.
    capsys.readouterr()
    assert export_main([str(tmp_path / "run"), "--to", str(tmp_path / "ms"), "--format", "modelscope"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["export"]
    assert "differs from the fixed transform the modelscope layout is served with" in report["preprocess_warning"]


def test_recipe_errors_name_the_compose_keys():
    from cnclip.errors import ConfigError
    from cnclip.recipe import load_recipe

    lit = REPO / "recipes" / "lit_zh.yaml"
    assert load_recipe(lit, check_data=False).model.compose.text == "hfl/chinese-roberta-wwm-ext"
    for override, message in (("model.text_tuning=half", "model.text_tuning': got 'half', accepted: lora, full"),
                              ("model.compose.image=", "model.compose.image' is required"),
                              ("model.compose.colour=x", "unknown recipe key 'model.compose.colour'")):
        with pytest.raises(ConfigError, match=message):
            load_recipe(lit, [override], check_data=False)


def test_a_chinese_clip_can_lend_its_image_tower_too(towers, tiny_model_dir):
    from transformers import ChineseCLIPModel

    base = compose(tiny_model_dir, towers[1])
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = ChineseCLIPModel.from_pretrained(tiny_model_dir).eval().get_image_features(pixel_values=pixels)
        reference = getattr(reference, "pooler_output", reference)
        assert (encode_images(base.clip, pixels) - reference).abs().max().item() <= 1e-5
