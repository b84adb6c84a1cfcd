"""`cnclip serve --backend onnx --workers N` under concurrent load (benchmarks/serve_load.py, CI-sized).

Asserts correctness and that nothing is lost, not speed: every request is answered with 200 and its top hit is
the one computed offline; the server's RSS stays flat after warm-up; the server process never maps libtorch.
The app runs at most --workers model calls at a time (checked with a searcher that counts overlapping calls).
"""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

from conftest import COLORS, image_bytes, load_benchmark, require
from onnx_fixtures import write_onnx_export

require("onnxruntime", "in the test extra (the onnx and serve extras)")


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("serve_load")


@pytest.fixture(scope="module")
def onnx_index(tiny_model_dir, tmp_path_factory):
    from cnclip.onnx_runtime import OnnxEmbedder
    from cnclip.search_index import build_index

    root = tmp_path_factory.mktemp("serve_load")
    export = write_onnx_export(tiny_model_dir, root / "export")
    photos = root / "photos"
    photos.mkdir()
    for i, color in enumerate(COLORS.values()):
        for shape in ("circle", "square"):
            for width in (30, 45, 60):
                (photos / f"{i}_{shape}_{width}.png").write_bytes(image_bytes(color, (width, 30), shape))
    build_index([str(photos)], root / "idx", OnnxEmbedder(export))
    return root / "idx", export


def test_concurrent_queries_are_all_answered_correctly_and_rss_stays_flat(bench, onnx_index, tmp_path):
    index, export = onnx_index
    result = bench.run(index, export, workers=2, levels=(1, 8), requests=48, time_limit=120, warmup=10,
                       log_path=tmp_path / "server.log")
    assert result["queries"] >= 16, result  # enough distinct queries with a clear winner to mean something
    for level in result["levels"]:
        assert level["sent"] == level["answered"] == 48, level
        assert level["errors"] == 0 and level["wrong"] == 0, level
    assert result["rss_growth_mb"] < 25, result["rss"]
    assert result["server_loaded_torch"] is False


def test_a_wrong_top_hit_is_counted(bench, onnx_index, tmp_path):
    """The load test's check can fail: expected rows shifted by one are all reported wrong."""
    index, export = onnx_index
    answers, _ = bench.expected_answers(index, export, bench.default_queries(), 1e-5)
    port = bench.free_port()
    server = bench.start_server(index, export, 1, port, tmp_path / "server.log")
    try:
        shifted = {q: row + 1 for q, row in answers.items()}
        level = asyncio.run(bench.run_level(port, shifted, 4, 12, 60, 5))
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert level["answered"] == 12 and level["wrong"] == 12 and level["errors"] == 0


@pytest.mark.parametrize("workers", [1, 3])
def test_at_most_workers_model_calls_run_at_once(workers):
    import httpx

    from cnclip.search_app import create_app

    running, peak, lock = 0, 0, threading.Lock()

    def by_text(text, k):
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.05)
        with lock:
            running -= 1
        return []

    index = SimpleNamespace(manifest={"kind": "exact", "model": {"spec": "m"}, "roots": []}, items=[],
                            __len__=lambda: 0)
    searcher = SimpleNamespace(index=index, by_text=by_text, embedder=SimpleNamespace(backend="onnx"))
    app = create_app(searcher, allowed_hosts=["testserver"], workers=workers)

    async def load():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            return await asyncio.gather(*(http.get("/api/search", params={"q": f"红色{i}"}) for i in range(9)))

    responses = asyncio.run(load())
    assert [r.status_code for r in responses] == [200] * 9
    assert peak == workers


def test_workers_must_be_positive():
    from cnclip.commands.serve import main as serve_main

    assert serve_main(["nowhere", "--workers", "0"]) == 2
    assert serve_main(["nowhere", "--workers", "100000"]) == 2  # not 100,000 threads
