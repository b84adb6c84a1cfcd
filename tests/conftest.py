"""Shared fixtures: tiny random ChineseCLIP models and tiny Chinese-CLIP-layout data sets.

Models are built from a config in the test, saved with save_pretrained (tokenizer and image
processor included) and loaded back through the same from_pretrained path real checkpoints use.
"""

from __future__ import annotations

import base64
import importlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import venv
from pathlib import Path
from types import ModuleType

import pytest
import torch
from PIL import Image, ImageDraw

# Characters every test caption is written with, plus a few fillers.
TEST_CHARS = ("左右上下角中间有一个的红绿蓝黄紫黑白色圆形正方三角在位于图片画着是"
              "高级感托特包斜挎连衣裙男女鞋帽子手机壳猫狗汽车花朵照片张")


def make_tiny_model(out_dir: Path, *, seed: int = 0, image_size: int = 32, center_crop: bool = False,
                    shortest_edge: int | None = None, projection_dim: int = 16) -> Path:
    """Save a tiny random ChineseCLIP (+ BERT tokenizer with a small Chinese vocab + image processor)."""
    from transformers import ChineseCLIPConfig, ChineseCLIPModel
    from transformers.models.chinese_clip.image_processing_pil_chinese_clip import ChineseCLIPImageProcessorPil

    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(TEST_CHARS))
    (out_dir / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "tokenize_chinese_chars": True}), encoding="utf-8")
    config = ChineseCLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=8, initializer_factor=3.0),
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    ChineseCLIPModel(config).save_pretrained(out_dir)
    size = {"shortest_edge": shortest_edge} if shortest_edge else {"height": image_size, "width": image_size}
    ChineseCLIPImageProcessorPil(size=size, crop_size={"height": image_size, "width": image_size},
                                 do_center_crop=center_crop).save_pretrained(out_dir)
    return out_dir


def image_bytes(color=(200, 30, 30), size=(40, 30), shape="circle", fmt="PNG") -> bytes:
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    w, h = size
    box = (w * 0.2, h * 0.2, w * 0.8, h * 0.8)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=color)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def write_split(root: Path, split: str, images: dict[int, bytes], texts: list[dict]) -> None:
    """Write one split in the Chinese-CLIP layout (urlsafe base64, as MUGE ships it)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{split}_imgs.tsv", "w", encoding="utf-8") as fh:
        for image_id, data in images.items():
            fh.write(f"{image_id}\t{base64.urlsafe_b64encode(data).decode()}\n")
    with open(root / f"{split}_texts.jsonl", "w", encoding="utf-8") as fh:
        for row in texts:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


COLORS = {"红色": (220, 30, 30), "绿色": (30, 170, 60), "蓝色": (30, 60, 220), "黄色": (230, 210, 30)}


def make_tiny_dataset(root: Path) -> Path:
    """Train/valid splits: 4 colours x 2 shapes, a text with two images, a repeated caption."""
    shapes = {"圆形": "circle", "正方形": "square"}
    for split, per_class in (("train", 2), ("valid", 1)):
        images, texts, image_id, text_id = {}, [], 100 if split == "train" else 500, 1 if split == "train" else 900
        for cname, color in COLORS.items():
            for sname, shape in shapes.items():
                ids = []
                for k in range(per_class):
                    images[image_id] = image_bytes(color, (40 + 4 * k, 30), shape)
                    ids.append(image_id)
                    image_id += 1
                texts.append({"text_id": text_id, "text": f"一个{cname}的{sname}", "image_ids": ids})
                text_id += 1
        if split == "train":  # a repeated caption (crawled data does this)
            texts.append({"text_id": text_id, "text": texts[0]["text"], "image_ids": texts[0]["image_ids"][:1]})
        write_split(root, split, images, texts)
    return root


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def tiny_model_no_dropout_dir(tmp_path_factory) -> Path:
    """The tiny model with the text tower's dropout off: runs that must agree number for number
    (N processes vs one, resumed vs uninterrupted) cannot draw the same dropout masks."""
    out = make_tiny_model(tmp_path_factory.mktemp("tiny_model_no_dropout"))
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    config["text_config"].update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out


@pytest.fixture()
def tiny_data_dir(tmp_path) -> Path:
    return make_tiny_dataset(tmp_path / "data")


def tiny_overrides(model_dir: Path, data_dir: Path, run_dir: Path, **extra) -> list[str]:
    """Recipe overrides that point recipes/demo.yaml at a tiny model and data set for a quick run."""
    values = {
        "model.base": str(model_dir), "model.random_init": False, "data.root": str(data_dir),
        "data.generate": None, "data.context_length": 16, "run_dir": str(run_dir),
        "cache.dir": str(run_dir.parent / "cache"), "train.epochs": 2, "train.batch_size": 4,
        "train.lr": 1e-3, "train.warmup_steps": 1, "train.log_every": 1, "train.save_every": 2,
        "eval.before_training": True, "model.lora_dropout": 0.1,
        "zeroshot.images": "", "zeroshot.classes": "", "zeroshot.templates": "",  # off (the demo recipe points into data/demo)
    }
    values.update(extra)
    return [f"{k}={'null' if v is None else v}" for k, v in values.items()]


REPO = Path(__file__).resolve().parent.parent
DEMO_RECIPE = REPO / "recipes" / "demo.yaml"


def lora_model_with_gradients(model_dir: Path, lora_dropout: float, target_modules: list[str]):
    """(peft model, base) in train mode with LoRA B drawn non-zero, so every LoRA weight gets a gradient."""
    from cnclip.models import attach_lora, load_base_model, lock_image_tower
    from cnclip.recipe import ModelConfig

    cfg = ModelConfig(base=str(model_dir), lora_dropout=lora_dropout, target_modules=target_modules)
    base = load_base_model(cfg)
    torch.manual_seed(0)
    model = attach_lora(base.clip, cfg)
    with torch.no_grad():  # LoRA B starts at zero, which would leave A without gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    model.train()
    lock_image_tower(base.clip)
    return model, base


def clamp_that_stops_in_step(step: int):
    """A stand-in for cnclip.trainer.clamp_logit_scale, which runs once per optimizer step on every rank,
    that stops the process (SystemExit 17) in optimizer step `step`: a crash after the checkpoints before it."""
    import cnclip.trainer

    real, calls = cnclip.trainer.clamp_logit_scale, [0]

    def clamp(clip):
        calls[0] += 1
        if calls[0] == step:
            raise SystemExit(17)
        real(clip)

    return clamp


# ---- optional test dependencies (skipped on a developer's machine, required in CI); fresh-process results ----
# CI (.ci/run, with the environment variable CI set) installs the test extra, the reference cn_clip,
# Chromium and a CJK font: there a missing one is a broken environment, and a test that skipped
# would pass without checking anything. The one exception is torchvision: CI deliberately lacks it
# (the registry's torchvision does not import beside torch 2.13.0+cpu), so the `torchvision`-marked
# tests skip everywhere it does not import, CI included.


def in_ci() -> bool:
    """True under CI: the CI environment variable set to anything but empty, 0, false or no."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing_dependency(reason: str) -> None:
    """A test cannot run for want of something CI installs: skip it here, fail it under CI."""
    if in_ci():
        pytest.fail(f"{reason}; CI installs it, so this environment is broken (unset CI to skip instead)",
                    pytrace=False)
    pytest.skip(reason, allow_module_level=True)  # also from a test module's top level (test_ray_engine.py)


def require(module: str, why: str) -> ModuleType:
    """Import `module` for a test (`why`: where it comes from); missing: `missing_dependency`."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        error = exc  # reported outside the handler: the failure under CI is one line, not a chained traceback
    missing_dependency(f"{module} does not import ({error}); {why}")
    raise AssertionError("unreachable: missing_dependency always raises")


def torchvision_or_skip() -> ModuleType:
    """torchvision for a `torchvision`-marked test, or a skip, in CI too: CI deliberately runs without it."""
    try:
        import torchvision
    except Exception as exc:  # absent, or a build that does not match torch ("torchvision::nms does not exist")
        pytest.skip(f"torchvision not usable here ({exc}); the torchvision-marked tests run where it imports "
                    "beside torch (CI has none: the registry's build does not import beside torch 2.13.0+cpu)")
    return torchvision


def in_fresh_process(code: str, hash_seed: int = 12345):
    """What `code` prints as JSON (its last line), run in a new interpreter of this checkout with another
    str-hash salt (PYTHONHASHSEED) and fresh global random state: a result that has to be a function of
    its arguments alone must come out the same there as in the test's own process."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONHASHSEED": str(hash_seed), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- end of optional test dependencies and fresh-process results ----


def wheel_in_new_venv(root: Path, dependencies: Path) -> Path:
    """A wheel of this checkout installed --no-deps into a new virtual environment under `root`; its python.

    The venv sees no other packages than the wheel and those in `dependencies` (a directory added through a
    .pth line, so the check costs seconds, not an install): the tests choose what the venv may import.
    """
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(root / "dist"), str(REPO)], capture_output=True, text=True, env=clean)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (root / "dist").glob("cnclip-*.whl")
    venv.EnvBuilder(with_pip=False).create(root / "venv")
    python = root / "venv" / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True, env=clean).stdout.strip()
    # Plain directories only: .pth files inside `dependencies` (an editable cnclip) are not processed.
    (Path(site) / "deps.pth").write_text(f"{dependencies}\n", encoding="utf-8")
    # --ignore-installed: a cnclip visible through deps.pth (the test environment's editable one) is not the wheel.
    pip = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                          "--ignore-installed", "-q", str(wheel)], capture_output=True, text=True, env=clean)
    assert pip.returncode == 0, pip.stderr[-3000:]
    return python


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/NAME.py as a module (the benchmarks are scripts, not a package), for their smoke tests."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
