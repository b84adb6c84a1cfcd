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


def make_tiny_encoder(out: Path, model_type: str, seed: int = 2) -> Path:
    """A tiny random RoBERTa / XLM-RoBERTa / ERNIE (with task-type embeddings) saved with from_pretrained's layout."""
    from transformers import ErnieConfig, ErnieModel, RobertaConfig, RobertaModel, XLMRobertaConfig, XLMRobertaModel

    make_tiny_bert(out)  # the vocabulary and tokenizer files; the weights are replaced below
    vocab_size = len(TINY_VOCAB.read_text(encoding="utf-8").splitlines())
    shape = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=66)
    config_cls, model_cls = {"roberta": (RobertaConfig, RobertaModel), "xlm-roberta": (XLMRobertaConfig, XLMRobertaModel),
                             "ernie": (ErnieConfig, ErnieModel)}[model_type]
    extra = dict(use_task_id=True, task_type_vocab_size=3) if model_type == "ernie" else dict(pad_token_id=1)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**shape, **extra))
    with torch.no_grad():  # random, far from zero, so that a dropped or misplaced row cannot go unnoticed
        for name, param in model.named_parameters():
            if "embeddings" in name:
                param.normal_(0, 1)
    (out / "model.safetensors").unlink()
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("model_type", ["roberta", "xlm-roberta", "ernie"])
def test_roberta_and_ernie_text_towers_give_the_source_models_states(towers, tmp_path, model_type):
    """transformers' own RobertaModel / ErnieModel is the reference: on right-padded batches the composed
    text tower's hidden state at every real token (the [CLS] one is the text embedding's input) equals the
    source model's, although RoBERTa numbers positions from padding_idx + 1 and ERNIE adds a task embedding."""
    from transformers import AutoModel

    source_dir = make_tiny_encoder(tmp_path / model_type, model_type)
    base = compose(towers[0], source_dir)
    source = AutoModel.from_pretrained(source_dir).eval()
    assert source.config.model_type == model_type
    pad = source.config.pad_token_id
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, source.config.vocab_size, (3, 12), generator=generator)
    mask = torch.ones_like(ids)
    for row, length in enumerate((12, 7, 3)):  # right padding, as the tokenizer pads
        ids[row, length:], mask[row, length:] = pad, 0
    with torch.no_grad():
        theirs = source(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = base.clip.text_model(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    diff = (ours[real] - theirs[real]).abs().max().item()
    scale = theirs[real].abs().max().item()
    print(f"{model_type}: composed vs source hidden states, max abs diff {diff:.2e} (values up to {scale:.1f})")
    assert diff <= 1e-4
    # The full position table is usable: RoBERTa's two reserved rows are gone, so 64 positions remain.
    assert base.clip.config.text_config.max_position_embeddings == 66 - (pad + 1 if model_type != "ernie" else 0)


def test_compose_refuses_a_pre_layernorm_encoder_by_name(towers, tmp_path):
    from transformers import MegatronBertConfig, MegatronBertModel

    from cnclip.errors import ModelLoadError

    out = tmp_path / "megatron"
    MegatronBertModel(MegatronBertConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2)).save_pretrained(out)
    with pytest.raises(ModelLoadError, match="'megatron-bert' model; expected .*bert, roberta, xlm-roberta, ernie"):
        compose(towers[0], out)
