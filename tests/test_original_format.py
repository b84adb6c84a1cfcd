"""The original Chinese-CLIP format in and out, checked against the reference implementations.

Reference code is loaded unchanged from the installed packages (tests/reference_impls.py): cn_clip's
own model, tokenizer, caption preprocessing and checkpoint loader (`create_model`), and ModelScope's
own CLIP model class. Models are tiny, built from custom configs in the cn_clip format.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from conftest import DEMO_RECIPE, make_tiny_dataset, tiny_overrides
from reference_impls import cn_clip, modelscope_clip_class

from cnclip.data import preprocess_text, tokenize
from cnclip.errors import ModelLoadError
from cnclip.export import main as export_main
from cnclip.inference import load_for_inference
from cnclip.models import encode_images, encode_texts, load_base_model
from cnclip.original_format import read_state_dict
from cnclip.recipe import ModelConfig

TEXT = {"vocab_size": 21128, "text_attention_probs_dropout_prob": 0.1, "text_hidden_act": "gelu",
        "text_hidden_dropout_prob": 0.1, "text_hidden_size": 128, "text_initializer_range": 0.02,
        "text_intermediate_size": 256, "text_max_position_embeddings": 64, "text_num_attention_heads": 2,
        "text_num_hidden_layers": 2, "text_type_vocab_size": 2}
VISION = {"embed_dim": 16, "image_resolution": 32, "vision_layers": 2, "vision_width": 128, "vision_patch_size": 8}
TOLERANCE = 1e-4


def reference_model(seed: int = 0, **vision):
    torch.manual_seed(seed)
    return cn_clip().model.CLIP(**{**VISION, **vision}, **TEXT).eval()


def save_cn_clip_checkpoint(model, path: Path) -> Path:
    """As cn_clip's training saves: DDP-prefixed names in {"epoch", "step", "name", "state_dict"}."""
    torch.save({"epoch": 1, "step": 10, "name": "tiny",
                "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


def captions() -> list[str]:
    """A few hundred varied captions: Chinese, Latin letters in both cases, digits, curly and straight quotes,
    full-width forms, accents, punctuation, spaces, and some longer than 52 tokens."""
    heads = ["高级感托特包", "夏季新款连衣裙", "男士运动鞋", "iPhone 15 Pro手机壳", "“复古”风格帽子", "ＮＩＫＥ跑步鞋",
             "Café咖啡杯", "儿童玩具车（红色）", "LED台灯 USB充电", "猫咪 狗狗 宠物窝", "2024年新款！", "『限量』T恤",
             "北京故宫的雪景", "一碗热腾腾的牛肉面", "Ｈｅｌｌｏ　Ｋｉｔｔｙ背包", "小米MIX Fold折叠屏", "华为P60 Pro",
             "日式和风餐具套装", "圣诞节装饰品🎄"]
    tails = ["", "，女款", " Size:XL", "、大容量", "——正品保证", "？！", "「包邮」", " 3件套", "”", "…", "Ａｂｃ", "小号/中号/大号",
             " 100% Cotton", "（2支装）", "～", "ÉTÉ été"]
    out = [h + t for h in heads for t in tails]
    out += [h * 5 for h in heads]  # longer than the context length: truncated the same way
    out += ["一张照片", "A PHOTO OF A DOG", "“引号”和\"引号\"", "  两端空格  ", "emoji😀不在词表", "全角１２３"]
    return out


@pytest.fixture(scope="module")
def cn_clip_pt(tmp_path_factory):
    root = tmp_path_factory.mktemp("cn_clip")
    model = reference_model()
    return model, save_cn_clip_checkpoint(model, root / "tiny.pt")


def test_tokenizer_and_caption_preprocessing_match_cn_clip_on_its_real_vocab(cn_clip_pt):
    ref = cn_clip()
    texts = captions()
    assert len(texts) >= 300 and len(ref.tokenizer.vocab) == 21128
    base = load_base_model(ModelConfig(base=str(cn_clip_pt[1])))  # vocab.txt: the installed cn_clip's
    ours = tokenize(base.tokenizer, texts, 52)["input_ids"]
    theirs = ref.tokenize([ref.preprocess_text(t) for t in texts], context_length=52)
    mismatched = [t for t, a, b in zip(texts, ours, theirs) if not torch.equal(a, b)]
    print(f"token ids: {len(texts) - len(mismatched)}/{len(texts)} captions identical at context length 52")
    assert not mismatched
    assert all(preprocess_text(t) == ref.preprocess_text(t) for t in texts)
    assert preprocess_text("“Hello” WORLD") == '"hello" world'


def test_cn_clip_checkpoint_embeds_like_cn_clip(cn_clip_pt):
    ref = cn_clip()
    model, pt = cn_clip_pt
    base = load_base_model(ModelConfig(base=str(pt)))
    assert base.clip.config.vision_config.num_attention_heads == 2 and base.preprocess.resize_height == 32
    texts = captions()[:64]
    pixels = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens = tokenize(base.tokenizer, texts, 52)
        ours_text = encode_texts(base.clip, **tokens)
        ours_image = encode_images(base.clip, pixels)
        ref_text = model.encode_text(ref.tokenize([ref.preprocess_text(t) for t in texts], 52))
        ref_image = model.encode_image(pixels)
    text_diff = (ours_text - ref_text).abs().max().item()
    image_diff = (ours_image - ref_image).abs().max().item()
    print(f"cn_clip .pt loaded by cnclip vs cn_clip: text max abs diff {text_diff:.2e}, image {image_diff:.2e} "
          f"(embedding scale {ref_text.abs().max().item():.2f} / {ref_image.abs().max().item():.2f})")
    assert text_diff < TOLERANCE and image_diff < TOLERANCE


def test_named_architecture_is_checked_against_the_shapes(cn_clip_pt):
    with pytest.raises(ModelLoadError, match="does not hold a ViT-B-16 model .*vision_width: 768 in ViT-B-16, 128"):
        load_base_model(ModelConfig(base=str(cn_clip_pt[1]), arch="ViT-B-16"))


def test_pickled_objects_are_refused(tmp_path, cn_clip_pt):
    state = torch.load(cn_clip_pt[1], weights_only=True)
    state["args"] = argparse.Namespace(lr=1e-4)  # what some training scripts save beside the weights
    torch.save(state, tmp_path / "with_args.pt")
    with pytest.raises(ModelLoadError, match="refused to load: it holds pickled objects"):
        read_state_dict(tmp_path / "with_args.pt")


def write_modelscope_dir(model, out: Path, vision_head_width: int | None = None) -> Path:
    """A ModelScope-layout directory as the damo/iic CLIP models ship (configs with the model's sizes)."""
    out.mkdir(parents=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, out / "pytorch_model.bin")
    vision = dict(VISION, **({"vision_head_width": vision_head_width} if vision_head_width else {}))
    (out / "vision_model_config.json").write_text(json.dumps(vision))
    (out / "text_model_config.json").write_text(json.dumps(TEXT))
    (out / "vocab.txt").write_bytes(cn_clip().vocab.read_bytes())
    return out


def test_modelscope_directory_embeds_like_cn_clip(tmp_path):
    ref = cn_clip()
    model = reference_model(seed=3, vision_head_width=32)  # 4 heads: only the JSON config can say so
    directory = write_modelscope_dir(model, tmp_path / "ms", vision_head_width=32)
    loaded = load_for_inference(str(directory))
    assert loaded.clip.config.vision_config.num_attention_heads == 4
    texts = captions()[:32]
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        text_diff = (encode_texts(loaded.clip, **tokenize(loaded.tokenizer, texts, 52))
                     - model.encode_text(ref.tokenize([ref.preprocess_text(t) for t in texts], 52))).abs().max().item()
        image_diff = (encode_images(loaded.clip, pixels) - model.encode_image(pixels)).abs().max().item()
    print(f"ModelScope dir loaded by cnclip vs cn_clip: text {text_diff:.2e}, image {image_diff:.2e}")
    assert text_diff < TOLERANCE and image_diff < TOLERANCE


def test_convert_command_writes_a_transformers_model(cn_clip_pt, tmp_path):
    from transformers import ChineseCLIPModel

    from cnclip.commands import main as cnclip_main

    assert cnclip_main(["convert", str(cn_clip_pt[1]), "--to", str(tmp_path / "hf")]) == 0
    converted = ChineseCLIPModel.from_pretrained(tmp_path / "hf").eval()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (encode_images(converted, pixels) - cn_clip_pt[0].encode_image(pixels)).abs().max().item()
    assert diff < TOLERANCE
    assert json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())["size"] == {"height": 32, "width": 32}
    assert (tmp_path / "hf" / "vocab.txt").read_text(encoding="utf-8").count("\n") == 21128


# ---------------------------------------------------------------- export: cnclip -> original format


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, cn_clip_pt):
    """A short LoRA run whose base is the cn_clip .pt (converted on load), then its three exports."""
    from cnclip.finetune import main as finetune_main

    root = tmp_path_factory.mktemp("run")
    data = make_tiny_dataset(root / "data")
    assert finetune_main([str(DEMO_RECIPE), *tiny_overrides(cn_clip_pt[1], data, root / "run",
                                                             **{"train.epochs": 1})]) == 0
    exports = {}
    for fmt in ("transformers", "modelscope", "cn_clip"):
        assert export_main([str(root / "run"), "--to", str(root / fmt), "--format", fmt]) == 0
        exports[fmt] = root / fmt
    return root / "run", exports


def probe_inputs():
    ref = cn_clip()
    texts = ["一个红色的圆形", "蓝色正方形", "“绿色”的三角形在左上角", "Yellow 黄色"]
    tokens = ref.tokenize([ref.preprocess_text(t) for t in texts], context_length=16)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    return texts, tokens, pixels


def transformers_embeddings(export_dir: Path, texts, pixels):
    loaded = load_for_inference(str(export_dir))
    with torch.no_grad():
        text = encode_texts(loaded.clip, **tokenize(loaded.tokenizer, texts, 16))
        image = encode_images(loaded.clip, pixels)
    return text, image


def normalized(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def test_cn_clip_export_loads_with_cn_clips_own_loader(trained_run, tmp_path):
    ref = cn_clip()
    _, exports = trained_run
    pt = next(exports["cn_clip"].glob("*.pt"))
    # cn_clip's create_model reads model_configs/<vision>.json and <text>.json beside its utils.py: the tiny sizes.
    (tmp_path / "model_configs").mkdir()
    (tmp_path / "model_configs" / "tiny-vit.json").write_text(json.dumps(VISION))
    (tmp_path / "model_configs" / "tiny-bert.json").write_text(json.dumps(TEXT))
    checkpoint = torch.load(pt, map_location="cpu")  # as load_from_name does (plain torch.load)
    assert set(checkpoint) == {"epoch", "step", "name", "state_dict"}
    model = ref.create_model("tiny-vit@tiny-bert", checkpoint, tmp_path).float().eval()  # load_from_name on CPU
    texts, tokens, pixels = probe_inputs()
    with torch.no_grad():
        ref_text, ref_image = model.encode_text(tokens), model.encode_image(pixels)
    ours_text, ours_image = transformers_embeddings(pt, texts, pixels)  # cnclip reading the .pt
    tf_text, tf_image = transformers_embeddings(exports["transformers"], texts, pixels)
    same = max((ours_text - ref_text).abs().max().item(), (ours_image - ref_image).abs().max().item())
    vs_tf = max((normalized(tf_text) - normalized(ref_text)).abs().max().item(),
                (normalized(tf_image) - normalized(ref_image)).abs().max().item())
    print(f"cn_clip export: cn_clip's loader vs cnclip reading the same .pt: max abs diff {same:.2e}; "
          f"vs the transformers export (normalised embeddings; the .pt holds fp16 weights): {vs_tf:.2e}")
    assert same < TOLERANCE
    assert vs_tf < 5e-3


def test_modelscope_export_loads_with_modelscopes_clip_model(trained_run):
    from modelscope.outputs import OutputKeys

    _, exports = trained_run
    directory = exports["modelscope"]
    assert json.loads((directory / "configuration.json").read_text()) == {
        "framework": "pytorch", "task": "multi-modal-embedding", "model": {"type": "clip-multi-modal-embedding"},
        "pipeline": {"type": "multi-modal-embedding"}}
    assert "pipeline(Tasks.multi_modal_embedding" in (directory / "README.md").read_text(encoding="utf-8")
    modelscope_clip_class()
    from modelscope.models import Model

    model = Model.from_pretrained(str(directory))  # configuration.json picks ModelScope's CLIP model class
    assert type(model).__name__ == "CLIPForMultiModalEmbedding"
    texts, tokens, pixels = probe_inputs()
    out = model.forward({"img": pixels, "text": tokens})
    ms_image, ms_text = out[OutputKeys.IMG_EMBEDDING], out[OutputKeys.TEXT_EMBEDDING]
    ours_text, ours_image = transformers_embeddings(directory, texts, pixels)  # cnclip reading the export
    tf_text, tf_image = transformers_embeddings(exports["transformers"], texts, pixels)
    same = max((normalized(ours_text) - ms_text).abs().max().item(), (normalized(ours_image) - ms_image).abs().max().item())
    vs_tf = max((normalized(tf_text) - ms_text).abs().max().item(), (normalized(tf_image) - ms_image).abs().max().item())
    print(f"ModelScope export: ModelScope's CLIPForMultiModalEmbedding vs cnclip on the same files: max abs diff "
          f"{same:.2e}; vs the transformers export (fp16 weights in pytorch_model.bin): {vs_tf:.2e}")
    assert same < TOLERANCE
    assert vs_tf < 5e-3


def test_original_exports_go_through_publish_dry_run(trained_run):
    from cnclip.commands import main as cnclip_main

    _, exports = trained_run
    for fmt in ("modelscope", "cn_clip"):
        assert cnclip_main(["publish", str(exports[fmt]), "owner/name", "--dry-run"]) == 0
