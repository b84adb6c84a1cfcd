"""Retrieval evaluation: text->image and image->text Recall@1/5/10 and mean recall.

Used by training (per-epoch validation) and by `cnclip evaluate`, which prints the numbers and
writes files Chinese-CLIP's own evaluation accepts: top-10 predictions per query and a result JSON.

Everything runs on the device the embeddings are on (the model's: text embeddings stay there, image
embeddings are moved there), and the query x gallery similarities are computed one row block at a
time, each block at most `BLOCK_ELEMENTS` similarities: memory is bounded by the block and the
embeddings, never by queries x gallery. The ranking is a function of the similarities alone: equal
similarities are ranked by gallery index, lowest first (`topk_lowest_index`), so ties come out the
same on every device and block size. (The similarities themselves come from the device's matrix
product, whose last bit can depend on how many rows it is given: a block size changes a ranking
only where two similarities are within that rounding of each other.)
"""

from __future__ import annotations

import json
import logging
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import Split, gather_tokens, int64_tensor, tokenize
from .skiplog import SkipLog
from .models import encode_texts

log = logging.getLogger(__name__)

KS = (1, 5, 10)


# Similarities per block of query rows (2**22 float32 = 16 MiB; top-k's work beside them adds about as
# much again): a 30k x 30k validation takes ~60 blocks on a GPU instead of one 3.6 GB matrix.
BLOCK_ELEMENTS = 1 << 22
TIE_ROWS = 8  # rows whose k-th similarity ties are re-ranked this many at a time (topk_lowest_index)


@torch.no_grad()
def embed_texts(clip, tokens: dict[str, torch.Tensor], runtime, batch_size: int, progress: bool = False):
    """Normalised text embeddings of pre-tokenised captions (fp32, on the runtime's device)."""
    n = tokens["input_ids"].shape[0]
    out = []
    for start in tqdm(range(0, n, batch_size), desc="text embeddings", disable=not progress, leave=False):
        batch = gather_tokens(tokens, torch.arange(start, min(start + batch_size, n)), runtime.device)
        with runtime.autocast():
            out.append(encode_texts(clip, **batch).float())
    return F.normalize(torch.cat(out), dim=-1)


def topk_lowest_index(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices of each row's k largest scores, largest first; equal scores in index order.

    torch.topk leaves the order of equal values (and which of them a cut keeps) to the kernel; here
    the answer depends on the scores alone. One top-(k+1) finds the rows whose k-th score ties with
    one left out; those are redone exactly: every score above it, then the tied ones from the lowest
    index up.
    """
    width = scores.shape[1]
    values, idx = scores.topk(min(k + 1, width), dim=1)
    if width > k:
        crowded = (values[:, k - 1] == values[:, k]).nonzero().squeeze(1)
        values, idx = values[:, :k], idx[:, :k]
        if crowded.numel():
            picked = []
            # a few rows at a time: a collapsed model ties every row, and temporaries the size of the block
            # (a different size each block) fragmented the C heap: 30k x 30k all tied peaked at 1-2.3 GB
            for rows in crowded.split(TIE_ROWS):
                sub, kth = scores[rows], values[rows, k - 1:]
                above, tied = sub > kth, sub == kth
                room = k - above.sum(1, keepdim=True)
                take = above | (tied & (tied.cumsum(1, dtype=torch.int32) <= room))  # exactly k per row
                picked.append(take.nonzero()[:, 1].view(-1, k))
            idx = idx.index_copy(0, crowded, torch.cat(picked))
    idx = idx.sort(dim=1).values  # index order, then a stable sort by score keeps it among equals
    order = scores.gather(1, idx).sort(dim=1, descending=True, stable=True).indices
    return idx.gather(1, order)


def block_rows(gallery_rows: int, block_elements: int = BLOCK_ELEMENTS) -> int:
    """Query rows per similarity block: as many as fit `block_elements` similarities, at least one."""
    return max(1, block_elements // max(1, gallery_rows))


def topk_indices(queries: torch.Tensor, gallery: torch.Tensor, k: int,
                 block_elements: int = BLOCK_ELEMENTS) -> torch.Tensor:
    """Indices of the k most similar gallery rows per query (ties: lowest index first), on the
    queries' device, one block of at most `block_elements` similarities at a time."""
    k = min(k, gallery.shape[0])
    gallery = gallery.to(queries.device)
    rows = block_rows(gallery.shape[0], block_elements)
    # One similarity buffer for every block: a new block-sized matrix each time (16 MiB) left the C heap
    # fragmented, and a 30k x 30k ranking peaked anywhere between 0.26 and 1.95 GB from run to run.
    scores = torch.empty(min(rows, queries.shape[0]), gallery.shape[0], device=queries.device,
                         dtype=torch.result_type(queries, gallery))
    out = []
    for start in range(0, queries.shape[0], rows):
        block = queries[start:start + rows]
        out.append(topk_lowest_index(torch.mm(block, gallery.t(), out=scores[:block.shape[0]]), k))
    return torch.cat(out) if out else torch.zeros(0, k, dtype=torch.long, device=queries.device)


def recall_at(topk: torch.Tensor, positives: list[set[int]]) -> dict[str, float]:
    """Percent of queries with at least one positive in their top k, for k in 1/5/10; queries
    without positives are left out (they cannot be scored)."""
    queries, targets = _positive_pairs(positives)
    scored = torch.bincount(queries, minlength=topk.shape[0]).to(topk.device) > 0
    return _recall(_hits(topk, queries, targets), scored)


def _positive_pairs(positives: list[set[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(query, gallery row) of every positive pair, as two int64 tensors: 8 bytes a pair each."""
    queries, targets = array("q"), array("q")
    for query, rows in enumerate(positives):
        for row in rows:
            queries.append(query)
            targets.append(row)
    return int64_tensor(queries), int64_tensor(targets)


def _hits(topk: torch.Tensor, queries: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """hits[q, j]: whether topk[q, j] is a positive of query q, the positive pairs being (queries[p],
    targets[p]). One int64 key per pair and per top-k entry: no Python object per query."""
    queries, targets = queries.to(topk.device), targets.to(topk.device)  # computed where the ranking is
    width = 1 + max(int(topk.max()) if topk.numel() else 0, int(targets.max()) if targets.numel() else 0)
    found = topk + torch.arange(topk.shape[0], device=topk.device).unsqueeze(1) * width
    return torch.isin(found, queries * width + targets)


def _recall(hits: torch.Tensor, scored: torch.Tensor) -> dict[str, float]:
    """R@1/5/10 and their mean over the `scored` queries (a query hits at k if any of its first k does)."""
    count = int(scored.sum())
    result = {}
    for k in KS:
        found = int((hits[:, :k].any(1) & scored).sum())
        result[f"r{k}"] = 100.0 * found / count if count else 0.0
    result["mean_recall"] = sum(result[f"r{k}"] for k in KS) / len(KS)
    return result


@dataclass
class RetrievalResult:
    """Scores and rankings of one evaluation. The rankings stay tensors (ten int64 rows per query); the
    prediction rows Chinese-CLIP's tools read are made from them when asked for, a query at a time."""

    metrics: dict | None  # None when the split has no labels
    t2i: torch.Tensor  # per text: its top-k rows of the image gallery
    i2t: torch.Tensor  # per image: its top-k rows of the texts
    text_ids: list[int]
    image_ids: list[int]

    def iter_text_predictions(self) -> Iterator[dict]:
        for tid, row in zip(self.text_ids, _rows(self.t2i)):
            yield {"text_id": tid, "image_ids": [self.image_ids[j] for j in row]}

    def iter_image_predictions(self) -> Iterator[dict]:
        for iid, row in zip(self.image_ids, _rows(self.i2t)):
            yield {"image_id": iid, "text_ids": [self.text_ids[j] for j in row]}

    @property
    def text_predictions(self) -> list[dict]:
        return list(self.iter_text_predictions())

    @property
    def image_predictions(self) -> list[dict]:
        return list(self.iter_image_predictions())


def _rows(topk: torch.Tensor, block: int = 4096) -> Iterator[list[int]]:
    """The ranking's rows as lists, a block of rows brought to the host at a time."""
    for start in range(0, topk.shape[0], block):
        yield from topk[start:start + block].tolist()


def retrieve(text_emb: torch.Tensor, image_emb: torch.Tensor, text_ids: list[int], image_ids: list[int],
             text_positives: list[set[int]]) -> RetrievalResult:
    """Rank images per text and texts per image; score them when labels exist.

    text_positives[t] holds the rows of `image_emb` that match text t.
    """
    t2i = topk_indices(text_emb, image_emb, max(KS))
    i2t = topk_indices(image_emb, text_emb, max(KS))
    texts, images = _positive_pairs(text_positives)
    if not texts.numel():
        return RetrievalResult(None, t2i, i2t, text_ids, image_ids)
    scored_texts = torch.bincount(texts, minlength=len(text_ids)).to(t2i.device) > 0
    scored_images = torch.bincount(images, minlength=len(image_ids)).to(t2i.device) > 0
    t2i_metrics = _recall(_hits(t2i, texts, images), scored_texts)
    i2t_metrics = _recall(_hits(i2t, images, texts), scored_images)
    metrics = {
        "text_to_image": t2i_metrics,
        "image_to_text": i2t_metrics,
        # Chinese-CLIP's overall "MR": the mean of all six recalls.
        "mean_recall": (t2i_metrics["mean_recall"] + i2t_metrics["mean_recall"]) / 2,
        "num_texts": int(scored_texts.sum()),
        "num_images": int(scored_images.sum()),
    }
    return RetrievalResult(metrics, t2i, i2t, text_ids, image_ids)


def scorable_texts(split: Split, features, skips: SkipLog | None = None) -> list:
    """The split's texts that can be scored: unlabelled ones, or with at least one decodable image.

    A text whose every image is undecodable is left out of recall and counted in `skips`.
    """
    texts = []
    for t in split.texts:
        if not t.image_ids or any(i in features.row for i in t.image_ids):
            texts.append(t)
        elif skips is not None:
            skips.skip("text without a decodable image", f"{split.images.path} text_id {t.text_id}",
                       "left out of recall")
    return texts


def evaluate_split(clip, tokenizer, split: Split, features, runtime, context_length: int,
                   batch_size: int, skips: SkipLog | None = None) -> RetrievalResult:
    """Score one split against its cached image embeddings (undecodable images are left out)."""
    texts = scorable_texts(split, features, skips)
    tokens = tokenize(tokenizer, [t.text for t in texts], context_length, compact=True)  # widened per batch
    text_emb = embed_texts(clip, tokens, runtime, batch_size)
    image_emb = F.normalize(features.embeddings.to(text_emb.device).float(), dim=-1)
    positives = [{features.row[i] for i in t.image_ids if i in features.row} for t in texts]
    return retrieve(text_emb, image_emb, [t.text_id for t in texts], features.ids, positives)


def format_metrics(metrics: dict) -> str:
    lines = [f"{'':16}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'MR':>8}"]
    for name in ("text_to_image", "image_to_text"):
        m = metrics[name]
        lines.append(f"{name:16}{m['r1']:8.2f}{m['r5']:8.2f}{m['r10']:8.2f}{m['mean_recall']:8.2f}")
    lines.append(f"mean recall (all six): {metrics['mean_recall']:.2f}")
    if "zeroshot" in metrics:  # set by finetune when the recipe tracks zero-shot accuracy (cnclip.zeroshot)
        z = metrics["zeroshot"]
        lines.append(f"zero-shot top-1: {z['top1']:.2f}  top-5: {z['top5']:.2f}  "
                     f"({z['num_images']} images, {z['num_classes']} classes)")
    return "\n".join(lines)


def chinese_clip_result(m: dict) -> dict:
    """The result JSON shape of Chinese-CLIP's evaluation scripts (percentages)."""
    return {"success": True, "score": m["mean_recall"],
            "scoreJson": {"score": m["mean_recall"], "mean_recall": m["mean_recall"],
                          "r1": m["r1"], "r5": m["r5"], "r10": m["r10"]}}


def write_outputs(result: RetrievalResult, out_dir: Path, split: str) -> list[Path]:
    from .atomic import atomic_file, write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, rows in ((f"{split}_predictions.jsonl", result.iter_text_predictions()),
                       (f"{split}_image_predictions.jsonl", result.iter_image_predictions())):
        with atomic_file(out_dir / name, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        written.append(out_dir / name)
    if result.metrics is not None:
        for name, key in ((f"{split}_text_to_image_result.json", "text_to_image"),
                          (f"{split}_image_to_text_result.json", "image_to_text")):
            write_json(out_dir / name, chinese_clip_result(result.metrics[key]))
            written.append(out_dir / name)
        write_json(out_dir / f"{split}_metrics.json", result.metrics)
        written.append(out_dir / f"{split}_metrics.json")
    return written
