"""Zero-shot classification with Chinese prompt templates, and zero-shot tracking during fine-tuning.

Each class name is put into every template ("一张{}的照片"); the normalised text embeddings of all
prompts of a class are averaged and renormalised (CLIP's prompt ensembling), and each image goes to
the class whose embedding is nearest. The math lives in small pure functions (`ensemble`,
`similarities`, `score`, `probabilities`) so it can be checked on hand-made embeddings.

Caching: image embeddings of a folder go through the same on-disk cache as training images (the
image tower is locked, so base and tuned model, and every epoch, share them). Class embeddings are
cached on disk beside it (`<cache>/class_embeddings/`), keyed by the text tower's weights, the
tokenizer, the prompts and the precision: the text pass over classes x names x templates is the
expensive part for large class lists, and a user re-running on other images or with --predict
reuses it. During fine-tuning the text tower changes at every step, so the tracker recomputes
class embeddings in memory and writes nothing.

Device: class embeddings are returned on the model's device and the image embeddings are moved to
theirs, so similarities and top-k run there (images x classes: a matrix of the folder's size times
the class list's, never images x images). Top-k ties go to the lowest class index
(retrieval.topk_lowest_index), on every device.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .atomic import atomic_file
from .data import ImageTransform, tokenize
from .errors import DataError
from .image_cache import default_cache_dir, split_image_features
from .image_sources import ImageFolder
from .images import decode_rgb
from .models import MAX_LOGIT_SCALE, encode_images, image_tower_fingerprint, text_tower_fingerprint
from .prompts import ClassList, build_prompts, load_classes, load_templates
from .retrieval import embed_texts, topk_lowest_index
from .skiplog import SkipLog

log = logging.getLogger(__name__)

TOP_K = 5
CLASS_CACHE_VERSION = 1


# ---------------------------------------------------------------- the math (pure, on embeddings)


def ensemble(text_emb: torch.Tensor, owners: Sequence[int], num_classes: int) -> torch.Tensor:
    """One embedding per class: normalise each prompt's embedding, average per class, renormalise."""
    emb = F.normalize(text_emb.float(), dim=-1)
    owner = torch.as_tensor(list(owners), dtype=torch.long, device=emb.device)
    counts = torch.bincount(owner, minlength=num_classes)
    if (counts == 0).any():
        raise ValueError(f"classes without prompts: {torch.nonzero(counts == 0).flatten().tolist()}")
    sums = torch.zeros(num_classes, emb.shape[1], device=emb.device).index_add_(0, owner, emb)
    return F.normalize(sums / counts[:, None], dim=-1)


def similarities(image_emb: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every image to every class (class embeddings are already unit length),
    on the class embeddings' device."""
    return F.normalize(image_emb.to(class_emb.device).float(), dim=-1) @ class_emb.float().t()


def probabilities(sims: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """Class probabilities as CLIP computes them: softmax over the model's scaled cosine logits."""
    return (sims * logit_scale).softmax(dim=-1)


def score(sims: torch.Tensor, labels: torch.Tensor, keys: Sequence[str], k: int = TOP_K) -> dict:
    """Top-1 / top-k accuracy (percent), per-class accuracy and the confusion matrix.

    The top-k entry is named for the k asked ("top5") and uses min(k, number of classes), recorded
    as "top_k_used". The confusion matrix has one row per true class and one column per predicted
    class, over every class of the list (rows of classes without images are all 0). Runs on the
    similarities' device; equal similarities rank the lower class index first.
    """
    n, num_classes = sims.shape
    k_used = min(k, num_classes)
    labels = labels.to(sims.device)
    top = topk_lowest_index(sims, k_used)
    predicted = top[:, 0]
    hit1 = predicted == labels
    hitk = (top == labels[:, None]).any(dim=1)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=sims.device)
    confusion.index_put_((labels, predicted), torch.ones(n, dtype=torch.long, device=sims.device), accumulate=True)
    # Per-class counts in three bincounts (three device-to-host copies, not three per class; no
    # weights: a weighted bincount has no deterministic CUDA kernel).
    images, hits1, hitsk = (torch.bincount(labels[hit], minlength=num_classes).tolist()
                            for hit in (slice(None), hit1, hitk))
    per_class = {key: {"images": images[c], "top1": 100.0 * hits1[c] / images[c],
                       f"top{k}": 100.0 * hitsk[c] / images[c]}
                 for c, key in enumerate(keys) if images[c]}
    return {
        "num_images": n,
        "num_classes": num_classes,
        "top1": 100.0 * int(hit1.sum()) / n if n else 0.0,
        f"top{k}": 100.0 * int(hitk.sum()) / n if n else 0.0,
        "top_k_used": k_used,
        "per_class": per_class,
        "confusion": {"labels": list(keys), "matrix": confusion.tolist()},
    }


# ---------------------------------------------------------------- class embeddings


def _tokenizer_digest(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    blob = json.dumps([type(tokenizer).__name__, getattr(tokenizer, "do_lower_case", None), vocab],
                      ensure_ascii=False)
    return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()


def class_cache_dir(cache_dir: str | Path | None) -> Path:
    """Beside the image-embedding cache: `<cache>/class_embeddings`."""
    return (Path(cache_dir) if cache_dir else default_cache_dir().parent) / "class_embeddings"


@torch.no_grad()
def class_embeddings(clip, tokenizer, templates: list[str], classes: ClassList, runtime, context_length: int,
                     batch_size: int, cache_dir: Path | None = None) -> torch.Tensor:
    """Ensembled class embeddings from one batched text pass over classes x names x templates.

    With `cache_dir`, the result is stored there and reused while text tower, tokenizer, prompts and
    precision are unchanged. Returned on the runtime's device.
    """
    texts, owners = build_prompts(templates, classes)
    path = None
    if cache_dir is not None:
        blob = json.dumps({"v": CLASS_CACHE_VERSION, "text": text_tower_fingerprint(clip),
                           "tokenizer": _tokenizer_digest(tokenizer), "prompts": texts, "owners": owners,
                           "context_length": context_length, "precision": runtime.precision},
                          ensure_ascii=False, sort_keys=True)
        path = Path(cache_dir) / f"{hashlib.sha256(blob.encode()).hexdigest()[:32]}.safetensors"
        if path.is_file():
            log.info("class embeddings loaded from cache %s", path)
            return load_safetensors(path.read_bytes())["embeddings"].to(runtime.device)
    log.info("embedding %d prompts (%d classes, %d names, %d templates)", len(texts), len(classes),
             sum(map(len, classes.names)), len(templates))
    tokens = tokenize(tokenizer, texts, context_length)
    emb = ensemble(embed_texts(clip, tokens, runtime, batch_size, progress=True), owners, len(classes))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, "wb") as fh:
            fh.write(save_safetensors({"embeddings": emb.cpu().contiguous()}))
    return emb


def logit_scale_of(clip) -> float:
    return min(clip.logit_scale.detach().exp().item(), MAX_LOGIT_SCALE)


@dataclass
class FolderEmbeddings:
    embeddings: torch.Tensor  # unit length, one row per decodable image
    labels: torch.Tensor
    files: list[Path]


def folder_embeddings(folder: ImageFolder, clip, transform: ImageTransform, runtime, cache_dir: str | None,
                      batch_size: int, num_workers: int, skips: SkipLog) -> FolderEmbeddings:
    """Embeddings of a folder's images through the shared image cache; undecodable files are counted."""
    by_id = SkipLog(max_examples=0)  # the cache reports ids; the user gets file names below
    features = split_image_features(folder, clip, transform, image_tower_fingerprint(clip), runtime, cache_dir,
                                    batch_size, num_workers, by_id)
    for i, why in sorted(features.bad.items()):
        skips.skip("undecodable image", str(folder.files[i]), why)
    if not features.ids:
        raise DataError(f"{folder.path}: none of its {len(folder)} images could be decoded")
    return FolderEmbeddings(F.normalize(features.embeddings.float(), dim=-1),
                            torch.tensor([folder.labels[i] for i in features.ids], dtype=torch.long),
                            [folder.files[i] for i in features.ids])


# ---------------------------------------------------------------- tracking during fine-tuning


class ZeroShotTracker:
    """Zero-shot top-1/top-5 on a held-out folder, re-scored at every validation of a training run.

    Built once before training: the prompts are tokenised and the folder's image embeddings (locked
    tower) computed and put on the runtime's device, so each call costs one text pass over the prompts
    and the scoring runs there.
    """

    def __init__(self, tokens: dict, owners: list[int], classes: ClassList, images: FolderEmbeddings, runtime,
                 batch_size: int):
        images = FolderEmbeddings(images.embeddings.to(runtime.device), images.labels.to(runtime.device),
                                  images.files)
        self.tokens, self.owners, self.classes, self.images = tokens, owners, classes, images
        self.runtime, self.batch_size = runtime, batch_size

    @classmethod
    def from_recipe(cls, recipe, clip, tokenizer, transform: ImageTransform, runtime,
                    skips: SkipLog) -> "ZeroShotTracker | None":
        z = recipe.zeroshot
        if not z.images:
            return None
        if not recipe.data.valid_split:
            log.warning("zeroshot.images is set but data.valid_split is null: zero-shot accuracy is measured "
                        "with each validation, so this run does not track it")
            return None
        classes = load_classes(z.classes)
        templates = load_templates(z.templates or None)
        folder = ImageFolder(z.images, classes, skips)
        images = folder_embeddings(folder, clip, transform, runtime, recipe.cache.dir, recipe.cache.batch_size,
                                   recipe.data.num_workers, skips)
        texts, owners = build_prompts(templates, classes)
        log.info("zero-shot tracking: %d images in %s, %d classes, %d prompts", len(images.files), folder.path,
                 len(classes), len(texts))
        return cls(tokenize(tokenizer, texts, recipe.data.context_length), owners, classes, images, runtime,
                   recipe.eval.batch_size)

    @torch.no_grad()
    def score(self, clip) -> dict:
        """{"top1", "top5", "num_images", "num_classes"} for the model as it is now (call in eval mode)."""
        class_emb = ensemble(embed_texts(clip, self.tokens, self.runtime, self.batch_size), self.owners,
                             len(self.classes))
        result = score(similarities(self.images.embeddings, class_emb), self.images.labels, self.classes.keys)
        return {k: result[k] for k in ("top1", f"top{TOP_K}", "num_images", "num_classes")}


@torch.no_grad()
def predict_images(paths: list[str], clip, preprocess, class_emb: torch.Tensor, classes: ClassList, runtime,
                   top_k: int, skips: SkipLog) -> list[dict]:
    """Top-k classes with probabilities for each image; an undecodable one is counted, not fatal."""
    transform = ImageTransform(preprocess)
    scale = logit_scale_of(clip)
    out = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise DataError(f"--predict: image not found: {path}")
        try:
            image = decode_rgb(path.read_bytes())
        except ValueError as exc:
            skips.skip("undecodable image", str(path), str(exc))
            out.append({"image": str(path), "error": str(exc)})
            continue
        with runtime.autocast():
            emb = encode_images(clip, transform([image]).to(runtime.device)).float()
        probs = probabilities(similarities(emb, class_emb), scale)[0]
        values, idx = probs.topk(min(top_k, len(classes)))
        out.append({"image": str(path), "top": [{"key": classes.keys[i], "name": classes.names[i][0],
                                                 "probability": v} for v, i in zip(values.tolist(), idx.tolist())]})
    return out
