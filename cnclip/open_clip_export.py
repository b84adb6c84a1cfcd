"""Export (and load back) a run composed on an open_clip image tower, in the forms its users load.

A ChineseCLIPModel whose image side is an open_clip tower (cnclip.open_clip_tower) has no transformers
layout for its image side, so `cnclip export` writes two folders instead of one model:

* `image/`: `open_clip_config.json` ({"model_cfg", "preprocess_cfg"}) and `open_clip_model.safetensors`, the
  layout of open_clip's `local-dir:` schema: `open_clip.create_model_and_transforms("local-dir:OUT/image")`
  loads it. The weights are the whole source model as open_clip creates it from the recipe's reference
  (its own text tower included, so the folder is a complete open_clip model), with the run's image tower
  tensors written in; the image tower was locked, so they are the source's.
* `text/`: a transformers `BertModel` (config, weights, tokenizer; the trained text tower, LoRA merged in,
  no pooler) and `text_projection.safetensors` (`weight`: the text projection, `logit_scale`).
  `AutoModel.from_pretrained("OUT/text", add_pooling_layer=False)`'s [CLS] state times `weight`.T is the text embedding.

Before the folder is swapped in, both halves are loaded back the way a user would (open_clip's factory,
transformers' AutoModel) and their embeddings of fixed inputs compared with the run's: a difference over
`ROUND_TRIP_TOLERANCE` refuses the export. `load_open_clip_export` reads such a folder back into a
ChineseCLIPModel for cnclip's own commands (evaluate, zeroshot, search, ...).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .atomic import save_tensors, write_json
from .errors import ModelLoadError
from .open_clip_reference import CONFIG_FILE, LOCAL_DIR, OPEN_CLIP_PREFIX, parse_open_clip_reference
from .open_clip_tower import WEIGHTS_FILE, create_open_clip_model, import_open_clip

log = logging.getLogger(__name__)

IMAGE_DIR, TEXT_DIR = "image", "text"
PROJECTION_FILE = "text_projection.safetensors"
# The BERT config keys of ChineseCLIP's text tower (a BERT under another model_type).
TEXT_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
             "type_vocab_size", "initializer_range", "layer_norm_eps", "pad_token_id")
# Embeddings loaded back from the written folders against the run's (fp32 on one machine: ~1e-6).
ROUND_TRIP_TOLERANCE = 1e-4


def is_open_clip_export(path: str | Path) -> bool:
    """A folder this module wrote: image/open_clip_config.json beside text/config.json."""
    path = Path(path)
    return (path / IMAGE_DIR / CONFIG_FILE).is_file() and (path / TEXT_DIR / "config.json").is_file()


def save_image_side(clip, out: Path) -> None:
    """image/: the source open_clip model re-created by open_clip, the run's image tower tensors in it."""
    vision = clip.vision_model
    model, _ = create_open_clip_model(vision.reference)
    model.visual.load_state_dict(vision.visual.state_dict(), strict=True)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / CONFIG_FILE, {"model_cfg": vision.model_cfg, "preprocess_cfg": vision.preprocess_cfg})
    # Cloned: safetensors refuses tensors that share storage, and open_clip loads this file strictly.
    save_tensors({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, out / WEIGHTS_FILE)


def save_text_side(clip, out: Path) -> None:
    """text/: the trained text tower as a transformers BertModel, the projection and logit scale (the exporter
    adds the tokenizer)."""
    from transformers import BertConfig, BertModel

    config = BertConfig(**{k: getattr(clip.config.text_config, k) for k in TEXT_KEYS})
    bert = BertModel(config, add_pooling_layer=False)
    bert.load_state_dict(clip.text_model.state_dict(), strict=True)
    bert.save_pretrained(str(out))
    save_tensors({"weight": clip.text_projection.weight.detach().contiguous(),
                  "logit_scale": clip.logit_scale.detach().reshape(1).contiguous()}, out / PROJECTION_FILE)


def check_round_trip(clip, tokenizer, out: Path, context_length: int, texts: list[str]) -> dict:
    """Load both written folders back (module docstring) and compare with the run; returns what the card and
    the export report show. Over ROUND_TRIP_TOLERANCE: RuntimeError, and nothing is exported."""
    diff = round_trip_diff(clip, tokenizer, out, context_length, texts)
    if diff > ROUND_TRIP_TOLERANCE:
        raise RuntimeError(f"the exported open_clip image tower and transformers text tower embed differently from "
                           f"the run (max abs diff {diff:.2e}); not exporting")
    vision = clip.vision_model
    return {"reference": vision.reference.spec, "architecture": vision.reference.model_name,
            "image_size": clip.config.vision_config.image_size, "embed_dim": clip.text_projection.out_features,
            "round_trip_max_abs_diff": diff}


def text_embeddings(bert, projection: torch.Tensor, tokenizer, texts: list[str], context_length: int) -> torch.Tensor:
    """What the card's usage computes: the [CLS] state of cnclip-tokenised texts times the projection."""
    from .data import tokenize

    tokens = tokenize(tokenizer, texts, context_length)
    return bert(**tokens).last_hidden_state[:, 0] @ projection.T


@torch.no_grad()
def round_trip_diff(clip, tokenizer, out: Path, context_length: int, texts: list[str]) -> float:
    """Max abs difference of the written folders' embeddings (loaded as a user would) and the run's."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    from .data import tokenize
    from .models import encode_images, encode_texts

    open_clip = import_open_clip()
    image_model, _, _ = open_clip.create_model_and_transforms(f"{LOCAL_DIR}{out / IMAGE_DIR}")
    size = clip.config.vision_config.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    image_diff = (image_model.eval().encode_image(pixels) - encode_images(clip, pixels)).abs().max().item()
    bert = AutoModel.from_pretrained(str(out / TEXT_DIR), add_pooling_layer=False).eval()
    projection = load_file(str(out / TEXT_DIR / PROJECTION_FILE))["weight"]
    tokens = tokenize(tokenizer, texts, context_length)
    ours = encode_texts(clip, tokens["input_ids"], tokens["attention_mask"], tokens.get("token_type_ids"))
    text_diff = (text_embeddings(bert, projection, tokenizer, texts, context_length) - ours).abs().max().item()
    return max(image_diff, text_diff)


@torch.no_grad()
def load_open_clip_export(path: str | Path, seed: int = 0):
    """A folder `cnclip export` wrote for such a run, as (ChineseCLIPModel, tokenizer, ImagePreprocess)."""
    from safetensors.torch import load_file

    from .compose import compose_open_clip
    from .open_clip_tower import load_open_clip_tower

    path = Path(path)
    tower = load_open_clip_tower(parse_open_clip_reference(f"{OPEN_CLIP_PREFIX}{LOCAL_DIR}{path / IMAGE_DIR}"))
    composed = compose_open_clip(tower, str(path / TEXT_DIR), seed)
    saved = load_file(str(path / TEXT_DIR / PROJECTION_FILE))
    clip = composed.clip
    if tuple(saved["weight"].shape) != tuple(clip.text_projection.weight.shape):
        raise ModelLoadError(f"{path / TEXT_DIR / PROJECTION_FILE}: a {tuple(saved['weight'].shape)} projection "
                             f"does not fit a {tuple(clip.text_projection.weight.shape)} text tower and image tower")
    clip.text_projection.weight.copy_(saved["weight"])
    clip.logit_scale.copy_(saved["logit_scale"].reshape(()))
    return clip.eval(), composed.tokenizer, tower.preprocess
