"""A small ONNX export (the `cnclip export --format onnx` directory layout) of a model directory, for tests and
benchmarks/serve_load.py: the two encoders traced with torch.onnx, tokenizer.json, cnclip_onnx.json."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F


class _ImageEncoder(torch.nn.Module):
    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, pixel_values):
        from cnclip.models import encode_images

        return F.normalize(encode_images(self.clip, pixel_values), dim=-1)


class _TextEncoder(torch.nn.Module):
    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, input_ids, attention_mask):
        from cnclip.models import encode_texts

        return F.normalize(encode_texts(self.clip, input_ids, attention_mask), dim=-1)


def write_onnx_export(model: str | Path, out: Path, *, record_fingerprint: bool = True) -> Path:
    """Export `model` (anything cnclip.inference.load_for_inference takes) into `out`; returns `out`.

    With `record_fingerprint`, cnclip_onnx.json names the torch model's weights (`source.fingerprint`), so an
    index built with the torch model accepts this export.
    """
    from cnclip.embedders import TorchEmbedder

    embedder = TorchEmbedder.load(str(model), "cpu")
    clip, preprocess, context = embedder.clip.eval(), embedder.loaded.preprocess, embedder.context_length
    out.mkdir(parents=True, exist_ok=True)
    size = clip.config.vision_config.image_size
    ids = torch.ones(2, context, dtype=torch.long)
    mask = torch.ones(2, context, dtype=torch.long)
    mask[1, context // 2:] = 0
    batch, seq = {0: "batch"}, {0: "batch", 1: "seq"}
    with torch.no_grad():
        torch.onnx.export(_ImageEncoder(clip), (torch.zeros(2, 3, size, size),), str(out / "image_encoder.onnx"),
                          input_names=["pixel_values"], output_names=["image_embeds"], dynamo=False,
                          dynamic_axes={"pixel_values": batch, "image_embeds": batch}, opset_version=17)
        torch.onnx.export(_TextEncoder(clip), (ids, mask), str(out / "text_encoder.onnx"),
                          input_names=["input_ids", "attention_mask"], output_names=["text_embeds"], dynamo=False,
                          dynamic_axes={"input_ids": seq, "attention_mask": seq, "text_embeds": batch},
                          opset_version=17)
    embedder.loaded.tokenizer.save_pretrained(str(out))
    assert (out / "tokenizer.json").is_file(), "the tokenizer must be a fast one"
    resize = ({"shortest_edge": preprocess.shortest_edge} if preprocess.shortest_edge is not None
              else {"height": preprocess.resize_height, "width": preprocess.resize_width})
    source = {"model": str(model), "run": Path(model).name}
    if record_fingerprint:
        source["fingerprint"] = embedder.fingerprint
    config = {
        "format": "cnclip-onnx", "version": 1, "embed_dim": int(clip.config.projection_dim),
        "context_length": context, "image_size": size,
        "text_preprocess": {"lowercase": True, "replace": {"“": '"', "”": '"'}},
        "tokenizer": {"pad_token_id": int(embedder.loaded.tokenizer.pad_token_id), "add_special_tokens": True},
        "preprocess": {"resize": resize, "resample": preprocess.resample, "do_center_crop": preprocess.do_center_crop,
                       "crop_size": {"height": preprocess.crop_height, "width": preprocess.crop_width},
                       "rescale_factor": preprocess.rescale_factor, "mean": list(preprocess.mean),
                       "std": list(preprocess.std), "image_mode": "RGB"},
        "logit_scale": float(embedder.logit_scale), "precision": "fp32",
        "files": {"image": "image_encoder.onnx", "text": "text_encoder.onnx"}, "source": source, "opset": 17,
    }
    (out / "cnclip_onnx.json").write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
    return out
