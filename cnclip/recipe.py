"""Typed recipes: YAML + ``key=value`` overrides -> validated dataclasses.

Every user mistake in a recipe (unknown key, wrong type, missing data) is reported here,
naming the key and what is accepted, before any model is loaded or any data is read.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .data_formats import FORMATS as DATA_FORMATS
from .errors import ConfigError, UsageError
from .model_reference import parse_model_reference
from .open_clip_reference import is_open_clip_reference, parse_open_clip_reference
from .typed_config import EMPTY, build_config, read_yaml_mapping


@dataclass
class ComposeConfig:
    # A CLIP-family checkpoint (CLIPModel, CLIPVisionModelWithProjection or ChineseCLIPModel; id or
    # directory): its vision tower, visual projection and image processor are copied exactly. Or an
    # open_clip tower, "open_clip:<architecture>@<tag or checkpoint file>", "open_clip:hf-hub:<org>/<repo>"
    # or "open_clip:local-dir:<dir>" (cnclip/open_clip_tower.py; needs the openclip extra).
    image: str = ""
    # A BERT-family Chinese encoder (id or directory): the text tower and the tokenizer.
    text: str = ""


@dataclass
class ModelConfig:
    # Local directory, Hugging Face id, or "modelscope:<id>": a transformers ChineseCLIPModel, or the
    # original Chinese-CLIP format (a cn_clip .pt file, or a ModelScope-layout directory / id),
    # converted on load (cnclip/original_format.py).
    base: str = "OFA-Sys/chinese-clip-vit-base-patch16"
    # Architecture of a cn_clip .pt (ViT-B-16, ViT-L-14, ViT-L-14-336, ViT-H-14); null = inferred from
    # the tensor shapes (attention heads as cn_clip's configs: 64-wide, 80 for ViT-H).
    arch: str | None = None
    # Build the model from an image tower and a Chinese BERT instead of `base` (the LiT recipe;
    # cnclip/compose.py): a new seeded text projection, logit scale 1/0.07.
    compose: ComposeConfig | None = None
    # "lora": LoRA on the text tower (+ the text projection); "full": the whole text tower is trained.
    # Either way the image tower is locked and its embeddings come from the cache.
    text_tuning: str = "lora"
    # Build random weights from the config at `base` instead of loading weights (demo, tests).
    random_init: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["query", "value"])
    train_text_projection: bool = True
    train_logit_scale: bool = True


@dataclass
class DataConfig:
    # Where the data is, in `format` (cnclip/data_formats.py): a directory for cnclip
    # ({split}_imgs.tsv + {split}_texts.jsonl), pairs ({split}_pairs.jsonl) and webdataset
    # ({split}-*.tar, or a folder {split}/ of *.tar as img2dataset writes); for hf a Hub id, a
    # save_to_disk directory, a directory of data files or one .parquet/.jsonl/.csv file.
    root: str = ""
    # cnclip | pairs | webdataset | hf
    format: str = "cnclip"
    # hf: the columns holding the image and the caption (or a list of captions).
    image_column: str = "image"
    text_column: str = "text"
    train_split: str = "train"
    # Split evaluated at each epoch end (best checkpoint = best mean recall); null = no validation.
    valid_split: str | None = "valid"
    # Tokens per caption, counting [CLS] and [SEP].
    context_length: int = 52
    # "demo": write the bundled synthetic data set into `root` when it is not there yet.
    generate: str | None = None
    # Worker processes decoding images for the embedding cache (0 = in the main process).
    num_workers: int = 2


@dataclass
class DistillConfig:
    # The teacher: null = the frozen base model (with LoRA, the same model with its adapter off: no
    # second copy); or any model reference model.base accepts, with the same tokenizer vocabulary.
    teacher: str | None = None
    # Weight of KL(teacher || student) over the in-batch image-text similarity distributions (> 0).
    weight: float = 1.0
    # null = each model's own logit scale for its distribution; or one fixed temperature for both (> 0).
    temperature: float | None = None


@dataclass
class WiseConfig:
    # WiSE-FT (cnclip/wise.py): after training, the best epoch's model is interpolated with the base at
    # each alpha (0 = base, 1 = fine-tuned), each is validated, and best/ (so evaluate, export and the
    # model card) uses the alpha `pick` chooses. Results: RUN/wise.json, RUN/plots/wise.png.
    alphas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    # best_retrieval: highest validation mean recall. balanced: highest validation mean recall among the
    # alphas whose zero-shot top-1 is at most max_zeroshot_drop points below alpha 0's (needs the
    # zeroshot section and alpha 0). Ties go to the smaller alpha.
    pick: str = "balanced"
    max_zeroshot_drop: float = 2.0


@dataclass
class TrainConfig:
    epochs: int = 3
    batch_size: int = 256
    lr: float = 2e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip: float = 1.0
    # "auto" = cuda when available, else cpu; or an explicit torch device string.
    device: str = "auto"
    # "auto" = bf16 autocast on CUDA with native bf16, fp16 autocast + loss scaler on older GPUs (T4, V100),
    # fp32 on CPU; or "fp32" / "bf16" / "fp16".
    precision: str = "auto"
    log_every: int = 10
    # Save a resumable checkpoint every N optimizer steps (and always at each epoch end).
    save_every: int = 200
    # Steps with a non-finite loss or gradient are skipped; more than this many stops the run.
    max_bad_steps: int = 10
    # Gradient caching (GradCache): run the text tower over the batch in chunks of this many
    # captions, so batch_size is bounded by embedding memory, not activations; 0 = off.
    grad_cache_chunk: int = 0
    # Recompute text-tower activations in backward instead of storing them (less memory, ~30% slower).
    gradient_checkpointing: bool = False
    # torch.compile the text tower (GPU speed-up after a warm-up compile; needs a C++ compiler on CPU).
    compile: bool = False
    # Run the text tower on the captions' real tokens only, skipping padding (same result, faster
    # on short uneven captions); off with compile, which needs the tower's own forward.
    packed_text: bool = True
    # torch's deterministic algorithms (torch.use_deterministic_algorithms; on CUDA also SDPA's math
    # kernel): bit-identical reruns and resumes on a GPU, somewhat slower. No effect on a CPU.
    deterministic: bool = False
    # Distillation towards a teacher ("learning without forgetting"); null = off (cnclip/distill.py).
    distill: DistillConfig | None = None
    # WiSE-FT after training (a mapping, {} for the defaults); null = off.
    wise: WiseConfig | None = None


@dataclass
class CacheConfig:
    # Where image embeddings of the locked image tower are kept; "" = ~/.cache/cnclip/image_features.
    dir: str = ""
    batch_size: int = 128
    # Images per cache file: the unit of resume when a run is killed while caching.
    part_size: int = 8192


@dataclass
class EvalConfig:
    batch_size: int = 256
    # Evaluate before training starts too (the demo prints before/after recall).
    before_training: bool = False


@dataclass
class ZeroShotConfig:
    # Held-out classification folder (DIR/<class_key>/*.jpg) scored zero-shot at every validation,
    # so forgetting shows while training; "" = off. Runs with validation (needs data.valid_split).
    images: str = ""
    # Class list for that folder: lines 'key: 名称1, 名称2' (see cnclip/prompts.py).
    classes: str = ""
    # Prompt templates file; "" = the shipped templates (cnclip/assets/zeroshot_templates.txt).
    templates: str = ""


@dataclass
class LoggingConfig:
    # Also log metrics to TensorBoard under RUN/tensorboard/ (needs pip install "cnclip[tensorboard]").
    # RUN/plots/*.png are drawn from metrics.jsonl in every run, whatever this says.
    tensorboard: bool = False


@dataclass
class Recipe:
    run_dir: str = "runs/default"
    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MAX_SEED = 2**32 - 1  # recipe `seed`: the range numpy and torch seeds share, with room for seed * 1000 + epoch
_GENERATORS = (None, "demo")
_TEXT_TUNINGS = ("lora", "full")
WISE_PICK_RULES = ("best_retrieval", "balanced")  # cnclip/wise.py says what each picks
# The cn_clip architectures transformers' ChineseCLIPModel can hold (RN50's ResNet tower it cannot).
ORIGINAL_ARCHS = ("ViT-B-16", "ViT-B-32", "ViT-L-14", "ViT-L-14-336", "ViT-H-14")


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(pairs: list[str]) -> list[tuple[str, Any]]:
    out = []
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{pair}' must look like key=value (e.g. train.lr=1e-4)")
        try:
            value = yaml.safe_load(text) if text else EMPTY
        except yaml.YAMLError as exc:
            raise ConfigError(f"override '{pair}': value is not valid YAML ({exc})") from None
        out.append((key.strip(), value))
    return out


def load_recipe(path: str | os.PathLike | None, overrides: list[str] = (), check_data: bool = True) -> Recipe:
    """Read a recipe file (safe YAML only), apply overrides, validate everything."""
    raw: Any = read_yaml_mapping(path, "recipe") if path is not None else {}
    for key, value in parse_overrides(list(overrides)):
        _set_path(raw, key, value)
    try:
        recipe = build_config(Recipe, raw, "recipe")
    except ConfigError as exc:
        source = f"{path}{' with overrides' if overrides else ''}" if path is not None else "overrides"
        raise ConfigError(f"{source}: {exc}") from None
    validate(recipe, check_data=check_data)
    return recipe


def validate(recipe: Recipe, check_data: bool = True) -> None:
    m, d, t = recipe.model, recipe.data, recipe.train
    positive = {
        "model.lora_r": m.lora_r,
        "train.epochs": t.epochs,
        "train.batch_size": t.batch_size,
        "train.log_every": t.log_every,
        "train.save_every": t.save_every,
        "data.context_length": d.context_length,
        "cache.batch_size": recipe.cache.batch_size,
        "cache.part_size": recipe.cache.part_size,
        "eval.batch_size": recipe.eval.batch_size,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"recipe key '{key}' must be >= 1, got {value}")
    if not 0 <= recipe.seed <= MAX_SEED:  # the trainer derives per-epoch torch seeds from it (seed * 1000 + epoch)
        raise ConfigError(f"recipe key 'seed' must be an integer from 0 to {MAX_SEED}, got {recipe.seed}")
    if t.batch_size < 2:
        raise ConfigError("recipe key 'train.batch_size' must be >= 2: a contrastive batch needs negatives")
    if not 0.0 <= m.lora_dropout < 1.0:
        raise ConfigError(f"recipe key 'model.lora_dropout' must be in [0, 1), got {m.lora_dropout}")
    if t.lr <= 0:
        raise ConfigError(f"recipe key 'train.lr' must be > 0, got {t.lr}")
    for key, value in {"train.warmup_steps": t.warmup_steps, "data.num_workers": d.num_workers,
                       "train.grad_clip": t.grad_clip, "train.weight_decay": t.weight_decay,
                       "train.max_bad_steps": t.max_bad_steps,
                       "train.grad_cache_chunk": t.grad_cache_chunk}.items():
        if value < 0:
            raise ConfigError(f"recipe key '{key}' must be >= 0, got {value}")
    if t.precision not in _PRECISIONS:
        raise ConfigError(f"recipe key 'train.precision': got {t.precision!r}, accepted: {', '.join(_PRECISIONS)}")
    if d.generate not in _GENERATORS:
        raise ConfigError(f"recipe key 'data.generate': got {d.generate!r}, accepted: null, demo")
    if not m.target_modules:
        raise ConfigError("recipe key 'model.target_modules' must name at least one module (e.g. [query, value])")
    if not d.root:
        raise ConfigError("recipe key 'data.root' is required: a directory with {split}_imgs.tsv and {split}_texts.jsonl")
    if d.format not in DATA_FORMATS:
        raise ConfigError(f"recipe key 'data.format': got {d.format!r}, accepted: {', '.join(DATA_FORMATS)}")
    if check_data and d.generate is None and d.format != "cnclip":
        _check_data_files(d)
    if check_data and d.generate is None and d.format == "cnclip":
        for split in filter(None, (d.train_split, d.valid_split)):
            for suffix in ("_imgs.tsv", "_texts.jsonl"):
                f = Path(d.root) / f"{split}{suffix}"
                if not f.is_file():
                    raise ConfigError(
                        f"recipe key 'data.root': missing data file {f} "
                        f"(expected the Chinese-CLIP layout {split}_imgs.tsv + {split}_texts.jsonl)"
                    )
    if m.text_tuning not in _TEXT_TUNINGS:
        raise ConfigError(f"recipe key 'model.text_tuning': got {m.text_tuning!r}, accepted: {', '.join(_TEXT_TUNINGS)}")
    if m.compose is not None:
        for side in ("image", "text"):
            if not getattr(m.compose, side):
                raise ConfigError(f"recipe key 'model.compose.{side}' is required with model.compose "
                                  "(an id or a directory)")
        if m.random_init:
            raise ConfigError("recipe keys 'model.compose' and 'model.random_init' do not go together: "
                              "compose copies pretrained towers")
    if m.arch is not None and m.arch not in ORIGINAL_ARCHS:
        raise ConfigError(f"recipe key 'model.arch': got {m.arch!r}, accepted: null, {', '.join(ORIGINAL_ARCHS)}")
    if check_data:  # a mistyped local path fails here, not after a minute of Hub retries
        for key, spec in _model_references(m):
            try:
                if key == "model.compose.image" and is_open_clip_reference(spec):  # cnclip.open_clip_reference
                    parse_open_clip_reference(spec, f"recipe key '{key}'")
                else:
                    parse_model_reference(spec, f"recipe key '{key}'")
            except UsageError as exc:
                raise ConfigError(str(exc)) from None
    if m.random_init and not Path(m.base).is_dir():
        raise ConfigError(f"recipe key 'model.base': random_init needs a local config directory, got {m.base!r}")
    _validate_zeroshot(recipe, check_data)
    _validate_distill(t.distill, check_data)
    _validate_wise(recipe)


def _validate_distill(d: DistillConfig | None, check_data: bool) -> None:
    if d is None:
        return
    if not d.weight > 0:  # also refuses NaN
        raise ConfigError(f"recipe key 'train.distill.weight' must be > 0, got {d.weight}")
    if d.temperature is not None and not d.temperature > 0:
        raise ConfigError(f"recipe key 'train.distill.temperature' must be > 0 or null, got {d.temperature}")
    if d.teacher is not None and check_data:
        try:
            parse_model_reference(d.teacher, "recipe key 'train.distill.teacher'")
        except UsageError as exc:
            raise ConfigError(str(exc)) from None


def _validate_wise(recipe: Recipe) -> None:
    w = recipe.train.wise
    if w is None:
        return
    if not w.alphas:
        raise ConfigError("recipe key 'train.wise.alphas' must list at least one alpha (e.g. [0, 0.5, 1])")
    bad = [a for a in w.alphas if not 0.0 <= a <= 1.0]
    if bad:
        raise ConfigError(f"recipe key 'train.wise.alphas': every alpha must be in [0, 1], got {bad}")
    if len(set(w.alphas)) != len(w.alphas):
        raise ConfigError(f"recipe key 'train.wise.alphas' lists an alpha twice: {w.alphas}")
    if w.pick not in WISE_PICK_RULES:
        raise ConfigError(f"recipe key 'train.wise.pick': got {w.pick!r}, accepted: {', '.join(WISE_PICK_RULES)}")
    if w.max_zeroshot_drop < 0:
        raise ConfigError(f"recipe key 'train.wise.max_zeroshot_drop' must be >= 0 (points), got {w.max_zeroshot_drop}")
    if recipe.data.valid_split is None:
        raise ConfigError("recipe key 'train.wise' needs a validation split (data.valid_split): each alpha is "
                          "chosen by its validation recall")
    if w.pick == "balanced" and not recipe.zeroshot.images:
        raise ConfigError("recipe key 'train.wise.pick': balanced weighs zero-shot accuracy and needs the "
                          "zero-shot check (zeroshot.images and zeroshot.classes); set them or use "
                          "train.wise.pick=best_retrieval")
    if w.pick == "balanced" and 0.0 not in w.alphas:
        raise ConfigError(f"recipe key 'train.wise.alphas' must include 0 with train.wise.pick=balanced (the "
                          f"base the zero-shot drop is measured from), got {w.alphas}")


def _model_references(m: ModelConfig) -> list[tuple[str, str]]:
    if m.compose is not None:
        return [("model.compose.image", m.compose.image), ("model.compose.text", m.compose.text)]
    return [("model.base", m.base)]


def _check_data_files(d: DataConfig) -> None:
    """The files a pairs / webdataset split needs (hf roots may be Hub ids: checked when read)."""
    for split in filter(None, (d.train_split, d.valid_split)):
        root = Path(d.root)
        if d.format == "pairs" and not (root / f"{split}_pairs.jsonl").is_file():
            raise ConfigError(f"recipe key 'data.root': missing data file {root / f'{split}_pairs.jsonl'} "
                              f"(data.format pairs: {split}_pairs.jsonl as build-pairs --format pairs writes)")
        if d.format == "webdataset" and not (any(root.glob(f"{split}-*.tar")) or any(root.glob(f"{split}/*.tar"))):
            raise ConfigError(f"recipe key 'data.root': no webdataset shards for split '{split}' in {root} "
                              f"(expected {split}-*.tar, or a folder {split}/ of *.tar as img2dataset writes)")


def _validate_zeroshot(recipe: Recipe, check_data: bool) -> None:
    z = recipe.zeroshot
    if bool(z.images) != bool(z.classes):
        raise ConfigError("recipe keys 'zeroshot.images' and 'zeroshot.classes' go together: set both "
                          "(a folder with one sub-folder per class, and its class list) or neither")
    if not check_data:
        return
    if z.templates and not Path(z.templates).is_file():
        raise ConfigError(f"recipe key 'zeroshot.templates': file not found: {z.templates}")
    if recipe.data.generate is None:  # a generated data set writes its zero-shot folder too
        if z.images and not Path(z.images).is_dir():
            raise ConfigError(f"recipe key 'zeroshot.images': folder not found: {z.images}")
        if z.classes and not Path(z.classes).is_file():
            raise ConfigError(f"recipe key 'zeroshot.classes': file not found: {z.classes}")


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}"""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def dump_recipe(recipe: Recipe, path: Path) -> None:
    path.write_text(yaml.safe_dump(recipe.to_dict(), allow_unicode=True, sort_keys=False), encoding="utf-8")
