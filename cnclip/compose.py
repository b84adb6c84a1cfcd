"""Compose a Chinese CLIP from any CLIP image tower and any Chinese BERT (the LiT / Taiyi-CLIP recipe).

Chinese-CLIP's first stage and Taiyi-CLIP both started this way: OpenAI CLIP's ViT, locked, and a
Chinese RoBERTa-wwm trained to meet it. `compose_clip(image, text)` builds a plain transformers
`ChineseCLIPModel`, so everything downstream (training with the image-embedding cache, evaluation,
zero-shot, export, publishing) treats it like any Chinese CLIP. Guarantees:

* the vision tower and the visual projection are the image checkpoint's, copied tensor for tensor
  (a `CLIPModel`, `CLIPVisionModelWithProjection` or `ChineseCLIPModel`), so image embeddings equal
  the source's `get_image_features`;
* the text tower is the encoder's weights (its pooler, unused by CLIP embeddings, is left out). A BERT
  (`model_type` bert: bert-base-chinese, hfl's RoBERTa-wwm and MacBERT, which are BERTs in transformers),
  a RoBERTa / XLM-RoBERTa (`roberta`, `xlm-roberta`) or an ERNIE (`ernie`) is accepted: RoBERTa and ERNIE
  are BERT layers with a different embedding front, rewritten into BERT's so that the [CLS] state is the
  source model's (RoBERTa's positions start at padding_idx + 1: its position table is shifted; ERNIE's
  task-type embedding, always row 0 without task ids, is folded into the token-type table). Anything
  else (pre-LayerNorm variants such as Megatron-BERT, ALBERT's shared layers...) is refused by name;
* the text projection is new, drawn from a seed (normal, std hidden**-0.5, as cn_clip initialises
  it), and the logit scale starts at 1/0.07;
* the tokenizer is the BERT's, the image preprocessing the image checkpoint's (so the cache and the
  exported preprocessor_config.json are what the model is served with).

The image side can also be an open_clip tower (`open_clip:<reference>`, cnclip.open_clip_tower): then the
ChineseCLIPModel's vision_model is open_clip's `model.visual` behind a thin wrapper and its visual projection
the identity (open_clip's towers project themselves), so image embeddings equal open_clip's `encode_image`;
the preprocessing is open_clip's, translated exactly; the text side is built as above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import ModelLoadError

IMAGE_TYPES = ("clip", "clip_vision_model", "chinese_clip")
# model_type -> how its weights become a BERT's (see _as_bert_weights).
TEXT_TYPES = ("bert", "roberta", "xlm-roberta", "ernie")
INITIAL_TEMPERATURE = 0.07


@dataclass
class Composed:
    clip: object  # ChineseCLIPModel
    tokenizer: object
    image_path: str  # where the image processor's settings come from


def _model_type(path: str, side: str) -> str:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path).model_type
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model.compose.{side} '{path}': no readable config.json: {exc}") from exc


def load_image_tower(path: str):
    """(vision_model, visual_projection, vision config, projection_dim) of a CLIP-family checkpoint."""
    from transformers import ChineseCLIPModel, CLIPModel, CLIPVisionModelWithProjection

    kind = _model_type(path, "image")
    if kind not in IMAGE_TYPES:
        raise ModelLoadError(f"model.compose.image '{path}' is a {kind!r} model; expected a CLIPModel, "
                             "CLIPVisionModelWithProjection or ChineseCLIPModel checkpoint")
    cls = {"clip": CLIPModel, "clip_vision_model": CLIPVisionModelWithProjection,
           "chinese_clip": ChineseCLIPModel}[kind]
    try:
        model = cls.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model.compose.image '{path}': could not load a {cls.__name__}: {exc}") from exc
    config = model.config if kind == "clip_vision_model" else model.config.vision_config
    projection_dim = model.visual_projection.out_features
    return model.vision_model, model.visual_projection, config, projection_dim


def load_text_tower(path: str):
    """(encoder model, tokenizer) of a BERT-family Chinese encoder (one of TEXT_TYPES)."""
    from transformers import AutoModel, AutoTokenizer

    kind = _model_type(path, "text")
    if kind not in TEXT_TYPES:
        raise ModelLoadError(f"model.compose.text '{path}' is a {kind!r} model; expected a BERT-family encoder "
                             f"(model_type one of {', '.join(TEXT_TYPES)}; e.g. hfl/chinese-roberta-wwm-ext, "
                             "bert-base-chinese): ChineseCLIP's text tower is a BERT")
    try:
        bert = AutoModel.from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model.compose.text '{path}': could not load a BERT and its tokenizer: {exc}") from exc
    return bert, tokenizer


def _position_offset(config) -> int:
    """Where the encoder's position ids start: 0 for BERT, padding_idx + 1 for the RoBERTa family."""
    return config.pad_token_id + 1 if config.model_type in ("roberta", "xlm-roberta") else 0


def _text_config(bert_config) -> dict:
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
            "type_vocab_size", "initializer_range", "layer_norm_eps", "pad_token_id")
    config = {k: getattr(bert_config, k) for k in keys}
    config["max_position_embeddings"] -= _position_offset(bert_config)
    return config


def _as_bert_weights(encoder) -> dict[str, torch.Tensor]:
    """The encoder's state dict in BERT's layout and meaning, pooler left out.

    The layers of every TEXT_TYPES model are BERT's under the same names; only the embedding front differs.
    RoBERTa numbers the positions of a right-padded text padding_idx + 1, padding_idx + 2, ...: dropping the
    first rows of its table gives BERT's 0, 1, ... the same vectors. ERNIE adds task_type_embeddings[0] to
    every token when no task ids are given (cnclip never gives any): the same sum as adding that row to
    every token-type row.
    """
    weights = {k: v for k, v in encoder.state_dict().items() if not k.startswith("pooler.")}
    offset = _position_offset(encoder.config)
    if offset:
        key = "embeddings.position_embeddings.weight"
        weights[key] = weights[key][offset:].clone()
    task = weights.pop("embeddings.task_type_embeddings.weight", None)
    if task is not None:
        key = "embeddings.token_type_embeddings.weight"
        weights[key] = weights[key] + task[0]
    return weights


def _vision_config(config) -> dict:
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
            "image_size", "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout", "initializer_range",
            "initializer_factor")
    return {k: getattr(config, k) for k in keys}


def _clip_with_text_tower(bert, vision_config: dict, projection_dim: int):
    """A ChineseCLIPModel (fp32, SDPA attention) shaped for the BERT's text side and `vision_config`."""
    from transformers import ChineseCLIPConfig, ChineseCLIPModel

    config = ChineseCLIPConfig(text_config=_text_config(bert.config), vision_config=vision_config,
                               projection_dim=projection_dim, logit_scale_init_value=math.log(1 / INITIAL_TEMPERATURE))
    config._attn_implementation = "sdpa"
    return ChineseCLIPModel(config)


@torch.no_grad()
def compose_clip(image: str, text: str, seed: int = 0) -> Composed:
    """A ChineseCLIPModel (fp32, SDPA attention): the image checkpoint's vision side, the BERT's text side."""
    vision, visual_projection, vision_config, projection_dim = load_image_tower(image)
    bert, tokenizer = load_text_tower(text)
    clip = _clip_with_text_tower(bert, _vision_config(vision_config), projection_dim)
    clip.vision_model.load_state_dict(vision.state_dict(), strict=True)
    clip.visual_projection.load_state_dict(visual_projection.state_dict(), strict=True)
    _load_text_side(clip, bert, text, seed)
    return Composed(clip=clip.eval(), tokenizer=tokenizer, image_path=image)


@torch.no_grad()
def compose_open_clip(tower, text: str, seed: int = 0) -> Composed:
    """A ChineseCLIPModel whose image side is the open_clip tower `tower` (cnclip.open_clip_tower.OpenClipTower).

    The config's vision part describes a one-layer placeholder of the tower's input size (what code reading
    `config.vision_config.image_size` needs); the placeholder is replaced by the tower before use."""
    from .open_clip_tower import IdentityProjection, OpenClipVisionModel

    bert, tokenizer = load_text_tower(text)
    placeholder = dict(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                       image_size=tower.image_size, patch_size=tower.image_size)
    clip = _clip_with_text_tower(bert, placeholder, tower.embed_dim)
    clip.vision_model = OpenClipVisionModel(tower)
    clip.visual_projection = IdentityProjection(tower.embed_dim)
    _load_text_side(clip, bert, text, seed)
    return Composed(clip=clip.eval(), tokenizer=tokenizer, image_path=tower.reference.spec)


def _load_text_side(clip, bert, text: str, seed: int) -> None:
    """The BERT's weights into the text tower, a seeded new text projection, the logit scale at 1/0.07."""
    missing, unexpected = clip.text_model.load_state_dict(_as_bert_weights(bert), strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ModelLoadError(f"model.compose.text '{text}': its weights do not fit ChineseCLIP's BERT text tower "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    generator = torch.Generator().manual_seed(seed)
    hidden = clip.text_projection.in_features
    clip.text_projection.weight.copy_(
        torch.randn(clip.text_projection.weight.shape, generator=generator) * hidden ** -0.5)
    clip.logit_scale.fill_(math.log(1 / INITIAL_TEMPERATURE))

