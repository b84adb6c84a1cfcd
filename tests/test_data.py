import base64
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from cnclip.data import ImageTransform, decode_base64_image, load_split, read_texts
from cnclip.errors import DataError
from cnclip.image_sources import ImageTSV
from cnclip.skiplog import SkipLog
from cnclip.models import load_image_preprocess

from conftest import image_bytes, make_tiny_model, write_split


def test_reads_chinese_clip_layout_with_urlsafe_base64(tmp_path):
    # Bytes chosen so the urlsafe alphabet's '-' and '_' appear: plain b64decode would corrupt them.
    data = image_bytes()
    encoded = base64.urlsafe_b64encode(data)
    write_split(tmp_path, "train", {1: data, 2: image_bytes((0, 0, 255))},
                [{"text_id": 10, "text": "高级感托特包斜挎", "image_ids": [1, 2]}])
    skips = SkipLog()
    split = load_split(tmp_path, "train", skips)
    assert split.images.read(1) == encoded
    assert decode_base64_image(split.images.read(1)).size == (40, 30)
    assert [rec.image_ids for rec in split.texts] == [(1, 2)]
    assert split.labelled and skips.total == 0


def test_bad_lines_are_counted_with_file_and_line(tmp_path, caplog):
    write_split(tmp_path, "train", {1: image_bytes()}, [])
    lines = [
        '{"text_id": 1, "text": "红色圆形", "image_ids": [1]}',
        '{"text_id": 2, "text": "坏行", ',  # malformed JSON
        '[1, 2, 3]',  # not an object
        '{"text_id": "x", "text": "a", "image_ids": [1]}',  # wrong type
        '{"text_id": 3, "text": "缺图", "image_ids": [99]}',  # image id without image
        '{"text_id": 1, "text": "重复", "image_ids": [1]}',  # duplicate id
    ]
    (tmp_path / "train_texts.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with open(tmp_path / "train_imgs.tsv", "a") as fh:
        fh.write("notanid\tAAAA\n")
    skips = SkipLog()
    with caplog.at_level(logging.WARNING):
        split = load_split(tmp_path, "train", skips)
    assert [t.text_id for t in split.texts] == [1]
    assert skips.counts == {"malformed text line": 3, "image id without image": 1, "duplicate text id": 1,
                            "malformed image line": 1}
    assert f"{tmp_path / 'train_texts.jsonl'}:2" in caplog.text
    assert f"{tmp_path / 'train_imgs.tsv'}:2" in caplog.text


def test_invalid_utf8_line_is_skipped(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"text_id": 1, "text": "\xff\xfe", "image_ids": []}\n{"text_id": 2, "text": "ok", "image_ids": []}\n')
    skips = SkipLog()
    assert [r.text_id for r in read_texts(path, skips)] == [2]
    assert skips.examples["malformed text line"][0].startswith(f"{path}:1")


def test_empty_split_is_an_error_naming_the_file(tmp_path):
    write_split(tmp_path, "valid", {1: image_bytes()}, [])
    with pytest.raises(DataError, match=r"split 'valid' has no usable texts: .*valid_texts.jsonl"):
        load_split(tmp_path, "valid", SkipLog())


def test_missing_file_names_it(tmp_path):
    with pytest.raises(DataError, match="image file not found: .*train_imgs.tsv"):
        load_split(tmp_path, "train", SkipLog())


def test_unlabelled_split_is_accepted(tmp_path):
    write_split(tmp_path, "test", {1: image_bytes()}, [{"text_id": 5, "text": "红色", "image_ids": []}])
    split = load_split(tmp_path, "test", SkipLog())
    assert not split.labelled and [rec.image_ids for rec in split.texts] == [()]


def test_truncated_image_is_a_clear_error():
    data = image_bytes(fmt="JPEG")[:100]
    with pytest.raises(ValueError, match="undecodable image"):
        decode_base64_image(base64.urlsafe_b64encode(data))


def test_image_fingerprint_changes_with_content(tmp_path):
    write_split(tmp_path, "a", {1: image_bytes()}, [])
    write_split(tmp_path, "b", {1: image_bytes((1, 2, 3))}, [])
    fa = ImageTSV(tmp_path / "a_imgs.tsv", SkipLog()).fingerprint
    fb = ImageTSV(tmp_path / "b_imgs.tsv", SkipLog()).fingerprint
    assert fa != fb and fa == ImageTSV(tmp_path / "a_imgs.tsv", SkipLog()).fingerprint


def _random_image(w, h, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


def _transparent_image(w, h, seed=5):
    """RGBA with real transparency: every alpha value from 0 to 255 occurs."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")


def parity_images(wh):
    """RGB, greyscale and RGBA with real transparency, in the size `wh`."""
    return [_random_image(*wh, seed=s) for s in range(2)] + [_random_image(*wh, "L", 3), _transparent_image(*wh)]


CONFIG_KINDS = {
    "square_resize": dict(size={"height": 32, "width": 32}, do_center_crop=False),  # Chinese-CLIP: squash, no crop
    "shortest_edge_crop": dict(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}, do_center_crop=True),
    "square_resize_crop": dict(size={"height": 40, "width": 40}, crop_size={"height": 32, "width": 30},
                               do_center_crop=True),
}


@pytest.mark.parametrize("size_kind", sorted(CONFIG_KINDS))
@pytest.mark.parametrize("wh", [(64, 64), (97, 41), (33, 120), (20, 15)])
def test_preprocessing_equals_transformers_image_processor(tmp_path, size_kind, wh):
    from transformers.models.chinese_clip.image_processing_pil_chinese_clip import ChineseCLIPImageProcessorPil

    ChineseCLIPImageProcessorPil(**CONFIG_KINDS[size_kind]).save_pretrained(tmp_path)
    reference = ChineseCLIPImageProcessorPil.from_pretrained(tmp_path)
    ours = ImageTransform(load_image_preprocess(str(tmp_path)))
    images = parity_images(wh)
    assert len(set(np.asarray(images[-1])[..., 3].ravel().tolist())) > 100  # really transparent
    expected = torch.as_tensor(np.stack(reference(images=images, return_tensors="np")["pixel_values"]))
    got = ours(images)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-5


def test_checkpoint_preprocessing_defaults_follow_config(tmp_path):
    model_dir = make_tiny_model(tmp_path / "m", image_size=32)
    pre = load_image_preprocess(str(model_dir))
    assert (pre.resize_height, pre.resize_width, pre.do_center_crop, pre.resample) == (32, 32, False, 3)
