"""Filter config loading (data_tools.config): defaults, YAML, errors that name the key."""

import pytest

from data_tools.config import ConfigError, FilterConfig, load_config


def test_defaults_without_a_file():
    config = load_config(None)
    assert config == FilterConfig()
    assert (config.text.min_chars, config.image.min_side, config.relevance.mode) == (4, 200, "overlap")


def test_yaml_overrides_only_what_it_names(tmp_path):
    path = tmp_path / "filters.yaml"
    path.write_text(
        "text:\n  min_chars: 2\n  fields: [title, alt]\n  boilerplate_texts: [本店推荐]\n"
        "relevance:\n  mode: keyword\n"
        "image:\n  max_aspect_ratio: 4\n"
        "dedup:\n  phash_max_distance: null\n",
        encoding="utf-8",
    )
    config = load_config(path)
    assert config.text.min_chars == 2 and config.text.max_chars == 64
    assert config.text.fields == ("title", "alt") and config.text.boilerplate_texts == ("本店推荐",)
    assert config.relevance.mode == "keyword"
    assert config.image.max_aspect_ratio == 4.0 and isinstance(config.image.max_aspect_ratio, float)
    assert config.dedup.phash_max_distance is None


def test_empty_file_means_defaults(tmp_path):
    (tmp_path / "f.yaml").write_text("")
    assert load_config(tmp_path / "f.yaml") == FilterConfig()


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("txt:\n  min_chars: 2\n", "unknown filter config key 'txt'; accepted keys here: text, relevance, image, dedup"),
        ("text:\n  min_char: 2\n", "unknown filter config key 'text.min_char'"),
        ("text:\n  min_chars: two\n", "key 'text.min_chars': expected int, got 'two'"),
        ("text:\n  min_chars: true\n", "key 'text.min_chars': expected int, got True"),
        ("text:\n  fields: [alt, caption]\n", "key 'text.fields': expected names from alt, title, context, got 'caption'"),
        ("text:\n  boilerplate_patterns: ['(']\n", "key 'text.boilerplate_patterns': invalid regular expression"),
        ("relevance:\n  mode: fuzzy\n", "key 'relevance.mode': expected one of off, overlap, keyword, got 'fuzzy'"),
        ("image:\n  max_aspect_ratio: 0.5\n", "key 'image.max_aspect_ratio': expected a number >= 1"),
        ("image: 3\n", "key 'image': expected a mapping"),
        ("- a\n- b\n", "a filter config must be a mapping"),
        ("text: [\n", "not a valid YAML filter config"),
        ("!!python/object/apply:os.system ['echo hi']\n", "not a valid YAML filter config"),  # safe_load refuses
    ],
)
def test_errors_name_the_file_and_key(tmp_path, yaml_text, message):
    path = tmp_path / "filters.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert message in str(caught.value) and "filters.yaml" in str(caught.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="filter config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
