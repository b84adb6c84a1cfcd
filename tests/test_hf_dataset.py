"""data_tools from-hf: a `datasets` image-text set -> Chinese-CLIP layout that cnclip trains on."""

import json

import datasets
import pytest

from cnclip.data import load_split
from cnclip.skiplog import SkipLog
from cnclip.errors import EXIT_DATA, DataError
from data_tools.hf_dataset import convert, open_rows

from conftest import image_bytes


def make_dataset() -> datasets.Dataset:
    red, blue = image_bytes((220, 30, 30)), image_bytes((30, 30, 220))
    rows = {
        "image": [{"bytes": red, "path": None}, {"bytes": blue, "path": None}, {"bytes": red, "path": None},
                  {"bytes": b"not an image", "path": None}, {"bytes": blue, "path": None}],
        "captions": [["一个红色的圆形", "红色圆形"], ["一个蓝色的圆形"], ["图片中间是红色圆形"], ["坏图"], []],
    }
    return datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())


@pytest.mark.parametrize("stored_as", ["save_to_disk", "parquet"])
def test_converts_and_groups_captions_of_identical_images(tmp_path, stored_as):
    ds = make_dataset()
    if stored_as == "save_to_disk":
        ds.save_to_disk(str(tmp_path / "ds"))
        source = tmp_path / "ds"
    else:
        source = tmp_path / "ds.parquet"
        ds.to_parquet(str(source))
    rows = open_rows(str(source), "train", None, "image")
    result = convert(rows, tmp_path / "out", "train", "image", "captions")
    assert result.to_dict()["skipped"] == {"undecodable image": 1, "no caption": 1}
    assert (result.rows, result.images, result.texts) == (5, 2, 4)
    split = load_split(tmp_path / "out", "train", SkipLog())
    by_image: dict[int, list[str]] = {}
    for t in split.texts:
        by_image.setdefault(t.image_ids[0], []).append(t.text)
    assert sorted(map(len, by_image.values())) == [1, 3]  # the red image's three captions share its id
    report = json.loads((tmp_path / "out" / "train_from_hf_report.json").read_text())
    assert report["rows"] == 5 and report["examples"]["undecodable image"][0].startswith("row 3")


def test_missing_column_names_it(tmp_path):
    make_dataset().save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match="no column 'picture'; columns: image, captions"):
        open_rows(str(tmp_path / "ds"), "train", None, "picture")


def test_unsupported_file_type(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported file type"):
        open_rows(str(tmp_path / "x.txt"), "train", None, "image")


def test_cli_converts_a_parquet_file(tmp_path, capsys):
    from data_tools.cli import main

    make_dataset().to_parquet(str(tmp_path / "ds.parquet"))
    code = main(["from-hf", str(tmp_path / "ds.parquet"), "--out", str(tmp_path / "out"), "--as-split", "valid",
                 "--text-column", "captions"])
    assert code == 0
    assert "5 rows -> 2 images, 4 captions" in capsys.readouterr().out
    assert load_split(tmp_path / "out", "valid", SkipLog()).labelled


def test_cli_names_a_missing_text_column(tmp_path, capsys):
    from data_tools.cli import main

    make_dataset().to_parquet(str(tmp_path / "ds.parquet"))
    assert main(["from-hf", str(tmp_path / "ds.parquet"), "--out", str(tmp_path / "out")]) == EXIT_DATA
    assert "no column 'text'" in capsys.readouterr().err


def test_cells_with_paths_leaving_the_set_are_counted_not_converted(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "outside").mkdir()
    secret = tmp_path / "outside" / "secret.png"
    secret.write_bytes(image_bytes((1, 2, 3)))  # a real image: read, it would be converted
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "inside.png").write_bytes(image_bytes((30, 170, 60)))
    cells = [{"bytes": None, "path": "../outside/secret.png"}, {"bytes": None, "path": str(secret)},
             {"bytes": None, "path": "inside.png"}, {"bytes": None, "path": "missing.png"}]
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"image": pa.array(cells, image_type), "text": ["逃出去", "绝对路径", "里面的", "没有"]}),
                   tmp_path / "ds" / "train.parquet")
    rows = open_rows(str(tmp_path / "ds" / "train.parquet"), "train", None, "image")
    result = convert(rows, tmp_path / "out", "train", "image", "text", base_dir=tmp_path / "ds")
    assert result.to_dict()["skipped"] == {"unsafe image path": 2, "image file missing": 1}
    assert (result.images, result.texts) == (1, 1)
    assert load_split(tmp_path / "out", "train", SkipLog()).texts[0].text == "里面的"
