"""Near duplicate means the same picture, colour included: the red, blue and green versions of one
product photo (which pHash, computed from luminance, sees as one picture) are all kept, each with its
caption, while a re-encoded, resized or brightened copy is still a near duplicate; the split groups
pictures the same way."""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance

from cnclip.errors import ConfigError
from data_tools.config import FilterConfig, config_from_dict
from data_tools.dedup import Deduplicator
from data_tools.images import colour_distance, colour_signature, perceptual_hash
from data_tools.pipeline import BuildOptions, build_pairs
from data_tools.records import Reason
from data_tools.split import colour_array, leak_free_groups

DRESS_COLOURS = {"红色": (200, 30, 40), "蓝色": (30, 60, 190), "绿色": (40, 150, 60)}
DEFAULTS = FilterConfig()


def product_photo(colour: tuple[int, int, int], size: int = 240) -> Image.Image:
    """A dress on a light background with a grey shadow and sensor noise, as shops photograph them."""
    image = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    s = size / 300
    draw.polygon([(120 * s, 40 * s), (180 * s, 40 * s), (200 * s, 110 * s), (240 * s, 270 * s), (60 * s, 270 * s),
                  (100 * s, 110 * s)], fill=colour)
    draw.rectangle([135 * s, 40 * s, 165 * s, 70 * s], fill=(255, 255, 255))
    draw.ellipse([60 * s, 270 * s, 240 * s, 290 * s], fill=(200, 200, 200))
    noisy = np.asarray(image).astype(float) + np.random.default_rng(0).normal(0, 6, (size, size, 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def jpeg(image: Image.Image, quality: int = 70) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def decoded(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def same_picture_copies(image: Image.Image) -> dict[str, Image.Image]:
    """What a shop or a crawler does to one photo: re-encode, resize, brighten, or all three."""
    return {"re-encoded": decoded(jpeg(image, 60)),
            "resized": image.resize((200, 200), Image.Resampling.BICUBIC),
            "brightened": ImageEnhance.Brightness(image).enhance(1.15),
            "all three": decoded(jpeg(ImageEnhance.Brightness(image).enhance(1.1).resize((256, 256)), 75))}


@pytest.fixture(scope="module")
def dresses():
    return {name: product_photo(rgb) for name, rgb in DRESS_COLOURS.items()}


def phash_bits(a: Image.Image, b: Image.Image) -> int:
    return (perceptual_hash(a) ^ perceptual_hash(b)).bit_count()


def test_colour_variants_hash_alike_but_their_colours_differ(dresses):
    red = dresses["红色"]
    for name in ("蓝色", "绿色"):
        assert phash_bits(red, dresses[name]) <= DEFAULTS.dedup.phash_max_distance  # pHash alone: a duplicate
        distance = colour_distance(colour_signature(red), colour_signature(dresses[name]))
        assert distance > 3 * DEFAULTS.split.colour_max_distance
    for what, copy in same_picture_copies(red).items():
        assert phash_bits(red, copy) <= DEFAULTS.dedup.phash_max_distance, what
        distance = colour_distance(colour_signature(red), colour_signature(copy))
        assert distance <= DEFAULTS.dedup.colour_max_distance, what


def test_colour_distance_of_rows_equals_the_distance_of_each_pair(dresses):
    signatures = [colour_signature(image) for image in dresses.values()]
    rows = colour_array(signatures)
    assert rows.shape == (3, 32)
    pairwise = colour_distance(rows[[0, 0, 1]], rows[[1, 2, 2]])
    one_by_one = [float(colour_distance(signatures[a], signatures[b])) for a, b in ((0, 1), (0, 2), (1, 2))]
    assert pairwise.tolist() == one_by_one


def test_dedup_keeps_every_colour_and_groups_the_copies(dresses):
    dedup = Deduplicator(DEFAULTS.dedup.phash_max_distance, colour_max_distance=DEFAULTS.dedup.colour_max_distance)
    for number, (name, image) in enumerate(dresses.items()):
        assert dedup.check(number, bytes([number]) * 16, perceptual_hash(image), "连衣裙", f"{name}连衣裙",
                           colour=colour_signature(image)) is None
    copies = same_picture_copies(dresses["蓝色"])
    for number, (what, copy) in enumerate(copies.items(), start=10):
        found = dedup.check(number, bytes([number]) * 16, perceptual_hash(copy), "连衣裙", f"蓝色连衣裙{what}",
                            colour=colour_signature(copy))
        assert found == (Reason.NEAR_DUPLICATE_IMAGE, 1), what  # the blue one, not the first (red) one


def test_without_a_colour_threshold_phash_alone_decides_as_before(dresses):
    dedup = Deduplicator(DEFAULTS.dedup.phash_max_distance, colour_max_distance=None)
    red, blue = dresses["红色"], dresses["蓝色"]
    assert dedup.check(0, b"r" * 16, perceptual_hash(red), "q", "红色连衣裙", colour=colour_signature(red)) is None
    assert dedup.check(1, b"b" * 16, perceptual_hash(blue), "q", "蓝色连衣裙",
                       colour=colour_signature(blue)) == (Reason.NEAR_DUPLICATE_IMAGE, 0)


def test_split_groups_copies_of_a_picture_but_not_its_colour_variants(dresses):
    images = [*dresses.values(), *same_picture_copies(dresses["红色"]).values()]
    captions = [f"第{i}款连衣裙" for i in range(len(images))]
    groups = leak_free_groups(captions, np.array([perceptual_hash(i) for i in images], dtype=np.uint64),
                              DEFAULTS.split.phash_max_distance,
                              colours=colour_array([colour_signature(i) for i in images]),
                              colour_max_distance=DEFAULTS.split.colour_max_distance)
    roots = [groups.find(i) for i in range(len(images))]
    assert roots[:3] == [0, 1, 2]  # red, blue and green: three groups, free to go to different splits
    assert roots[3:] == [0] * 4  # every copy of the red one goes with it


def test_build_pairs_keeps_each_colour_with_its_caption(tmp_path, dresses):
    crawl = tmp_path / "crawl"
    crawl.mkdir()
    records = [{"query": "连衣裙", "alt": f"{name}连衣裙", "image": base64.b64encode(jpeg(image, 92)).decode()}
               for name, image in dresses.items()]
    for what, copy in same_picture_copies(dresses["红色"]).items():
        records.append({"query": "连衣裙", "alt": f"红色连衣裙 {what}",
                        "image": base64.b64encode(jpeg(copy, 92)).decode()})
    (crawl / "a.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    config = config_from_dict({"text": {"min_chars": 3}, "image": {"min_side": 32}, "relevance": {"mode": "off"}})
    result = build_pairs(BuildOptions(inputs=(str(crawl),), out=tmp_path / "out", config=config, progress=False,
                                      format="pairs", splits=(("train", 1.0), ("valid", 0.0), ("test", 0.0))))
    assert result.report["kept"] == 3 and result.report["rejected"] == {"near_duplicate_image": 4}
    lines = (tmp_path / "out" / "train_pairs.jsonl").read_text("utf-8").splitlines()
    kept = [json.loads(line)["text"] for line in lines]
    assert kept == ["红色连衣裙", "蓝色连衣裙", "绿色连衣裙"]
    assert all("repeats" in example and "a.jsonl:1" in example.split("repeats")[1]
               for example in result.report["examples"]["near_duplicate_image"])


@pytest.mark.parametrize("filters, key", [
    ({"dedup": {"colour_max_distance": -1}}, "dedup.colour_max_distance"),
    ({"split": {"colour_max_distance": 400}}, "split.colour_max_distance"),
    ({"dedup": {"colour_max_distance": 30}, "split": {"colour_max_distance": 25}}, "split.colour_max_distance"),
    ({"dedup": {"colour_max_distance": None}}, "split.colour_max_distance"),  # dedup merges more than split groups
    ({"dedup": {"colour_max_distance": "red"}}, "dedup.colour_max_distance"),
])
def test_colour_thresholds_are_validated_naming_the_key(filters, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_dict(filters)


def test_colour_thresholds_can_be_set_or_switched_off():
    config = config_from_dict({"dedup": {"colour_max_distance": 10}, "split": {"colour_max_distance": None}})
    assert (config.dedup.colour_max_distance, config.split.colour_max_distance) == (10.0, None)
    assert config.to_dict()["dedup"]["colour_max_distance"] == 10.0
