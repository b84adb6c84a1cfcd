"""The whole cn_clip package, torchvision included: its image transform and its `load_from_name`.

tests/test_original_format.py checks cn_clip's model, tokenizer and `create_model` without torchvision.
What needs torchvision is checked here, in an environment where it imports beside torch (marked
`torchvision`: `python -m pytest -m torchvision`; docs/formats.md, "Original Chinese-CLIP format"; skipped where
torchvision does not import, CI included, deliberately: the registry's build does not import beside torch 2.13.0+cpu):

* cn_clip's `image_transform` (torchvision Resize/ToTensor/Normalize) equals the preprocessing cnclip
  uses for original-format checkpoints;
* a cn_clip-format file written by cnclip loads through cn_clip's public `load_from_name` (its
  shipped ViT-B-32 and RBT3-chinese configs, random weights) and embeds like cnclip's reading of it.

ModelScope's `pipeline(Tasks.multi_modal_embedding)` is not run even here: its module imports
`modelscope.preprocessors.multi_modal`, which imports `.ofa` -> `ofa/asr.py` -> fairseq (an sdist
only, not buildable for Python 3.11 here). Its model class is checked in test_original_format.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cnclip.data import ImageTransform, tokenize
from cnclip.models import ImagePreprocess, encode_images, encode_texts, load_base_model
from cnclip.original_format import ARCHS, preprocess_dict, save_cn_clip
from cnclip.recipe import ModelConfig

from conftest import require, torchvision_or_skip

pytestmark = pytest.mark.torchvision


def cn_clip_utils():
    torchvision_or_skip()
    # the package as users import it, __init__ and all
    return require("cn_clip.clip.utils", "README's test command installs cn-clip==1.6.0")


def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(224, 224), (300, 200), (97, 41), (40, 130), (640, 480)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def test_cn_clips_image_transform_equals_cnclips_preprocessing_of_original_checkpoints():
    utils = cn_clip_utils()
    reference = torch.stack([utils.image_transform(224)(img) for img in images()])
    transform = ImageTransform(ImagePreprocess.from_dict(preprocess_dict(224)))
    diff = (transform(images()) - reference).abs().max().item()
    print(f"cn_clip image_transform vs cnclip: max abs diff {diff:.2e}")
    assert diff < 1e-5
    # Known difference, kept: cn_clip resizes an RGBA image before dropping its alpha (PIL resamples RGBA
    # premultiplied), cnclip and transformers' ChineseCLIPImageProcessor drop it first. Opaque RGBA agrees.
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (50, 60, 4), dtype=np.uint8)
    pixels[..., 3] = 255
    opaque = Image.fromarray(pixels, "RGBA")
    assert (transform([opaque])[0] - utils.image_transform(224)(opaque)).abs().max().item() < 1e-5


def test_load_from_name_reads_a_checkpoint_cnclip_wrote(tmp_path):
    utils = cn_clip_utils()
    from cn_clip.clip.model import CLIP

    text = {**ARCHS["ViT-B-16"], "text_num_hidden_layers": 3}  # RBT3-chinese
    info = {**{k: v for k, v in text.items() if k.startswith("text_") or k == "vocab_size"},
            **{k: v for k, v in ARCHS["ViT-B-32"].items() if not k.startswith("text_") and k != "vocab_size"}}
    torch.manual_seed(0)
    original = CLIP(**info).eval()
    torch.save({"epoch": 0, "step": 0, "name": "random", "state_dict": {f"module.{k}": v for k, v in
                                                                     original.state_dict().items()}}, tmp_path / "in.pt")
    base = load_base_model(ModelConfig(base=str(tmp_path / "in.pt")))  # shapes -> ViT-B-32 + RBT3 sizes
    save_cn_clip(base.clip, tmp_path / "out.pt", name="written-by-cnclip")
    model, preprocess = utils.load_from_name(str(tmp_path / "out.pt"), device="cpu", vision_model_name="ViT-B-32",
                                             text_model_name="RBT3-chinese", input_resolution=224)
    model.eval()
    texts = ["一只可爱的猫", "“复古”风格帽子 SIZE:XL", "北京故宫的雪景"]
    ours = load_base_model(ModelConfig(base=str(tmp_path / "out.pt")))
    with torch.no_grad():
        ref_text = model.encode_text(utils.tokenize([t.lower().replace("“", '"').replace("”", '"') for t in texts], 52))
        ref_image = model.encode_image(torch.stack([preprocess(img) for img in images()]))
        our_text = encode_texts(ours.clip, **tokenize(ours.tokenizer, texts, 52))
        our_image = encode_images(ours.clip, ImageTransform(ours.preprocess)(images()))
    text_diff = (our_text - ref_text).abs().max().item()
    image_diff = (our_image - ref_image).abs().max().item()
    print(f"load_from_name on cnclip's cn_clip file vs cnclip reading it (own preprocessing and tokenizer): "
          f"text {text_diff:.2e}, image {image_diff:.2e}")
    assert text_diff < 1e-4 and image_diff < 1e-4
