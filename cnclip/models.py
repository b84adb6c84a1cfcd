"""Load a Chinese CLIP base model, lock its image tower, attach / merge LoRA on the text tower.

The same `from_pretrained` path serves local directories, Hugging Face ids and ModelScope ids,
so tiny models saved by the tests exercise exactly the code real checkpoints go through.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import ModelLoadError
# Defined in cnclip.images so that the torch-free ONNX runtime parses the same settings; imported from here too.
from .images import ImagePreprocess  # noqa: F401
from .model_reference import MODELSCOPE_PREFIX, hub_access, parse_model_reference  # noqa: F401 - re-exported
from .recipe import ModelConfig

log = logging.getLogger(__name__)

# The one warning attach_lora silences (see there); a regex for warnings.filterwarnings.
GRADIENT_CHECKPOINTING_WARNING = r"`is_gradient_checkpointing` is deprecated"
# logit_scale is stored as log(scale); CLIP caps the scale at 100.
MAX_LOGIT_SCALE = 100.0


def resolve_model_path(spec: str, what: str = "model") -> str:
    """What from_pretrained should load for `spec` (rule: cnclip.model_reference): an existing local path,
    a Hub id (transformers resolves it and its cache), or the local snapshot of `modelscope:<id>`.

    A local path that does not exist raises UsageError here, before any network access.
    """
    ref = parse_model_reference(spec, what)
    if ref.kind == "modelscope":
        from modelscope import snapshot_download  # heavy import, only when asked for

        try:
            return snapshot_download(ref.name)
        except Exception as exc:  # noqa: BLE001 - network / auth / not-found all end here
            raise ModelLoadError(f"could not download '{ref.name}' from ModelScope: {exc}") from exc
    return ref.name


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_clip(path: str, random_init: bool = False, seed: int = 0):
    """A ChineseCLIPModel in fp32: from weights, or random from the config (demo/tests)."""
    from transformers import ChineseCLIPConfig, ChineseCLIPModel

    try:
        if random_init:
            config = ChineseCLIPConfig.from_pretrained(path)
            torch.manual_seed(seed)
            return ChineseCLIPModel(config)
        # SDPA attention (fused kernels on GPU); transformers' default for ChineseCLIP today, pinned here.
        return ChineseCLIPModel.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    except OSError as exc:
        raise ModelLoadError(f"could not load a ChineseCLIP model from '{path}': {exc}") from exc


def load_image_preprocess(path: str) -> ImagePreprocess:
    from transformers.image_processing_base import ImageProcessingMixin

    try:
        cfg, _ = ImageProcessingMixin.get_image_processor_dict(path)
    except OSError as exc:
        raise ModelLoadError(f"'{path}' has no readable preprocessor_config.json: {exc}") from exc
    return ImagePreprocess.from_dict(cfg)


@dataclass
class BaseModel:
    clip: nn.Module
    tokenizer: object
    preprocess: ImagePreprocess
    path: str
    # preprocessor_config.json an export writes; None = the one at `path`, copied as it is.
    processor_config: dict | None = None


def load_base_model(cfg: ModelConfig, seed: int = 0) -> BaseModel:
    """The recipe's base: a ChineseCLIPModel directory / id, an original-format checkpoint (converted
    in memory, cnclip.original_format), or a model composed from an image tower (a transformers CLIP or an
    open_clip tower) and a BERT (cnclip.compose)."""
    from .original_format import is_original_format, load_original

    if cfg.compose is not None:
        return _composed_base(cfg.compose, seed)
    path = resolve_model_path(cfg.base, "model.base")
    if is_original_format(path):
        original = load_original(path, cfg.arch)
        return BaseModel(clip=original.clip, tokenizer=original.tokenizer,
                         preprocess=ImagePreprocess.from_dict(original.processor_config), path=path,
                         processor_config=original.processor_config)
    if Path(path).exists() and not Path(path).is_dir():
        raise ModelLoadError(f"model.base '{cfg.base}' is a file but not a cn_clip checkpoint (.pt); expected a "
                             "model directory, a hub id or a cn_clip .pt")
    with hub_access(parse_model_reference(path)):
        clip = load_clip(path, cfg.random_init, seed)
        return BaseModel(clip=clip, tokenizer=load_tokenizer(path), preprocess=load_image_preprocess(path),
                         path=path)


def _composed_base(compose, seed: int) -> BaseModel:
    """model.compose (cnclip.compose): a transformers CLIP image checkpoint (its preprocessor_config.json) or an
    open_clip tower (cnclip.open_clip_tower: its own preprocessing), with the BERT's text side."""
    from .compose import compose_clip, compose_open_clip
    from .open_clip_reference import is_open_clip_reference, parse_open_clip_reference

    text_path = resolve_model_path(compose.text, "model.compose.text")
    if is_open_clip_reference(compose.image):
        from .open_clip_tower import load_open_clip_tower

        tower = load_open_clip_tower(parse_open_clip_reference(compose.image))
        with hub_access(parse_model_reference(text_path)):
            composed = compose_open_clip(tower, text_path, seed)
        return BaseModel(clip=composed.clip, tokenizer=composed.tokenizer, preprocess=tower.preprocess,
                         path=compose.image)
    image_path = resolve_model_path(compose.image, "model.compose.image")
    with hub_access(parse_model_reference(image_path)), hub_access(parse_model_reference(text_path)):
        composed = compose_clip(image_path, text_path, seed)
        preprocess = load_image_preprocess(image_path)
    return BaseModel(clip=composed.clip, tokenizer=composed.tokenizer, preprocess=preprocess, path=image_path)


def lock_image_tower(clip: nn.Module) -> None:
    """No grads and eval mode for the image side: it is never trained, so dropout must stay off."""
    for module in (clip.vision_model, clip.visual_projection):
        module.requires_grad_(False)
        module.eval()


def attach_lora(clip: nn.Module, cfg: ModelConfig):
    """Wrap the model with a peft LoRA adapter on the text tower only.

    The target names (query/key/value/dense) exist only in the BERT text tower; the ViT uses
    q_proj/k_proj/... so the image tower is never touched. The text projection, when trained,
    is saved with the adapter (modules_to_save) so the adapter is self-contained.
    """
    from peft import LoraConfig, get_peft_model

    from .open_clip_tower import is_open_clip_model

    bad = [t for t in cfg.target_modules if t not in {"query", "key", "value", "dense"}]
    if bad:
        raise ModelLoadError(
            f"model.target_modules: {bad} are not text-tower modules; accepted: query, key, value, dense"
        )
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules),
        modules_to_save=["text_projection"] if cfg.train_text_projection else None,
        bias="none",
        # An open_clip image tower has its own module names: none may ever get a LoRA layer.
        exclude_modules=r"vision_model\..*" if is_open_clip_model(clip) else None,
    )
    with warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing` property while wrapping the model;
        # the FutureWarning is about peft's code, not ours: hide exactly that one, here only.
        warnings.filterwarnings("ignore", message=GRADIENT_CHECKPOINTING_WARNING, category=FutureWarning)
        model = get_peft_model(clip, lora)
    clip.logit_scale.requires_grad_(cfg.train_logit_scale)
    lock_image_tower(clip)
    return model


def attach_text_tuning(clip: nn.Module, cfg: ModelConfig) -> nn.Module:
    """What training updates (model.text_tuning): LoRA on the text tower (returns the peft model), or
    the whole text tower and its projection (`full`; returns `clip` itself). The image tower stays locked."""
    if cfg.text_tuning == "lora":
        return attach_lora(clip, cfg)
    clip.requires_grad_(False)
    clip.text_model.requires_grad_(True)
    clip.text_projection.requires_grad_(cfg.train_text_projection)
    clip.logit_scale.requires_grad_(cfg.train_logit_scale)
    lock_image_tower(clip)
    return clip


def is_lora(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def merged_model(model: nn.Module) -> nn.Module:
    """The plain ChineseCLIPModel of a trained model: LoRA merged in, or the fully tuned model as it is."""
    return model.merge_and_unload() if is_lora(model) else model


def clamp_logit_scale(clip: nn.Module) -> None:
    with torch.no_grad():
        clip.logit_scale.clamp_(max=torch.log(torch.tensor(MAX_LOGIT_SCALE)).item())


def encode_images(clip: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected (unnormalised) image embeddings, as ChineseCLIPModel computes them."""
    pooled = clip.vision_model(pixel_values=pixel_values).pooler_output
    return clip.visual_projection(pooled)


def encode_texts(clip: nn.Module, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
    """Projected text embeddings: the last layer's [CLS] state times the text projection."""
    out = clip.text_model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
    return clip.text_projection(out.last_hidden_state[:, 0, :])


def _modules_fingerprint(clip: nn.Module, module_names: tuple[str, ...]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for module_name in module_names:
        for name, tensor in sorted(getattr(clip, module_name).state_dict().items()):
            h.update(f"{module_name}.{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def image_tower_fingerprint(clip: nn.Module) -> str:
    """A hash of every weight that shapes an image embedding: any change invalidates the cache."""
    return _modules_fingerprint(clip, ("vision_model", "visual_projection"))


def text_tower_fingerprint(clip: nn.Module) -> str:
    """A hash of every weight that shapes a text embedding (LoRA merged in or not): keys text caches."""
    return _modules_fingerprint(clip, ("text_model", "text_projection"))


def describe_trainable(model: nn.Module) -> str:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%)"

