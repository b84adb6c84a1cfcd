"""A fine-tuned run as a model anyone can load (`export_run`, run by `cnclip export`).

OUT_DIR holds a complete transformers model (LoRA merged into the text tower, safetensors), the
tokenizer and image-processor files of the base model, the bare LoRA adapter in adapter/, and what
ModelScope reads (configuration.json and a README.md model card generated from the run's own
metrics). `ChineseCLIPModel.from_pretrained(OUT_DIR)` and `ChineseCLIPProcessor.from_pretrained(OUT_DIR)`
load it without cnclip. `cnclip export --upload` then publishes the directory (cnclip/modelscope_upload.py).

OUT_DIR is written under a temporary name and swapped in whole, so an interrupted export never
leaves a half-written model where a finished one is expected.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from .atomic import atomic_dir, write_json
from .checkpoint import stabilise_adapter_config
from .plots import copy_recall_plot, copy_wise_plot
from .model_card import CardInputs, base_model_id, configuration_json, read_run_metrics, render_card
from .models import encode_images, encode_texts, is_lora, merged_model
from . import original_format
from .errors import UsageError
from .modelscope_upload import folder_files
from .inference import RECIPE_FILE, is_run_dir, load_run, run_weights

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
# Weight layouts `cnclip export --format` writes: transformers (default), ModelScope's original CLIP
# layout (pipeline(Tasks.multi_modal_embedding)), a cn_clip .pt (cn_clip's load_from_name).
FORMATS = ("transformers", "modelscope", "cn_clip")
# The merged model must embed exactly like the trained (unmerged) one; fp32 merging is ~1e-7 off.
MERGE_TOLERANCE = 1e-4
PROBE_TEXTS = ("一张照片", "图片中间有一个红色的圆形")


def check_run_dir_to_export(run_dir: Path) -> None:
    """Every export format starts from a run directory (its recipe names the base and the data)."""
    if not is_run_dir(run_dir):
        raise UsageError(f"{run_dir} is not a cnclip run directory (no {RECIPE_FILE}); pass the run_dir "
                         "that python -m cnclip.finetune wrote")


def check_out_dir(out_dir: Path) -> None:
    """OUT_DIR is replaced whole: refuse anything that is not empty or an earlier export."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--to {out_dir} is a file; expected a directory to write the model into")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        earlier_export = (out_dir / "configuration.json").is_file() and (
            (out_dir / ADAPTER_DIR).is_dir() or (out_dir / "config.json").is_file()
            or (out_dir / "image" / "open_clip_config.json").is_file()
            or (out_dir / original_format.VISION_CONFIG).is_file() or any(out_dir.glob("*.pt")))
        if not earlier_export:
            raise UsageError(f"--to {out_dir} exists and is not an earlier cnclip export; it would be replaced "
                             "whole, so choose a new or empty directory")


@torch.no_grad()
def probe_embeddings(clip, tokenizer, image_size: int, context_length: int) -> torch.Tensor:
    """Text and image embeddings of fixed inputs: compared before and after merging the LoRA."""
    tokens = tokenizer(list(PROBE_TEXTS), padding=True, truncation=True, max_length=context_length,
                       return_tensors="pt")
    pixels = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    text = encode_texts(clip, tokens["input_ids"], tokens["attention_mask"], tokens.get("token_type_ids"))
    return torch.cat([text, encode_images(clip, pixels)]).float()


def save_tokenizer(tokenizer, out_dir: Path, context_length: int | None = None) -> None:
    """The tokenizer files transformers writes, plus a BERT vocab.txt for older readers (transformers 4
    slow tokenizer, ModelScope tooling) that transformers 5's fast-only save leaves out.

    Saved clean: a fast tokenizer remembers the truncation and padding of its last call (training's
    fixed-length batches) in tokenizer.json, which would silently cut or pad every user's text. None
    is stored; `model_max_length` is the context length the model was trained with, so
    `truncation=True` cuts there.
    """
    import copy

    tokenizer = copy.deepcopy(tokenizer)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        backend.no_truncation()
        backend.no_padding()
    if context_length is not None:
        tokenizer.model_max_length = context_length
    tokenizer.save_pretrained(str(out_dir))
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    for loader_only in ("is_local", "local_files_only"):  # how this copy was loaded, not a tokenizer setting
        config.pop(loader_only, None)
    write_json(config_path, config)
    vocab = tokenizer.get_vocab()
    if not (out_dir / "vocab.txt").exists() and sorted(vocab.values()) == list(range(len(vocab))):
        by_id = sorted(vocab, key=vocab.get)
        (out_dir / "vocab.txt").write_text("\n".join(by_id) + "\n", encoding="utf-8")


def readable_by_umask(folder: Path) -> None:
    """safetensors writes its files 0600; give every file the permissions the user's umask allows."""
    umask = os.umask(0)
    os.umask(umask)
    for p in folder.rglob("*"):
        if p.is_file():
            p.chmod(0o666 & ~umask)


def save_image_processor(base_path: str, out_dir: Path, config: dict | None = None) -> None:
    """The base checkpoint's preprocessor_config.json, as it was (or `config`, for a base converted from
    the original format, which has none).

    Copying the settings (not saving a processor object) keeps image_processor_type the portable
    `ChineseCLIPImageProcessor`: transformers 5 resolves it to the torchvision processor when torchvision
    is installed and to the PIL one otherwise, and transformers 4 has only that class.
    """
    from transformers.image_processing_base import ImageProcessingMixin

    cfg = config if config is not None else ImageProcessingMixin.get_image_processor_dict(base_path)[0]
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    cfg.setdefault("image_processor_type", "ChineseCLIPImageProcessor")
    write_json(out_dir / "preprocessor_config.json", cfg)


def export_run(run_dir: str | Path, out_dir: str | Path, *, repo_id: str | None = None, dataset: str | None = None,
               license: str = "apache-2.0", format: str = "transformers", alpha: float | None = None) -> dict:
    """Write the model directory in `format` (FORMATS); returns a JSON-able report (files, merge check, metrics).

    The weights are best/'s: for a run with train.wise, at the WiSE-FT alpha the run picked; `alpha` exports
    the model at that alpha instead (`inference.load_run`)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if format not in FORMATS:
        raise UsageError(f"--format {format!r}: accepted: {', '.join(FORMATS)}")
    check_run_dir_to_export(run_dir)
    check_out_dir(out_dir)
    weights = run_weights(run_dir, "best")
    from_best = weights.parent.name == "best"
    checkpoint = "best checkpoint (best/)" if from_best else f"latest checkpoint ({weights.parent.name}; no best/ yet)"
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise UsageError(f"--alpha must be in [0, 1] (0 = the base model, 1 = fine-tuned), got {alpha}")
    open_clip_image = open_clip_image_of(run_dir, format)
    metrics = read_run_metrics(run_dir, from_best)
    wise_card = wise_card_inputs(run_dir, alpha, from_best)
    if alpha is not None:  # the recorded metrics are the picked alpha's: use the sweep's row for this one
        metrics = metrics_at_alpha(metrics, wise_card, alpha)
    saved_recipe = yaml.safe_load((run_dir / RECIPE_FILE).read_text(encoding="utf-8"))  # the card shows it as run

    log.info("loading %s from %s%s", checkpoint, run_dir, "" if alpha is None else f" at WiSE-FT alpha {alpha:g}")
    peft_model, base, recipe = load_run(run_dir, alpha=alpha)

    with atomic_dir(out_dir) as tmp:
        # An open_clip run's adapter would need a base that is not a transformers model: its folders carry
        # the merged towers only.
        if is_lora(peft_model) and format == "transformers" and open_clip_image is None:
            save_adapter(peft_model, tmp, recipe)
        merged, diff = merge_and_check(peft_model, base, recipe)
        original = open_clip = None
        if open_clip_image is not None:
            open_clip = write_open_clip_folders(merged, base.tokenizer, tmp, recipe.data.context_length)
        elif format == "transformers":
            merged.save_pretrained(str(tmp))
            save_tokenizer(base.tokenizer, tmp, recipe.data.context_length)
            save_image_processor(base.path, tmp, base.processor_config)
        else:
            original = write_original(merged, base, tmp, format, run_dir)
        write_json(tmp / "configuration.json", configuration_json())
        recall_plot = copy_recall_plot(run_dir, tmp)  # the card shows RUN/plots/recall.png
        if wise_card is not None:  # and RUN/plots/wise.png
            wise_card["plot"] = copy_wise_plot(run_dir, tmp)
        card = CardInputs(
            title=repo_id or out_dir.resolve().name, repo_id=repo_id, recipe=saved_recipe, metrics=metrics,
            dataset=dataset or Path(recipe.data.root).resolve().name, license=license, checkpoint=checkpoint,
            format=format, original=original, recall_plot=recall_plot, wise=wise_card, open_clip=open_clip)
        (tmp / "README.md").write_text(render_card(card), encoding="utf-8")
        readable_by_umask(tmp)

    files = folder_files(out_dir)
    valid = metrics.valid if metrics else None
    return {
        "run_dir": str(run_dir), "out_dir": str(out_dir), "checkpoint": str(weights.parent), "format": format,
        "merge_max_abs_diff": diff,
        "open_clip": open_clip,
        "wise_alpha": None if wise_card is None else wise_card["alpha"],
        "preprocess_warning": preprocess_warning(base, format),
        "metrics": {"split": metrics.split, "epoch": metrics.epoch, "mean_recall": valid["mean_recall"]}
        if valid else None,
        "files": [{"path": f.path, "size": f.size} for f in files],
        "total_bytes": sum(f.size for f in files),
    }


def write_open_clip_folders(merged, tokenizer, tmp: Path, context_length: int) -> dict:
    """image/ for open_clip and text/ for transformers (cnclip.open_clip_export), checked by loading them back."""
    from .open_clip_export import IMAGE_DIR, TEXT_DIR, check_round_trip, save_image_side, save_text_side

    save_image_side(merged, tmp / IMAGE_DIR)
    save_text_side(merged, tmp / TEXT_DIR)
    save_tokenizer(tokenizer, tmp / TEXT_DIR, context_length)
    return check_round_trip(merged, tokenizer, tmp, context_length, list(PROBE_TEXTS))


def open_clip_image_of(run_dir: Path, format: str) -> str | None:
    """The open_clip image reference a run was composed on (cnclip.open_clip_export writes it as open_clip +
    transformers folders), or None; such a run has no other export format, refused here before any loading."""
    from .open_clip_reference import is_open_clip_reference

    recipe = yaml.safe_load((run_dir / RECIPE_FILE).read_text(encoding="utf-8")) or {}
    image = str(((recipe.get("model") or {}).get("compose") or {}).get("image") or "")
    if not is_open_clip_reference(image):
        return None
    if format != "transformers":
        raise UsageError(f"--format {format}: {run_dir} is composed on the open_clip image tower {image}, which only "
                         "the default format exports (image/ for open_clip, text/ for transformers); the "
                         "modelscope, cn_clip and onnx layouts hold Chinese-CLIP ViTs only")
    return image


def wise_card_inputs(run_dir: Path, alpha: float | None, from_best: bool) -> dict | None:
    """What the card says about WiSE-FT (model_card.CardInputs.wise): the run's sweep and the exported alpha;
    None for a run without one (and no --alpha), or when the weights are not best/'s."""
    from .wise import WISE_FILE

    path = run_dir / WISE_FILE
    record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() and from_best else None
    if record is None and alpha is None:
        return None
    picked = record["picked_alpha"] if record else None
    return {"alpha": picked if alpha is None else alpha, "picked": alpha is None,
            "picked_alpha": picked,
            "rule_text": record["rule_text"] if record else "none (the run had no train.wise)",
            "table": record["metrics"] if record else [], "plot": None}


def metrics_at_alpha(metrics, wise_card: dict, alpha: float):
    """The card's metrics for weights exported at `alpha`: the sweep's row for it, else none recorded."""
    from dataclasses import replace

    rows = [r["valid"] for r in wise_card["table"] if r["alpha"] == alpha]
    if metrics is None or not rows:
        return None
    return replace(metrics, valid=rows[0])


def merge_and_check(peft_model, base, recipe) -> tuple[torch.nn.Module, float]:
    """The plain model of a trained one (LoRA merged in; a full text-tuning run is its model already) and the
    max abs difference of probe embeddings before and after; raises if merging changed what the model embeds."""
    image_size = base.clip.config.vision_config.image_size
    before = probe_embeddings(base.clip, base.tokenizer, image_size, recipe.data.context_length)  # LoRA injected
    merged = merged_model(peft_model)
    after = probe_embeddings(merged, base.tokenizer, image_size, recipe.data.context_length)
    diff = (after - before).abs().max().item()
    if diff > MERGE_TOLERANCE * max(1.0, before.abs().max().item()):
        raise RuntimeError(f"merged model embeds differently from the trained one (max abs diff {diff:.2e}); "
                           "not exporting")
    return merged, diff


@dataclass
class MergedRun:
    clip: torch.nn.Module  # the run's ChineseCLIPModel, LoRA merged in
    base: object  # cnclip.models.BaseModel: tokenizer, preprocess, path of the base
    recipe: object
    checkpoint: Path  # the checkpoint directory the weights came from
    merge_max_abs_diff: float


def merge_checked(run_dir: Path) -> MergedRun:
    """A run's best (else latest) checkpoint as the merged model every export format writes
    (`cnclip export --format onnx` uses it; export_run merges inline, after saving the adapter)."""
    checkpoint = run_weights(run_dir, "best").parent
    log.info("loading %s from %s", checkpoint.name, run_dir)
    peft_model, base, recipe = load_run(run_dir)
    merged, diff = merge_and_check(peft_model, base, recipe)
    return MergedRun(merged, base, recipe, checkpoint, diff)


def save_adapter(peft_model, tmp: Path, recipe) -> None:
    """The bare LoRA adapter in ADAPTER_DIR; first, since merging removes the LoRA layers it is read from."""
    peft_model.save_pretrained(str(tmp / ADAPTER_DIR))
    (tmp / ADAPTER_DIR / "README.md").unlink(missing_ok=True)  # peft's empty template; the card covers it
    # peft records the base's load path; a local path means nothing elsewhere (and may name a home dir)
    stabilise_adapter_config(tmp / ADAPTER_DIR / "adapter_config.json",
                             base_model_name_or_path=recipe.model.base if base_model_id(recipe.model.base) else None)


def write_original(clip, base, tmp: Path, format: str, run_dir: Path) -> dict:
    """The merged model in ModelScope's or cn_clip's original layout; returns what the card shows."""
    if format == "modelscope":
        info = original_format.save_modelscope(clip, base.tokenizer, tmp)
        return {"info": info}
    info = original_format.model_info_of(clip.config)
    name = f"{run_dir.resolve().name}.pt"
    original_format.save_cn_clip(clip, tmp / name, name=run_dir.resolve().name)
    original_format.write_vocab(base.tokenizer, tmp)
    return {"file": name, "info": info, "resolution": info["image_resolution"],
            **original_format.cn_clip_model_names(info)}


def preprocess_warning(base, format: str) -> str | None:
    """Set when the original layouts' fixed image transform differs from the one the run trained with."""
    if format == "transformers":
        return None
    size = base.clip.config.vision_config.image_size
    reference = original_format.preprocess_dict(size)
    p = base.preprocess
    same = (p.shortest_edge is None and (p.resize_height, p.resize_width) == (size, size)
            and (not p.do_center_crop or (p.crop_height, p.crop_width) == (size, size)) and p.resample == 3
            and all(abs(x - y) < 1e-6 for x, y in zip((*p.mean, *p.std), reference["image_mean"] + reference["image_std"])))
    if same:
        return None
    message = (f"the run's image preprocessing ({p.to_dict()}) differs from the fixed transform the {format} "
               "layout is served with (square bicubic resize, OpenAI mean/std): image embeddings there will "
               "differ slightly from the run's")
    log.warning(message)
    return message
