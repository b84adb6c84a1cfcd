"""`cnclip evaluate ... --report`: a self-contained HTML page with the right thumbnails, ranks and matrix."""

import base64
import io
import json
import random
import re
from html.parser import HTMLParser

import torch
import torch.nn.functional as F
from PIL import Image

from cnclip.commands.evaluate import main as evaluate_main
from cnclip.data import ImageTransform, decode_base64_image, load_split, tokenize
from cnclip.eval_report import THUMB_SIDE, pick_examples, thumbnail_uri, QueryRow
from cnclip.inference import load_for_inference
from cnclip.models import encode_images
from cnclip.retrieval import embed_texts
from cnclip.runtime import pick_runtime
from cnclip.skiplog import SkipLog

from conftest import COLORS, image_bytes, in_fresh_process, write_split

SHAPES = {"圆形": "circle", "正方形": "square"}


def make_eval_data(root):
    """A valid split of 24 images and 24 captions (a random tiny model misses many of them)."""
    images, texts, image_id = {}, [], 100
    for cname, color in COLORS.items():
        for sname, shape in SHAPES.items():
            for k in range(3):
                images[image_id] = image_bytes(color, (36 + 5 * k, 30 + 2 * k), shape)
                text = f"{'左右中'[k]}边一个{cname}的{sname}"
                texts.append({"text_id": image_id, "text": text, "image_ids": [image_id]})
                image_id += 1
    write_split(root, "valid", images, texts)
    for key, cname in (("red", "红色"), ("blue", "蓝色")):
        (root / "zs" / key).mkdir(parents=True)
        for i in range(3):
            (root / "zs" / key / f"{i}.png").write_bytes(image_bytes(COLORS[cname], (40 + 4 * i, 30), "circle"))
    (root / "classes.txt").write_text("red: 红色\nblue: 蓝色\n", encoding="utf-8")
    return root


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.blocks, self.imgs, self.urls = [], [], []
        self._cell = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for name in ("src", "href", "action"):
            if name in a:
                self.urls.append(a[name])
        if tag == "div" and "data-text-id" in a:
            self.blocks.append({"text_id": int(a["data-text-id"]), "rank": int(a["data-rank"]), "cells": []})
        if tag == "div" and "data-image-id" in a:
            self._cell = {"id": int(a["data-image-id"]), "cls": a["class"], "rank": a.get("data-rank")}
            self.blocks[-1]["cells"].append(self._cell)
        if tag == "img":
            self.imgs.append(a)
            if self._cell is not None:
                self._cell["src"] = a["src"]
                self._cell = None


def test_report_is_self_contained_with_the_right_thumbnails_ranks_and_confusion(tiny_model_dir, tmp_path, capsys):
    data = make_eval_data(tmp_path / "data")
    out = tmp_path / "eval"
    code = evaluate_main([str(tiny_model_dir), "--data", str(data), "--split", "valid", "--out", str(out),
                          "--cache-dir", str(tmp_path / "cache"), "--context-length", "16", "--report",
                          "--report-sample", "4", "--report-worst", "3", "--zeroshot-images", str(data / "zs"),
                          "--zeroshot-classes", str(data / "classes.txt"), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert code == 0 and f"wrote {out / 'report.html'}" in printed
    text = (out / "report.html").read_text(encoding="utf-8")
    outside_data_uris = re.sub(r"data:image/[a-z]+;base64,[A-Za-z0-9+/=]+", "", text)
    assert not re.search(r"[a-z]+://|url\(|@import|(src|href)=['\"]//", outside_data_uris), "no URL may be referenced"
    page = Page()
    page.feed(text)
    assert page.urls and all(u.startswith("data:image/") for u in page.urls)

    # recall table = the metrics evaluate printed
    metrics = json.loads(next(ln for ln in printed.splitlines() if ln.startswith("{")))
    t2i = metrics["text_to_image"]
    assert f"<td>text → image</td><td>{t2i['r1']:.2f}</td><td>{t2i['r5']:.2f}</td>" in text

    # brute force: the top 5 and the rank of the correct image of every query
    loaded = load_for_inference(str(tiny_model_dir))
    split = load_split(data, "valid", SkipLog())
    runtime = pick_runtime("cpu")
    with torch.no_grad():
        text_emb = embed_texts(loaded.clip, tokenize(loaded.tokenizer, [t.text for t in split.texts], 16), runtime, 64)
        pixels = ImageTransform(loaded.preprocess)([decode_base64_image(split.images.read(i))
                                                    for i in split.images.ids])
        image_emb = F.normalize(encode_images(loaded.clip, pixels), dim=-1)
    sims = text_emb @ image_emb.T
    ids = list(split.images.ids)
    by_text = {t.text_id: i for i, t in enumerate(split.texts)}

    assert len(page.blocks) == 7
    assert any(b["rank"] > 5 for b in page.blocks), "the data makes the random model miss some queries"
    for block in page.blocks:
        row = sims[by_text[block["text_id"]]]
        top5 = [ids[j] for j in row.topk(5).indices.tolist()]
        shown = [c for c in block["cells"] if "gt" not in c["cls"]]
        assert [c["id"] for c in shown] == top5
        truth = split.texts[by_text[block["text_id"]]].image_ids[0]
        rank = int((row > row[ids.index(truth)]).sum()) + 1
        assert block["rank"] == rank
        for c in shown:
            assert ("hit" in c["cls"]) == (c["id"] == truth)
        missed = [c for c in block["cells"] if "gt" in c["cls"]]
        assert (len(missed) == 1 and missed[0]["id"] == truth and int(missed[0]["rank"]) == rank) if rank > 5 \
            else not missed
        for c in block["cells"]:  # each thumbnail is that image, shrunk
            assert c["src"] == thumbnail_uri(split.images, c["id"])
            thumb = Image.open(io.BytesIO(base64.b64decode(c["src"].split(",", 1)[1])))
            assert thumb.format == "JPEG" and max(thumb.size) <= THUMB_SIDE
    worst = [b["rank"] for b in page.blocks[4:]]
    others = [b["rank"] for b in page.blocks[:4]]
    assert worst == sorted(worst, reverse=True) and worst[0] == max(worst + others)

    confusion = [i for i in page.imgs if i.get("id") == "confusion"]
    assert len(confusion) == 1
    png = Image.open(io.BytesIO(base64.b64decode(confusion[0]["src"].split(",", 1)[1])))
    assert png.format == "PNG" and png.size[0] > 100
    assert "Zero-shot classification" in text and "over 6 images, 2 classes" in text


EXAMPLE_RANKS = [1, 9, 3, 30, 2, 7, 1, 12]
PICK_IN_A_FRESH_PROCESS = (
    "import json, random; from cnclip.eval_report import QueryRow, pick_examples; random.seed(2); "
    f"rows = [QueryRow(i, f't{{i}}', [], {{i}}, r, i, '') for i, r in enumerate({EXAMPLE_RANKS})]; "
    "print(json.dumps([r.text_id for r in pick_examples(rows, 3, 2, seed=5)]))")


def test_examples_are_seeded_and_the_worst_come_last():
    rows = [QueryRow(i, f"t{i}", [], {i}, rank, i, "") for i, rank in enumerate(EXAMPLE_RANKS)]
    random.seed(1)  # the global random state is not the report's: the seed alone picks the sample
    a = pick_examples(rows, 3, 2, seed=5)
    assert [r.text_id for r in a] == in_fresh_process(PICK_IN_A_FRESH_PROCESS)  # the same report in any run
    assert len({tuple(r.text_id for r in pick_examples(rows, 3, 0, seed=s)) for s in range(20)}) > 5  # seeded
    assert [r.why for r in a] == ["sample"] * 3 + ["worst"] * 2
    sampled = {r.text_id for r in a[:3]}
    expected_worst = [i for i in sorted(range(8), key=lambda i: -rows[i].rank) if i not in sampled][:2]
    assert [r.text_id for r in a[3:]] == expected_worst
