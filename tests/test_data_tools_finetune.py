"""The last step of the build-pairs story: its cnclip output trains with `python -m cnclip.finetune`."""

import io
import json
import subprocess
import sys

import numpy as np
from PIL import Image

from conftest import DEMO_RECIPE, REPO, tiny_overrides
from data_tools.config import config_from_dict
from data_tools.pipeline import BuildOptions, build_pairs
from data_tools.split import parse_splits

COLOURS = ["红色", "绿色", "蓝色", "黄色", "紫色", "黑色"]
THINGS = ["圆形", "正方形", "三角形", "帽子"]


def write_crawl(root):
    """24 hits over four queries, images given as files next to the dump."""
    root.mkdir()
    lines = []
    for c, colour in enumerate(COLOURS):
        for t, thing in enumerate(THINGS):
            cells = np.random.default_rng(c * 10 + t).integers(0, 255, (4, 4, 3), dtype=np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(cells).resize((48, 48), Image.Resampling.BICUBIC).save(buffer, "PNG")
            (root / f"{c}{t}.png").write_bytes(buffer.getvalue())
            lines.append({"query": thing, "image": f"{c}{t}.png", "alt": f"一个{colour}的{thing}"})
    (root / "crawl.jsonl").write_text("\n".join(json.dumps(l, ensure_ascii=False) for l in lines) + "\n", encoding="utf-8")


def test_build_pairs_output_trains(tiny_model_dir, tmp_path):
    write_crawl(tmp_path / "crawl")
    data = tmp_path / "pairs"
    result = build_pairs(BuildOptions(
        inputs=(str(tmp_path / "crawl"),), out=data, splits=parse_splits("0.7,0.3,0"), progress=False,
        config=config_from_dict({"text": {"min_chars": 3}, "image": {"min_side": 32}}),
    ))
    assert result.report["kept"] == 24 and result.report["splits"]["valid"] > 0

    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "cnclip.finetune", str(DEMO_RECIPE),
               *tiny_overrides(tiny_model_dir, data, run_dir, **{"train.epochs": 1, "eval.before_training": False})]
    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    # one epoch over the train split's pairs, batch 4, the last partial batch dropped
    train_pairs = len((data / "train_texts.jsonl").read_text(encoding="utf-8").splitlines())
    assert f"training on {train_pairs} pairs" in (run_dir / "train.log").read_text(encoding="utf-8")
    assert summary["steps"] == train_pairs // 4 >= 3
    assert (run_dir / "best" / "adapter_model.safetensors").is_file()
