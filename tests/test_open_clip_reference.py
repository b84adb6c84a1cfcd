"""open_clip image towers, the parts that need no open_clip (they run everywhere, CI included): parsing
`model.compose.image: open_clip:...`, the error when open_clip does not import, the translation of its
preprocessing settings, recipe validation, the export's refusals and the card's scrubbing of local paths.
The open_clip towers themselves are tested in tests/test_open_clip_tower.py (torchvision-marked)."""

from __future__ import annotations

import sys

import pytest
import yaml
from conftest import REPO

from cnclip.errors import ConfigError, ModelLoadError, UsageError
from cnclip.open_clip_reference import parse_open_clip_reference

LIT_EVA = REPO / "recipes" / "lit_eva_zh.yaml"


def test_references_name_an_architecture_with_weights_or_an_open_clip_folder(tmp_path):
    ref = parse_open_clip_reference("open_clip:ViT-B-16-SigLIP2@webli")
    assert (ref.model_name, ref.pretrained) == ("ViT-B-16-SigLIP2", "webli")
    weights = tmp_path / "eva.safetensors"
    weights.write_bytes(b"x")
    ref = parse_open_clip_reference(f"open_clip:EVA02-B-16@{weights}")
    assert (ref.model_name, ref.pretrained) == ("EVA02-B-16", str(weights))
    assert parse_open_clip_reference("open_clip:hf-hub:timm/ViT-B-16-SigLIP2").model_name == "hf-hub:timm/ViT-B-16-SigLIP2"
    (tmp_path / "oc").mkdir()
    (tmp_path / "oc" / "open_clip_config.json").write_text("{}")
    ref = parse_open_clip_reference(f"open_clip:local-dir:{tmp_path / 'oc'}")
    assert (ref.model_name, ref.pretrained) == (f"local-dir:{tmp_path / 'oc'}", None)


@pytest.mark.parametrize("spec, message", [
    ("open_clip:", "names no open_clip model"),
    ("open_clip:EVA02-B-16", "names no weights: add @<pretrained tag>"),
    ("open_clip:EVA02-B-16@", "names no weights"),
    ("open_clip:@webli", "names no architecture"),
    ("open_clip:EVA02-B-16@/no/such/eva.pt", "no such checkpoint file: /no/such/eva.pt"),
    ("open_clip:EVA02-B-16@weights.safetensors", "no such checkpoint file: weights.safetensors"),
    ("open_clip:hf-hub:timm", "a Hub repository is <org>/<repo>"),
    ("open_clip:hf-hub:a/b/c", "a Hub repository is <org>/<repo>"),
    ("open_clip:local-dir:/no/such/dir", "is not an open_clip model directory"),
])
def test_bad_references_are_usage_errors_naming_the_key(spec, message):
    with pytest.raises(UsageError, match=f"model.compose.image: .*{message}"):
        parse_open_clip_reference(spec)


def test_a_missing_open_clip_is_a_model_load_error_naming_the_extra(monkeypatch):
    from cnclip.open_clip_tower import import_open_clip

    monkeypatch.setitem(sys.modules, "open_clip", None)  # `import open_clip` raises ImportError
    with pytest.raises(ModelLoadError, match=r"needs open_clip, which does not import here .*cnclip\[openclip\]"):
        import_open_clip()


def test_cnclip_imports_no_open_clip_until_a_tower_is_used():
    """Importing cnclip's modules (training, inference, export) must work where open_clip is absent."""
    from conftest import in_fresh_process

    out = in_fresh_process(
        "import sys, json; sys.modules['open_clip'] = None\n"
        "import cnclip.finetune, cnclip.inference, cnclip.exporter, cnclip.open_clip_tower, cnclip.open_clip_export\n"
        "from cnclip.recipe import load_recipe\n"
        f"r = load_recipe({str(LIT_EVA)!r}, check_data=False)\n"
        "print(json.dumps({'image': r.model.compose.image, 'timm': 'timm' in sys.modules}))")
    assert out == {"image": "open_clip:EVA02-L-14@merged2b_s4b_b131k", "timm": False}


def test_open_clip_preprocessing_translates_exactly_or_is_refused():
    from cnclip.open_clip_tower import preprocess_of

    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    shortest = preprocess_of({"size": 224, "mode": "RGB", "mean": mean, "std": std, "interpolation": "bicubic",
                              "resize_mode": "shortest"})
    assert (shortest.shortest_edge, shortest.do_center_crop, shortest.crop_height, shortest.crop_offset,
            shortest.resample) == (224, True, 224, "round", 3)
    squash = preprocess_of({"size": (256, 256), "mean": 0.5, "std": 0.5, "interpolation": "bilinear",
                            "resize_mode": "squash"})
    assert (squash.resize_height, squash.resize_width, squash.do_center_crop, squash.resample, squash.mean) == (
        256, 256, False, 2, mean)
    with pytest.raises(ModelLoadError, match="resize_mode 'longest'"):
        preprocess_of({"size": 224, "mean": mean, "std": std, "resize_mode": "longest"})
    with pytest.raises(ModelLoadError, match="not RGB"):
        preprocess_of({"size": 224, "mode": "L", "mean": mean, "std": std})


def test_torchvision_crop_offsets_round_half_to_even_and_transformers_keys_stay():
    """open_clip's centre crop is torchvision's: top = int(round((h - crop) / 2)). For a margin of 3 that is
    2 (transformers' floor gives 1); for 5 it is 2 as well (round half to even)."""
    import numpy as np
    from PIL import Image

    from cnclip.images import ImagePreprocess, ImageResize

    base = dict(resize_height=None, resize_width=None, shortest_edge=4, do_center_crop=True, crop_height=4,
                crop_width=4, resample=0, rescale_factor=1 / 255, mean=(0, 0, 0), std=(1, 1, 1))
    rows = np.arange(9, dtype=np.uint8).repeat(4).reshape(9, 4, 1).repeat(3, axis=2) * 20  # 4 wide, 9 tall
    image = Image.fromarray(rows)
    torchvision_like = ImageResize(ImagePreprocess(**base, crop_offset="round")).pil_to_array(image)
    transformers_like = ImageResize(ImagePreprocess(**base)).pil_to_array(image)
    assert torchvision_like[:, 0, 0].tolist() == [40, 60, 80, 100]  # margin 5: round(2.5) = 2
    assert transformers_like[:, 0, 0].tolist() == [40, 60, 80, 100]  # 5 // 2 = 2
    seven = Image.fromarray(rows[:7])  # margin 3: round(1.5) = 2, floor 1
    assert ImageResize(ImagePreprocess(**base, crop_offset="round")).pil_to_array(seven)[:, 0, 0].tolist() == [
        40, 60, 80, 100]
    assert ImageResize(ImagePreprocess(**base)).pil_to_array(seven)[:, 0, 0].tolist() == [20, 40, 60, 80]
    # A transformers checkpoint's settings (and so its image-cache key) do not gain the new field.
    assert "crop_offset" not in ImagePreprocess(**base).to_dict()
    assert ImagePreprocess(**base, crop_offset="round").to_dict()["crop_offset"] == "round"


def test_recipe_validation_checks_open_clip_references(tmp_path):
    from cnclip.recipe import load_recipe

    recipe = load_recipe(LIT_EVA, check_data=False)
    assert recipe.model.text_tuning == "full" and recipe.model.compose.text == "hfl/chinese-roberta-wwm-ext"
    data = tmp_path / "data"
    for split in ("train", "valid"):
        (data / f"{split}_imgs.tsv").parent.mkdir(parents=True, exist_ok=True)
        (data / f"{split}_imgs.tsv").write_text("")
        (data / f"{split}_texts.jsonl").write_text("")
    ok = load_recipe(LIT_EVA, [f"data.root={data}"], check_data=True)  # a tag is not looked up here
    assert ok.model.compose.image.startswith("open_clip:EVA02-L-14@")
    for image, message in (("open_clip:EVA02-L-14", "recipe key 'model.compose.image': .* names no weights"),
                           ("open_clip:EVA02-L-14@/no/such.pt", "no such checkpoint file")):
        with pytest.raises(ConfigError, match=message):
            load_recipe(LIT_EVA, [f"data.root={data}", f"model.compose.image={image}"], check_data=True)


def write_run_recipe(run_dir, image: str) -> None:
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump({"model": {"compose": {"image": image, "text": "t"}}}))


@pytest.mark.parametrize("fmt", ["modelscope", "cn_clip", "onnx"])
def test_only_the_default_format_exports_an_open_clip_run(tmp_path, fmt):
    from cnclip.exporter import open_clip_image_of

    write_run_recipe(tmp_path / "run", "open_clip:EVA02-B-16@merged2b_s8b_b131k")
    assert open_clip_image_of(tmp_path / "run", "transformers") == "open_clip:EVA02-B-16@merged2b_s8b_b131k"
    with pytest.raises(UsageError, match=f"--format {fmt}: .* open_clip image tower open_clip:EVA02-B-16"):
        open_clip_image_of(tmp_path / "run", fmt)
    write_run_recipe(tmp_path / "clip_run", "openai/clip-vit-base-patch16")
    assert open_clip_image_of(tmp_path / "clip_run", fmt) is None


def test_the_card_names_open_clip_towers_without_local_paths():
    from cnclip.model_card import _named, public_recipe_text

    assert _named("open_clip:ViT-B-16-SigLIP2@webli") == "open_clip `ViT-B-16-SigLIP2@webli`"
    assert _named("open_clip:EVA02-B-16@/home/me/eva.pt") == "open_clip `EVA02-B-16` with the weights `eva.pt` (a local file)"
    assert "/home" not in _named("open_clip:local-dir:/home/me/towers/eva")
    text = public_recipe_text({"model": {"compose": {"image": "open_clip:local-dir:/home/me/towers/eva",
                                                     "text": "/home/me/bert"}},
                               "other": "open_clip:EVA02-B-16@/home/me/eva.pt"})
    assert "/home" not in text and "open_clip:local-dir:.../eva" in text and "open_clip:EVA02-B-16@.../eva.pt" in text


def test_the_export_command_refuses_onnx_for_an_open_clip_run_by_name(tmp_path, capsys):
    from cnclip.commands.export import main as export_main

    write_run_recipe(tmp_path / "run", "open_clip:ViT-B-16-SigLIP2@webli")
    assert export_main([str(tmp_path / "run"), "--to", str(tmp_path / "out"), "--format", "onnx"]) == 2
    assert "--format onnx: " in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_composed_models_card_names_no_base_checkpoint():
    """model.base keeps its default (OFA-Sys/chinese-clip-vit-base-patch16) in a composed run's recipe; the card's
    front matter must not claim it as the base model."""
    from cnclip.model_card import CardInputs, base_model_id, front_matter

    recipe = {"model": {"base": "OFA-Sys/chinese-clip-vit-base-patch16",
                        "compose": {"image": "open_clip:EVA02-B-16@merged2b_s8b_b131k", "text": "hfl/chinese-roberta-wwm-ext"}}}
    card = CardInputs(title="t", repo_id=None, recipe=recipe, metrics=None, dataset="d", license="apache-2.0",
                      checkpoint="best")
    assert "base_model" not in front_matter(card)
    recipe["model"].pop("compose")
    assert front_matter(card)["base_model"] == [base_model_id("OFA-Sys/chinese-clip-vit-base-patch16")]
