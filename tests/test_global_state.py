"""Library calls that need a numeric setting (exact fp32, one faiss thread) leave the process' own as it was.

Before: build-pairs --model switched TF32 off for the whole process through the legacy torch API
(after which torch >= 2.9 refuses to report a precision set with the other API), semantic dedup set
faiss to one thread for good, and opening a Searcher did the same.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from data_tools.scoring import ScoringOptions
from data_tools.semantic import SemanticIndex, similar_pairs

ROOT = Path(__file__).resolve().parent.parent


def precision_state() -> dict:
    """Everything exact_float32 may touch, read through both torch APIs ('unreadable' where torch refuses)."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn

    def read(getter):
        try:
            return getter()
        except RuntimeError:
            return "unreadable"

    return {"precision": read(torch.get_float32_matmul_precision), "matmul_allow_tf32": read(lambda: matmul.allow_tf32),
            "cudnn_allow_tf32": read(lambda: cudnn.allow_tf32), "matmul": matmul.fp32_precision,
            "conv": cudnn.conv.fp32_precision, "rnn": cudnn.rnn.fp32_precision}


@pytest.fixture()
def callers_settings():
    """A caller that wants TF32 matmuls and two faiss threads; the test process' settings are put back afterwards."""
    import faiss

    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (torch.get_float32_matmul_precision(), matmul.fp32_precision, cudnn.conv.fp32_precision,
             cudnn.rnn.fp32_precision, faiss.omp_get_max_threads())
    torch.set_float32_matmul_precision("high")
    faiss.omp_set_num_threads(2)
    yield
    torch.set_float32_matmul_precision(saved[0])
    matmul.fp32_precision, cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = saved[1:4]
    faiss.omp_set_num_threads(saved[4])


# Each setup in a fresh interpreter (forked after importing torch): the settings are process globals.
SETUPS = {
    "default": "pass",
    "legacy high": "torch.set_float32_matmul_precision('high')",
    "legacy medium": "torch.set_float32_matmul_precision('medium')",
    "legacy allow_tf32": "torch.backends.cuda.matmul.allow_tf32 = True; torch.backends.cudnn.allow_tf32 = False",
    "new api": "torch.backends.cuda.matmul.fp32_precision = 'tf32'; torch.backends.cudnn.conv.fp32_precision = 'ieee'",
    "mixed apis": "torch.set_float32_matmul_precision('high'); torch.backends.cuda.matmul.allow_tf32 = False",
}


def test_exact_float32_restores_every_caller_setting():
    script = textwrap.dedent(f"""
        import os, sys
        import torch
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        from test_global_state import precision_state
        from cnclip.global_state import exact_float32
        for name, setup in {SETUPS!r}.items():
            pid = os.fork()
            if pid == 0:
                exec(setup)
                before = precision_state()
                try:
                    with exact_float32():
                        inside = precision_state()
                        raise KeyError("the computation fails")
                except KeyError:
                    pass
                after = precision_state()
                ok = before == after and inside["matmul"] == inside["conv"] == inside["rnn"] == "ieee"
                ok = ok and inside["precision"] in ("highest", "unreadable" if before["precision"] == "unreadable" else "")
                print(name, "OK" if ok else f"FAILED before={{before}} inside={{inside}} after={{after}}", flush=True)
                os._exit(0)
            os.waitpid(pid, 0)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", script], capture_output=True, text=True, env=env, timeout=120)
    lines = done.stdout.splitlines()
    assert [line.split(" OK")[0] for line in lines if line.endswith(" OK")] == list(SETUPS), done.stdout + done.stderr


def test_build_pairs_with_a_model_leaves_precision_and_faiss_threads_alone(tmp_path, tiny_model_dir, callers_settings):
    import faiss
    from test_data_tools_selection import build, scored_dump

    before = precision_state()
    assert before["precision"] == "high"
    result = build(scored_dump(tmp_path), tmp_path / "out", {"dedup": {"semantic_threshold": 0.99}}, format="pairs",
                   scoring=ScoringOptions(model=str(tiny_model_dir)))
    assert result.report["kept"] > 0
    assert precision_state() == before
    assert faiss.omp_get_max_threads() == 2


def test_semantic_dedup_leaves_faiss_threads_alone(callers_settings):
    import faiss

    vectors = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = SemanticIndex(8, 0.99)
    for i, vector in enumerate(vectors):
        index.find(vector)
        index.add(vector, i)
    assert len(index) == 300 and faiss.omp_get_max_threads() == 2
    pairs = [pair for left, right in similar_pairs(np.vstack([vectors, vectors[:3]]), 0.999)
             for pair in zip(left.tolist(), right.tolist())]
    assert pairs == [(0, 300), (1, 301), (2, 302)]
    assert faiss.omp_get_max_threads() == 2


def test_searcher_leaves_faiss_threads_alone(tmp_path, tiny_model_dir, callers_settings):
    import faiss
    from test_search_index import build as build_index, make_photos

    from cnclip.search_index import Searcher

    build_index(make_photos(tmp_path / "photos", n_per=1), tmp_path / "idx", tiny_model_dir)
    searcher = Searcher.open(tmp_path / "idx", device="cpu")
    assert searcher.index.manifest["kind"] == "exact"
    assert searcher.by_text("红色圆形", 3) and faiss.omp_get_max_threads() == 2
