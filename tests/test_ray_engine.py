"""--engine ray writes the same bytes as --engine local (a local Ray with 2 CPUs; about 20 s, most of it
Ray starting). Deselect with `-m "not ray"`; where Ray is not installed (pip install 'cnclip[ray]') skipped,
but failed under CI, which installs it (conftest.require)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import require
from image_server import ImageServer
from PIL import Image

from data_tools.config import config_from_dict
from data_tools.download import DownloadOptions
from data_tools.pipeline import BuildOptions, build_pairs

require("ray", "pip install 'cnclip[ray]'; the test extra brings it")
pytestmark = pytest.mark.ray

FILTERS = {"image": {"min_side": 32, "max_side": 64}, "relevance": {"mode": "off"}}


def write_dump(root: Path, server: ImageServer) -> Path:
    """60 records: image files in the dump, URLs on the local server (some 404), a duplicate, junk text."""
    (root / "images").mkdir(parents=True)
    lines = []
    for i in range(60):
        record = {"query": f"查询{i % 5}", "alt": f"复古台灯图片{i}号"}
        if i % 2:
            record["url"] = server.url(f"/img/{i}.jpg" if i % 9 else "/404")
        else:
            cells = np.random.default_rng(i).integers(0, 255, (6, 6, 3), dtype=np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(cells).resize((64, 64), Image.Resampling.BICUBIC).save(buffer, "PNG")
            (root / "images" / f"{i}.png").write_bytes(buffer.getvalue())
            record["image"] = f"images/{i}.png"
        if i % 13 == 12:
            record["alt"] = "图"
        lines.append(json.dumps(record, ensure_ascii=False))
    lines.append(lines[0])  # an exact duplicate
    (root / "crawl.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "crawl.jsonl"


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_ray_engine_output_is_byte_identical_to_local(tmp_path):
    with ImageServer() as server:
        crawl = write_dump(tmp_path / "dump", server)

        def options(out: Path, **engine) -> BuildOptions:
            return BuildOptions(inputs=(str(crawl),), out=out, config=config_from_dict(FILTERS), shard_size=10,
                                splits=(("train", 0.8), ("valid", 0.1), ("test", 0.1)), progress=False,
                                download=DownloadOptions(allow_private_network=True, retries=0), **engine)

        local = build_pairs(options(tmp_path / "local"))
        ray_run = build_pairs(options(tmp_path / "ray", engine="ray", workers=2))
    assert ray_run.shards_computed == ray_run.shards_total == 7
    assert local.report["kept"] > 30 and local.report["rejected"]["http_404"] == 3
    assert tree(tmp_path / "ray") == tree(tmp_path / "local")
