"""Messages that say what happened, and values out of range refused with the key named (exit 2)."""

from __future__ import annotations

import io
import json
import re

import pytest
from PIL import Image

from cnclip.errors import EXIT_USAGE, ConfigError
from cnclip.images import decode_rgb
from cnclip.recipe import load_recipe
from cnclip.typed_config import build_config

from conftest import DEMO_RECIPE, image_bytes


def png(size=(64, 64)) -> bytes:
    """A noisy PNG: every prefix shorter than the whole is truncated pixel data."""
    buf = io.BytesIO()
    Image.frombytes("RGB", size, bytes((i * 7919) % 251 for i in range(size[0] * size[1] * 3))).save(buf, "PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- undecodable images name the cause


def test_an_undecodable_image_names_the_cause():
    raw = png()
    with pytest.raises(ValueError, match=r"^undecodable image: OSError: image file is truncated"):
        decode_rgb(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"^undecodable image: not a recognised image format$"):
        decode_rgb(b"certainly not an image")


def test_the_cause_reaches_the_skip_log(tmp_path, tiny_model_dir, caplog):
    from cnclip.commands.search import main as search_main

    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "ok.png").write_bytes(image_bytes())
    (photos / "cut.png").write_bytes(png()[:len(png()) // 2])
    assert search_main(["index", str(photos), "--model", str(tiny_model_dir), "--out", str(tmp_path / "idx"),
                        "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]) == 0
    assert [r.getMessage() for r in caplog.records if "cut.png" in r.getMessage()] == [
        "skipped cut.png: undecodable image (undecodable image: OSError: image file is truncated)"]


# ---------------------------------------------------------------- the repository id error names what was given


def test_publish_blames_its_positional_argument_not_upload(tmp_path, capsys):
    from cnclip.commands.publish import main as publish_main

    assert publish_main([str(tmp_path), "not-a-repo-id"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "the OWNER/NAME argument 'not-a-repo-id': expected owner/name" in err and "--upload" not in err


def test_export_blames_upload(tmp_path, capsys):
    from cnclip.commands.export import main as export_main

    assert export_main([str(tmp_path), "--to", str(tmp_path / "o"), "--upload", "no-slash"]) == EXIT_USAGE
    assert "--upload 'no-slash': expected owner/name" in capsys.readouterr().err


# ---------------------------------------------------------------- an empty override value


def test_an_empty_override_is_null_where_the_key_accepts_null(tmp_path):
    recipe = load_recipe(DEMO_RECIPE, ["data.generate=", f"data.root={tmp_path}", "model.arch="], check_data=False)
    assert recipe.data.generate is None and recipe.model.arch is None
    cleared = load_recipe(DEMO_RECIPE, ["zeroshot.images=", "zeroshot.classes="], check_data=False)
    assert cleared.zeroshot.images == "" and cleared.zeroshot.classes == ""  # a plain string key: empty string
    with pytest.raises(ConfigError, match="recipe key 'train.epochs': expected int, got ''"):
        load_recipe(DEMO_RECIPE, ["train.epochs="], check_data=False)


# ---------------------------------------------------------------- integers out of range


def test_a_seed_beyond_64_bits_is_a_usage_error_naming_the_key(capsys):
    import cnclip.commands.finetune

    assert cnclip.commands.finetune.main([str(DEMO_RECIPE), "seed=9223372036854775808"]) == EXIT_USAGE
    assert "recipe key 'seed': 9223372036854775808 is out of range" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="recipe key 'seed' must be an integer from 0 to 4294967295, got -1"):
        load_recipe(DEMO_RECIPE, ["seed=-1"], check_data=False)
    with pytest.raises(ConfigError, match="got 9223372036854775807"):  # fits 64 bits, but seed * 1000 would not
        load_recipe(DEMO_RECIPE, ["seed=9223372036854775807"], check_data=False)
    assert load_recipe(DEMO_RECIPE, ["seed=4294967295"], check_data=False).seed == 4294967295


def test_every_typed_int_key_must_fit_64_bits():
    from dataclasses import dataclass

    @dataclass
    class Knobs:
        n: int = 0

    assert build_config(Knobs, {"n": 2**63 - 1}, "test config").n == 2**63 - 1
    with pytest.raises(ConfigError, match=r"test config key 'n': -9223372036854775809 is out of range"):
        build_config(Knobs, {"n": -2**63 - 1}, "test config")


def test_zeroshot_flags_share_the_range_check(capsys):
    from cnclip.commands.zeroshot import main

    assert main(["--model", "x", "--top-k", str(2**70)]) == EXIT_USAGE
    assert "key 'top_k': 1180591620717411303424 is out of range" in capsys.readouterr().err


def test_data_tools_seed_beyond_64_bits_exits_2_naming_the_option(tmp_path, capsys):
    from data_tools.cli import main

    dump = tmp_path / "dump.jsonl"
    dump.write_text(json.dumps({"query": "红色", "image": "a.png", "alt": "红色的圆形"}) + "\n", encoding="utf-8")
    with pytest.raises(SystemExit) as exited:
        main(["build-pairs", str(dump), "--out", str(tmp_path / "out"), "--no-progress",
              "--seed", "9223372036854775808"])
    assert exited.value.code == EXIT_USAGE
    assert "argument --seed: expected an integer from -9223372036854775808 to 9223372036854775807" in \
        capsys.readouterr().err


# ---------------------------------------------------------------- the search index says where embeddings came from


def test_search_index_counts_cache_hits_apart_from_embeddings(tmp_path, tiny_model_dir, capsys):
    from cnclip.commands.search import main as search_main

    photos = tmp_path / "photos"
    photos.mkdir()
    for i, color in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)]):
        (photos / f"{i}.png").write_bytes(image_bytes(color))
    common = ["--model", str(tiny_model_dir), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    assert search_main(["index", str(photos), "--out", str(tmp_path / "a"), *common]) == 0
    out = capsys.readouterr().out
    assert "3 images (exact index): 0 reused from the index, 0 from the embedding cache, 3 embedded now" in out
    assert re.search(r"memory per image: [\d,]+ bytes of exact index \(faiss.index\) \+ [\d,]+ bytes of stored "
                     r"vector \(vectors.safetensors\)", out), out
    assert search_main(["index", str(photos), "--out", str(tmp_path / "b"), *common, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["embedded"], report["from_cache"], report["kept"], report["total"]) == (0, 3, 0, 3)
