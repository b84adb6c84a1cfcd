"""Zero-shot classification with Chinese prompt templates, and zero-shot tracking during fine-tuning.

    python -m cnclip.zeroshot --model RUN_OR_MODEL --classes classes.txt --images DIR [--templates FILE]
                              [--single-template] [--compare-base] [--out DIR] [--predict IMG ...]
    python -m cnclip.zeroshot recipes/zeroshot.yaml [--flag ...]      (flags override the file)

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
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import sys
import unicodedata
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .data import DataError, ImageTransform, SkipLog, tokenize
from .images import decode_rgb
from .evaluate import embed_texts
from .features import default_cache_dir, split_image_features
from .io import atomic_file, write_json
from .models import MAX_LOGIT_SCALE, encode_images, image_tower_fingerprint, text_tower_fingerprint
from .prompts import ClassList, build_prompts, load_classes, load_templates
from .recipe import Recipe, RecipeError, _build, load_recipe

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
TOP_K = 5
CLASS_CACHE_VERSION = 1


# ---------------------------------------------------------------- the math (pure, on embeddings)


def ensemble(text_emb: torch.Tensor, owners: Sequence[int], num_classes: int) -> torch.Tensor:
    """One embedding per class: normalise each prompt's embedding, average per class, renormalise."""
    emb = F.normalize(text_emb.float(), dim=-1)
    owner = torch.as_tensor(list(owners), dtype=torch.long)
    counts = torch.bincount(owner, minlength=num_classes)
    if (counts == 0).any():
        raise ValueError(f"classes without prompts: {torch.nonzero(counts == 0).flatten().tolist()}")
    sums = torch.zeros(num_classes, emb.shape[1]).index_add_(0, owner, emb)
    return F.normalize(sums / counts[:, None], dim=-1)


def similarities(image_emb: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every image to every class (class embeddings are already unit length)."""
    return F.normalize(image_emb.float(), dim=-1) @ class_emb.float().t()


def probabilities(sims: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """Class probabilities as CLIP computes them: softmax over the model's scaled cosine logits."""
    return (sims * logit_scale).softmax(dim=-1)


def score(sims: torch.Tensor, labels: torch.Tensor, keys: Sequence[str], k: int = TOP_K) -> dict:
    """Top-1 / top-k accuracy (percent), per-class accuracy and the confusion matrix.

    The top-k entry is named for the k asked ("top5") and uses min(k, number of classes), recorded
    as "top_k_used". The confusion matrix has one row per true class and one column per predicted
    class, over every class of the list (rows of classes without images are all 0).
    """
    n, num_classes = sims.shape
    k_used = min(k, num_classes)
    top = sims.topk(k_used, dim=1).indices
    predicted = top[:, 0]
    hit1 = predicted == labels
    hitk = (top == labels[:, None]).any(dim=1)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((labels, predicted), torch.ones(n, dtype=torch.long), accumulate=True)
    per_class = {}
    for c, key in enumerate(keys):
        mine = labels == c
        count = int(mine.sum())
        if count:
            per_class[key] = {"images": count, "top1": 100.0 * int(hit1[mine].sum()) / count,
                              f"top{k}": 100.0 * int(hitk[mine].sum()) / count}
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
    precision are unchanged.
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
            return load_safetensors(path.read_bytes())["embeddings"]
    log.info("embedding %d prompts (%d classes, %d names, %d templates)", len(texts), len(classes),
             sum(map(len, classes.names)), len(templates))
    tokens = tokenize(tokenizer, texts, context_length)
    emb = ensemble(embed_texts(clip, tokens, runtime, batch_size, progress=True), owners, len(classes))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, "wb") as fh:
            fh.write(save_safetensors({"embeddings": emb.contiguous()}))
    return emb


def logit_scale_of(clip) -> float:
    return min(clip.logit_scale.detach().exp().item(), MAX_LOGIT_SCALE)


# ---------------------------------------------------------------- image folders


class ImageFolder:
    """DIR/<class_key>/*.jpg|png|...: one sub-folder per class, named by its key in the class list.

    Speaks ImageTSV's interface (ids, read -> base64 payload, path, fingerprint), so the on-disk
    embedding cache and its DataLoader workers serve a folder exactly as they serve a TSV split.
    Anything that is not an image of a known class is counted in the SkipLog or is an error.
    """

    def __init__(self, root: str | Path, classes: ClassList, skips: SkipLog):
        self.path = Path(root)
        if not self.path.is_dir():
            raise DataError(f"image folder not found: {self.path}")
        index = classes.index()
        files: list[Path] = []
        labels: list[int] = []
        for entry in sorted(self.path.iterdir()):
            if entry.name.startswith("."):
                skips.skip("hidden entry", str(entry))
            elif not entry.is_dir():
                skips.skip("file outside a class folder", str(entry), "images go in DIR/<class_key>/")
            elif entry.name not in index:
                shown = ", ".join(classes.keys[:8]) + (", ..." if len(classes) > 8 else "")
                raise DataError(f"class folder {entry} has no entry in the class list {classes.path} "
                                f"(keys there: {shown}); add a line '{entry.name}: 名称' or remove the folder")
            else:
                found = self._images_of(entry, skips)
                if not found:
                    raise DataError(f"class folder {entry} has no images "
                                    f"({', '.join(sorted(IMAGE_EXTENSIONS))})")
                files.extend(found)
                labels.extend([index[entry.name]] * len(found))
        if not files:
            raise DataError(f"{self.path} has no class folders with images (expected DIR/<class_key>/*.jpg)")
        self.files, self.labels = files, labels
        self.ids = list(range(len(files)))
        self.fingerprint = self._fingerprint()

    @staticmethod
    def _images_of(folder: Path, skips: SkipLog) -> list[Path]:
        found = []
        for f in sorted(folder.iterdir()):
            if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_EXTENSIONS:
                found.append(f)
            else:
                skips.skip("not an image file", str(f), "folder" if f.is_dir() else f"suffix {f.suffix or 'none'}")
        return found

    def _fingerprint(self) -> str:
        """Content hash of every image and its class folder: any change makes a new cache entry."""
        h = hashlib.blake2b(digest_size=16)
        for f in self.files:
            h.update(str(f.relative_to(self.path)).encode())
            h.update(b"\0")
            try:
                h.update(f.read_bytes())
            except OSError:
                h.update(b"<unreadable>")
        return h.hexdigest()

    def __len__(self) -> int:
        return len(self.files)

    def read(self, i: int) -> bytes:
        try:
            return base64.urlsafe_b64encode(self.files[i].read_bytes())
        except OSError as exc:
            raise ValueError(f"unreadable file: {exc}") from None


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
    tower) computed, so each call costs one text pass over the prompts.
    """

    def __init__(self, tokens: dict, owners: list[int], classes: ClassList, images: FolderEmbeddings, runtime,
                 batch_size: int):
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


# ---------------------------------------------------------------- command line


@dataclass
class ZeroShotRun:
    """The keys of recipes/zeroshot.yaml; each is also a command-line flag (a flag wins over the file)."""

    # A run directory of cnclip.finetune, or a model directory / hub id.
    model: str = ""
    # Which checkpoint of a run directory: best or last.
    checkpoint: str = "best"
    # Class list (key: 名称1, 名称2); default: the run's zeroshot.classes.
    classes: str = ""
    # DIR/<class_key>/*.jpg to score; default: the run's zeroshot.images.
    images: str = ""
    # Templates file; default: the run's zeroshot.templates, else recipes/zeroshot_templates.txt.
    templates: str = ""
    # Only the first template (一张{}的照片) instead of the ensemble.
    single_template: bool = False
    # Score the run's base model too, side by side.
    compare_base: bool = False
    # Images to label one by one (top-k classes with probabilities).
    predict: list[str] = field(default_factory=list)
    top_k: int = TOP_K
    # Output folder; default RUN/zeroshot for a run, ./zeroshot otherwise.
    out: str = ""
    # Embedding caches; default: the run's cache.dir, else ~/.cache/cnclip.
    cache_dir: str = ""
    batch_size: int = 64
    # Tokens per prompt; default: the run's data.context_length, else 52.
    context_length: int = 0
    device: str = "auto"
    workers: int = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cnclip.zeroshot",
        description="Zero-shot image classification with Chinese prompt templates (prompt ensembling on by "
                    "default): accuracy, per-class accuracy and confusion matrix for a folder of class "
                    "sub-folders, or top-k labels for single images.",
        epilog="examples:\n  python -m cnclip.zeroshot --model runs/demo --compare-base\n"
               "  python -m cnclip.zeroshot --model OFA-Sys/chinese-clip-vit-base-patch16 "
               "--classes recipes/cifar10_classes.txt --images data/cifar10/test\n"
               "  python -m cnclip.zeroshot recipes/zeroshot.yaml --predict cat.jpg",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", nargs="?", help="optional YAML file with the keys below (see recipes/zeroshot.yaml)")
    p.add_argument("--model", help="run directory (its best checkpoint), or model directory / hub id")
    p.add_argument("--checkpoint", choices=("best", "last"))
    p.add_argument("--classes", help="class list: lines 'key: 名称1, 名称2' (key = image sub-folder name)")
    p.add_argument("--images", help="folder with one sub-folder of images per class key")
    p.add_argument("--templates", help="templates file, one per line with {} (default recipes/zeroshot_templates.txt)")
    p.add_argument("--single-template", action=argparse.BooleanOptionalAction, default=None,
                   help="use only the first template instead of the ensemble")
    p.add_argument("--compare-base", action=argparse.BooleanOptionalAction, default=None,
                   help="score the run's base model too and print both side by side")
    p.add_argument("--predict", nargs="+", metavar="IMG", help="label these images (top-k with probabilities)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--out", help="output folder (default RUN/zeroshot, or ./zeroshot)")
    p.add_argument("--cache-dir", help="embedding cache folder (default: the run's cache.dir, or ~/.cache/cnclip)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--context-length", type=int)
    p.add_argument("--device")
    p.add_argument("--workers", type=int, help="image decoding worker processes")
    return p


def load_run_config(args: argparse.Namespace) -> ZeroShotRun:
    """The YAML file (if any), then every flag given on the command line, validated."""
    import yaml

    raw: dict = {}
    if args.recipe:
        path = Path(args.recipe)
        if not path.is_file():
            raise RecipeError(f"zero-shot recipe not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise RecipeError(f"{path}: not valid YAML ({exc})") from None
    for f in fields(ZeroShotRun):
        value = getattr(args, f.name, None)
        if value is not None:
            raw[f.name] = value
    cfg = _build(ZeroShotRun, raw, "")
    if not cfg.model:
        raise RecipeError("no model: pass --model RUN_OR_MODEL_DIR (or 'model:' in the recipe)")
    if cfg.checkpoint not in ("best", "last"):
        raise RecipeError(f"recipe key 'checkpoint': got {cfg.checkpoint!r}, accepted: best, last")
    for key in ("top_k", "batch_size"):
        if getattr(cfg, key) < 1:
            raise RecipeError(f"recipe key '{key}' must be >= 1, got {getattr(cfg, key)}")
    if cfg.workers < 0 or cfg.context_length < 0:
        raise RecipeError("recipe keys 'workers' and 'context_length' must be >= 0")
    return cfg


def _fill_from_run(cfg: ZeroShotRun) -> Recipe | None:
    """Defaults from a run directory's recipe: its zero-shot folder, class list, templates, cache."""
    from .trained import RECIPE_FILE, is_run_dir

    if not is_run_dir(cfg.model):
        return None
    recipe = load_recipe(Path(cfg.model) / RECIPE_FILE, check_data=False)
    z = recipe.zeroshot
    cfg.classes = cfg.classes or z.classes
    cfg.images = cfg.images or (z.images if not cfg.predict else "")
    cfg.templates = cfg.templates or z.templates
    cfg.cache_dir = cfg.cache_dir or recipe.cache.dir
    cfg.context_length = cfg.context_length or recipe.data.context_length
    return recipe


@dataclass
class ModelResult:
    name: str
    metrics: dict | None
    sims: torch.Tensor | None
    logit_scale: float


def _score_model(name: str, clip, tokenizer, preprocess, cfg: ZeroShotRun, templates, classes, folder,
                 runtime, skips: SkipLog) -> tuple[ModelResult, torch.Tensor, FolderEmbeddings | None]:
    clip = clip.to(runtime.device).eval()
    class_emb = class_embeddings(clip, tokenizer, templates, classes, runtime, cfg.context_length, cfg.batch_size,
                                 class_cache_dir(cfg.cache_dir or None))
    metrics = sims = images = None
    if folder is not None:
        images = folder_embeddings(folder, clip, ImageTransform(preprocess), runtime, cfg.cache_dir or None,
                                   cfg.batch_size, cfg.workers, skips)
        sims = similarities(images.embeddings, class_emb)
        metrics = score(sims, images.labels, classes.keys)
    return ModelResult(name, metrics, sims, logit_scale_of(clip)), class_emb, images


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
            emb = encode_images(clip, transform([image]).to(runtime.device)).float().cpu()
        probs = probabilities(similarities(emb, class_emb), scale)[0]
        values, idx = probs.topk(min(top_k, len(classes)))
        out.append({"image": str(path), "top": [{"key": classes.keys[i], "name": classes.names[i][0],
                                                 "probability": v} for v, i in zip(values.tolist(), idx.tolist())]})
    return out


# ---------------------------------------------------------------- printouts


def _width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _pad(text: str, width: int, right: bool = False) -> str:
    fill = " " * max(0, width - _width(text))
    return fill + text if right else text + fill


def _table(rows: list[list[str]], left: tuple[int, ...] = (0,)) -> str:
    """Columns sized by display width (Chinese characters take two cells); numbers right-aligned."""
    widths = [max(_width(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(_pad(cell, widths[c], right=c not in left) for c, cell in enumerate(r)).rstrip()
                     for r in rows)


def _most_confused(metrics: dict, c: int) -> str:
    row = list(metrics["confusion"]["matrix"][c])
    row[c] = 0
    worst = max(range(len(row)), key=row.__getitem__)
    return f"{metrics['confusion']['labels'][worst]} ({row[worst]})" if row[worst] else "-"


def format_report(results: list[ModelResult], classes: ClassList, max_matrix: int = 12) -> str:
    """Accuracy table (models side by side, with the change when there are two), per class, confusion."""
    top_k = f"top{TOP_K}"
    lines = []
    rows = [["", "top-1", f"top-{TOP_K}"]]
    rows += [[r.name, f"{r.metrics['top1']:.2f}", f"{r.metrics[top_k]:.2f}"] for r in results]
    if len(results) == 2:
        a, b = results[0].metrics, results[1].metrics
        rows.append(["change", f"{b['top1'] - a['top1']:+.2f}", f"{b[top_k] - a[top_k]:+.2f}"])
    lines += [_table(rows), ""]

    last = results[-1].metrics
    header = ["class", "images"] + [f"top-1 {r.name}" for r in results] + ["most often taken for"]
    rows = [header]
    for c, key in enumerate(classes.keys):
        if key not in last["per_class"]:
            continue
        rows.append([classes.label(c), str(last["per_class"][key]["images"])]
                    + [f"{r.metrics['per_class'][key]['top1']:.2f}" for r in results] + [_most_confused(last, c)])
    lines += ["per class:", _table(rows, left=(0, len(header) - 1)), ""]

    matrix = last["confusion"]["matrix"]
    if len(classes) <= max_matrix:
        rows = [["true \\ predicted"] + list(classes.keys)]
        rows += [[key] + [str(v) for v in matrix[c]] for c, key in enumerate(classes.keys) if key in last["per_class"]]
        lines += [f"confusion matrix ({results[-1].name}; rows: true class, columns: predicted):", _table(rows)]
    else:
        pairs = sorted(((matrix[t][p], t, p) for t in range(len(matrix)) for p in range(len(matrix)) if t != p),
                       reverse=True)[:10]
        rows = [["true", "predicted", "images"]] + [[classes.keys[t], classes.keys[p], str(n)] for n, t, p in pairs if n]
        lines += [f"most frequent confusions ({results[-1].name}; full matrix in the JSON):", _table(rows, (0, 1))]
    return "\n".join(lines)


def format_predictions(predictions: list[dict], classes: ClassList) -> str:
    index = classes.index()
    lines = []
    for p in predictions:
        lines.append(p["image"])
        if "error" in p:
            lines.append(f"  skipped: {p['error']}")
            continue
        for t in p["top"]:
            lines.append(f"  {t['probability']:7.4f}  {classes.label(index[t['key']])}")
    return "\n".join(lines)


# ---------------------------------------------------------------- the command


def run(cfg: ZeroShotRun) -> dict:
    from .device import pick_runtime
    from .models import load_base_model
    from .trained import load_for_inference

    recipe = _fill_from_run(cfg)
    if not cfg.classes:
        raise RecipeError("no class list: pass --classes classes.txt (lines 'key: 名称1, 名称2')")
    if not cfg.images and not cfg.predict:
        raise RecipeError("nothing to classify: pass --images DIR (one sub-folder per class) and/or --predict IMG ...")
    if cfg.compare_base and not cfg.images:
        raise RecipeError("--compare-base compares accuracy on an image folder: pass --images DIR as well")
    if cfg.compare_base and recipe is None:
        raise RecipeError(f"--compare-base needs a run directory (its recipe names the base model); "
                          f"{cfg.model} is a model directory")
    cfg.context_length = cfg.context_length or 52

    # Every input is read and checked before any model is loaded.
    skips = SkipLog()
    classes = load_classes(cfg.classes)
    templates = load_templates(cfg.templates or None, single=cfg.single_template)
    folder = ImageFolder(cfg.images, classes, skips) if cfg.images else None

    runtime = pick_runtime(cfg.device, recipe.train.precision if recipe else "auto")
    results: list[ModelResult] = []
    if cfg.compare_base:
        base = load_base_model(recipe.model, recipe.seed)
        result, _, _ = _score_model("base", base.clip, base.tokenizer, base.preprocess, cfg, templates, classes,
                                    folder, runtime, SkipLog(max_examples=0))
        results.append(result)
        del base
    loaded = load_for_inference(cfg.model, checkpoint=cfg.checkpoint)
    name = "tuned" if recipe is not None else "model"
    result, class_emb, images = _score_model(name, loaded.clip, loaded.tokenizer, loaded.preprocess, cfg, templates,
                                             classes, folder, runtime, skips)
    results.append(result)

    out_dir = Path(cfg.out) if cfg.out else (Path(cfg.model) / "zeroshot" if recipe is not None else Path("zeroshot"))
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "model": cfg.model, "checkpoint": cfg.checkpoint if recipe is not None else None,
        "classes": str(classes.path), "images": str(folder.path) if folder else None,
        "templates": templates, "ensemble": len(templates) > 1,
        "results": {r.name: r.metrics for r in results if r.metrics is not None},
        "logit_scale": {r.name: r.logit_scale for r in results},
        "skipped": skips.summary(),
    }
    if folder is not None:
        header = (f"zero-shot classification: {cfg.model} on {folder.path}\n"
                  f"{len(images.files)} images, {len(classes)} classes ({classes.path}), "
                  + (f"{len(templates)} templates averaged" if len(templates) > 1 else f"one template {templates[0]}"))
        print(header)
        print(format_report(results, classes))
        with atomic_file(out_dir / "predictions.jsonl", "w", encoding="utf-8") as fh:
            top = result.sims.topk(min(TOP_K, len(classes)), dim=1).indices.tolist()
            for f, label, row in zip(images.files, images.labels.tolist(), top):
                fh.write(json.dumps({"image": str(f), "label": classes.keys[label],
                                     "top": [classes.keys[i] for i in row]}, ensure_ascii=False) + "\n")
    if cfg.predict:
        report["predictions"] = predict_images(cfg.predict, loaded.clip, loaded.preprocess, class_emb, classes,
                                               runtime, cfg.top_k, skips)
        print(format_predictions(report["predictions"], classes))
    report["skipped"] = skips.summary()
    if skips.total:
        print(f"skipped {skips.total} items: {dict(skips.counts)} (examples in {out_dir / 'zeroshot.json'})")
    write_json(out_dir / "zeroshot.json", report)
    print(f"wrote {out_dir / 'zeroshot.json'}")
    summary: dict = {r.name: {"top1": r.metrics["top1"], f"top{TOP_K}": r.metrics[f"top{TOP_K}"]}
                     for r in results if r.metrics is not None}
    if cfg.predict:
        summary["predictions"] = report["predictions"]
    print(json.dumps(summary, ensure_ascii=False))
    return report


def main(argv: list[str] | None = None) -> int:
    from .cli import run_cli

    args = build_parser().parse_args(argv)
    return run_cli(lambda: (run(load_run_config(args)), 0)[1])


if __name__ == "__main__":
    sys.exit(main())
