"""The bundled demo data set: coloured shapes in positions, with Chinese captions.

Generated deterministically from a seed and written in the Chinese-CLIP layout, so the demo runs
through exactly the readers real data uses. Validation images are new drawings (other sizes and
jitter) and their captions use held-out wordings the model never saw in training.
"""

from __future__ import annotations

import base64
import io
import json
import random
from itertools import product
from pathlib import Path

from PIL import Image, ImageDraw

from .atomic import atomic_file

COLORS = {"红色": (220, 40, 40), "绿色": (40, 170, 60), "蓝色": (40, 70, 220), "黄色": (235, 210, 40),
          "紫色": (140, 50, 180), "黑色": (20, 20, 20)}
SHAPES = ("圆形", "正方形", "三角形")
POSITIONS = {"左上角": (0.25, 0.25), "右上角": (0.75, 0.25), "左下角": (0.25, 0.75), "右下角": (0.75, 0.75),
             "中间": (0.5, 0.5)}
TRAIN_TEMPLATES = ("{pos}有一个{color}的{shape}", "一个{color}的{shape}在{pos}", "{color}{shape}位于图片{pos}")
VALID_TEMPLATES = ("图片的{pos}画着{color}{shape}", "{pos}是一个{color}的{shape}")
TRAIN_IMAGES_PER_CLASS = 4
# Held-out zero-shot classification set: colour classes (ASCII folder keys, Chinese names), each
# folder new drawings of any shape anywhere; the demo recipe tracks zero-shot accuracy on it.
ZEROSHOT_DIR, ZEROSHOT_CLASSES = "zeroshot", "zeroshot_classes.txt"
ZEROSHOT_KEYS = {"red": "红色, 红", "green": "绿色, 绿", "blue": "蓝色, 蓝", "yellow": "黄色, 黄",
                 "purple": "紫色, 紫", "black": "黑色, 黑"}
ZEROSHOT_IMAGES_PER_CLASS = 6


def _draw(color: tuple, shape: str, pos: tuple, rng: random.Random) -> bytes:
    width, height = 96, 80  # non-square: exercises the squash-to-square resize
    background = tuple(rng.randint(245, 255) for _ in range(3))
    img = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(img)
    cx = pos[0] * width + rng.uniform(-2, 2)
    cy = pos[1] * height + rng.uniform(-2, 2)
    r = rng.uniform(13, 16)
    if shape == "圆形":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
    elif shape == "正方形":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=color)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _write_split(root: Path, split: str, rows: list[tuple[int, bytes]], texts: list[dict]) -> None:
    with atomic_file(root / f"{split}_imgs.tsv", "w", encoding="utf-8") as fh:
        for image_id, data in rows:
            fh.write(f"{image_id}\t{base64.urlsafe_b64encode(data).decode()}\n")
    with atomic_file(root / f"{split}_texts.jsonl", "w", encoding="utf-8") as fh:
        for row in texts:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_demo_dataset(root: str | Path, seed: int = 0) -> Path:
    """Write train/valid splits under `root` (skipped when they are already there)."""
    root = Path(root)
    write_demo_zeroshot(root, seed)
    if all((root / f"{s}_{kind}").is_file() for s in ("train", "valid") for kind in ("imgs.tsv", "texts.jsonl")):
        return root
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    image_id, text_id = 1000, 1
    train_imgs, train_texts, valid_imgs, valid_texts = [], [], [], []
    for (cname, color), shape, (pname, pos) in product(COLORS.items(), SHAPES, POSITIONS.items()):
        words = {"color": cname, "shape": shape, "pos": pname}
        ids = []
        for _ in range(TRAIN_IMAGES_PER_CLASS):
            train_imgs.append((image_id, _draw(color, shape, pos, rng)))
            ids.append(image_id)
            image_id += 1
        for template in TRAIN_TEMPLATES:
            train_texts.append({"text_id": text_id, "text": template.format(**words), "image_ids": ids})
            text_id += 1
        valid_imgs.append((image_id, _draw(color, shape, pos, rng)))
        valid_texts.append({"text_id": text_id, "text": rng.choice(VALID_TEMPLATES).format(**words),
                            "image_ids": [image_id]})
        image_id += 1
        text_id += 1
    _write_split(root, "train", train_imgs, train_texts)
    _write_split(root, "valid", valid_imgs, valid_texts)
    return root


def write_demo_zeroshot(root: str | Path, seed: int = 0,
                        images_per_class: int = ZEROSHOT_IMAGES_PER_CLASS) -> tuple[Path, Path]:
    """`root/zeroshot/<colour key>/*.png` and `root/zeroshot_classes.txt` (skipped when already there).

    The class list is written last, so its presence marks a complete folder. More images per class make
    the accuracy a finer measurement (one image of 6 x 6 is 2.8 points).
    """
    root = Path(root)
    folder, classes = root / ZEROSHOT_DIR, root / ZEROSHOT_CLASSES
    if classes.is_file():
        return folder, classes
    rng = random.Random(seed + 7)  # its own stream: the training set stays as it was
    for key, names in ZEROSHOT_KEYS.items():
        color = COLORS[names.split(",")[0]]
        (folder / key).mkdir(parents=True, exist_ok=True)
        for i in range(images_per_class):
            pos = (rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.75))
            with atomic_file(folder / key / f"{i:02d}.png", "wb") as fh:
                fh.write(_draw(color, rng.choice(SHAPES), pos, rng))
    with atomic_file(classes, "w", encoding="utf-8") as fh:
        fh.write("# demo colour classes (cnclip.demo_data): folder key: Chinese names\n")
        fh.writelines(f"{key}: {names}\n" for key, names in ZEROSHOT_KEYS.items())
    return folder, classes


def demo_vocabulary() -> list[str]:
    """Every character the demo captions use (the tiny model's vocab must cover them)."""
    chars = set("".join(TRAIN_TEMPLATES + VALID_TEMPLATES) + "".join(COLORS) + "".join(SHAPES) + "".join(POSITIONS))
    chars |= set("".join(ZEROSHOT_KEYS.values())) - set(", ")
    chars -= set("{}")
    for word in ("pos", "color", "shape"):
        chars -= set(word)
    return sorted(chars)


# ---------------------------------------------------------------- caption families, for measuring forgetting
# The same drawings captioned two ways. "colour_shape_position": the demo's own wordings, naming all three
# (a model trained briefly on them is a generalist: it knows colours well and shapes and positions a little,
# as a pretrained CLIP knows a little of a user's domain). "shape_position": captions name only the shape and
# the position, never a colour (fine-tuning on them is a specialist task that can make the model forget
# colours). tests/test_forgetting.py trains the first, then fine-tunes on the second.
FAMILY_TEMPLATES = {
    "colour_shape_position": (TRAIN_TEMPLATES, VALID_TEMPLATES),
    "shape_position": (("{pos}有一个{shape}", "一个{shape}在{pos}", "{shape}位于图片{pos}"),
                       ("图片的{pos}画着{shape}", "{pos}是一个{shape}")),
}
FAMILIES = tuple(FAMILY_TEMPLATES)


def write_family_dataset(root: str | Path, family: str, seed: int = 0, images_per_class: int = 2,
                         valid_images_per_class: int = 1) -> Path:
    """train/valid splits under `root` whose captions describe only one `family` (FAMILIES) of concepts.

    Every colour x shape x position is drawn `images_per_class` times for training and
    `valid_images_per_class` times for validation. A caption names its family's concepts only, so it
    matches every drawing that shares them (a shape/position caption: that shape there in every colour):
    each text record lists all those images. Validation has one caption per group and held-out wording (every
    held-out template), so recall is measured over as many queries as the family allows. Deterministic in
    `seed`; rewritten on every call.
    """
    if family not in FAMILY_TEMPLATES:
        raise ValueError(f"family {family!r}: accepted: {', '.join(FAMILIES)}")
    train_templates, valid_templates = FAMILY_TEMPLATES[family]
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    image_id = 1000
    groups: dict[str, dict] = {}  # caption words -> {"words", "train": [ids], "valid": [ids]}
    train_imgs, valid_imgs = [], []
    for (cname, color), shape, (pname, pos) in product(COLORS.items(), SHAPES, POSITIONS.items()):
        named = {"color": cname, "shape": shape, "pos": pname}
        words = {k: v for k, v in named.items() if "{" + k + "}" in train_templates[0]}  # what the family names
        group = groups.setdefault("|".join(words.values()), {"words": words, "train": [], "valid": []})
        for _ in range(images_per_class):
            train_imgs.append((image_id, _draw(color, shape, pos, rng)))
            group["train"].append(image_id)
            image_id += 1
        for _ in range(valid_images_per_class):
            valid_imgs.append((image_id, _draw(color, shape, pos, rng)))
            group["valid"].append(image_id)
            image_id += 1
    train_texts, valid_texts, text_id = [], [], 1
    for group in groups.values():
        for template in train_templates:
            train_texts.append({"text_id": text_id, "text": template.format(**group["words"]),
                                "image_ids": group["train"]})
            text_id += 1
        for template in valid_templates:
            valid_texts.append({"text_id": text_id, "text": template.format(**group["words"]),
                                "image_ids": group["valid"]})
            text_id += 1
    _write_split(root, "train", train_imgs, train_texts)
    _write_split(root, "valid", valid_imgs, valid_texts)
    return root
