"""data.format: build-pairs' pairs and webdataset outputs, img2dataset shards and Hugging Face sets
train without conversion, and the image-embedding cache sees the same images whatever the format."""

from __future__ import annotations

import base64
import io
import json
import shutil
import tarfile

import datasets
import numpy as np
import pytest
from PIL import Image

from cnclip.data import ImageTransform, load_split
from cnclip.errors import ConfigError, DataError
from cnclip.finetune import main as finetune_main
from cnclip.image_cache import split_image_features
from cnclip.models import image_tower_fingerprint, load_clip, load_image_preprocess
from cnclip.recipe import load_recipe
from cnclip.runtime import pick_runtime
from cnclip.skiplog import SkipLog
from conftest import DEMO_RECIPE, image_bytes, tiny_overrides
from data_tools.config import config_from_dict
from data_tools.pipeline import BuildOptions, build_pairs
from data_tools.split import parse_splits

COLOURS = ["红色", "绿色", "蓝色", "黄色", "紫色", "黑色"]
THINGS = ["圆形", "正方形", "三角形", "帽子"]


def picture(seed: int) -> bytes:
    cells = np.random.default_rng(seed).integers(0, 255, (4, 4, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(cells).resize((48, 48), Image.Resampling.BICUBIC).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One crawl written by build-pairs in all three formats."""
    root = tmp_path_factory.mktemp("formats")
    (root / "crawl").mkdir()
    lines = []
    for c, colour in enumerate(COLOURS):
        for t, thing in enumerate(THINGS):
            (root / "crawl" / f"{c}{t}.png").write_bytes(picture(c * 10 + t))
            lines.append({"query": thing, "image": f"{c}{t}.png", "alt": f"一个{colour}的{thing}"})
    (root / "crawl" / "a.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines),
                                            encoding="utf-8")
    for fmt in ("cnclip", "pairs", "webdataset"):
        build_pairs(BuildOptions(inputs=(str(root / "crawl"),), out=root / fmt, format=fmt, progress=False,
                                 splits=parse_splits("0.7,0.3,0"),
                                 config=config_from_dict({"text": {"min_chars": 3}, "image": {"min_side": 32}})))
    return root


def embeddings_by_caption(split, model_dir, cache_dir) -> dict[str, np.ndarray]:
    clip = load_clip(str(model_dir))
    features = split_image_features(split.images, clip, ImageTransform(load_image_preprocess(str(model_dir))),
                                    image_tower_fingerprint(clip), pick_runtime("cpu"), str(cache_dir), 8, 0, SkipLog())
    return {text.text: features.embeddings[features.row[text.image_ids[0]]].numpy() for text in split.texts}


def test_every_format_reads_the_same_pairs_and_embeddings(built, tiny_model_dir, tmp_path):
    reference = None
    for fmt in ("cnclip", "pairs", "webdataset"):
        split = load_split(built / fmt, "train", SkipLog(), fmt)
        embeddings = embeddings_by_caption(split, tiny_model_dir, tmp_path / "cache")
        if reference is None:
            reference = embeddings
            assert len(reference) > 10
        assert embeddings.keys() == reference.keys()
        for caption, vector in embeddings.items():
            np.testing.assert_allclose(vector, reference[caption], atol=1e-6)
    assert sorted(p.name for p in (built / "webdataset").iterdir() if not p.name.startswith(".")) == [
        "report.json", "train-00000.tar", "valid-00000.tar"]  # read in place: nothing unpacked beside the shards


@pytest.mark.parametrize("fmt", ["pairs", "webdataset"])
def test_build_pairs_output_trains_in_its_format(built, fmt, tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(tiny_model_dir, built / fmt, run_dir, **{"train.epochs": 1, "data.format": fmt})
    assert finetune_main([str(DEMO_RECIPE), *overrides]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] > 0 and summary["after"]["mean_recall"] >= 0


def write_img2dataset_folder(folder, samples: list[tuple[bytes | None, str]]):
    """img2dataset's layout: NNNNN.tar shards of {key}.jpg/.txt/.json, plus its stats and parquet files."""
    folder.mkdir(parents=True)
    for shard in range(2):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for k, (data, caption) in enumerate(samples[shard::2]):
                key = f"{shard:05d}{k:04d}"
                members = [(f"{key}.txt", caption.encode()), (f"{key}.json", json.dumps(
                    {"caption": caption, "url": f"https://x/{key}.jpg", "status": "success", "key": key}).encode())]
                if data is not None:
                    members.insert(0, (f"{key}.jpg", data))
                for name, payload in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        (folder / f"{shard:05d}_stats.json").write_text("{}")


def test_img2dataset_shards_are_read_in_place_with_a_content_fingerprint(tmp_path):
    samples = [(image_bytes((40 * k, 30, 200 - 20 * k), fmt="JPEG"), f"第{k}张图片") for k in range(6)]
    write_img2dataset_folder(tmp_path / "data" / "train", samples + [(None, "没有图片")])
    skips = SkipLog()
    split = load_split(tmp_path / "data", "train", skips, "webdataset")
    assert sorted(t.text for t in split.texts) == sorted(caption for _, caption in samples)
    assert skips.counts == {"webdataset sample without an image": 1}
    by_text = {t.text: t.image_ids[0] for t in split.texts}
    assert split.images.read(by_text["第3张图片"]) == base64.urlsafe_b64encode(samples[3][0])

    same = load_split(tmp_path / "data", "train", SkipLog(), "webdataset").images.fingerprint
    assert same == split.images.fingerprint
    shutil.copytree(tmp_path / "data", tmp_path / "changed")
    samples[2] = (image_bytes((1, 2, 3), fmt="JPEG"), samples[2][1])
    shutil.rmtree(tmp_path / "changed" / "train")
    write_img2dataset_folder(tmp_path / "changed" / "train", samples + [(None, "没有图片")])
    assert load_split(tmp_path / "changed", "train", SkipLog(), "webdataset").images.fingerprint != same


def test_img2dataset_folder_trains(tmp_path, tiny_model_dir):
    colours = [(220, 30, 30), (30, 170, 60), (30, 60, 220), (230, 210, 30)]
    for split, shapes in (("train", ("circle", "square")), ("valid", ("circle",))):
        samples = [(image_bytes(c, (40, 30), shape, fmt="JPEG"), f"一个{name}的{'圆形' if shape == 'circle' else '正方形'}")
                   for c, name in zip(colours, ("红色", "绿色", "蓝色", "黄色")) for shape in shapes]
        write_img2dataset_folder(tmp_path / "data" / split, samples)
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(tiny_model_dir, tmp_path / "data", run_dir, **{"train.epochs": 1, "data.format": "webdataset"})
    assert finetune_main([str(DEMO_RECIPE), *overrides]) == 0
    assert json.loads((run_dir / "summary.json").read_text())["steps"] > 0


def hf_dataset() -> datasets.Dataset:
    red, blue, green = (image_bytes(c) for c in ((220, 30, 30), (30, 30, 220), (30, 170, 60)))
    rows = {"image": [{"bytes": red, "path": None}, {"bytes": blue, "path": None}, {"bytes": red, "path": None},
                      {"bytes": green, "path": None}, {"bytes": blue, "path": None}],
            "captions": [["一个红色的圆形", "红色圆形"], ["一个蓝色的圆形"], ["图片中间是红色圆形"], ["绿色的圆形"], []]}
    return datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())


@pytest.mark.parametrize("stored_as", ["save_to_disk", "parquet"])
def test_hf_sets_group_captions_of_identical_images(tmp_path, stored_as):
    ds = hf_dataset()
    source = tmp_path / ("ds" if stored_as == "save_to_disk" else "ds.parquet")
    ds.save_to_disk(str(source)) if stored_as == "save_to_disk" else ds.to_parquet(str(source))
    skips = SkipLog()
    split = load_split(source, "train", skips, "hf", "image", "captions")
    assert skips.counts == {"row without a caption": 1}
    by_image: dict[int, list[str]] = {}
    for text in split.texts:
        by_image.setdefault(text.image_ids[0], []).append(text.text)
    assert sorted(map(len, by_image.values())) == [1, 1, 3] and len(split.images) == 3
    assert split.images.read(split.texts[0].image_ids[0]) == base64.urlsafe_b64encode(image_bytes((220, 30, 30)))
    with pytest.raises(DataError, match="no column 'text'"):
        load_split(source, "train", SkipLog(), "hf")


def test_hf_parquet_trains(tmp_path, tiny_model_dir):
    hf_dataset().to_parquet(str(tmp_path / "train.parquet"))
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(tiny_model_dir, tmp_path / "train.parquet", run_dir,
                               **{"train.epochs": 1, "data.format": "hf", "data.text_column": "captions",
                                  "data.valid_split": None})
    assert finetune_main([str(DEMO_RECIPE), *overrides]) == 0
    assert json.loads((run_dir / "summary.json").read_text())["steps"] > 0


def test_recipe_names_a_bad_format_and_missing_shards(tmp_path):
    with pytest.raises(ConfigError, match="'data.format': got 'tfrecord', accepted: cnclip, pairs, webdataset, hf"):
        load_recipe(None, [f"data.root={tmp_path}", "data.format=tfrecord"])
    with pytest.raises(ConfigError, match="no webdataset shards for split 'train'"):
        load_recipe(None, [f"data.root={tmp_path}", "data.format=webdataset"])
    with pytest.raises(ConfigError, match="train_pairs.jsonl"):
        load_recipe(None, [f"data.root={tmp_path}", "data.format=pairs"])
