"""The reference implementations, loaded unchanged from their installed packages (test-only).

* cn_clip (OFA-Sys Chinese-CLIP, `pip install cn-clip`, the `test` extra): its package `__init__`
  imports torchvision through `clip/utils.py`, and the registry's torchvision does not import beside
  torch 2.13.0+cpu ("operator torchvision::nms does not exist"). So `clip/bert_tokenizer.py`,
  `clip/configuration_bert.py`, `clip/modeling_bert.py` and `clip/model.py` are loaded by file path,
  unchanged, under their own module names, with `cn_clip.clip._tokenizer` set exactly as
  `cn_clip/clip/__init__.py` sets it (`FullTokenizer()`). Three functions that live in modules with
  torchvision (or lmdb) imports are taken from their source text, unchanged, with `ast`:
  `clip/utils.py`'s `tokenize` and `create_model` (the checkpoint loader behind `load_from_name`) and
  `eval/data.py`'s `_preprocess_text`. Only `image_transform` (torchvision itself) is left out here;
  tests/test_reference_torchvision.py checks it in a venv where torchvision imports.
* ModelScope's own CLIP model class (`modelscope/models/multi_modal/clip/model.py`,
  `CLIPForMultiModalEmbedding`) imports without torchvision; its pipeline's preprocessor does not
  (it imports torchvision, timm and decord).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import os
import sys
import types
from pathlib import Path
from typing import List, Union

import torch

from conftest import missing_dependency


def _load_file(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _function_from_source(path: Path, name: str, namespace: dict):
    """Function `name` from the file at `path`, its source text unchanged, defined in `namespace`."""
    source = path.read_text(encoding="utf-8")
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == name)
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), namespace)
    return namespace[name]


@functools.cache
def cn_clip() -> types.SimpleNamespace:
    spec = importlib.util.find_spec("cn_clip")
    if spec is None or not spec.submodule_search_locations:
        missing_dependency("the reference cn_clip is not installed (README's test command installs cn-clip==1.6.0)")
    root = Path(list(spec.submodule_search_locations)[0])
    clip_dir = root / "clip"
    names = ["cn_clip", "cn_clip.clip", "cn_clip.clip.bert_tokenizer", "cn_clip.clip.configuration_bert",
             "cn_clip.clip.modeling_bert", "cn_clip.clip.model"]
    saved = {n: sys.modules.get(n) for n in names}
    package = types.ModuleType("cn_clip")
    package.__path__ = [str(root)]
    clip_package = types.ModuleType("cn_clip.clip")
    clip_package.__path__ = [str(clip_dir)]
    sys.modules.update({"cn_clip": package, "cn_clip.clip": clip_package})
    try:
        bert_tokenizer = _load_file("cn_clip.clip.bert_tokenizer", clip_dir / "bert_tokenizer.py")
        clip_package._tokenizer = bert_tokenizer.FullTokenizer()  # cn_clip/clip/__init__.py, first lines
        _load_file("cn_clip.clip.configuration_bert", clip_dir / "configuration_bert.py")
        _load_file("cn_clip.clip.modeling_bert", clip_dir / "modeling_bert.py")
        model = _load_file("cn_clip.clip.model", clip_dir / "model.py")
    finally:  # leave no half-made cn_clip package behind for other code that looks it up
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
    utils_ns = {"torch": torch, "Union": Union, "List": List, "_tokenizer": clip_package._tokenizer,
                "json": json, "os": os, "Path": Path, "CLIP": model.CLIP, "convert_weights": model.convert_weights}
    tokenize = _function_from_source(clip_dir / "utils.py", "tokenize", utils_ns)
    preprocess_text = _function_from_source(root / "eval" / "data.py", "_preprocess_text", {})

    def create_model(model_name: str, checkpoint: dict, config_dir: Path):
        """cn_clip's create_model, run with its model_configs/ looked up under `config_dir` (tiny sizes)."""
        namespace = dict(utils_ns, __file__=str(config_dir / "utils.py"))
        return _function_from_source(clip_dir / "utils.py", "create_model", namespace)(model_name, checkpoint)

    return types.SimpleNamespace(model=model, tokenizer=clip_package._tokenizer, tokenize=tokenize,
                                 preprocess_text=preprocess_text, create_model=create_model,
                                 vocab=clip_dir / "vocab.txt")


def modelscope_clip_class():
    """ModelScope's CLIPForMultiModalEmbedding (the model its multi-modal-embedding pipeline builds)."""
    try:
        from modelscope.models.multi_modal.clip.model import CLIPForMultiModalEmbedding
    except ImportError as exc:
        missing_dependency(f"ModelScope's CLIP model class does not import here: {exc} (the test extra brings addict)")
    return CLIPForMultiModalEmbedding
