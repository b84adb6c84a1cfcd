"""`cnclip export RUN --format onnx`: the ONNX encoders embed like cnclip's PyTorch encoders (fp32 within 1e-4 on
the demo's validation images and captions, batch sizes 1, 7 and 64, texts of one character to the full context);
int8 retrieves the demo's validation set within 1 point of fp32 mean recall; fp16 runs on CPU within 1e-2; the
directory documents itself (manifest, card whose snippet runs without torch); bad requests are refused by name.

The run is the demo recipe (tiny random model, generated coloured shapes) trained for 3 epochs, so recall is far
above chance and a quantization that broke ranking would show.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import DEMO_RECIPE, REPO, require

require("onnxruntime", "in the test extra (the onnx extra)")
require("onnxscript", "in the test extra (the onnx extra)")

import onnxruntime as ort  # noqa: E402

from cnclip.commands.export import main as export_main  # noqa: E402
from cnclip.data import ImageTransform, decode_base64_image, load_split, tokenize  # noqa: E402
from cnclip.errors import EXIT_MODEL, EXIT_USAGE, ModelLoadError  # noqa: E402
from cnclip.inference import load_for_inference  # noqa: E402
from cnclip.models import encode_images, encode_texts  # noqa: E402
from cnclip.onnx_export import IMAGE_FILE, MANIFEST, TEXT_FILE  # noqa: E402
from cnclip.retrieval import retrieve  # noqa: E402
from cnclip.skiplog import SkipLog  # noqa: E402

FP32_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    from cnclip.finetune import main as finetune_main

    work = tmp_path_factory.mktemp("onnx_demo")
    overrides = {
        "model.base": REPO / "recipes" / "models" / "tiny", "data.root": work / "data", "run_dir": work / "run",
        "cache.dir": work / "cache", "train.epochs": 3, "eval.before_training": "false",
        "zeroshot.images": "", "zeroshot.classes": "", "zeroshot.templates": "",
    }
    assert finetune_main([str(DEMO_RECIPE), *(f"{k}={v}" for k, v in overrides.items())]) == 0
    return work / "run"


def export(run: Path, out: Path, *flags: str, capsys=None) -> dict:
    code = export_main([str(run), "--format", "onnx", "--to", str(out), *flags])
    assert code == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["export"] if capsys else {}


@pytest.fixture(scope="module")
def exports(demo_run, tmp_path_factory) -> dict[str, Path]:
    """The run exported at each precision, through the CLI."""
    root = tmp_path_factory.mktemp("onnx_exports")
    out = {}
    for precision, flags in (("fp32", ()), ("int8", ("--quantize", "int8")), ("fp16", ("--fp16",))):
        out[precision] = root / precision
        assert export_main([str(demo_run), "--format", "onnx", "--to", str(out[precision]), *flags]) == 0
    return out


@pytest.fixture(scope="module")
def reference(demo_run):
    """cnclip's own PyTorch model of the run, and the demo's validation split decoded through its preprocessing."""
    model = load_for_inference(str(demo_run))
    recipe = model.recipe
    split = load_split(recipe.data.root, "valid", SkipLog())
    transform = ImageTransform(model.preprocess)
    ids = split.images.ids
    pixels = transform([decode_base64_image(split.images.read(i)) for i in ids])
    return model, split, ids, pixels


def sessions(out: Path) -> tuple:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return tuple(ort.InferenceSession(str(out / f), opts, providers=["CPUExecutionProvider"])
                 for f in (IMAGE_FILE, TEXT_FILE))


def onnx_texts(text_session, tokens: dict) -> np.ndarray:
    feeds = {k: tokens[k].numpy() for k in ("input_ids", "attention_mask")}
    return text_session.run(None, feeds)[0]


@torch.no_grad()
def torch_texts(clip, tokens: dict) -> np.ndarray:
    return F.normalize(encode_texts(clip, **tokens), dim=-1).numpy()


def trimmed(tokens: dict, length: int) -> dict:
    return {k: v[:, :length] for k, v in tokens.items()}


def test_fp32_images_agree_with_pytorch_at_batch_1_7_64(exports, reference):
    model, _, ids, pixels = reference
    assert len(ids) >= 64
    image_session, _ = sessions(exports["fp32"])
    for batch in (1, 7, 64):
        x = pixels[:batch]
        with torch.no_grad():
            expected = F.normalize(encode_images(model.clip, x), dim=-1).numpy()
        got = image_session.run(None, {"pixel_values": x.numpy()})[0]
        assert got.shape == expected.shape == (batch, model.clip.config.projection_dim)
        assert np.abs(got - expected).max() <= FP32_TOLERANCE, batch
        assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)


def test_fp32_texts_agree_with_pytorch_across_batches_and_lengths(exports, reference):
    model, split, _, _ = reference
    context = model.recipe.data.context_length
    _, text_session = sessions(exports["fp32"])
    captions = [t.text for t in split.texts]
    # one real character ([CLS] 猫 [SEP]) and one past the context (truncated to exactly the context)
    captions = ["猫", "图" * (2 * context), *captions]
    tokens = tokenize(model.tokenizer, captions, context)  # padded to the full context, as training pads
    lengths = tokens["attention_mask"].sum(1)
    assert lengths[0] == 3 and lengths[1] == context and lengths.min() < lengths.max()
    worst = 0.0
    for batch in (1, 7, 64):
        rows = {k: v[:batch] for k, v in tokens.items()}
        longest = int(rows["attention_mask"].sum(1).max())
        # padded to the context, and trimmed to the batch's longest text (what search and evaluation send)
        for length in sorted({context, longest}):
            t = trimmed(rows, length)
            got, expected = onnx_texts(text_session, t), torch_texts(model.clip, t)
            assert got.shape == (batch, model.clip.config.projection_dim)
            worst = max(worst, float(np.abs(got - expected).max()))
    # the one-character caption alone at its own length (seq 3), and a [CLS]-only input (seq 1)
    for length in (3, 1):
        t = trimmed({k: v[:1] for k, v in tokens.items()}, length)
        worst = max(worst, float(np.abs(onnx_texts(text_session, t) - torch_texts(model.clip, t)).max()))
    assert worst <= FP32_TOLERANCE
    # padding really is masked: the same caption padded to the context or not embeds the same
    short = trimmed({k: v[:1] for k, v in tokens.items()}, 3)
    assert np.abs(onnx_texts(text_session, short) - onnx_texts(text_session, trimmed(tokens, context))[:1]).max() \
        <= FP32_TOLERANCE


def mean_recall(image_session, text_session, model, split, ids, pixels) -> float:
    image_emb = image_session.run(None, {"pixel_values": pixels.numpy()})[0]
    texts = split.texts
    tokens = tokenize(model.tokenizer, [t.text for t in texts], model.recipe.data.context_length)
    text_emb = onnx_texts(text_session, tokens)
    row = {image_id: r for r, image_id in enumerate(ids)}
    positives = [{row[i] for i in t.image_ids} for t in texts]
    result = retrieve(torch.from_numpy(text_emb), torch.from_numpy(image_emb), [t.text_id for t in texts], ids,
                      positives)
    return result.metrics["mean_recall"]


def test_int8_recall_within_one_point_of_fp32_and_smaller_files(exports, reference, demo_run):
    model, split, ids, pixels = reference
    fp32 = mean_recall(*sessions(exports["fp32"]), model, split, ids, pixels)
    int8 = mean_recall(*sessions(exports["int8"]), model, split, ids, pixels)
    best = json.loads((demo_run / "summary.json").read_text())["best"]["valid"]["mean_recall"]
    chance = 100 * (1 + 5 + 10) / 3 / len(ids)
    print(f"\nvalid mean recall: fp32 ONNX {fp32:.2f}, int8 ONNX {int8:.2f}, PyTorch (best) {best:.2f}, "
          f"chance {chance:.2f}")
    assert fp32 == pytest.approx(best, abs=0.01)  # the same ranking the run's own evaluation found
    assert fp32 > 2 * chance  # trained: a broken quantization has ranking to lose
    assert abs(int8 - fp32) <= 1.0
    sizes = {p: {f: (exports[p] / f).stat().st_size for f in (IMAGE_FILE, TEXT_FILE)} for p in exports}
    print("file sizes (bytes):", json.dumps(sizes))
    for f in (IMAGE_FILE, TEXT_FILE):
        assert sizes["int8"][f] < sizes["fp32"][f] and sizes["fp16"][f] < sizes["fp32"][f]


def test_fp16_runs_on_cpu_close_to_fp32(exports, reference):
    model, split, ids, pixels = reference
    image16, text16 = sessions(exports["fp16"])
    image32, text32 = sessions(exports["fp32"])
    x = pixels[:7].numpy()
    a, b = image16.run(None, {"pixel_values": x})[0], image32.run(None, {"pixel_values": x})[0]
    assert a.dtype == np.float32 and np.abs(a - b).max() <= 1e-2
    tokens = tokenize(model.tokenizer, [t.text for t in split.texts[:7]], model.recipe.data.context_length)
    assert np.abs(onnx_texts(text16, tokens) - onnx_texts(text32, tokens)).max() <= 1e-2


def test_manifest_and_card_name_the_precision(exports, reference):
    model, _, _, _ = reference
    for precision, out in exports.items():
        meta = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        assert meta["format"] == "cnclip-onnx" and meta["version"] == 1 and meta["precision"] == precision
        assert meta["opset"] >= 18 and meta["files"] == {"image": IMAGE_FILE, "text": TEXT_FILE}
        assert meta["embed_dim"] == model.clip.config.projection_dim
        assert meta["context_length"] == model.recipe.data.context_length
        assert meta["image_size"] == model.clip.config.vision_config.image_size
        p = model.preprocess
        assert meta["preprocess"]["mean"] == list(p.mean) and meta["preprocess"]["resample"] == p.resample
        assert meta["logit_scale"] == pytest.approx(model.clip.logit_scale.exp().item())
        assert (out / "tokenizer.json").is_file() and (out / "preprocessor_config.json").is_file()
        card = (out / "README.md").read_text(encoding="utf-8")
        assert card.startswith("---\n") and f"(ONNX, {precision})" in card
        assert ("embeddings are approximate" in card) is (precision == "int8")
        graph = ort.InferenceSession(str(out / TEXT_FILE), providers=["CPUExecutionProvider"])
        dims = [d for d in graph.get_inputs()[0].shape]
        assert all(isinstance(d, str) for d in dims), dims  # batch and seq are symbolic


# Runs the card's snippet in the export directory with torch, transformers and cnclip unimportable.
CARD_RUN = textwrap.dedent('''
    import importlib.abc, re, sys
    class Blocked(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers", "cnclip"):
                raise ImportError(f"{name} must not be needed")
    sys.meta_path.insert(0, Blocked())
    card = open("README.md", encoding="utf-8").read()
    exec(re.search(r"```python\\n(.*?)```", card, re.S).group(1))
''')


def test_card_snippet_runs_without_torch_and_matches_pytorch(exports, reference):
    from PIL import Image

    model, _, _, _ = reference
    out = exports["fp32"]
    size = model.clip.config.vision_config.image_size
    photo = out / "photo.jpg"
    Image.new("RGB", (size + 9, size), (220, 30, 30)).save(photo)  # not square: the snippet squashes it
    try:
        proc = subprocess.run([sys.executable, "-c", CARD_RUN], cwd=out, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": ""})
        decoded = Image.open(photo).convert("RGB")
        decoded.load()
    finally:
        photo.unlink()
    assert proc.returncode == 0, proc.stderr
    sims = np.array([[float(v) for v in row.strip(" []").split()] for row in proc.stdout.strip().splitlines()])
    # the snippet's two captions against the same decoded photo, through cnclip's PyTorch path (the demo model
    # squashes to a square, as the snippet does)
    assert model.preprocess.shortest_edge is None and not model.preprocess.do_center_crop
    tokens = tokenize(model.tokenizer, ["一只猫", "海边的日落"], model.recipe.data.context_length)
    with torch.no_grad():
        image = F.normalize(encode_images(model.clip, ImageTransform(model.preprocess)([decoded])), dim=-1)
    expected = torch_texts(model.clip, tokens) @ image.numpy().T
    assert sims.shape == (2, 1) and np.abs(sims - expected).max() <= 1e-4, (sims, expected)


def refused(argv: list[str], capsys) -> tuple[int, str]:
    code = export_main(argv)
    return code, capsys.readouterr().err


def test_refusals_name_the_cause(demo_run, tmp_path, capsys):
    out = str(tmp_path / "out")
    code, err = refused([str(demo_run), "--to", out, "--quantize", "int8"], capsys)
    assert code == EXIT_USAGE and "--format onnx" in err
    code, err = refused([str(demo_run), "--format", "onnx", "--to", out, "--quantize", "int8", "--fp16"], capsys)
    assert code == EXIT_USAGE and "choose one" in err
    code, err = refused([str(demo_run), "--format", "onnx", "--to", out, "--upload", "me/model"], capsys)
    assert code == EXIT_USAGE and "--upload" in err
    code, err = refused([str(tmp_path), "--format", "onnx", "--to", out], capsys)
    assert code == EXIT_USAGE and "not a cnclip run directory" in err
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    code, err = refused([str(demo_run), "--format", "onnx", "--to", str(occupied)], capsys)
    assert code == EXIT_USAGE and "not an earlier cnclip ONNX export" in err and (occupied / "notes.txt").exists()
    assert not Path(out).exists()


def test_refuses_a_run_whose_context_exceeds_the_text_tower(demo_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text(encoding="utf-8"))
    recipe["data"]["context_length"] = 65  # the tiny model has 64 positions
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    code, err = refused([str(run), "--format", "onnx", "--to", str(tmp_path / "out")], capsys)
    assert code == EXIT_USAGE and "context_length 65" in err and "max_position_embeddings 64" in err
    assert not (tmp_path / "out").exists()


def test_an_exporter_failure_is_a_model_error_and_leaves_no_directory(demo_run, tmp_path, capsys, monkeypatch):
    def cannot(*args, **kwargs):
        raise RuntimeError("Unsupported: data-dependent control flow in forward\nlong trace")

    monkeypatch.setattr(torch.onnx, "export", cannot)
    code, err = refused([str(demo_run), "--format", "onnx", "--to", str(tmp_path / "out")], capsys)
    assert code == EXIT_MODEL and "cannot export the image encoder to ONNX" in err and "data-dependent" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ModelLoadError):
        from cnclip.onnx_export import export_onnx

        export_onnx(demo_run, tmp_path / "out2")


def test_a_missing_runtime_is_named_with_the_extra(demo_run, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    code, err = refused([str(demo_run), "--format", "onnx", "--to", str(tmp_path / "out")], capsys)
    assert code == EXIT_USAGE and "onnxruntime" in err and 'cnclip[onnx]' in err


def test_an_index_built_with_the_run_accepts_its_onnx_export_at_every_precision(demo_run, exports, tmp_path):
    """cnclip_onnx.json records the exported weights' fingerprint as a search index built with the run records
    it, so the run's index takes any of its exports as query model (and ranks alike); other weights are refused."""
    from cnclip.errors import UsageError
    from cnclip.search_index import Searcher, build_index, open_embedder

    data = demo_run.parent / "data"
    index = tmp_path / "idx"
    build_index([str(data / "valid_imgs.tsv")], index, open_embedder("torch", str(demo_run), device="cpu"))
    by_torch = Searcher.open(index, device="cpu")
    query = "左上角有一个红色的圆形"
    expected = [hit.row for hit in by_torch.by_text(query, 5)]
    for precision, out in exports.items():
        meta = json.loads((out / "cnclip_onnx.json").read_text(encoding="utf-8"))
        assert meta["source"]["fingerprint"] == by_torch.embedder.fingerprint, precision
        searcher = Searcher.open(index, str(out), device="cpu", backend="onnx")
        rows = [hit.row for hit in searcher.by_text(query, 5)]
        assert rows[0] == expected[0] if precision == "fp32" else set(rows) & set(expected), precision
    other = json.loads((exports["fp32"] / "cnclip_onnx.json").read_text(encoding="utf-8"))
    other["source"]["fingerprint"] = "0" * 32
    forged = tmp_path / "other"
    shutil.copytree(exports["fp32"], forged)
    (forged / "cnclip_onnx.json").write_text(json.dumps(other), encoding="utf-8")
    with pytest.raises(UsageError, match="model mismatch"):
        Searcher.open(index, str(forged), device="cpu", backend="onnx")
