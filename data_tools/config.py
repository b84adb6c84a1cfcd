"""Filter thresholds for build-pairs, loaded from YAML.

A misspelt key in a filter file would otherwise silently leave a default in force, so unknown
keys and wrong types are errors that name the key. Defaults follow what Wukong-style Chinese
corpora filter on (short side >= 200 px, aspect ratio <= 3, mostly-Chinese short captions).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnclip.errors import ConfigError
from cnclip.typed_config import build_config, load_config_file
from data_tools.records import TEXT_FIELDS


RELEVANCE_MODES = ("off", "overlap", "keyword")


@dataclass(frozen=True)
class TextConfig:
    """Caption choice and cleaning."""

    fields: tuple[str, ...] = TEXT_FIELDS  # candidate fields, most preferred first
    min_chars: int = 4
    max_chars: int = 64
    min_chinese_ratio: float = 0.3  # CJK characters / (letters + digits + CJK characters)
    traditional_to_simplified: bool = True
    boilerplate_texts: tuple[str, ...] = ()  # added to the built-in list ("图片", "商品图", ...)
    boilerplate_patterns: tuple[str, ...] = ()  # regular expressions, matched against the whole text

    def __post_init__(self) -> None:
        _require(bool(self.fields), "text.fields", "at least one of alt, title, context")
        for name in self.fields:
            _require(name in TEXT_FIELDS, "text.fields", f"names from {', '.join(TEXT_FIELDS)}, got {name!r}")
        _require(len(set(self.fields)) == len(self.fields), "text.fields", "no repeated names")
        _require(self.min_chars >= 0, "text.min_chars", "an integer >= 0")
        _require(self.max_chars >= self.min_chars, "text.max_chars", "an integer >= text.min_chars")
        _require(0.0 <= self.min_chinese_ratio <= 1.0, "text.min_chinese_ratio", "a number in [0, 1]")
        for pattern in self.boilerplate_patterns:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"filter config key 'text.boilerplate_patterns': invalid regular expression {pattern!r}: {err}") from None


@dataclass(frozen=True)
class RelevanceConfig:
    """Whether the caption must be about the query that found the image."""

    mode: str = "overlap"  # off | overlap (share a content word) | keyword (query appears in text)
    stopwords: tuple[str, ...] = ()  # added to the built-in list

    def __post_init__(self) -> None:
        _require(self.mode in RELEVANCE_MODES, "relevance.mode", f"one of {', '.join(RELEVANCE_MODES)}, got {self.mode!r}")


@dataclass(frozen=True)
class ImageConfig:
    """Image acceptance and the stored size."""

    min_side: int = 200
    max_aspect_ratio: float = 3.0
    max_pixels: int = 50_000_000  # checked from the header, before any decoding
    max_file_bytes: int = 50 * 2**20
    max_side: int = 512  # longer side after resizing; 0 keeps the original size
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        _require(self.min_side >= 1, "image.min_side", "an integer >= 1")
        _require(self.max_aspect_ratio >= 1.0, "image.max_aspect_ratio", "a number >= 1")
        _require(self.max_pixels >= 1, "image.max_pixels", "an integer >= 1")
        _require(self.max_file_bytes >= 1, "image.max_file_bytes", "an integer >= 1")
        _require(self.max_side >= 0, "image.max_side", "an integer >= 0")
        _require(1 <= self.jpeg_quality <= 95, "image.jpeg_quality", "an integer in [1, 95]")


@dataclass(frozen=True)
class DedupConfig:
    """Near-duplicate thresholds; exact image and (query, text) duplicates are always removed."""

    phash_max_distance: int | None = 4  # Hamming distance of 64-bit pHashes; null disables
    # ...and only when their colours match too: the largest chroma difference over a 4x4 grid (0-255
    # YCbCr units, data_tools.images.colour_distance). A re-encoded, resized or brightened copy stays
    # within 20; another colour of the same product (red vs blue: 120+) does not. null: pHash alone.
    colour_max_distance: float | None = 20.0
    # Cosine similarity of image embeddings at or above which an image repeats an earlier kept one
    # (crops, watermarks, re-uploads); needs --model; null disables.
    semantic_threshold: float | None = 0.95

    def __post_init__(self) -> None:
        if self.phash_max_distance is not None:
            _require(0 <= self.phash_max_distance <= 32, "dedup.phash_max_distance", "an integer in [0, 32] or null")
        _check_colour_distance(self.colour_max_distance, "dedup.colour_max_distance")
        if self.semantic_threshold is not None:
            _require(-1.0 <= self.semantic_threshold <= 1.0, "dedup.semantic_threshold", "a number in [-1, 1] or null")


@dataclass(frozen=True)
class SplitConfig:
    """Pairs this close go to the same split (with pairs sharing a caption): looser than dedup."""

    phash_max_distance: int | None = 8  # null: pHash does not group
    colour_max_distance: float | None = 32.0  # with pHash: as dedup's, looser; null: pHash alone groups
    semantic_threshold: float | None = 0.9  # needs --model; null: embeddings do not group

    def __post_init__(self) -> None:
        if self.phash_max_distance is not None:
            _require(0 <= self.phash_max_distance <= 16, "split.phash_max_distance", "an integer in [0, 16] or null")
        _check_colour_distance(self.colour_max_distance, "split.colour_max_distance")
        if self.semantic_threshold is not None:
            _require(-1.0 <= self.semantic_threshold <= 1.0, "split.semantic_threshold", "a number in [-1, 1] or null")


@dataclass(frozen=True)
class FilterConfig:
    """Everything a filters.yaml can set."""

    text: TextConfig = field(default_factory=TextConfig)
    relevance: RelevanceConfig = field(default_factory=RelevanceConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    split: SplitConfig = field(default_factory=SplitConfig)

    def __post_init__(self) -> None:
        # What dedup lets through (a kept copy in another query) must still be grouped for the split.
        d, s = self.dedup, self.split
        if d.phash_max_distance is not None and (s.phash_max_distance is None or s.phash_max_distance < d.phash_max_distance):
            raise ConfigError("filter config key 'split.phash_max_distance': expected an integer >= "
                              f"dedup.phash_max_distance ({d.phash_max_distance})")
        if s.colour_max_distance is not None and d.colour_max_distance is None:
            raise ConfigError("filter config key 'split.colour_max_distance': expected null, as "
                              "dedup.colour_max_distance is (pHash alone makes a near duplicate, whatever the colours)")
        if s.colour_max_distance is not None and s.colour_max_distance < d.colour_max_distance:
            raise ConfigError("filter config key 'split.colour_max_distance': expected null or a number >= "
                              f"dedup.colour_max_distance ({d.colour_max_distance})")
        if d.semantic_threshold is not None and (s.semantic_threshold is None or s.semantic_threshold > d.semantic_threshold):
            raise ConfigError("filter config key 'split.semantic_threshold': expected a number <= "
                              f"dedup.semantic_threshold ({d.semantic_threshold})")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (lists, not tuples) for report.json and for fingerprinting the per-record stages."""
        return dataclasses.asdict(self, dict_factory=lambda items: {k: list(v) if isinstance(v, tuple) else v for k, v in items})


def load_config(path: Path | None) -> FilterConfig:
    """Read a filter file (YAML, safe_load); `None` gives the defaults."""
    if path is None:
        return FilterConfig()
    return load_config_file(FilterConfig, path, "filter config")


def config_from_dict(data: Any) -> FilterConfig:
    """Build a FilterConfig from parsed YAML, rejecting unknown keys and wrong types."""
    return build_config(FilterConfig, data, "filter config")


def _check_colour_distance(value: float | None, key: str) -> None:
    if value is not None:
        # 361 > the largest possible distance (255 * sqrt 2): colour never decides
        _require(0.0 <= value <= 361.0, key, "a number in [0, 361] or null")


def _require(condition: bool, key: str, expected: str) -> None:
    if not condition:
        raise ConfigError(f"filter config key '{key}': expected {expected}")
