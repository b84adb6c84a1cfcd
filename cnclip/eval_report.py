"""An evaluation a person can look at: `cnclip evaluate ... --report` writes one self-contained HTML page.

The page holds:
* the R@1/5/10 and mean-recall table of both directions;
* text -> image examples: a seeded random sample of queries plus the worst-ranked ones (the queries
  whose first correct image ranks lowest), each with its top-5 retrieved images as thumbnails, the
  correct ones marked, and when the correct image is not in the top 5, that image with its rank;
* for zero-shot (a run that tracks a classification folder, or --zeroshot-images/--zeroshot-classes),
  top-1/top-5 and the confusion matrix drawn as an image.

Everything is embedded (JPEG thumbnails and PNGs as data: URIs, inline CSS, no script): the file
opens offline, can be mailed, and makes no request to any server.
"""

from __future__ import annotations

import base64
import html
import io
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import decode_base64_image, tokenize
from .plots import chinese_text
from .retrieval import embed_texts, scorable_texts

TOP = 5
THUMB_SIDE = 112


@dataclass
class QueryRow:
    text_id: int
    text: str
    top: list[tuple[int, float]]  # (image id, cosine) of the top 5
    positives: set[int]
    rank: int  # 1-based rank of the best-ranked correct image
    best_positive: int  # that image's id
    why: str  # "sample" or "worst"


@torch.no_grad()
def rank_queries(clip, tokenizer, split, features, runtime, context_length: int, batch_size: int,
                 chunk: int = 1024) -> list[QueryRow]:
    """Every labelled query's top 5 and the rank of its best correct image (chunked: memory stays bounded)."""
    texts = [t for t in scorable_texts(split, features) if t.image_ids]
    text_emb = embed_texts(clip, tokenize(tokenizer, [t.text for t in texts], context_length), runtime, batch_size)
    image_emb = F.normalize(features.embeddings.to(text_emb.device).float(), dim=-1)  # on the model's device
    ids = features.ids
    rows = []
    for start in range(0, len(texts), chunk):
        sims = text_emb[start:start + chunk] @ image_emb.t()
        values, top = sims.topk(min(TOP, len(ids)), dim=1)
        for i, record in enumerate(texts[start:start + chunk]):
            pos_rows = [features.row[p] for p in record.image_ids if p in features.row]
            pos_sims = sims[i, pos_rows]
            best = pos_rows[int(pos_sims.argmax())]
            rank = int((sims[i] > sims[i, best]).sum()) + 1
            rows.append(QueryRow(record.text_id, record.text,
                                 [(ids[j], float(v)) for j, v in zip(top[i].tolist(), values[i].tolist())],
                                 {ids[r] for r in pos_rows}, rank, ids[best], ""))
    return rows


def pick_examples(rows: list[QueryRow], sample: int, worst: int, seed: int) -> list[QueryRow]:
    """`sample` queries drawn with `seed`, then the `worst` lowest-ranked others (ties: text order)."""
    picked = random.Random(seed).sample(range(len(rows)), min(sample, len(rows)))
    chosen = [QueryRow(**{**rows[i].__dict__, "why": "sample"}) for i in sorted(picked)]
    rest = sorted((i for i in range(len(rows)) if i not in set(picked)), key=lambda i: -rows[i].rank)
    chosen += [QueryRow(**{**rows[i].__dict__, "why": "worst"}) for i in rest[:worst] if rows[i].rank > 1]
    return chosen


def _data_uri(raw: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def thumbnail_uri(images, image_id) -> str | None:
    """A small JPEG of one image as a data: URI; None when it cannot be decoded."""
    try:
        image = decode_base64_image(images.read(image_id))
    except ValueError:
        return None
    image.thumbnail((THUMB_SIDE, THUMB_SIDE))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=80)
    return _data_uri(buf.getvalue(), "image/jpeg")


@chinese_text()  # the class names are Chinese
def confusion_png(confusion: dict) -> bytes:
    """The confusion matrix (rows: true class, columns: predicted) as a PNG with counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    labels, matrix = confusion["labels"], confusion["matrix"]
    n = len(labels)
    side = min(12.0, 2.5 + 0.45 * n)
    fig = Figure(figsize=(side, side * 0.85), dpi=100)
    ax = fig.add_subplot()
    im = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= 30:
        peak = max((max(r) for r in matrix), default=0)
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                if v:
                    ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                            color="white" if v > peak / 2 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


CSS = """body{font-family:system-ui,"Noto Sans CJK SC","WenQuanYi Micro Hei",sans-serif;margin:24px;color:#222}
table.r{border-collapse:collapse;margin:8px 0 20px}
table.r td,table.r th{border:1px solid #ccc;padding:4px 10px;text-align:right}
table.r td:first-child,table.r th:first-child{text-align:left}
.q{margin:14px 0;padding:10px;border:1px solid #ddd;border-radius:6px}.q h3{margin:0 0 6px;font-size:15px}
.tag{font-size:12px;padding:1px 6px;border-radius:8px;background:#eee;margin-left:6px}.tag.worst{background:#fde2e1}
.imgs{display:flex;gap:8px;align-items:flex-start}.cell{width:118px;font-size:11px;text-align:center}
.cell img{width:112px;height:112px;object-fit:contain;border:3px solid #ddd;background:#fafafa}
.cell.hit img{border-color:#1a9e3f}.cell.gt img{border-color:#d9822b;border-style:dashed}
.sep{border-left:2px solid #bbb;margin:0 6px}"""


def _recall_table(metrics: dict) -> str:
    rows = ["<tr><th>direction</th><th>R@1</th><th>R@5</th><th>R@10</th><th>mean recall</th></tr>"]
    for key, name in (("text_to_image", "text → image"), ("image_to_text", "image → text")):
        m = metrics[key]
        rows.append(f"<tr><td>{name}</td><td>{m['r1']:.2f}</td><td>{m['r5']:.2f}</td><td>{m['r10']:.2f}</td>"
                    f"<td>{m['mean_recall']:.2f}</td></tr>")
    return f"<table class='r'>{''.join(rows)}</table><p>Mean recall over both directions: " \
           f"<b>{metrics['mean_recall']:.2f}</b> ({metrics['num_texts']} texts, {metrics['num_images']} images)</p>"


def _query_block(row: QueryRow, thumbs) -> str:
    cells = []
    for rank, (image_id, sim) in enumerate(row.top, start=1):
        hit = image_id in row.positives
        cells.append(f"<div class='cell{' hit' if hit else ''}' data-image-id='{image_id}'>"
                     f"<img src='{thumbs(image_id)}' alt='image {image_id}'><br>#{rank} · {sim:.3f}"
                     f"{' ✓ correct' if hit else ''}</div>")
    missed = ""
    if row.rank > TOP:
        missed = (f"<div class='sep'></div><div class='cell gt' data-image-id='{row.best_positive}' "
                  f"data-rank='{row.rank}'><img src='{thumbs(row.best_positive)}' alt='correct image "
                  f"{row.best_positive}'><br>correct image, rank {row.rank}</div>")
    tag = "random sample" if row.why == "sample" else "worst ranked"
    return (f"<div class='q' data-text-id='{row.text_id}' data-rank='{row.rank}'><h3>{html.escape(row.text)}"
            f"<span class='tag {row.why}'>{tag}</span><span class='tag'>correct at rank {row.rank}</span></h3>"
            f"<div class='imgs'>{''.join(cells)}{missed}</div></div>")


def render_report(title: str, metrics: dict | None, examples: list[QueryRow], images, zeroshot: dict | None,
                  notes: list[str]) -> str:
    cache: dict = {}

    def thumbs(image_id) -> str:
        if image_id not in cache:
            cache[image_id] = thumbnail_uri(images, image_id) or ""
        return cache[image_id]

    parts = [f"<!doctype html><html lang='zh-CN'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    parts += [f"<p>{html.escape(n)}</p>" for n in notes]
    parts.append("<h2>Retrieval recall</h2>")
    parts.append(_recall_table(metrics) if metrics else "<p>This split has no labels: no recall.</p>")
    if examples:
        parts.append(f"<h2>Text → image examples</h2><p>Top {TOP} images per query; green border: a correct "
                     "image; dashed orange: the correct image when it is not in the top 5, with its rank.</p>")
        parts += [_query_block(row, thumbs) for row in examples]
    if zeroshot:
        png = confusion_png(zeroshot["confusion"])
        parts.append(f"<h2>Zero-shot classification</h2><p>top-1 {zeroshot['top1']:.2f}% · top-5 "
                     f"{zeroshot.get('top5', float('nan')):.2f}% over {zeroshot['num_images']} images, "
                     f"{zeroshot['num_classes']} classes</p><img id='confusion' alt='confusion matrix' "
                     f"src='{_data_uri(png, 'image/png')}'>")
    parts.append("</body></html>")
    return "".join(parts)


def zeroshot_scores(clip, tokenizer, preprocess, images_dir: str, classes_path: str, templates_path: str | None,
                    runtime, context_length: int, batch_size: int, cache_dir: str | None, skips) -> dict:
    """cnclip.classifier's score() (with the confusion matrix) for a classification folder."""
    from .classifier import class_cache_dir, class_embeddings, folder_embeddings, score, similarities
    from .data import ImageTransform
    from .image_sources import ImageFolder
    from .prompts import load_classes, load_templates

    classes = load_classes(classes_path)
    templates = load_templates(templates_path or None)
    folder = ImageFolder(images_dir, classes, skips)
    class_emb = class_embeddings(clip, tokenizer, templates, classes, runtime, context_length, batch_size,
                                 class_cache_dir(cache_dir))
    images = folder_embeddings(folder, clip, ImageTransform(preprocess), runtime, cache_dir, batch_size, 0, skips)
    return score(similarities(images.embeddings, class_emb), images.labels, classes.keys)


def write_evaluation_report(path, *, title: str, clip, tokenizer, split, features, runtime, context_length: int,
                            batch_size: int, metrics: dict | None, zeroshot: dict | None = None, sample: int = 12,
                            worst: int = 8, seed: int = 0, notes: list[str] = ()) -> dict:
    """Rank the split's queries, pick the examples, write the page atomically; returns a summary."""
    from pathlib import Path

    from .atomic import atomic_file

    rows = rank_queries(clip, tokenizer, split, features, runtime, context_length, batch_size) if metrics else []
    examples = pick_examples(rows, sample, worst, seed)
    page = render_report(title, metrics, examples, split.images, zeroshot, list(notes))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "w", encoding="utf-8") as fh:
        fh.write(page)
    return {"report": str(path), "examples": len(examples),
            "worst_rank": max((r.rank for r in rows), default=None), "bytes": len(page.encode())}
