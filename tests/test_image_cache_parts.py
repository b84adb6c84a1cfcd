"""The image cache trusts nothing for being on disk: a part proves which images it holds before it
is reused, and an entry proves it covers every image exactly once before it is read.

The loss this guards against: an entry half-written with part_size 2 and finished with part_size 4
took the size-2 parts for size-4 parts (same file names) and wrote a "finished" manifest holding
4 of 8 images, for every later user of that key, with no error.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import cnclip.image_cache as image_cache
from cnclip.data import ImageTransform, load_split
from cnclip.models import image_tower_fingerprint, load_clip, load_image_preprocess
from cnclip.runtime import pick_runtime
from cnclip.skiplog import SkipLog
from conftest import image_bytes, write_split

IDS = list(range(1, 9))
UNDECODABLE = 3


class Killed(Exception):
    """Stands for the process being killed at a crash point."""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cache_parts")
    images = {i: image_bytes((25 * i, 100, 220 - 20 * i), (30 + i, 30)) for i in IDS}
    images[UNDECODABLE] = b"not an image"
    write_split(root, "train", images, [{"text_id": 1, "text": "一张图", "image_ids": IDS}])
    return root


def features(data: Path, model_dir: Path, cache: Path, part_size: int, skips: SkipLog | None = None):
    clip = load_clip(str(model_dir)).eval()
    split = load_split(data, "train", SkipLog())
    return image_cache.split_image_features(
        split.images, clip, ImageTransform(load_image_preprocess(str(model_dir))), image_tower_fingerprint(clip),
        pick_runtime("cpu", "fp32"), str(cache), 2, 0, skips if skips is not None else SkipLog(), part_size=part_size)


def killed_after(parts: int, monkeypatch):
    """Make the cache 'die' right after writing its `parts`-th part (as CNCLIP_CRASH_AT=cache-part:N does)."""
    written = []

    def crash(name: str) -> None:
        written.append(name)
        if len(written) == parts:
            raise Killed

    monkeypatch.setattr(image_cache, "crash_point", crash)


@pytest.fixture(scope="module")
def reference(data, tiny_model_dir, tmp_path_factory):
    """The entry computed in one go, with part_size 4."""
    return features(data, tiny_model_dir, tmp_path_factory.mktemp("reference"), 4)


def assert_same(result, reference) -> None:
    assert result.ids == reference.ids == [i for i in IDS if i != UNDECODABLE]
    assert set(result.bad) == {UNDECODABLE}
    torch.testing.assert_close(result.embeddings, reference.embeddings, atol=1e-5, rtol=1e-4)


def entry_of(cache: Path) -> Path:
    (entry,) = [p for p in cache.iterdir() if p.is_dir()]
    return entry


def test_a_cache_started_with_one_part_size_and_finished_with_another_holds_every_image(
        data, tiny_model_dir, reference, tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        killed_after(2, patch)
        with pytest.raises(Killed):
            features(data, tiny_model_dir, tmp_path, part_size=2)  # parts 0 and 1 hold images 1-2 and 3-4
    entry = entry_of(tmp_path)
    assert sorted(p.name for p in entry.glob("part-*.safetensors")) == ["part-00000.safetensors", "part-00001.safetensors"]

    skips = SkipLog()
    finished = features(data, tiny_model_dir, tmp_path, part_size=4, skips=skips)  # parts 0 and 1 hold 1-4 and 5-8
    assert_same(finished, reference)
    assert finished.computed and skips.counts == {"undecodable image": 1}
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["parts"] == ["part-00000.safetensors", "part-00001.safetensors"] and manifest["count"] == 8
    assert_same(features(data, tiny_model_dir, tmp_path, part_size=4), reference)  # and read back as it is
    assert_same(features(data, tiny_model_dir, tmp_path, part_size=2), reference)  # any part_size reads it


def test_parts_of_the_right_size_are_reused_not_recomputed(data, tiny_model_dir, reference, tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        killed_after(1, patch)
        with pytest.raises(Killed):
            features(data, tiny_model_dir, tmp_path, part_size=4)
    encoded = []
    encode = image_cache.ImageFeatureCache._encode

    def counting(*args):
        encoded.append(list(args[2]))
        return encode(*args)

    monkeypatch.setattr(image_cache.ImageFeatureCache, "_encode", staticmethod(counting))
    assert_same(features(data, tiny_model_dir, tmp_path, part_size=4), reference)
    assert encoded == [[5, 6, 7, 8]]  # the first part proved its content and was kept


def damage_truncate(part: Path) -> None:
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])


def damage_last_float(part: Path) -> None:
    data = bytearray(part.read_bytes())
    data[-4:] = bytes.fromhex("0000c07f")  # the last embedding value becomes NaN; the file still parses
    part.write_bytes(bytes(data))


def damage_other_ids(part: Path) -> None:
    """A well-formed part of the right count holding other images (as a part of another entry would)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(part), framework="pt") as fh:
        metadata, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    tensors["ids"] = tensors["ids"] + 100
    save_file(tensors, str(part), metadata=metadata)


@pytest.mark.parametrize("damage", [damage_truncate, damage_last_float, damage_other_ids])
def test_a_damaged_part_of_a_finished_entry_is_rebuilt(data, tiny_model_dir, reference, tmp_path, damage):
    features(data, tiny_model_dir, tmp_path, part_size=4)
    part = entry_of(tmp_path) / "part-00001.safetensors"
    damage(part)
    again = features(data, tiny_model_dir, tmp_path, part_size=4)
    assert again.computed  # found wanting and rebuilt, not read
    assert_same(again, reference)
    assert image_cache._read_part(part, IDS[4:], reference.embeddings.shape[1])[0] == IDS[4:]  # proves itself again


def test_a_manifest_that_misses_images_is_not_trusted(data, tiny_model_dir, reference, tmp_path):
    features(data, tiny_model_dir, tmp_path, part_size=4)
    manifest = entry_of(tmp_path) / "manifest.json"
    meta = json.loads(manifest.read_text())
    meta["parts"] = meta["parts"][:1]  # a finished entry that lists half of its images
    manifest.write_text(json.dumps(meta))
    again = features(data, tiny_model_dir, tmp_path, part_size=4)
    assert again.computed
    assert_same(again, reference)
