"""Embeddings without torch (cnclip.onnx_runtime) and `cnclip search` / `cnclip serve` on the onnx backend.

* Preprocessing: the numpy pixels (cnclip.images.ImageResize.pixels) equal cnclip.data.ImageTransform's torch
  tensor within 1e-5 for RGB, grey, grey+alpha, RGBA, palette, 16-bit and odd sizes, under both resize configs.
* Tokens: the `tokenizers` path gives transformers' input ids and masks (cnclip.data.tokenize), truncation included.
* Embeddings: the ONNX export's within 1e-4 of the PyTorch model's, texts and images, batch 1 and 7.
* No torch: a subprocess whose import of torch or transformers fails builds an index, queries it and classifies.
* The index's model check across backends, and the CLI's --backend onnx.
* A wheel installed into a new venv with only the `serve` extra's packages (no torch) answers `cnclip search query`.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnclip.commands.search import main as search_main
from cnclip.data import ImageTransform, tokenize
from cnclip.embedders import TorchEmbedder
from cnclip.errors import ModelLoadError, UsageError
from cnclip.images import ImagePreprocess, ImageResize
from cnclip.onnx_runtime import OnnxEmbedder
from cnclip.search_index import Searcher, build_index

from conftest import COLORS, REPO, image_bytes, require, wheel_in_new_venv
from onnx_fixtures import write_onnx_export

require("onnxruntime", "in the test extra (the onnx and serve extras)")


@pytest.fixture(scope="module")
def tiny_export(tiny_model_dir, tmp_path_factory) -> Path:
    return write_onnx_export(tiny_model_dir, tmp_path_factory.mktemp("onnx") / "export")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for i, (name, color) in enumerate(COLORS.items()):
        for shape in ("circle", "square"):
            (root / f"{i}_{shape}.png").write_bytes(image_bytes(color, (40 + 3 * i, 30), shape))
    return root


def _modes() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (31, 47, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, (64, 9, 4), dtype=np.uint8), "RGBA")
    palette = rgb.convert("P")
    palette.info["transparency"] = 0
    return [rgb, rgb.convert("L"), rgb.convert("LA"), rgba, palette, Image.new("RGB", (1, 1), (9, 200, 30)),
            Image.fromarray(rng.integers(0, 65536, (13, 301), dtype=np.uint16)),  # 16-bit grey ("I;16")
            Image.fromarray(rng.integers(0, 256, (500, 3, 3), dtype=np.uint8))]


@pytest.mark.parametrize("cfg", [
    {"size": {"height": 32, "width": 32}, "do_center_crop": False},
    {"size": {"shortest_edge": 36}, "crop_size": {"height": 32, "width": 32}, "do_center_crop": True},
    {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}, "resample": 2},
])
def test_numpy_pixels_equal_the_torch_preprocessing(cfg):
    preprocess = ImagePreprocess.from_dict(cfg)
    images = _modes()
    numpy_pixels = ImageResize(preprocess).pixels(images)
    torch_pixels = ImageTransform(preprocess)(images).numpy()
    assert numpy_pixels.dtype == np.float32 and numpy_pixels.shape == torch_pixels.shape
    assert np.abs(numpy_pixels - torch_pixels).max() <= 1e-5


def test_tokens_equal_transformers_tokenizer(tiny_export, tiny_model_dir):
    embedder = OnnxEmbedder(tiny_export)
    torch_side = TorchEmbedder.load(str(tiny_model_dir), "cpu")
    texts = ["一个红色的圆形", "“红色”ABC的包", "红" * 200, "x", "  蓝色  手机壳 "]
    ours = embedder.tokenizer(texts)
    ref = tokenize(torch_side.loaded.tokenizer, texts, embedder.context_length)
    length = ours["input_ids"].shape[1]
    assert length == embedder.context_length  # the 200-character text was truncated to the context
    assert (ours["input_ids"] == ref["input_ids"][:, :length].numpy()).all()
    assert (ours["attention_mask"] == ref["attention_mask"][:, :length].numpy()).all()


@pytest.mark.parametrize("batch", [1, 7])
def test_onnx_embeddings_match_pytorch(tiny_export, tiny_model_dir, batch):
    onnx_side, torch_side = OnnxEmbedder(tiny_export), TorchEmbedder.load(str(tiny_model_dir), "cpu")
    texts = (["一个红色的圆形", "“蓝色”的正方形", "黄" * 80, "绿", "猫", "A B C", "高级感托特包"] * 2)[:batch]
    images = (_modes() * 2)[:batch]
    assert np.abs(onnx_side.embed_texts(texts) - torch_side.embed_texts(texts)).max() <= 1e-4
    assert np.abs(onnx_side.embed_images(images) - torch_side.embed_images(images)).max() <= 1e-4
    assert onnx_side.fingerprint == torch_side.fingerprint


def test_a_broken_export_is_a_model_error_naming_the_file(tiny_export, tmp_path):
    with pytest.raises(ModelLoadError, match="no cnclip_onnx.json"):
        OnnxEmbedder(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_export.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "cnclip_onnx.json").write_text('{"format": "cnclip-onnx", "version": 9}', encoding="utf-8")
    with pytest.raises(ModelLoadError, match="version 1"):
        OnnxEmbedder(broken)
    (broken / "cnclip_onnx.json").write_text((tiny_export / "cnclip_onnx.json").read_text(encoding="utf-8"))
    (broken / "image_encoder.onnx").write_bytes(b"not a graph")
    with pytest.raises(ModelLoadError, match="onnxruntime cannot load"):
        OnnxEmbedder(broken)


def test_index_model_check_across_backends(tiny_export, tiny_model_dir, photos, tmp_path):
    """Same weights: a torch index answers an onnx query model with the same ranking. An export that does not
    record its weights is refused by the torch index (and builds its own)."""
    torch_index = tmp_path / "torch_idx"
    build_index([str(photos)], torch_index, TorchEmbedder.load(str(tiny_model_dir), "cpu"),
                cache_dir=str(tmp_path / "cache"))
    manifest = json.loads((torch_index / "index.json").read_text(encoding="utf-8"))
    assert manifest["model"]["backend"] == "torch" and manifest["model"]["precision"] == "fp32"
    by_torch = Searcher.open(torch_index, device="cpu")
    by_onnx = Searcher.open(torch_index, str(tiny_export), backend="onnx")
    for text in ("红色的圆形", "蓝色正方形", "黄色"):
        assert [h.row for h in by_onnx.by_text(text, 8)] == [h.row for h in by_torch.by_text(text, 8)]

    anonymous = tmp_path / "anonymous"
    for f in tiny_export.iterdir():
        (anonymous / f.name).parent.mkdir(exist_ok=True)
        (anonymous / f.name).write_bytes(f.read_bytes())
    config = json.loads((anonymous / "cnclip_onnx.json").read_text(encoding="utf-8"))
    del config["source"]["fingerprint"]
    (anonymous / "cnclip_onnx.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(UsageError, match=r"model mismatch: .*backend torch.*backend onnx.*--backend torch"):
        Searcher.open(torch_index, str(anonymous), backend="onnx")
    with pytest.raises(UsageError, match="--backend onnx needs --model"):
        Searcher.open(torch_index, backend="onnx")

    onnx_index = tmp_path / "onnx_idx"
    build_index([str(photos)], onnx_index, OnnxEmbedder(anonymous))
    rebuilt = Searcher.open(onnx_index)  # the backend and model the index records
    assert rebuilt.embedder.backend == "onnx"
    assert np.abs(rebuilt.index.vectors - by_torch.index.vectors).max() <= 1e-4
    with pytest.raises(UsageError, match="model mismatch"):
        Searcher.open(onnx_index, str(tiny_model_dir), device="cpu", backend="torch")


def test_cli_search_with_the_onnx_backend(tiny_export, photos, tmp_path, capsys):
    index = tmp_path / "idx"
    assert search_main(["index", str(photos), "--backend", "onnx", "--model", str(tiny_export), "--out", str(index),
                        "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["total"] == 8 and report["embedded"] == 8
    assert search_main(["query", str(index), "红色的圆形", "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["results"]
    expected = Searcher.open(index).by_text("红色的圆形", 3)
    assert [h["row"] for h in hits] == [h.row for h in expected]
    assert search_main(["image", str(index), str(photos / "2_square.png"), "--backend", "onnx", "--model",
                        str(tiny_export), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["ref"] == "2_square.png"
    assert search_main(["query", str(index), "红色", "--device", "cuda"]) == 2
    assert "the onnx backend runs on the CPU" in capsys.readouterr().err


NO_TORCH = """
import importlib.abc, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(f"{name} imported on the onnx path")
sys.meta_path.insert(0, Refuse())
"""


def test_the_onnx_path_imports_neither_torch_nor_transformers(tiny_export, photos, tmp_path):
    script = NO_TORCH + f"""
import json
from cnclip.commands import main
from cnclip.search_app import create_app
from cnclip.search_index import Searcher
from cnclip.prompts import parse_classes
from PIL import Image
code = main(["search", "index", {str(photos)!r}, "--backend", "onnx", "--model", {str(tiny_export)!r},
             "--out", {str(tmp_path / "idx")!r}])
assert code == 0, code
assert main(["search", "query", {str(tmp_path / "idx")!r}, "红色的圆形", "--json"]) == 0
searcher = Searcher.open({str(tmp_path / "idx")!r})
create_app(searcher)
top = searcher.classify(Image.open({str(photos / "0_circle.png")!r}), parse_classes("r: 红色\\nb: 蓝色", "x"), ["{{}}"])
assert abs(sum(c["probability"] for c in top) - 1) < 1e-5
print("LOADED", json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "LOADED []"


# ---------------------------------------------------------------- a venv with the serve extra only


def serve_requirements() -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return project["optional-dependencies"]["serve"]


def _closure(requirements: list[str]) -> set[str]:
    """The installed distributions `requirements` need, transitively (markers evaluated, no extras)."""
    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        if name in seen or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        todo += [Requirement(r) for r in (importlib.metadata.distribution(name).requires or [])]
    return seen


def _link_distributions(names: set[str], target: Path) -> None:
    """Each distribution's top-level files and folders (and its .dist-info) linked into `target`."""
    target.mkdir(parents=True)
    for name in names:
        dist = importlib.metadata.distribution(name)
        for top in {Path(str(f)).parts[0] for f in dist.files or []}:
            source = Path(dist.locate_file(top))
            if source.exists() and top != ".." and not (target / top).exists():
                (target / top).symlink_to(source)


@pytest.fixture(scope="module")
def serve_venv(tmp_path_factory) -> Path:
    """The wheel installed --no-deps into a new venv whose only other packages are the serve extra's (linked from
    the test environment, as tests/test_architecture.py's wheel test does through a .pth line)."""
    closure = _closure(serve_requirements())
    assert not closure & {"torch", "transformers", "peft"}, closure
    root = tmp_path_factory.mktemp("serve_wheel")
    _link_distributions(closure, root / "serve_deps")
    return wheel_in_new_venv(root, root / "serve_deps")


def test_search_query_runs_in_a_venv_without_torch(serve_venv, tiny_export, photos, tmp_path):
    from test_architecture import run_installed

    probe = run_installed(serve_venv, [str(serve_venv), "-c", "import torch"], tmp_path)
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr
    cnclip = str(serve_venv.parent / "cnclip")
    built = run_installed(serve_venv, [cnclip, "search", "index", str(photos), "--backend", "onnx", "--model",
                                       str(tiny_export), "--out", str(tmp_path / "idx")], tmp_path)
    assert built.returncode == 0, built.stderr[-3000:]
    query = run_installed(serve_venv, [cnclip, "search", "query", str(tmp_path / "idx"), "蓝色的正方形", "-k", "3",
                                       "--backend", "onnx", "--json"], tmp_path)
    assert query.returncode == 0, query.stderr[-3000:]
    rows = [h["row"] for h in json.loads(query.stdout)["results"]]
    assert rows == [h.row for h in Searcher.open(tmp_path / "idx").by_text("蓝色的正方形", 3)]
    where = run_installed(serve_venv, [str(serve_venv), "-c", "import cnclip; print(cnclip.__file__)"], tmp_path)
    assert not where.stdout.strip().startswith(str(REPO))  # the wheel, not the checkout
    refused = run_installed(serve_venv, [cnclip, "search", "query", str(tmp_path / "idx"), "蓝色", "--backend",
                                         "torch", "--model", str(tiny_export)], tmp_path)
    assert_serves_without_torch(cnclip, tmp_path / "idx", rows)
    assert refused.returncode == 2 and "--backend torch needs torch" in refused.stderr, refused.stderr[-3000:]


def test_without_a_recorded_source_the_files_are_the_fingerprint(tiny_export, tmp_path):
    """Graphs and any external weights beside them (FILE.onnx.data, large towers) identify the weights."""
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in tiny_export.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    config = json.loads((copy / "cnclip_onnx.json").read_text(encoding="utf-8"))
    del config["source"]["fingerprint"]
    (copy / "cnclip_onnx.json").write_text(json.dumps(config), encoding="utf-8")
    first = OnnxEmbedder(copy).fingerprint
    assert first.startswith("onnx-") and first == OnnxEmbedder(copy).fingerprint
    (copy / "image_encoder.onnx.data").write_bytes(b"weights, version 1")
    second = OnnxEmbedder(copy).fingerprint
    (copy / "image_encoder.onnx.data").write_bytes(b"weights, version 2")
    assert len({first, second, OnnxEmbedder(copy).fingerprint}) == 3


def assert_serves_without_torch(cnclip: str, index: Path, rows: list[int]) -> None:
    """`cnclip serve` from the torch-free venv answers the page's text search with the same ranking."""
    import httpx
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    server = subprocess.Popen([cnclip, "serve", str(index), "--port", str(port), "--workers", "2"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.stdout.read().decode(errors="replace")[-3000:]
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/api/search", params={"q": "蓝色的正方形", "k": 3})
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "the server did not answer within 60 s"
                time.sleep(0.3)
        assert response.status_code == 200, response.text
        assert [int(r["thumb"].rsplit("/", 1)[1]) for r in response.json()["results"]] == rows
        assert httpx.get(f"http://127.0.0.1:{port}/api/info").json()["backend"] == "onnx"
        assert "libtorch" not in Path(f"/proc/{server.pid}/maps").read_text()
    finally:
        server.terminate()
        server.wait(timeout=30)
