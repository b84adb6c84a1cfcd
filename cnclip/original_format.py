"""The original Chinese-CLIP format, both ways: cn_clip `.pt` checkpoints and ModelScope model directories.

Two layouts hold the original weights (the OFA-Sys `cn_clip` package's names: `visual.*` for the ViT,
`bert.*` for the RoBERTa text tower, `text_projection`, `logit_scale`, optionally prefixed `module.`):

* a cn_clip checkpoint: `{"epoch", "step", "name", "state_dict"}` in one `.pt` file; its architecture
  is one of cn_clip's named configs (`ARCHS`) or inferred from the tensor shapes;
* a ModelScope directory (`damo/`, `iic/multi-modal_clip-vit-*_zh`): `pytorch_model.bin` with those
  names, `vision_model_config.json` + `text_model_config.json` (the keyword arguments of cn_clip's
  `CLIP`), `vocab.txt` and a `configuration.json` for `pipeline(Tasks.multi_modal_embedding, ...)`.

Guarantees:

* Reading runs no code: `torch.load(weights_only=True)`; a file holding any other pickled object is
  refused with a `ModelLoadError` naming it.
* `to_transformers` converts with the rules of transformers' own
  `convert_chinese_clip_original_pytorch_to_hf.py` (the fused `in_proj` split into q/k/v, `c_fc`/
  `c_proj` -> `fc1`/`fc2`, projections transposed, `bert.*` copied by name) and checks itself: every
  original tensor is used, and converting back (`to_original`) gives every tensor bit for bit.
* `to_original` is the inverse; `save_cn_clip` / `save_modelscope` write files that cn_clip's
  `create_model` and ModelScope's `CLIPForMultiModalEmbedding` load with their strict
  `load_state_dict`. Weights are stored in fp16, like the released checkpoints: both loaders cast the
  model to fp16 before loading (`convert_weights`), so fp16 files load without a second rounding.
* Image preprocessing is cn_clip's: squash-resize to the square input size (bicubic), no crop, the
  OpenAI CLIP mean/std. Text: BERT's lower-casing WordPiece tokenizer on the model's `vocab.txt`.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConfigError, ModelLoadError

MODELSCOPE_WEIGHTS = "pytorch_model.bin"
VISION_CONFIG = "vision_model_config.json"
TEXT_CONFIG = "text_model_config.json"
VOCAB = "vocab.txt"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

_TEXT_BASE = {"vocab_size": 21128, "text_attention_probs_dropout_prob": 0.1, "text_hidden_act": "gelu",
              "text_hidden_dropout_prob": 0.1, "text_hidden_size": 768, "text_initializer_range": 0.02,
              "text_intermediate_size": 3072, "text_max_position_embeddings": 512, "text_num_attention_heads": 12,
              "text_num_hidden_layers": 12, "text_type_vocab_size": 2}
_TEXT_LARGE = {**_TEXT_BASE, "text_hidden_size": 1024, "text_intermediate_size": 4096,
               "text_num_attention_heads": 16, "text_num_hidden_layers": 24}
# cn_clip's model_configs/*.json, vision and text merged (the keyword arguments of cn_clip's CLIP).
ARCHS = {
    "ViT-B-16": {"embed_dim": 512, "image_resolution": 224, "vision_layers": 12, "vision_width": 768,
                 "vision_patch_size": 16, **_TEXT_BASE},
    "ViT-B-32": {"embed_dim": 512, "image_resolution": 224, "vision_layers": 12, "vision_width": 768,
                 "vision_patch_size": 32, **_TEXT_BASE},
    "ViT-L-14": {"embed_dim": 768, "image_resolution": 224, "vision_layers": 24, "vision_width": 1024,
                 "vision_patch_size": 14, **_TEXT_BASE},
    "ViT-L-14-336": {"embed_dim": 768, "image_resolution": 336, "vision_layers": 24, "vision_width": 1024,
                     "vision_patch_size": 14, **_TEXT_BASE},
    "ViT-H-14": {"embed_dim": 1024, "image_resolution": 224, "vision_layers": 32, "vision_width": 1280,
                 "vision_head_width": 80, "vision_patch_size": 14, **_TEXT_LARGE},
}
VISION_KEYS = ("embed_dim", "image_resolution", "vision_layers", "vision_width", "vision_patch_size",
               "vision_head_width")
HEAD_WIDTH = 64  # cn_clip's default attention head width (ViT-H's config says 80)


# ---------------------------------------------------------------- recognising and reading


def is_cn_clip_file(path: str | Path) -> bool:
    path = Path(path)
    return path.is_file() and path.suffix in CHECKPOINT_SUFFIXES


def is_modelscope_dir(path: str | Path) -> bool:
    path = Path(path)
    return all((path / name).is_file() for name in (MODELSCOPE_WEIGHTS, VISION_CONFIG, TEXT_CONFIG))


def is_original_format(path: str | Path) -> bool:
    """A cn_clip checkpoint file or a ModelScope-layout directory (not a transformers directory)."""
    return is_cn_clip_file(path) or is_modelscope_dir(path)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The original-named tensors of a cn_clip / ModelScope weights file, prefixes (`module.`) removed.

    Only tensors and plain containers are unpickled (weights_only=True); anything else is refused.
    """
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"{path}: refused to load: it holds pickled objects other than tensors and plain containers "
            f"(torch.load weights_only=True said: {first}). Only weight files are accepted; re-save the "
            "state_dict alone if you trust this file") from None
    except (OSError, RuntimeError, EOFError) as exc:
        raise ModelLoadError(f"{path}: not a readable PyTorch checkpoint: {exc}") from None
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelLoadError(f"{path}: expected a state_dict of tensors (or a dict with one under 'state_dict')")
    for prefix in ("module.", "clip_model."):  # DDP's prefix; ModelScope's fine-tuned wrapper
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if not k.startswith("bert.pooler.")}  # unused by the embeddings
    if "visual.conv1.weight" not in sd or "bert.embeddings.word_embeddings.weight" not in sd:
        raise ModelLoadError(f"{path}: not a Chinese-CLIP ViT checkpoint (no visual.conv1.weight / bert.* "
                             "tensors; ResNet (RN50) towers are not supported by transformers' ChineseCLIPModel)")
    return sd


def _count(sd: dict, prefix: str) -> int:
    n = 0
    while any(k.startswith(f"{prefix}.{n}.") for k in sd):
        n += 1
    return n


def infer_model_info(sd: dict[str, torch.Tensor]) -> dict:
    """cn_clip's CLIP keyword arguments from tensor shapes; head counts follow cn_clip's configs
    (64-wide heads, 80 for the 1280-wide ViT-H), which shapes alone cannot tell."""
    width, _, patch, _ = sd["visual.conv1.weight"].shape
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    words = sd["bert.embeddings.word_embeddings.weight"]
    hidden = words.shape[1]
    info = {
        "embed_dim": sd["visual.proj"].shape[1], "image_resolution": grid * patch,
        "vision_layers": _count(sd, "visual.transformer.resblocks"), "vision_width": width,
        "vision_patch_size": patch,
        "vocab_size": words.shape[0], "text_attention_probs_dropout_prob": 0.1, "text_hidden_act": "gelu",
        "text_hidden_dropout_prob": 0.1, "text_hidden_size": hidden, "text_initializer_range": 0.02,
        "text_intermediate_size": sd["bert.encoder.layer.0.intermediate.dense.weight"].shape[0],
        "text_max_position_embeddings": sd["bert.embeddings.position_embeddings.weight"].shape[0],
        "text_num_attention_heads": max(1, hidden // HEAD_WIDTH),
        "text_num_hidden_layers": _count(sd, "bert.encoder.layer"),
        "text_type_vocab_size": sd["bert.embeddings.token_type_embeddings.weight"].shape[0],
    }
    if width == 1280:
        info["vision_head_width"] = 80
    return {k: int(v) if isinstance(v, (int, torch.Size)) or hasattr(v, "__index__") else v for k, v in info.items()}


def model_info_for(sd: dict[str, torch.Tensor], arch: str | None, source: str) -> dict:
    """The named architecture (checked against the shapes), or the one the shapes imply."""
    inferred = infer_model_info(sd)
    if arch is None:
        return inferred
    if arch not in ARCHS:
        raise ConfigError(f"model.arch {arch!r} is not a cn_clip ViT architecture; accepted: {', '.join(ARCHS)}")
    named = ARCHS[arch]
    shape_keys = [k for k in named if k not in ("text_attention_probs_dropout_prob", "text_hidden_dropout_prob",
                                                  "text_initializer_range", "text_hidden_act",
                                                  "text_num_attention_heads", "vision_head_width")]
    wrong = {k: (named[k], inferred[k]) for k in shape_keys if named[k] != inferred[k]}
    if wrong:
        detail = ", ".join(f"{k}: {a} in {arch}, {b} in the file" for k, (a, b) in wrong.items())
        raise ModelLoadError(f"{source} does not hold a {arch} model ({detail})")
    return dict(named)


def read_modelscope_info(model_dir: Path) -> dict:
    info = {}
    for name in (VISION_CONFIG, TEXT_CONFIG):
        try:
            info.update(json.loads((model_dir / name).read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{model_dir / name}: not a readable JSON config: {exc}") from None
    if isinstance(info.get("vision_layers"), (str, list)):
        raise ModelLoadError(f"{model_dir}: a ResNet image tower ({info['vision_layers']}); transformers' "
                             "ChineseCLIPModel holds ViT towers only")
    return info


# ---------------------------------------------------------------- conversion


def transformers_config(info: dict):
    """The ChineseCLIPConfig of a cn_clip architecture."""
    from transformers import ChineseCLIPConfig

    width = info["vision_width"]
    return ChineseCLIPConfig(
        text_config=dict(
            vocab_size=info["vocab_size"], hidden_size=info["text_hidden_size"],
            num_hidden_layers=info["text_num_hidden_layers"], num_attention_heads=info["text_num_attention_heads"],
            intermediate_size=info["text_intermediate_size"], hidden_act=info["text_hidden_act"],
            hidden_dropout_prob=info["text_hidden_dropout_prob"],
            attention_probs_dropout_prob=info["text_attention_probs_dropout_prob"],
            max_position_embeddings=info["text_max_position_embeddings"], type_vocab_size=info["text_type_vocab_size"],
            initializer_range=info["text_initializer_range"], layer_norm_eps=1e-12),
        vision_config=dict(
            hidden_size=width, intermediate_size=4 * width, num_hidden_layers=info["vision_layers"],
            num_attention_heads=width // info.get("vision_head_width", HEAD_WIDTH),
            image_size=info["image_resolution"], patch_size=info["vision_patch_size"], hidden_act="quick_gelu",
            layer_norm_eps=1e-5),
        projection_dim=info["embed_dim"],
    )


def model_info_of(config) -> dict:
    """cn_clip's CLIP keyword arguments for a ChineseCLIPConfig (the inverse of transformers_config)."""
    t, v = config.text_config, config.vision_config
    if v.intermediate_size != 4 * v.hidden_size or v.hidden_act != "quick_gelu":
        raise ModelLoadError("this image tower cannot be written in the original format: cn_clip's ViT has a "
                             f"4x-wide quick_gelu MLP (here {v.intermediate_size} wide, {v.hidden_act})")
    info = {"embed_dim": config.projection_dim, "image_resolution": v.image_size, "vision_layers": v.num_hidden_layers,
            "vision_width": v.hidden_size, "vision_patch_size": v.patch_size}
    head_width = v.hidden_size // v.num_attention_heads
    if head_width != HEAD_WIDTH:
        info["vision_head_width"] = head_width
    info.update({
        "vocab_size": t.vocab_size, "text_attention_probs_dropout_prob": t.attention_probs_dropout_prob,
        "text_hidden_act": t.hidden_act, "text_hidden_dropout_prob": t.hidden_dropout_prob,
        "text_hidden_size": t.hidden_size, "text_initializer_range": t.initializer_range,
        "text_intermediate_size": t.intermediate_size, "text_max_position_embeddings": t.max_position_embeddings,
        "text_num_attention_heads": t.num_attention_heads, "text_num_hidden_layers": t.num_hidden_layers,
        "text_type_vocab_size": t.type_vocab_size})
    return info


def _vision_pairs(layers: int):
    """(transformers name, original name, transposed) for every vision tensor but the fused attention."""
    yield "visual_projection.weight", "visual.proj", True
    for hf, orig in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
        for p in ("weight", "bias"):
            yield f"vision_model.{hf}.{p}", f"visual.{orig}.{p}", False
    yield "vision_model.embeddings.patch_embedding.weight", "visual.conv1.weight", False
    yield "vision_model.embeddings.class_embedding", "visual.class_embedding", False
    yield "vision_model.embeddings.position_embedding.weight", "visual.positional_embedding", False
    for i in range(layers):
        hf, orig = f"vision_model.encoder.layers.{i}", f"visual.transformer.resblocks.{i}"
        for a, b in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                     ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj")):
            for p in ("weight", "bias"):
                yield f"{hf}.{a}.{p}", f"{orig}.{b}.{p}", False


@torch.no_grad()
def to_transformers(sd: dict[str, torch.Tensor], info: dict, source: str = "checkpoint"):
    """A ChineseCLIPModel (fp32, eval) holding the original weights; the conversion is checked."""
    from transformers import ChineseCLIPModel

    config = transformers_config(info)
    config._attn_implementation = "sdpa"
    clip = ChineseCLIPModel(config).eval()
    target = clip.state_dict()
    new: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in sd:
            raise ModelLoadError(f"{source}: missing tensor '{name}' for a {info['vision_layers']}-layer ViT")
        used.add(name)
        return sd[name].float()

    new["text_projection.weight"] = take("text_projection").T
    for name in target:
        if name.startswith("text_model."):
            new[name] = take("bert." + name[len("text_model."):])
    for hf, orig, transposed in _vision_pairs(info["vision_layers"]):
        new[hf] = take(orig).T if transposed else take(orig)
    for i in range(info["vision_layers"]):
        hf, orig = f"vision_model.encoder.layers.{i}.self_attn", f"visual.transformer.resblocks.{i}.attn"
        for p in ("weight", "bias"):
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), take(f"{orig}.in_proj_{p}").chunk(3, dim=0)):
                new[f"{hf}.{proj}.{p}"] = part
    new["logit_scale"] = take("logit_scale").reshape(target["logit_scale"].shape)

    unused = sorted(set(sd) - used)
    if unused:
        raise ModelLoadError(f"{source}: {len(unused)} tensors have no place in a ChineseCLIPModel "
                             f"(e.g. {unused[:3]}); not a cn_clip ViT checkpoint of this architecture")
    wrong = [(k, tuple(new[k].shape), tuple(t.shape)) for k, t in target.items() if k in new and new[k].shape != t.shape]
    missing = sorted(set(target) - set(new) - {k for k in target if k.endswith("position_ids")})
    if wrong or missing:
        raise ModelLoadError(f"{source}: does not fit the inferred architecture ({wrong[:3]} have other shapes, "
                             f"{missing[:3]} missing); name it with model.arch")
    clip.load_state_dict(new, strict=False)
    back = to_original(clip)
    for name, tensor in sd.items():
        if not torch.equal(back[name], tensor.float()):
            raise ModelLoadError(f"{source}: conversion check failed: '{name}' does not convert back bit for bit")
    return clip


@torch.no_grad()
def to_original(clip) -> dict[str, torch.Tensor]:
    """cn_clip-named fp32 tensors of a ChineseCLIPModel (no `module.` prefix, no BERT pooler)."""
    src = {k: v.detach().float().cpu() for k, v in clip.state_dict().items()}
    out = {"text_projection": src["text_projection.weight"].T.contiguous(), "logit_scale": src["logit_scale"].reshape(())}
    for name, tensor in src.items():
        if name.startswith("text_model.") and not name.endswith("position_ids"):
            out["bert." + name[len("text_model."):]] = tensor
    layers = clip.config.vision_config.num_hidden_layers
    for hf, orig, transposed in _vision_pairs(layers):
        out[orig] = src[hf].T.contiguous() if transposed else src[hf]
    for i in range(layers):
        hf, orig = f"vision_model.encoder.layers.{i}.self_attn", f"visual.transformer.resblocks.{i}.attn"
        for p in ("weight", "bias"):
            out[f"{orig}.in_proj_{p}"] = torch.cat([src[f"{hf}.{proj}.{p}"] for proj in ("q_proj", "k_proj", "v_proj")])
    return out


# ---------------------------------------------------------------- loading for cnclip


def preprocess_dict(image_resolution: int) -> dict:
    """cn_clip's image transform as a ChineseCLIPImageProcessor config (squash, bicubic, no crop)."""
    size = {"height": image_resolution, "width": image_resolution}
    return {"image_processor_type": "ChineseCLIPImageProcessor", "do_resize": True, "size": size,
            "resample": 3, "do_center_crop": False, "crop_size": size, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(OPENAI_MEAN),
            "image_std": list(OPENAI_STD), "do_convert_rgb": True}


def find_vocab(path: Path) -> Path:
    """vocab.txt of an original checkpoint: beside it, else the one the installed cn_clip package ships."""
    here = (path if path.is_dir() else path.parent) / VOCAB
    if here.is_file():
        return here
    import importlib.util

    spec = importlib.util.find_spec("cn_clip")
    if spec is not None and spec.submodule_search_locations:
        shipped = Path(next(iter(spec.submodule_search_locations))) / "clip" / VOCAB
        if shipped.is_file():
            return shipped
    raise ModelLoadError(f"{path}: no {VOCAB} beside it (cn_clip's 21,128-token Chinese vocabulary); put it there "
                         "or `pip install cn-clip`, which ships it")


def bert_tokenizer(vocab: Path):
    """BERT's lower-casing WordPiece tokenizer on `vocab` (what cn_clip's FullTokenizer does)."""
    from transformers import BertTokenizer

    # from the file's directory: the constructor's vocabulary argument differs between transformers 4 and 5
    return BertTokenizer.from_pretrained(str(vocab.parent), do_lower_case=True, tokenize_chinese_chars=True)


@dataclass
class OriginalModel:
    clip: object  # ChineseCLIPModel
    tokenizer: object
    processor_config: dict  # preprocessor_config.json contents
    info: dict  # cn_clip's CLIP keyword arguments


def load_original(path: str | Path, arch: str | None = None) -> OriginalModel:
    """A cn_clip `.pt` or a ModelScope-layout directory as a checked ChineseCLIPModel (nothing written)."""
    path = Path(path)
    if is_modelscope_dir(path):
        sd = read_state_dict(path / MODELSCOPE_WEIGHTS)
        info = read_modelscope_info(path)
        if arch is not None:
            model_info_for(sd, arch, str(path))  # only checks that the file is the named architecture
    else:
        sd = read_state_dict(path)
        info = model_info_for(sd, arch, str(path))
    clip = to_transformers(sd, info, str(path))
    vocab = find_vocab(path)
    tokenizer = bert_tokenizer(vocab)
    if len(tokenizer) != info["vocab_size"]:
        raise ModelLoadError(f"{vocab} has {len(tokenizer)} tokens but {path} was trained with {info['vocab_size']}")
    return OriginalModel(clip, tokenizer, preprocess_dict(info["image_resolution"]), info)


# ---------------------------------------------------------------- writing


def _fp16_module_prefixed(clip) -> dict[str, torch.Tensor]:
    sd = to_original(clip)
    hidden = sd["bert.embeddings.word_embeddings.weight"].shape[1]
    # ModelScope's BERT has a pooler (strict loading wants it); the embeddings never use it.
    sd["bert.pooler.dense.weight"] = torch.zeros(hidden, hidden)
    sd["bert.pooler.dense.bias"] = torch.zeros(hidden)
    return {"module." + k: v.half().contiguous() for k, v in sd.items()}


def save_cn_clip(clip, out_file: Path, *, name: str, epoch: int = 0, step: int = 0) -> None:
    """A checkpoint as cn_clip saves one: {"epoch", "step", "name", "state_dict"} with `module.` keys."""
    from .atomic import save_torch

    save_torch({"epoch": epoch, "step": step, "name": name, "state_dict": _fp16_module_prefixed(clip)}, out_file)


def save_modelscope(clip, tokenizer, out_dir: Path) -> dict:
    """pytorch_model.bin + the two JSON configs + vocab.txt (configuration.json is the caller's)."""
    from .atomic import save_torch, write_json

    info = model_info_of(clip.config)
    save_torch({"state_dict": _fp16_module_prefixed(clip)}, out_dir / MODELSCOPE_WEIGHTS)
    write_json(out_dir / VISION_CONFIG, {k: info[k] for k in VISION_KEYS if k in info})
    write_json(out_dir / TEXT_CONFIG, {k: v for k, v in info.items() if k not in VISION_KEYS})
    write_vocab(tokenizer, out_dir)
    return info


def write_vocab(tokenizer, out_dir: Path) -> None:
    """vocab.txt, one token a line in id order (what cn_clip's and ModelScope's FullTokenizer read)."""
    vocab = tokenizer.get_vocab()
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ModelLoadError("the tokenizer's vocabulary has gaps; it cannot be written as vocab.txt")
    (out_dir / VOCAB).write_text("\n".join(sorted(vocab, key=vocab.get)) + "\n", encoding="utf-8")


_TEXT_NAMES = {"RoBERTa-wwm-ext-base-chinese": _TEXT_BASE, "RoBERTa-wwm-ext-large-chinese": _TEXT_LARGE,
               "RBT3-chinese": {**_TEXT_BASE, "text_num_hidden_layers": 3}}


def cn_clip_model_names(info: dict) -> dict:
    """cn_clip's config names (vision_model_name, text_model_name of load_from_name) for `info`, or
    'custom' where cn_clip ships no config of that size (then it needs model_configs/<name>.json)."""
    vision = next((n for n, a in ARCHS.items() if all(a.get(k) == info.get(k) for k in VISION_KEYS)), "custom")
    text = next((n for n, t in _TEXT_NAMES.items()
                 if all(t[k] == info[k] for k in t if "dropout" not in k and "range" not in k)), "custom")
    return {"vision": vision, "text": text}

