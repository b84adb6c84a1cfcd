"""build-pairs' global stages with a model: CLIP scores, semantic dedup, leak-free splits, and the
cap that keeps a picture when any copy of it can be kept (data_tools.selection)."""

from __future__ import annotations

import base64
import io
import json
from itertools import combinations
from pathlib import Path

import imagehash
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageDraw
from transformers import ChineseCLIPModel, ChineseCLIPProcessor

from data_tools.cap import pair_priority
from data_tools.config import config_from_dict
from data_tools.pipeline import BuildOptions, build_pairs
from data_tools.scoring import ScoringOptions
from data_tools.split import caption_key, parse_splits

FILTERS = {"text": {"max_chars": 32}, "image": {"min_side": 32, "max_side": 64}}
SPLITS = parse_splits("0.34,0.33,0.33")


def picture(seed: int, size=(64, 64)) -> Image.Image:
    cells = np.random.default_rng(seed).integers(0, 255, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(cells).resize(size, Image.Resampling.BICUBIC)


def b64(image: Image.Image, quality: int = 92) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return base64.b64encode(buffer.getvalue()).decode()


def write_dump(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def build(dump: Path, out: Path, filters=None, **options):
    config = config_from_dict({**FILTERS, **(filters or {})})
    return build_pairs(BuildOptions(inputs=(str(dump),), out=out, config=config, progress=False, **options))


def read_pairs(out: Path) -> list[dict]:
    pairs = []
    for split in ("train", "valid", "test"):
        path = out / f"{split}_pairs.jsonl"
        if path.exists():
            pairs += [{**json.loads(line), "split": split} for line in path.read_text(encoding="utf-8").splitlines()]
    return pairs


def decode(pair: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.urlsafe_b64decode(pair["image"]))).convert("RGB")


def plain_transformers_embeddings(model_dir: Path, pairs: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Normalised image and caption embeddings, computed with transformers alone (no cnclip code)."""
    model = ChineseCLIPModel.from_pretrained(model_dir).eval()
    processor = ChineseCLIPProcessor.from_pretrained(model_dir)
    with torch.no_grad():
        image = model.get_image_features(**processor(images=[decode(p) for p in pairs], return_tensors="pt"))
        text = model.get_text_features(**processor(text=[p["text"] for p in pairs], padding=True, return_tensors="pt"))
    image = image if torch.is_tensor(image) else image.pooler_output
    text = text if torch.is_tensor(text) else text.pooler_output
    return (torch.nn.functional.normalize(image, dim=-1).numpy(), torch.nn.functional.normalize(text, dim=-1).numpy())


# ---------------------------------------------------------------- 1. CLIP score


def scored_dump(root: Path) -> Path:
    queries = ["红色连衣裙", "复古台灯"]
    records = [{"query": q, "alt": f"{q}第{k}款", "image": b64(picture(100 * i + k))}
               for i, q in enumerate(queries) for k in range(10)]
    return write_dump(root / "crawl" / "a.jsonl", records)


def test_clip_scores_match_plain_transformers_and_filter_by_threshold(tmp_path, tiny_model_dir):
    dump = scored_dump(tmp_path)
    first = build(dump, tmp_path / "all", format="pairs", scoring=ScoringOptions(model=str(tiny_model_dir)))
    pairs = read_pairs(tmp_path / "all")
    assert len(pairs) == 20 and first.report["rejected"] == {}
    image, text = plain_transformers_embeddings(tiny_model_dir, pairs)
    stored = np.array([p["meta"]["similarity"] for p in pairs])
    recomputed = np.einsum("nd,nd->n", image, text)
    np.testing.assert_allclose(stored, recomputed, atol=1e-4)
    histogram = first.report["similarity"]["histogram"]
    assert sum(histogram["counts"]) == 20 and len(histogram["edges"]) == len(histogram["counts"]) + 1
    assert histogram["min"] == pytest.approx(stored.min(), abs=1e-5)

    threshold = float(np.median(stored))
    second = build(dump, tmp_path / "all", format="pairs",
                   scoring=ScoringOptions(model=str(tiny_model_dir), min_similarity=threshold))
    kept = read_pairs(tmp_path / "all")
    assert second.report["rejected"] == {"low_similarity": int((stored < threshold).sum())}
    assert {p["text"] for p in kept} == {p["text"] for p, s in zip(pairs, stored) if s >= threshold}
    assert second.shards_computed == 0  # a new threshold reuses the per-record work and the image cache


def test_keep_top_per_query(tmp_path, tiny_model_dir):
    dump = scored_dump(tmp_path)
    result = build(dump, tmp_path / "out", format="pairs",
                   scoring=ScoringOptions(model=str(tiny_model_dir), keep_top=0.3, per_query=True))
    assert result.report["rejected"] == {"low_similarity": 14}
    assert {q: c["kept"] for q, c in result.report["per_query"].items()} == {"红色连衣裙": 3, "复古台灯": 3}
    everything = build(dump, tmp_path / "all", format="pairs", scoring=ScoringOptions(model=str(tiny_model_dir)))
    by_query: dict[str, list[float]] = {}
    for pair in read_pairs(tmp_path / "all"):
        by_query.setdefault(pair["query"], []).append(pair["meta"]["similarity"])
    kept = read_pairs(tmp_path / "out")
    for query, scores in by_query.items():
        assert sorted(p["meta"]["similarity"] for p in kept if p["query"] == query) == sorted(scores)[-3:]
    assert everything.report["kept"] == 20


# ---------------------------------------------------------------- 2. semantic dedup


def reupload(image: Image.Image) -> Image.Image:
    """The same picture re-uploaded smaller with a faint watermark: pHash is told to miss it below."""
    copy = image.resize((56, 56), Image.Resampling.BICUBIC).convert("RGBA")
    mark = Image.new("RGBA", copy.size, (0, 0, 0, 0))
    ImageDraw.Draw(mark).text((30, 44), "wm", fill=(255, 255, 255, 90))
    return Image.alpha_composite(copy, mark).convert("RGB")


COPIED = (1, 2, 4, 6, 7, 8, 9)  # cosine to the original 0.991-0.998 with the tiny model: 0.98 catches them


def test_semantic_dedup_removes_reuploads_that_phash_is_told_to_miss(tmp_path, tiny_model_dir):
    originals = [picture(500 + k) for k in range(10)]
    records = [{"query": "红色连衣裙", "alt": f"红色连衣裙第{k}款", "image": b64(image)} for k, image in enumerate(originals)]
    records += [{"query": "红色连衣裙", "alt": f"红色连衣裙新{k}款", "image": b64(reupload(originals[k]))} for k in COPIED]
    dump = write_dump(tmp_path / "crawl" / "a.jsonl", records)
    filters = {"dedup": {"phash_max_distance": None, "semantic_threshold": 0.98},
               "split": {"phash_max_distance": None, "semantic_threshold": 0.9}}
    result = build(dump, tmp_path / "out", filters, format="pairs", scoring=ScoringOptions(model=str(tiny_model_dir)))
    kept = read_pairs(tmp_path / "out")
    image, _ = plain_transformers_embeddings(tiny_model_dir, kept)
    similarity = image @ image.T
    np.fill_diagonal(similarity, -1)
    assert similarity.max() < 0.98  # no kept image within the threshold of another
    assert result.report["rejected"] == {"semantic_duplicate": len(COPIED)}
    assert sorted(p["text"] for p in kept) == sorted(f"红色连衣裙第{k}款" for k in range(10))
    assert all(": repeats " in example for example in result.report["examples"]["semantic_duplicate"])


# ---------------------------------------------------------------- 3. leak-free splits


def phash(image: Image.Image) -> int:
    return int(str(imagehash.phash(image)), 16)


def near_variant(image: Image.Image) -> Image.Image | None:
    """A slightly rotated or cropped `image` whose pHash is 5-7 bits away: dedup (4 bits) keeps it,
    the split (8 bits) groups it."""
    base = phash(image)
    candidates = [image.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=(128, 128, 128))
                  for angle in (2, 3, 4, 5, 6, 8, 10, 12)]
    candidates += [image.crop(box).resize((64, 64), Image.Resampling.BICUBIC)
                   for m in range(1, 16) for box in ((m, 0, 64, 64), (0, m, 64, 64))]
    return next((v for v in candidates if 5 <= (phash(v) ^ base).bit_count() <= 7), None)


def test_no_caption_and_no_near_duplicate_pair_crosses_splits(tmp_path, tiny_model_dir):
    records, near_pairs = [], []
    queries = ["红色连衣裙", "连衣裙", "复古台灯", "台灯"]
    for k in range(24):  # distinct pictures, distinct captions
        records.append({"query": queries[k % 4], "alt": f"{queries[k % 4]}第{k}款", "image": b64(picture(k))})
    for k in range(6):  # one caption on 3 pictures, under two queries (so not duplicate_text)
        for j, query in enumerate(("红色连衣裙", "连衣裙", "红色连衣裙")):
            caption = f"红色连衣裙 夏季{k}款" if j != 2 else f"红色连衣裙夏季{k}款!"
            records.append({"query": query, "alt": caption, "image": b64(picture(1000 + 10 * k + j))})
    for k in range(8):  # near duplicates beyond dedup's pHash radius
        original, variant = next((o, v) for o in map(picture, range(2000 + 100 * k, 2100 + 100 * k))
                                 if (v := near_variant(o)) is not None)
        records.append({"query": "复古台灯", "alt": f"复古台灯原图{k}号", "image": b64(original)})
        records.append({"query": "台灯", "alt": f"台灯变体{k}号", "image": b64(variant)})
        near_pairs.append((f"复古台灯原图{k}号", f"台灯变体{k}号"))
    dump = write_dump(tmp_path / "crawl" / "a.jsonl", records)
    filters = {"dedup": {"semantic_threshold": 0.995}}  # the tiny random model sees the variants as 0.95-0.99 alike
    result = build(dump, tmp_path / "out", filters, format="pairs", splits=SPLITS, per_query_cap=0,
                   scoring=ScoringOptions(model=str(tiny_model_dir)))
    kept = read_pairs(tmp_path / "out")
    assert len(set(p["split"] for p in kept)) == 3, result.report["rejected"]
    split_of = {p["text"]: p["split"] for p in kept}

    by_caption: dict[str, set[str]] = {}
    for pair in kept:
        by_caption.setdefault(caption_key(pair["text"]), set()).add(pair["split"])
    assert sum(1 for p in kept if "夏季" in p["text"]) == 18  # every shared caption survived...
    assert all(len(splits) == 1 for splits in by_caption.values())  # ...and none crosses splits

    present = [(a, b) for a, b in near_pairs if a in split_of and b in split_of]
    assert len(present) >= 6, result.report["rejected"]
    assert all(split_of[a] == split_of[b] for a, b in present)
    hashes = [phash(decode(p)) for p in kept]  # independent: recomputed from the written JPEGs
    close = [(i, j) for i, j in combinations(range(len(kept)), 2) if (hashes[i] ^ hashes[j]).bit_count() <= 6]
    assert len(close) >= 4 and all(kept[i]["split"] == kept[j]["split"] for i, j in close)

    image, _ = plain_transformers_embeddings(tiny_model_dir, kept)
    threshold = result.report["settings"]["filters"]["split"]["semantic_threshold"]
    similar = [(i, j) for i, j in combinations(range(len(kept)), 2) if image[i] @ image[j] >= threshold + 1e-4]
    assert similar and all(kept[i]["split"] == kept[j]["split"] for i, j in similar)
    assert result.report["split_groups"]["groups"] < len(kept)


# ---------------------------------------------------------------- 4. dedup and cap order


def test_a_picture_capped_in_its_first_query_is_kept_through_its_copy_in_another(tmp_path):
    """Query A: pictures X then Y, cap 1, X ranked below Y; query B: a copy of X. X must survive in B,
    its copy in A is counted as query_cap (not duplicate_image), Y is kept in A."""
    x, y = b64(picture(1)), b64(picture(2))
    records = [{"query": "红色连衣裙", "alt": "红色连衣裙甲款", "image": x},
               {"query": "红色连衣裙", "alt": "红色连衣裙乙款", "image": y},
               {"query": "复古台灯", "alt": "复古台灯甲款", "image": x}]
    dump = write_dump(tmp_path / "crawl" / "a.jsonl", records)
    build(dump, tmp_path / "out", format="pairs", per_query_cap=0)
    shard = next((tmp_path / "out" / ".work" / "shards").glob("*.parquet"))
    sha_x, sha_y = pq.read_table(shard, columns=["sha"]).column("sha").to_pylist()[:2]
    seed = next(s for s in range(100) if pair_priority(s, sha_x) > pair_priority(s, sha_y))  # X loses in A

    result = build(dump, tmp_path / "out", format="pairs", per_query_cap=1, seed=seed)
    assert sorted((p["query"], p["text"]) for p in read_pairs(tmp_path / "out")) == [
        ("复古台灯", "复古台灯甲款"), ("红色连衣裙", "红色连衣裙乙款")]
    assert result.report["rejected"] == {"query_cap": 1}
    assert result.report["per_query"]["红色连衣裙"] == {"read": 2, "kept": 1, "rejected": 1, "capped": 1}
    assert result.report["per_query"]["复古台灯"] == {"read": 1, "kept": 1, "rejected": 0, "capped": 0}

    seed_y_loses = next(s for s in range(100) if pair_priority(s, sha_x) < pair_priority(s, sha_y))
    result = build(dump, tmp_path / "out", format="pairs", per_query_cap=1, seed=seed_y_loses)
    assert result.report["rejected"] == {"duplicate_image": 1, "query_cap": 1}  # X kept in A: B's copy repeats it
    assert result.report["examples"]["duplicate_image"] == [f"{dump}:3: repeats {dump}:1"]


def test_command_line_model_stage(tmp_path, tiny_model_dir, capsys):
    from cnclip.errors import EXIT_USAGE
    from data_tools.cli import main

    dump = scored_dump(tmp_path)
    (tmp_path / "filters.yaml").write_text(json.dumps(FILTERS))
    common = [str(dump), "--out", str(tmp_path / "out"), "--config", str(tmp_path / "filters.yaml"), "--no-progress"]
    assert main(["build-pairs", *common, "--keep-top", "0.5"]) == EXIT_USAGE
    assert "need --model MODEL" in capsys.readouterr().err
    assert main(["build-pairs", *common, "--model", str(tmp_path / "no-such-model")]) == EXIT_USAGE  # a missing path
    capsys.readouterr()
    assert main(["build-pairs", *common, "--model", str(tiny_model_dir), "--keep-top", "0.5", "--format", "pairs"]) == 0
    assert "low_similarity         10" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert report["settings"]["scoring"]["keep_top"] == 0.5 and report["similarity"]["histogram"]["count"] == 20
