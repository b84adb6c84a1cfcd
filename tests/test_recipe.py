import pytest

from cnclip.errors import ConfigError
from cnclip.recipe import load_recipe

from conftest import DEMO_RECIPE


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def test_demo_recipe_loads_with_typed_overrides():
    r = load_recipe(DEMO_RECIPE, ["train.lr=1e-4", "train.epochs=2", "model.target_modules=query,value",
                                  "data.valid_split=null"])
    assert r.train.lr == pytest.approx(1e-4) and isinstance(r.train.lr, float)
    assert r.train.epochs == 2
    assert r.model.target_modules == ["query", "value"]
    assert r.data.valid_split is None


def test_unknown_key_names_key_and_accepted(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown recipe key 'train.lrr'.*accepted keys here: .*\blr\b"):
        load_recipe(write(tmp_path, "data: {root: x, generate: demo}\ntrain: {lrr: 1}\n"))


def test_unknown_override_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown recipe key 'bogus'"):
        load_recipe(DEMO_RECIPE, ["bogus.x=1"])


@pytest.mark.parametrize("override, message", [
    ("train.epochs=three", r"'train.epochs': expected int, got 'three'"),
    ("train.epochs=2.5", r"'train.epochs': expected int"),
    ("model.random_init=maybe", r"'model.random_init': expected bool"),
    ("train.batch_size=1", r"'train.batch_size' must be >= 2"),
    ("train.precision=fp8", r"accepted: auto, fp32, bf16, fp16"),
    ("model.lora_dropout=1.5", r"lora_dropout"),
])
def test_wrong_types_and_values_are_rejected(override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(DEMO_RECIPE, [override])


def test_missing_data_path_is_rejected_before_work(tmp_path):
    with pytest.raises(ConfigError, match=r"missing data file .*train_imgs.tsv"):
        load_recipe(DEMO_RECIPE, [f"data.root={tmp_path}/nowhere", "data.generate=null"])


def test_yaml_tags_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="not a valid YAML recipe"):
        load_recipe(write(tmp_path, "run_dir: !!python/object/apply:os.system ['echo hi']\n"))


def test_non_mapping_recipe(tmp_path):
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_recipe(write(tmp_path, "- a\n- b\n"))


def test_shipped_recipes_are_valid():
    from conftest import REPO

    for name in ("muge", "flickr30k_cn", "coco_cn"):
        r = load_recipe(REPO / "recipes" / f"{name}.yaml", check_data=False)
        assert r.data.context_length >= 24 and r.train.lr > 0
