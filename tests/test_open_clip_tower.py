"""Composing from open_clip image towers (cnclip.open_clip_tower, cnclip.open_clip_export), against open_clip itself.

Tiny random-weight towers are built from open_clip model configs (no downloads): open_clip's own ViT, a timm
ViT (`test_vit`, SigLIP-style squash preprocessing) and a timm EVA02 (`eva02_tiny_patch14_224`, the EVA-CLIP
architecture), each saved in open_clip's local-dir layout and loaded by open_clip's factory. open_clip imports
torchvision, which CI's torch has no build of: these tests are torchvision-marked and skip where it does not
import (docs/reliability.md names the environment they run in). tests/test_open_clip_reference.py covers
what needs no open_clip, everywhere.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from conftest import DEMO_RECIPE, image_bytes, torchvision_or_skip, write_split
from PIL import Image

from cnclip.recipe import ComposeConfig, ModelConfig

pytestmark = pytest.mark.torchvision

TEXT = dict(context_length=16, vocab_size=100, width=32, heads=2, layers=1)
OPENAI = dict(mean=[0.48145466, 0.4578275, 0.40821073], std=[0.26862954, 0.26130258, 0.27577711])
TOWERS = {
    # open_clip's own VisionTransformer, 48 px, OpenAI preprocessing (shortest edge + centre crop, bicubic).
    "open_clip_vit": ({"embed_dim": 32, "vision_cfg": {"image_size": 48, "layers": 2, "width": 64, "patch_size": 8,
                                                       "head_width": 32},
                       "text_cfg": TEXT}, dict(OPENAI, size=48, interpolation="bicubic", resize_mode="shortest")),
    # a timm ViT with SigLIP's preprocessing: squash to the square, bilinear, mean/std 0.5.
    "timm_vit_squash": ({"embed_dim": 32, "vision_cfg": {"image_size": 224, "timm_model_name": "test_vit",
                                                         "timm_model_pretrained": False, "timm_pool": "token",
                                                         "timm_proj": "linear"},
                         "text_cfg": TEXT}, dict(mean=[0.5] * 3, std=[0.5] * 3, size=224, interpolation="bilinear",
                                                 resize_mode="squash")),
    # timm's EVA02 (rotary position embeddings, SwiGLU), as open_clip's EVA02 configs build it.
    "timm_eva02": ({"embed_dim": 32, "vision_cfg": {"image_size": 224, "timm_model_name": "eva02_tiny_patch14_224",
                                                    "timm_model_pretrained": False, "timm_pool": "token",
                                                    "timm_proj": None},
                    "text_cfg": TEXT, "custom_text": True}, dict(OPENAI, size=224, interpolation="bicubic",
                                                                 resize_mode="shortest")),
}


@pytest.fixture(scope="module")
def open_clip():
    torchvision_or_skip()
    try:
        import open_clip
    except Exception as exc:  # noqa: BLE001 - absent, or not importing beside this torch
        pytest.skip(f"open_clip not usable here ({exc}); install the openclip extra where torchvision imports")
    return open_clip


def make_open_clip_dir(open_clip, out: Path, kind: str, seed: int = 0) -> Path:
    """A random-weight open_clip model of TOWERS[kind] in open_clip's local-dir layout."""
    from safetensors.torch import save_file

    model_cfg, preprocess_cfg = TOWERS[kind]
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}))
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{out}")  # no weights in the folder yet: random
    with torch.no_grad():
        for name, param in model.visual.named_parameters():
            if name.endswith("head.weight"):  # timm starts its heads near zero (EVA: x0.001): unit scale instead
                param.normal_(0, param.shape[1] ** -0.5)
            elif kind == "open_clip_vit" and param.dim() > 1:
                # As the demo's tiny tower draws with initializer_factor 3: larger random weights (and position
                # embeddings 8x larger still) so that the locked random features tell the drawings' positions
                # apart (1-NN of the demo's validation drawings by colour, shape and position: 0.40 -> 0.72).
                param.mul_(24.0 if name == "positional_embedding" else 3.0)
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
              out / "open_clip_model.safetensors")
    return out


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    from test_compose import make_tiny_bert

    return make_tiny_bert(tmp_path_factory.mktemp("bert") / "bert")


def compose(image: str, text: Path, seed: int = 0):
    from cnclip.models import load_base_model

    return load_base_model(ModelConfig(compose=ComposeConfig(image=image, text=str(text))), seed=seed)


# Odd sizes, both orientations: the centre crops have odd margins, where torchvision's offset and
# transformers' differ.
SIZES = ((37, 61), (83, 45), (64, 64), (120, 50), (251, 97))


def image_split(root: Path) -> dict[int, bytes]:
    images = {i + 1: image_bytes((30 + 40 * i, 200 - 30 * i, 90), size, shape="circle" if i % 2 else "square")
              for i, size in enumerate(SIZES)}
    write_split(root, "test", images, [{"text_id": 1, "text": "一张图", "image_ids": list(images)}])
    return images


@pytest.mark.parametrize("kind", list(TOWERS))
def test_cached_embeddings_equal_open_clips_encode_image(open_clip, bert, tmp_path, kind):
    """The image cache's embeddings (cnclip's decoding, translated preprocessing, wrapper) against open_clip's
    own pipeline on the same image files: its eval transform, then model.encode_image."""
    from cnclip.data import ImageTransform, load_split
    from cnclip.image_cache import split_image_features
    from cnclip.models import image_tower_fingerprint
    from cnclip.runtime import pick_runtime
    from cnclip.skiplog import SkipLog

    folder = make_open_clip_dir(open_clip, tmp_path / kind, kind)
    images = image_split(tmp_path / "data")
    base = compose(f"open_clip:local-dir:{folder}", bert)
    split = load_split(tmp_path / "data", "test", SkipLog())
    features = split_image_features(split.images, base.clip, ImageTransform(base.preprocess),
                                    image_tower_fingerprint(base.clip), pick_runtime("cpu", "fp32"),
                                    str(tmp_path / "cache"), 2, 0, SkipLog())
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.open(io.BytesIO(images[i]))) for i in features.ids])
        reference = model.eval().encode_image(pixels)
    diff = (features.embeddings - reference).abs().max().item()
    scale = reference.abs().max().item()
    print(f"{kind}: cached embeddings vs open_clip encode_image, max abs diff {diff:.2e} (values up to {scale:.2f})")
    assert features.ids == sorted(images) and diff <= 1e-5 * max(1.0, scale)
    # The embeddings differ from image to image (a tower that ignored its input would agree trivially).
    assert torch.cdist(reference, reference).max().item() > 100 * diff
    again = split_image_features(split.images, base.clip, ImageTransform(base.preprocess),
                                 image_tower_fingerprint(base.clip), pick_runtime("cpu", "fp32"),
                                 str(tmp_path / "cache"), 2, 0, SkipLog())
    assert not again.computed and torch.equal(again.embeddings, features.embeddings)


def test_an_architecture_with_a_checkpoint_file_is_the_same_tower(open_clip, bert, tmp_path):
    """`open_clip:<architecture>@<file>`: an architecture open_clip knows (registered here) and a weights file."""
    folder = make_open_clip_dir(open_clip, tmp_path / "vit", "open_clip_vit", seed=3)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "cnclip-test-vit.json").write_text(json.dumps(TOWERS["open_clip_vit"][0]))
    open_clip.add_model_config(tmp_path / "configs")
    by_file = compose(f"open_clip:cnclip-test-vit@{folder / 'open_clip_model.safetensors'}", bert)
    by_dir = compose(f"open_clip:local-dir:{folder}", bert)
    pixels = torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    from cnclip.models import encode_images, image_tower_fingerprint

    with torch.no_grad():
        assert torch.equal(encode_images(by_file.clip, pixels), encode_images(by_dir.clip, pixels))
    assert image_tower_fingerprint(by_file.clip) == image_tower_fingerprint(by_dir.clip)
    # The preprocessing is the tag's / file's default (OpenAI mean, shortest edge), not the folder's settings file.
    assert by_file.preprocess.shortest_edge == 48 and by_file.preprocess.crop_offset == "round"


def test_lora_never_touches_the_open_clip_tower(open_clip, bert, tmp_path):
    from cnclip.models import attach_text_tuning

    folder = make_open_clip_dir(open_clip, tmp_path / "vit", "timm_vit_squash")
    base = compose(f"open_clip:local-dir:{folder}", bert)
    model = attach_text_tuning(base.clip, ModelConfig(target_modules=["query", "key", "value", "dense"]))
    lora = [name for name, _ in model.named_modules() if name.endswith("lora_A")]
    assert lora and all(".text_model." in name for name in lora)
    assert not any(p.requires_grad for p in base.clip.vision_model.parameters())


def test_a_lora_run_on_an_open_clip_tower_learns_and_exports_merged(open_clip, bert, tmp_path, capsys):
    """LoRA on the Chinese text tower against a locked open_clip tower (the recipe default): recall climbs
    above chance and the export holds the LoRA update merged into text/, loadable as the run embeds."""
    from cnclip.export import main as export_main
    from cnclip.finetune import main as finetune_main

    folder = make_open_clip_dir(open_clip, tmp_path / "tower", "open_clip_vit")
    run = tmp_path / "run"
    assert finetune_main([
        str(DEMO_RECIPE), f"run_dir={run}", f"data.root={tmp_path / 'data'}", f"cache.dir={tmp_path / 'cache'}",
        "model.random_init=false", f"model.compose.image=open_clip:local-dir:{folder}", f"model.compose.text={bert}",
        "model.text_tuning=lora", "train.epochs=5", "train.lr=1e-2", "zeroshot.images=", "zeroshot.classes="]) == 0
    summary = json.loads((run / "summary.json").read_text())
    before, after = summary["before"]["mean_recall"], summary["best"]["valid"]["mean_recall"]
    chance = 100 * (1 + 5 + 10) / 3 / summary["before"]["num_images"]
    with capsys.disabled():  # the figures docs/compose.md quotes
        print(f"open_clip tower, LoRA text tuning: mean recall {before:.1f} before, {after:.1f} after (chance {chance:.1f})")
    assert after > 2 * chance and after > before + 10
    capsys.readouterr()
    assert export_main([str(run), "--to", str(tmp_path / "out")]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["export"]
    assert report["open_clip"]["round_trip_max_abs_diff"] <= 1e-4


def test_a_composed_run_learns_and_exports_for_open_clip_and_transformers(open_clip, bert, tmp_path, capsys):
    """The LiT recipe on the generated demo set with an open_clip tower (text tower fully trained): recall
    climbs far above chance, the zero-shot check runs on it; the export loads back through open_clip and
    transformers and embeds like the run, and cnclip evaluate gives the same recall on the run and the export."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    from cnclip.commands.evaluate import main as evaluate_main
    from cnclip.commands.search import main as search_main
    from cnclip.commands.zeroshot import main as zeroshot_main
    from cnclip.export import main as export_main
    from cnclip.finetune import main as finetune_main
    from cnclip.inference import load_for_inference
    from cnclip.models import encode_images, encode_texts
    from cnclip.data import tokenize

    folder = make_open_clip_dir(open_clip, tmp_path / "tower", "open_clip_vit")
    run = tmp_path / "run"
    code = finetune_main([
        str(DEMO_RECIPE), f"run_dir={run}", f"data.root={tmp_path / 'data'}", f"cache.dir={tmp_path / 'cache'}",
        "model.random_init=false", f"model.compose.image=open_clip:local-dir:{folder}", f"model.compose.text={bert}",
        "model.text_tuning=full", "train.epochs=5", "train.lr=1e-3", f"zeroshot.images={tmp_path / 'data' / 'zeroshot'}",
        f"zeroshot.classes={tmp_path / 'data' / 'zeroshot_classes.txt'}"])
    assert code == 0
    summary = json.loads((run / "summary.json").read_text())
    before, after = summary["before"]["mean_recall"], summary["best"]["valid"]["mean_recall"]
    chance = 100 * (1 + 5 + 10) / 3 / summary["before"]["num_images"]
    with capsys.disabled():  # the figures docs/compose.md quotes
        print(f"open_clip tower, full text tuning: mean recall {before:.1f} before, {after:.1f} after (chance {chance:.1f})")
    assert after > 3 * chance and after > before + 15

    out = tmp_path / "out"
    capsys.readouterr()
    assert export_main([str(run), "--to", str(out)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["export"]
    assert report["open_clip"]["round_trip_max_abs_diff"] <= 1e-4
    assert not (out / "adapter").exists() and not (out / "config.json").exists()
    card = (out / "README.md").read_text()
    assert 'create_model_and_transforms(f"local-dir:{model_dir}/image")' in card and "text_projection.safetensors" in card

    # Loaded the way the card says, without cnclip: the same embeddings as the run.
    trained = load_for_inference(str(run))
    image_model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out / 'image'}")
    text_model = AutoModel.from_pretrained(out / "text", add_pooling_layer=False).eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "text")
    projection = load_file(out / "text" / "text_projection.safetensors")["weight"]
    pixels = torch.randn(4, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    texts = ["左上角有一个红色的圆形", "图片中间有一个蓝色的正方形"]
    with torch.no_grad():
        image_diff = (image_model.eval().encode_image(pixels) - encode_images(trained.clip, pixels)).abs().max().item()
        tokens = tokenizer(texts, padding=True, return_tensors="pt")
        theirs = text_model(**tokens).last_hidden_state[:, 0] @ projection.T
        ours = encode_texts(trained.clip, **tokenize(trained.tokenizer, texts, 24))
    text_diff = (theirs - ours).abs().max().item()
    with capsys.disabled():  # the figures docs/compose.md quotes
        print(f"export round trip: image max abs diff {image_diff:.2e}, text max abs diff {text_diff:.2e}")
    assert image_diff <= 1e-5 and text_diff <= 1e-4
    # A Chinese-CLIP layout cannot hold this tower: said by name.
    assert export_main([str(run), "--to", str(tmp_path / "ms"), "--format", "modelscope"]) == 2

    # cnclip's own commands take the export as they take the run.
    recalls = []
    for model in (run, out):
        capsys.readouterr()
        assert evaluate_main([str(model), "--data", str(tmp_path / "data"), "--split", "valid", "--context-length",
                              "24", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "eval")]) == 0
        recalls.append(json.loads([line for line in capsys.readouterr().out.splitlines()
                                   if line.startswith('{"split"')][-1])["mean_recall"])
    with capsys.disabled():  # the figures docs/compose.md quotes
        print(f"cnclip evaluate: mean recall {recalls[0]:.2f} (run), {recalls[1]:.2f} (export)")
    assert abs(recalls[0] - recalls[1]) < 1e-6 and abs(recalls[0] - after) < 1e-6
    zeroshot = []
    for model in (run, out):
        capsys.readouterr()
        assert zeroshot_main(["--model", str(model), "--images", str(tmp_path / "data" / "zeroshot"), "--classes",
                              str(tmp_path / "data" / "zeroshot_classes.txt"), "--context-length", "24",
                              "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "zs")]) == 0
        zeroshot.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert list(zeroshot[0].values()) == list(zeroshot[1].values())  # keyed "tuned" (a run) and "model"
    # Search: the export indexes a folder, and an image query finds that image first.
    capsys.readouterr()
    assert search_main(["index", str(tmp_path / "data" / "zeroshot"), "--model", str(out), "--out",
                        str(tmp_path / "idx"), "--cache-dir", str(tmp_path / "cache"), "--json"]) == 0
    capsys.readouterr()
    query = next((tmp_path / "data" / "zeroshot" / "red").iterdir())
    assert search_main(["image", str(tmp_path / "idx"), str(query), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["ref"] == f"red/{query.name}"
