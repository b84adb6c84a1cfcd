"""Image towers from open_clip (EVA02-CLIP, SigLIP 2, DFN, ...) as the locked side of a composed Chinese CLIP.

`model.compose.image: open_clip:<reference>` (cnclip.compose; the forms are cnclip.open_clip_reference's)
takes its image tower from open_clip, where the strongest published towers live, instead of from a
transformers CLIP checkpoint.

Guarantees:

* the model is created by open_clip's own factory (`open_clip.create_model_and_transforms`), in fp32: the
  architecture, the weights and the preprocessing settings are exactly open_clip's. Only the image tower
  (`model.visual`) is kept; the architecture's own text tower is dropped after loading.
* `OpenClipVisionModel` stands where ChineseCLIPModel has its vision tower and `IdentityProjection` where it
  has its visual projection, so `cnclip.models.encode_images` (the one image-embedding entry point of the
  cache, evaluation, zero-shot, search and probing) returns open_clip's `encode_image(x)` (unnormalised).
* open_clip's eval preprocessing is translated into cnclip's `ImagePreprocess` (cnclip.images) only where the
  translation is exact: resize mode `shortest` to a square (resize, then torchvision's centre crop offsets)
  or `squash`, bicubic or bilinear, RGB. Anything else (`longest`, which pads) is refused by name, never
  approximated, and every load checks the translation against open_clip's own transform on two images of
  odd sizes (`check_preprocess`): pixels that differ by more than `PREPROCESS_TOLERANCE` refuse the tower.
* open_clip is imported here only, and only when such a tower is used (it imports torchvision, which not
  every torch build has beside it); when it does not import, the error names the `openclip` extra.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import ModelLoadError
from .open_clip_reference import HF_HUB, INSTALL_HINT, LOCAL_DIR, OpenClipReference

# PIL interpolation codes of open_clip's `interpolation` (its eval transform treats "random" as bicubic).
RESAMPLE = {"bicubic": 3, "bilinear": 2, "random": 3}
# Pixels (after normalisation) of open_clip's transform and the translated one: x / 255 and x * (1 / 255)
# differ by an ulp, nothing more.
PREPROCESS_TOLERANCE = 1e-5
WEIGHTS_FILE = "open_clip_model.safetensors"  # the first name open_clip looks for in a local-dir directory


def import_open_clip(what: str = "model.compose.image"):
    """open_clip, or ModelLoadError naming the extra that brings it."""
    try:
        import open_clip
    except Exception as exc:  # noqa: BLE001 - absent, or its torchvision not importing beside this torch
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ModelLoadError(f"{what}: an open_clip image tower needs open_clip, which does not import here "
                             f"({type(exc).__name__}: {first}); install it with {INSTALL_HINT}") from None
    return open_clip


def preprocess_of(cfg: dict):
    """cnclip's ImagePreprocess doing exactly what open_clip's eval transform for `cfg` does, or ModelLoadError."""
    from .images import ImagePreprocess

    size = cfg.get("size", 224)
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    mode, interpolation = cfg.get("resize_mode", "shortest"), cfg.get("interpolation", "bicubic")
    mean, std = cfg.get("mean"), cfg.get("std")
    mean, std = [tuple(float(v) for v in (x if isinstance(x, (list, tuple)) else (x,) * 3)) for x in (mean, std)]
    if cfg.get("mode", "RGB") != "RGB" or interpolation not in RESAMPLE or len(mean) != 3 or len(std) != 3:
        raise ModelLoadError(f"open_clip preprocessing {cfg} is not RGB with bicubic or bilinear resizing; "
                             "cnclip cannot reproduce it exactly")
    common = dict(crop_height=height, crop_width=width, resample=RESAMPLE[interpolation], rescale_factor=1 / 255,
                  mean=mean, std=std)
    if mode == "squash":
        return ImagePreprocess(resize_height=height, resize_width=width, shortest_edge=None, do_center_crop=False,
                               **common)
    if mode == "shortest" and height == width:
        return ImagePreprocess(resize_height=None, resize_width=None, shortest_edge=height, do_center_crop=True,
                               crop_offset="round", **common)
    raise ModelLoadError(f"open_clip resize_mode {mode!r} to {height}x{width} is not supported (cnclip reproduces "
                         "'shortest' to a square and 'squash' exactly; 'longest' pads, which it does not)")


def check_preprocess(open_clip_transform, preprocess, spec: str) -> float:
    """Max abs difference of open_clip's transform and the translated one on two test images of odd sizes
    (whose centre crops have odd margins); over PREPROCESS_TOLERANCE: ModelLoadError."""
    import numpy as np
    from PIL import Image

    from .data import ImageTransform

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((37, 61), (83, 45))]
    ours = ImageTransform(preprocess)
    diff = 0.0
    for image in images:
        theirs = open_clip_transform(image).unsqueeze(0).float()
        mine = ours([image])
        if mine.shape != theirs.shape:
            diff = float("inf")
            break
        diff = max(diff, (mine - theirs).abs().max().item())
    if diff > PREPROCESS_TOLERANCE:
        raise ModelLoadError(f"model.compose.image '{spec}': cnclip's translation of open_clip's preprocessing "
                             f"differs from open_clip's own transform (max abs diff {diff:.3g}); refusing the tower")
    return diff


@dataclass
class OpenClipTower:
    visual: object  # the open_clip model's image tower (torch.nn.Module)
    embed_dim: int
    image_size: int
    preprocess: object  # cnclip.images.ImagePreprocess equal to open_clip's eval transform
    model_cfg: dict  # open_clip's model config (what `cnclip export` writes as open_clip_config.json)
    preprocess_cfg: dict  # open_clip's final preprocess config
    reference: OpenClipReference


def _model_config(open_clip, ref: OpenClipReference) -> dict:
    name = ref.model_name if ref.model_name.startswith((HF_HUB, LOCAL_DIR)) else ref.model_name.replace("/", "-")
    config = open_clip.get_model_config(name)
    if config is None:
        raise ModelLoadError(f"model.compose.image '{ref.spec}': open_clip has no architecture {ref.model_name!r}")
    return config


def create_open_clip_model(ref: OpenClipReference):
    """(open_clip model, its eval transform) in fp32 on the CPU, through open_clip's own factory."""
    open_clip = import_open_clip()
    try:
        model, _, transform = open_clip.create_model_and_transforms(ref.model_name, pretrained=ref.pretrained,
                                                                    precision="fp32", device="cpu")
    except (RuntimeError, ValueError, OSError, KeyError, AssertionError) as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ModelLoadError(f"model.compose.image '{ref.spec}': open_clip could not create it: {first}") from None
    return model.eval(), transform


def load_open_clip_tower(ref: OpenClipReference) -> OpenClipTower:
    """The locked image tower of `ref` with its model config and exact preprocessing (module docstring)."""
    model, transform = create_open_clip_model(ref)
    model_cfg = _model_config(import_open_clip(), ref)
    preprocess_cfg = dict(model.visual.preprocess_cfg)
    preprocess = preprocess_of(preprocess_cfg)
    check_preprocess(transform, preprocess, ref.spec)
    visual = model.visual
    size = preprocess.crop_height
    if preprocess.crop_width != size:
        raise ModelLoadError(f"model.compose.image '{ref.spec}': a {preprocess.crop_height}x{preprocess.crop_width} "
                             "input; cnclip composes square image towers only")
    with torch.no_grad():
        embed_dim = int(visual(torch.zeros(1, 3, size, size)).shape[-1])
    del model  # the architecture's own text tower is not needed (the export loads it again)
    return OpenClipTower(visual=visual, embed_dim=embed_dim, image_size=size, preprocess=preprocess,
                         model_cfg=model_cfg, preprocess_cfg=preprocess_cfg, reference=ref)


class OpenClipVisionModel(nn.Module):
    """open_clip's image tower where ChineseCLIPModel has its vision_model: pooler_output = encode_image(x).

    Its state dict is the tower's (`visual.*`), so cnclip's image-tower fingerprint (the image-cache key)
    changes with any weight; `reference` says where the tower came from (what the export reloads)."""

    def __init__(self, tower: OpenClipTower):
        super().__init__()
        self.visual = tower.visual
        self.reference = tower.reference
        self.model_cfg = tower.model_cfg
        self.preprocess_cfg = tower.preprocess_cfg

    def forward(self, pixel_values, **_ignored):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return BaseModelOutputWithPooling(pooler_output=self.visual(pixel_values))


class IdentityProjection(nn.Module):
    """ChineseCLIPModel's visual_projection for an open_clip tower, whose output is already projected."""

    def __init__(self, dim: int):
        super().__init__()
        self.in_features = self.out_features = dim

    def forward(self, x):
        return x


def is_open_clip_model(clip) -> bool:
    """Whether a ChineseCLIPModel's image side is an open_clip tower (composed by cnclip.compose)."""
    return isinstance(getattr(clip, "vision_model", None), OpenClipVisionModel)
