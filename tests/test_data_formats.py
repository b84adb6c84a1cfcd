"""data.format: build-pairs' pairs and webdataset outputs, img2dataset shards and Hugging Face sets
train without conversion, and the image-embedding cache sees the same images whatever the format."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import sys
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from cnclip.data import ImageTransform, load_split
from cnclip.commands.evaluate import main as evaluate_main
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
    train, valid = (load_split(built / fmt, name, SkipLog(), fmt) for name in ("train", "valid"))
    assert summary["steps"] == len(train.texts) // 4  # one epoch of full batches of 4 pairs (one caption per image)
    after = summary["after"]
    assert (after["num_texts"], after["num_images"]) == (len(valid.texts), len(valid.images)) == (6, 6)
    # The recall it reports is the one `cnclip evaluate` measures on the run's last checkpoint, read the same way.
    assert evaluate_main([str(run_dir), "--checkpoint", "last", "--out", str(tmp_path / "eval")]) == 0
    evaluated = json.loads((tmp_path / "eval" / "valid_metrics.json").read_text(encoding="utf-8"))
    assert evaluated["num_texts"] == after["num_texts"]
    assert evaluated["mean_recall"] == pytest.approx(after["mean_recall"])


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


# ---------------------------------------------------------------- image paths never leave the data root

OPENED: list[str] = []
_RECORDING = [False]


def _record_opens(event: str, args: tuple) -> None:
    if event == "open" and _RECORDING[0] and isinstance(args[0], (str, bytes, os.PathLike)):
        OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_record_opens)  # audit hooks cannot be removed: this one records only inside `opens_recorded`


@contextlib.contextmanager
def opens_recorded():
    """Every file this process opens meanwhile, however it is opened (Python's "open" audit event)."""
    OPENED.clear()
    _RECORDING[0] = True
    try:
        yield OPENED
    finally:
        _RECORDING[0] = False


@pytest.fixture()
def secret(tmp_path) -> Path:
    """A real image outside the data directory: read, it would train, evaluate and index fine."""
    (tmp_path / "outside").mkdir()
    path = tmp_path / "outside" / "secret.png"
    path.write_bytes(image_bytes((1, 2, 3)))
    return path


def write_pairs_with_escaping_paths(data: Path, secret: Path) -> None:
    data.mkdir()
    (data / "inside.png").write_bytes(image_bytes((220, 30, 30)))
    os.symlink(secret, data / "link.png")
    inline = base64.b64encode(image_bytes((30, 30, 220))).decode()
    rows = [("inside.png", "红色的圆形"), ("../outside/secret.png", "相对路径逃出去"), (str(secret), "绝对路径"),
            ("link.png", "符号链接指向外面"), ("missing.png", "不存在的文件"), (inline, "内嵌的蓝色圆形")]
    (data / "valid_pairs.jsonl").write_text("".join(json.dumps({"image": image, "text": text}, ensure_ascii=False)
                                                    + "\n" for image, text in rows), encoding="utf-8")


def test_pairs_paths_leaving_the_directory_are_counted_never_read(tmp_path, secret):
    write_pairs_with_escaping_paths(tmp_path / "data", secret)
    skips = SkipLog()
    with opens_recorded() as opened:
        split = load_split(tmp_path / "data", "valid", skips, "pairs")
        images = [split.images.read(image_id) for image_id in split.images.ids]
    assert [t.text for t in split.texts] == ["红色的圆形", "内嵌的蓝色圆形"]
    assert skips.counts == {"unsafe image path": 3, "image file missing": 1}
    assert images[0] == base64.urlsafe_b64encode(image_bytes((220, 30, 30)))
    assert str(secret) not in opened and any(path.endswith("inside.png") for path in opened)


def test_evaluate_counts_a_pairs_path_leaving_the_directory(tmp_path, secret, tiny_model_dir, capsys):
    write_pairs_with_escaping_paths(tmp_path / "data", secret)
    with opens_recorded() as opened:
        code = evaluate_main([str(tiny_model_dir), "--data", str(tmp_path / "data"), "--format", "pairs",
                              "--split", "valid", "--out", str(tmp_path / "eval"), "--cache-dir",
                              str(tmp_path / "cache"), "--device", "cpu"])
    out = capsys.readouterr()
    assert code == 0, out.err[-2000:]
    assert str(secret) not in opened
    assert "skipped 4 bad items: {'unsafe image path': 3, 'image file missing': 1}" in out.out
    assert json.loads((tmp_path / "eval" / "valid_metrics.json").read_text(encoding="utf-8"))["num_texts"] == 2


def write_hf_parquet_with_paths(data: Path, secret: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    data.mkdir()
    (data / "inside.png").write_bytes(image_bytes((30, 170, 60)))
    cells = [({"bytes": image_bytes((220, 30, 30)), "path": None}, "红色的圆形"),
             ({"bytes": None, "path": "../outside/secret.png"}, "相对路径逃出去"),
             ({"bytes": None, "path": str(secret)}, "绝对路径"),
             ({"bytes": None, "path": "inside.png"}, "绿色的圆形")]
    table = pa.table({"image": pa.array([c for c, _ in cells], pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                      "text": [t for _, t in cells]})
    pq.write_table(table, data / "train.parquet")
    return data / "train.parquet"


def test_hf_cells_with_paths_leaving_the_set_are_counted_never_read(tmp_path, secret):
    source = write_hf_parquet_with_paths(tmp_path / "data", secret)
    skips = SkipLog()
    with opens_recorded() as opened:
        split = load_split(source, "train", skips, "hf", "image", "text")
        images = [split.images.read(image_id) for image_id in split.images.ids]
    assert [t.text for t in split.texts] == ["红色的圆形", "绿色的圆形"]
    assert skips.counts == {"unsafe image path": 2}
    assert images[1] == base64.urlsafe_b64encode(image_bytes((30, 170, 60)))
    assert str(secret) not in opened


def test_pairs_paths_the_os_cannot_take_are_counted(tmp_path):
    inline = base64.b64encode(image_bytes()).decode()
    (tmp_path / "valid_pairs.jsonl").write_text(
        '{"image": "\\ud800.png", "text": "孤立代理项"}\n{"image": "a\\u0000.png", "text": "空字符"}\n'
        '{"image": "file:///etc/hostname.png", "text": "网址"}\n{"image": "C:\\\\x.png", "text": "盘符"}\n'
        + json.dumps({"image": inline, "text": "好的"}) + "\n", encoding="utf-8")
    skips = SkipLog()
    split = load_split(tmp_path, "valid", skips, "pairs")
    assert [t.text for t in split.texts] == ["好的"]
    assert skips.counts == {"unsafe image path": 4}
