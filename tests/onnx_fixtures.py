"""An ONNX export of a model directory in the `cnclip export --format onnx` layout, for tests and benchmarks:
the graphs and cnclip_onnx.json are cnclip.onnx_export's own (export_graphs, manifest); only the run-directory
step (merging LoRA) is skipped, so a plain tiny model directory will do."""

from __future__ import annotations

import json
from pathlib import Path


def write_onnx_export(model: str | Path, out: Path, *, record_fingerprint: bool = True) -> Path:
    """Export `model` (anything cnclip.inference.load_for_inference takes) into `out`; returns `out`.

    With `record_fingerprint`, `source.fingerprint` names the torch model's weights (cnclip.embedders), so an
    index built with the torch model accepts this export.
    """
    from cnclip.embedders import TorchEmbedder
    from cnclip.onnx_export import export_graphs, manifest

    embedder = TorchEmbedder.load(str(model), "cpu")
    clip, tokenizer, context = embedder.clip.eval(), embedder.loaded.tokenizer, embedder.context_length
    out.mkdir(parents=True, exist_ok=True)
    export_graphs(clip, out, clip.config.vision_config.image_size, context)
    tokenizer.save_pretrained(str(out))
    assert (out / "tokenizer.json").is_file(), "the tokenizer must be a fast one"
    source = {"model": str(model), "run": Path(model).name}
    if record_fingerprint:
        source["fingerprint"] = embedder.fingerprint
    meta = manifest(clip, tokenizer, embedder.loaded.preprocess, context, "fp32", source)
    (out / "cnclip_onnx.json").write_text(json.dumps(meta, ensure_ascii=False, indent=2), encoding="utf-8")
    return out
