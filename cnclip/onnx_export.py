"""A fine-tuned run as two ONNX encoders that run without torch (`export_onnx`, run by
`cnclip export RUN --format onnx`).

OUT_DIR holds (format "cnclip-onnx", version 1):
  image_encoder.onnx  pixel_values float32 [batch, 3, S, S] -> image_embeds float32 [batch, D]
  text_encoder.onnx   input_ids, attention_mask int64 [batch, seq] -> text_embeds float32 [batch, D]
  cnclip_onnx.json    what a runtime needs besides the graphs: sizes, text and image preprocessing, logit scale,
                      precision, file names, opset
  the tokenizer (tokenizer.json included), preprocessor_config.json and a README.md card.

Guarantees:
* Embeddings are L2-normalised; batch is dynamic in both graphs, and seq in the text graph (1..context_length,
  right padding as the tokenizer pads). Inputs and outputs are float32 / int64 at every precision.
* The model is the run's merged model, the same one `cnclip export --format transformers` writes
  (`cnclip.exporter.merge_checked`).
* Before OUT_DIR is swapped in, onnxruntime runs both graphs on probe inputs (texts of 1 token to the full
  context, images in a batch) and compares them with cnclip's PyTorch encoders: fp32 must agree within
  FP32_TOLERANCE, fp16 within FP16_TOLERANCE; int8 is reported (its check is retrieval recall, see the tests).
  A graph that disagrees is never written.
* OUT_DIR is written under a temporary name and swapped in whole (cnclip.atomic.atomic_dir).

Why torch.onnx.export(dynamo=True) (torch 2.13, transformers 5.25): the legacy TorchScript tracer records the
Python branches taken for the example input, and transformers drops an all-ones attention mask in Python, so a
text graph traced from an unpadded example ignored padding (max abs diff 0.19 on padded rows); traced from a padded
example it agrees, a correctness that hangs on the example. Its graph also fails onnxconverter-common's fp16
conversion (Conv bound to float and float16), and the legacy exporter is deprecated. torch.export keeps the mask
as data whatever the example (export_graphs still passes a padded one).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .atomic import atomic_dir, write_json
from .data import preprocess_text, tokenize
from .errors import ModelLoadError, UsageError
from .embedders import combine_fingerprints
from .models import ImagePreprocess, encode_images, encode_texts, image_tower_fingerprint, text_tower_fingerprint
from .modelscope_upload import folder_files, format_size

log = logging.getLogger(__name__)

FORMAT_NAME = "cnclip-onnx"
FORMAT_VERSION = 1
MANIFEST = "cnclip_onnx.json"
IMAGE_FILE = "image_encoder.onnx"
TEXT_FILE = "text_encoder.onnx"
PRECISIONS = ("fp32", "fp16", "int8")
# The opset torch's exporter translates to natively (torch.onnx's TORCHLIB_OPSET in torch 2.13: no version
# conversion step); onnxruntime runs it from 1.14 on.
OPSET = 18
FP32_TOLERANCE = 1e-4
# fp16 weights and activations: ~1e-3 on normalised embeddings; a graph off by more is broken, not rounded.
FP16_TOLERANCE = 1e-2
# A protobuf file holds at most 2 GiB; towers larger than this keep their weights in FILE.data beside it.
SINGLE_FILE_BYTES = 1_800_000_000
INSTALL_HINT = 'pip install "cnclip[onnx]"'


class ImageEncoder(nn.Module):
    """pixel_values -> L2-normalised image embeddings (cnclip.models.encode_images)."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(encode_images(self.clip, pixel_values), dim=-1)


class TextEncoder(nn.Module):
    """input_ids, attention_mask -> L2-normalised text embeddings (cnclip.models.encode_texts). token_type_ids
    are all zeros for one sentence, which is what BERT uses when none are given."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(encode_texts(self.clip, input_ids, attention_mask), dim=-1)


def require_onnx(precision: str) -> None:
    """The packages are an optional extra: name it when one is missing, before anything is loaded."""
    import importlib.util

    needed = ("onnx", "onnxruntime", "onnxscript", *(("onnxconverter_common",) if precision == "fp16" else ()))
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"--format onnx needs {', '.join(missing)}: {INSTALL_HINT}")


def check_out_dir(out_dir: Path) -> None:
    """OUT_DIR is replaced whole: refuse anything that is not empty or an earlier ONNX export."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--to {out_dir} is a file; expected a directory to write the ONNX export into")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
        raise UsageError(f"--to {out_dir} exists and is not an earlier cnclip ONNX export (no {MANIFEST}); it "
                         "would be replaced whole, so choose a new or empty directory")


def check_exportable(clip: nn.Module, tokenizer, context_length: int) -> None:
    """What the graphs assume of the model, checked before tracing so the error names the cause."""
    from transformers import ChineseCLIPModel

    if not isinstance(clip, ChineseCLIPModel):
        raise ModelLoadError(f"cannot export a {type(clip).__name__} to ONNX: only ChineseCLIPModel is supported")
    if tokenizer.pad_token_id is None:
        raise ModelLoadError(f"cannot export to ONNX: the run's tokenizer ({type(tokenizer).__name__}) has no pad "
                             "token, and the text graph takes right-padded batches")
    positions = clip.config.text_config.max_position_embeddings
    if context_length > positions:
        raise UsageError(f"cannot export to ONNX: data.context_length {context_length} exceeds the text tower's "
                         f"max_position_embeddings {positions}")


def preprocess_manifest(p: ImagePreprocess) -> dict:
    """Everything a numpy implementation needs to reproduce cnclip.data.ImageTransform."""
    resize = ({"shortest_edge": p.shortest_edge} if p.shortest_edge is not None
              else {"height": p.resize_height, "width": p.resize_width})
    return {"resize": resize, "resample": p.resample, "do_center_crop": p.do_center_crop,
            "crop_size": {"height": p.crop_height, "width": p.crop_width}, "rescale_factor": p.rescale_factor,
            "mean": list(p.mean), "std": list(p.std), "image_mode": "RGB"}


def text_preprocess_manifest() -> dict:
    """cnclip.data.preprocess_text as data: lower-case, then these replacements (checked against it)."""
    replace = {"“": '"', "”": '"'}
    sample = "A“B”"
    assert preprocess_text(sample) == "".join(replace.get(c, c) for c in sample.lower()), "preprocess_text changed"
    return {"lowercase": True, "replace": replace}


def probe_inputs(tokenizer, image_size: int, context_length: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Texts from one character to past the context (truncated), padded to the context; three random images."""
    from .exporter import PROBE_TEXTS

    texts = ["猫", *PROBE_TEXTS, "图" * (context_length * 2)]
    tokens = tokenize(tokenizer, texts, context_length)
    pixels = torch.randn(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}, pixels


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """The exporter's own chatter is not the user's business: onnxscript's and onnx_ir's INFO lines about each
    rewrite, torch.onnx's notes on torchvision ops it skips, and the deprecation and axis-renaming warnings the
    exporter raises about its own internals. Its errors still propagate."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
            warnings.filterwarnings("ignore", message=r"# The axis name: .* will not be used", category=UserWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export_graph(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_name: str,
                  dynamic_shapes: dict) -> None:
    big = sum(p.numel() * p.element_size() for p in module.parameters()) > SINGLE_FILE_BYTES
    try:
        with quiet_exporter():
            program = torch.onnx.export(module.eval(), args, dynamo=True, opset_version=OPSET, input_names=input_names,
                                        output_names=[output_name], dynamic_shapes=dynamic_shapes, verbose=False)
            program.save(str(path), external_data=big)
    except Exception as exc:  # noqa: BLE001 - torch.export / onnxscript raise many types; all mean "cannot"
        raise ModelLoadError(f"cannot export the {path.stem.replace('_', ' ')} to ONNX: "
                             f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc


def export_graphs(clip: nn.Module, out_dir: Path, image_size: int, context_length: int) -> None:
    """image_encoder.onnx and text_encoder.onnx in fp32, with dynamic batch (and seq)."""
    from torch.export import Dim

    batch, seq = Dim("batch", min=1, max=4096), Dim("seq", min=1, max=context_length)
    pixels = torch.zeros(2, 3, image_size, image_size)
    # Example text with padding in the second row, so nothing about masks can be specialised away.
    ids = torch.ones(2, context_length, dtype=torch.long)
    mask = torch.ones(2, context_length, dtype=torch.long)
    mask[1, context_length // 2:] = 0
    _export_graph(ImageEncoder(clip), (pixels,), out_dir / IMAGE_FILE, ["pixel_values"], "image_embeds",
                  {"pixel_values": {0: batch}})
    _export_graph(TextEncoder(clip), (ids, mask), out_dir / TEXT_FILE, ["input_ids", "attention_mask"],
                  "text_embeds", {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}})


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 quantization of the MatMul/Gemm weights (activations quantized at run time).

    Weights are 7-bit per output channel (reduce_range, per_channel): an export runs on CPUs it was not made on, and
    onnxruntime's u8s8 kernels on x86 without VNNI (AVX2, pre-Cascade Lake) can saturate full 8-bit weights;
    per-channel scales win back the bit. On the demo model this kept validation recall within 0.2 points of fp32
    where 8-bit per-tensor weights lost 0.9 (tests/test_onnx_export.py)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    def no_preprocessing_advice(record: logging.LogRecord) -> bool:
        # onnxruntime advises static-quantization pre-processing on the root logger at every call
        return "pre-processing before quantization" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(no_preprocessing_advice)
    try:
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QInt8,
                         per_channel=True, reduce_range=True,
                         use_external_data_format=src.with_name(src.name + ".data").exists())
    finally:
        root.removeFilter(no_preprocessing_advice)


def convert_fp16(src: Path, dst: Path) -> None:
    """fp16 weights and compute; inputs and outputs stay float32 (keep_io_types), as the format requires."""
    import onnx
    from onnxconverter_common import float16

    with warnings.catch_warnings():
        # constants outside fp16's range are clamped (the attention mask's -3.4e38 becomes -1e4, still a mask);
        # the agreement check after conversion is what decides whether the result is usable
        warnings.filterwarnings("ignore", message=r"the float32 number .* will be truncated", category=UserWarning)
        model = float16.convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))


def convert_precision(fp32_dir: Path, out_dir: Path, precision: str) -> None:
    for name in (IMAGE_FILE, TEXT_FILE):
        if precision == "fp32":
            for f in fp32_dir.glob(name + "*"):  # the graph and any external-data file beside it
                shutil.move(str(f), str(out_dir / f.name))
        elif precision == "int8":
            quantize_int8(fp32_dir / name, out_dir / name)
        else:
            convert_fp16(fp32_dir / name, out_dir / name)


def session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # onnxruntime's own warnings (unused initializers etc.) are not the user's
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def agreement(clip: nn.Module, out_dir: Path, tokens: dict[str, torch.Tensor], pixels: torch.Tensor) -> dict:
    """Max abs difference between onnxruntime's and PyTorch's normalised embeddings on the probe inputs."""
    text_ref = TextEncoder(clip).eval()(**tokens).numpy()
    image_ref = ImageEncoder(clip).eval()(pixels).numpy()
    text = session(out_dir / TEXT_FILE).run(None, {k: v.numpy() for k, v in tokens.items()})[0]
    image = session(out_dir / IMAGE_FILE).run(None, {"pixel_values": pixels.numpy()})[0]
    return {"text": float(abs(text - text_ref).max()), "image": float(abs(image - image_ref).max())}


def check_agreement(diff: dict, precision: str) -> None:
    limit = {"fp32": FP32_TOLERANCE, "fp16": FP16_TOLERANCE}.get(precision)
    worst = max(diff.values())
    if limit is not None and worst > limit:
        raise ModelLoadError(f"the {precision} ONNX graphs embed differently from the PyTorch model (max abs diff "
                             f"{worst:.2e} > {limit:.0e}: {diff}); not exporting")


def manifest(clip: nn.Module, tokenizer, preprocess: ImagePreprocess, context_length: int, precision: str,
             source: dict) -> dict:
    return {
        "format": FORMAT_NAME, "version": FORMAT_VERSION,
        "embed_dim": int(clip.config.projection_dim), "context_length": context_length,
        "image_size": int(clip.config.vision_config.image_size),
        "text_preprocess": text_preprocess_manifest(),
        "tokenizer": {"pad_token_id": int(tokenizer.pad_token_id), "add_special_tokens": True},
        "preprocess": preprocess_manifest(preprocess),
        "logit_scale": float(clip.logit_scale.detach().exp().item()),
        "precision": precision,
        "files": {"image": IMAGE_FILE, "text": TEXT_FILE},
        "source": source,
        "opset": OPSET,
    }


CARD = """\
---
tags: [chinese-clip, onnx, cnclip]
library_name: onnxruntime
---
# {title} (ONNX, {precision})

The image and text encoders of {run} as ONNX graphs ({precision}, opset {opset}), exported by
`cnclip export --format onnx`. Both output L2-normalised {dim}-dimensional embeddings, so a dot
product is the cosine similarity. Batch size is dynamic; text length is dynamic up to {context} tokens.

| file | input | output | size |
|---|---|---|---|
| `{image_file}` | `pixel_values` float32 [batch, 3, {size}, {size}] | `image_embeds` float32 \
[batch, {dim}] | {image_bytes} |
| `{text_file}` | `input_ids`, `attention_mask` int64 [batch, seq] | `text_embeds` float32 [batch, {dim}] \
| {text_bytes} |

Agreement with the PyTorch model on probe inputs (max abs difference of embeddings): text {diff_text:.1e},
image {diff_image:.1e}.{precision_note}

`{manifest}` records the preprocessing: captions are lower-cased (curly quotes become `"`) and tokenised
with `tokenizer.json`; images are converted to RGB, resized ({resize}, PIL resample {resample}),
{crop}scaled by {rescale:.6g} and normalised with mean {mean} and std {std}.

```python
import json
import numpy as np
import onnxruntime as ort
from PIL import Image
from tokenizers import Tokenizer

cfg = json.load(open("{manifest}"))
text_session = ort.InferenceSession("{text_file}", providers=["CPUExecutionProvider"])
image_session = ort.InferenceSession("{image_file}", providers=["CPUExecutionProvider"])

tokenizer = Tokenizer.from_file("tokenizer.json")
tokenizer.enable_truncation(cfg["context_length"])
tokenizer.enable_padding(pad_id=cfg["tokenizer"]["pad_token_id"])
texts = [t.lower().replace("“", '"').replace("”", '"') for t in ["一只猫", "海边的日落"]]
enc = tokenizer.encode_batch(texts)
ids = np.array([e.ids for e in enc], dtype=np.int64)
mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
text_emb = text_session.run(None, {{"input_ids": ids, "attention_mask": mask}})[0]

p = cfg["preprocess"]
image = Image.open("photo.jpg").convert("RGB").resize(({size}, {size}), resample=p["resample"])
x = np.asarray(image, dtype=np.float32) * p["rescale_factor"]
x = ((x - p["mean"]) / p["std"]).transpose(2, 0, 1)[None].astype(np.float32)
image_emb = image_session.run(None, {{"pixel_values": x}})[0]
print(text_emb @ image_emb.T)  # cosine similarities; times cfg["logit_scale"] for CLIP's logits
```
{resize_note}"""


PRECISION_NOTES = {
    "fp32": "",
    "fp16": " fp16 weights and arithmetic inside the graphs; inputs and outputs are float32.",
    "int8": (" int8 MatMul/Gemm weights (7-bit, per output channel) with activations quantized at run time: "
             "embeddings are approximate, so check retrieval on your own validation data against the fp32 export."),
}


def render_card(title: str, meta: dict, diff: dict, sizes: dict[str, int]) -> str:
    p = meta["preprocess"]
    resize = ", ".join(f"{k} {v}" for k, v in p["resize"].items())
    crop = (f"centre-cropped to {p['crop_size']['height']}x{p['crop_size']['width']}, " if p["do_center_crop"]
            else "")
    note = ("" if "height" in p["resize"] and not p["do_center_crop"] else
            "\nThe snippet squashes the image to a square; this model was trained with a shortest-edge resize and "
            "centre crop as recorded above, which a faithful client reproduces.\n")
    return CARD.format(
        title=title, precision=meta["precision"], run=meta["source"].get("run") or meta["source"]["model"],
        opset=meta["opset"], dim=meta["embed_dim"], context=meta["context_length"], size=meta["image_size"],
        image_file=IMAGE_FILE, text_file=TEXT_FILE, image_bytes=format_size(sizes[IMAGE_FILE]),
        text_bytes=format_size(sizes[TEXT_FILE]), diff_text=diff["text"], diff_image=diff["image"],
        manifest=MANIFEST, resize=resize, resample=p["resample"], crop=crop, rescale=p["rescale_factor"],
        mean=[round(m, 6) for m in p["mean"]], std=[round(s, 6) for s in p["std"]], resize_note=note,
        precision_note=PRECISION_NOTES[meta["precision"]])


def graph_bytes(out_dir: Path, name: str) -> int:
    return sum(f.stat().st_size for f in out_dir.glob(name + "*"))


def export_onnx(run_dir: str | Path, out_dir: str | Path, *, precision: str = "fp32") -> dict:
    """Write the run's merged model as ONNX encoders in OUT_DIR; returns a JSON-able report (files, agreement)."""
    from .exporter import (check_run_dir_to_export, merge_checked, readable_by_umask, save_image_processor,
                           save_tokenizer)

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if precision not in PRECISIONS:
        raise UsageError(f"ONNX precision {precision!r}: accepted: {', '.join(PRECISIONS)}")
    check_run_dir_to_export(run_dir)
    require_onnx(precision)
    check_out_dir(out_dir)
    merged = merge_checked(run_dir)
    clip, base, recipe = merged.clip.eval(), merged.base, merged.recipe
    context_length = recipe.data.context_length
    check_exportable(clip, base.tokenizer, context_length)
    image_size = clip.config.vision_config.image_size
    tokens, pixels = probe_inputs(base.tokenizer, image_size, context_length)

    with atomic_dir(out_dir) as tmp:
        fp32_dir = tmp / "fp32"
        fp32_dir.mkdir()
        log.info("exporting the image and text encoders to ONNX (opset %d)", OPSET)
        export_graphs(clip, fp32_dir, image_size, context_length)
        check_agreement(agreement(clip, fp32_dir, tokens, pixels), "fp32")
        convert_precision(fp32_dir, tmp, precision)
        shutil.rmtree(fp32_dir)
        diff = agreement(clip, tmp, tokens, pixels)
        check_agreement(diff, precision)
        save_tokenizer(base.tokenizer, tmp, context_length)
        if not (tmp / "tokenizer.json").is_file():
            raise ModelLoadError(f"the run's tokenizer ({type(base.tokenizer).__name__}) has no fast tokenizer.json; "
                                 "an ONNX export needs one for runtimes without transformers")
        save_image_processor(base.path, tmp, base.processor_config)
        # The weights' fingerprint, as a search index built with the run records it: the index then accepts
        # this export (any precision) as its query model (cnclip.embedders).
        source = {"model": recipe.model.base, "run": run_dir.resolve().name,
                  "fingerprint": combine_fingerprints(image_tower_fingerprint(clip), text_tower_fingerprint(clip))}
        # the preprocessing the run trained and evaluated with (the same settings preprocessor_config.json holds)
        meta = manifest(clip, base.tokenizer, base.preprocess, context_length, precision, source)
        write_json(tmp / MANIFEST, meta)
        sizes = {name: graph_bytes(tmp, name) for name in (IMAGE_FILE, TEXT_FILE)}
        (tmp / "README.md").write_text(render_card(out_dir.resolve().name, meta, diff, sizes), encoding="utf-8")
        readable_by_umask(tmp)

    files = folder_files(out_dir)
    return {
        "run_dir": str(run_dir), "out_dir": str(out_dir), "format": "onnx", "precision": precision,
        "checkpoint": str(merged.checkpoint), "merge_max_abs_diff": merged.merge_max_abs_diff,
        "onnx_max_abs_diff": diff, "sizes": sizes,
        "files": [{"path": f.path, "size": f.size} for f in files],
        "total_bytes": sum(f.size for f in files),
    }
