"""Preprocessing parity with transformers' torchvision-backed ChineseCLIPImageProcessor.

With torchvision installed (normal on a GPU machine), transformers 5 serves an exported model's
`preprocessor_config.json` ("ChineseCLIPImageProcessor") with its torchvision backend; without it,
with the PIL backend. cnclip's pipeline equals the PIL backend within 1e-5 (tests/test_data.py).
The two backends differ from each other by rounding in the resize (torchvision resizes a uint8
tensor); this test proves cnclip is never farther from the torchvision backend than transformers'
own PIL backend is, and bounds that difference.

Needs torchvision, so it is marked: `python -m pytest -m torchvision` in an environment with
torch + torchvision (docs/reliability.md). Skipped where torchvision is not importable, CI included
(deliberately: the registry's torchvision does not import beside torch 2.13.0+cpu).
"""

import numpy as np
import pytest
import torch

from cnclip.data import ImageTransform
from cnclip.models import load_image_preprocess

from conftest import torchvision_or_skip
from test_data import CONFIG_KINDS, parity_images

pytestmark = pytest.mark.torchvision

# One uint8 level in normalised units is 1/255/std (std ~0.26): 0.015.
ONE_LEVEL = 1 / 255 / min((0.26862954, 0.26130258, 0.27577711))


@pytest.mark.parametrize("size_kind", sorted(CONFIG_KINDS))
@pytest.mark.parametrize("wh", [(64, 64), (97, 41), (33, 120), (20, 15), (500, 375)])
def test_preprocessing_is_as_close_to_the_torchvision_backend_as_transformers_own_pil_backend(tmp_path, size_kind, wh):
    torchvision_or_skip()
    from transformers import ChineseCLIPImageProcessor
    from transformers.models.chinese_clip.image_processing_pil_chinese_clip import ChineseCLIPImageProcessorPil

    ChineseCLIPImageProcessorPil(**CONFIG_KINDS[size_kind]).save_pretrained(tmp_path)
    served = ChineseCLIPImageProcessor.from_pretrained(tmp_path)  # what an exported model is served with
    assert type(served).__name__ == "ChineseCLIPImageProcessor" and "Torchvision" in type(served).__mro__[1].__name__
    pil = ChineseCLIPImageProcessorPil.from_pretrained(tmp_path)
    images = parity_images(wh)
    tv = torch.as_tensor(np.stack(served(images=images, return_tensors="np")["pixel_values"]))
    pil_out = torch.as_tensor(np.stack(pil(images=images, return_tensors="np")["pixel_values"]))
    ours = ImageTransform(load_image_preprocess(str(tmp_path)))(images)
    assert ours.shape == tv.shape
    ours_vs_tv = (ours - tv).abs()
    backends = (pil_out - tv).abs()
    assert ours_vs_tv.max().item() <= backends.max().item() + 1e-5
    # The bound itself: a resize rounding difference, never a different image (the RGBA with real
    # transparency included: both flatten it onto white).
    assert ours_vs_tv.max().item() < 8 * ONE_LEVEL
    assert ours_vs_tv.mean().item() < 0.5 * ONE_LEVEL
