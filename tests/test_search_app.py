"""The search web app: its API over HTTP (Starlette's test client) and the page in a real browser.

The browser test starts `cnclip serve` as a user would, on 127.0.0.1, drives the page in headless
Chromium from the OS packages (playwright-python with the system executable: playwright's own
browser download is not used), and saves a screenshot to tests/artifacts/search_app.png.
It is skipped, with the reason, only where no Chromium executable exists; .ci/run installs one.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from cnclip.data import decode_base64_image
from cnclip.demo_data import write_demo_dataset, write_demo_zeroshot
from cnclip.inference import load_for_inference
from cnclip.runtime import pick_runtime
from cnclip.search_index import Searcher, SearchIndex, build_index, read_payload

from conftest import REPO, image_bytes

ARTIFACTS = REPO / "tests" / "artifacts"
BROWSER_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
BROWSER_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"]
QUERY = "左上角有一个红色的圆形"


@pytest.fixture(scope="module")
def demo_index(tiny_model_dir, tmp_path_factory):
    """An index over the demo data set's validation drawings (90 captioned images).

    The model is the demo run's when CNCLIP_SEARCH_DEMO_RUN names one (the docs/search.md screenshot is taken
    that way), else the tiny test model: the assertions compare the page with the library's answers.
    """
    root = tmp_path_factory.mktemp("search_demo")
    data = write_demo_dataset(root / "data")
    model = os.environ.get("CNCLIP_SEARCH_DEMO_RUN") or str(tiny_model_dir)
    loaded = load_for_inference(model)
    build_index([str(data / "valid_imgs.tsv")], root / "index", loaded, model, pick_runtime("cpu"),
                cache_dir=str(root / "cache"))
    write_demo_zeroshot(root / "data")
    return root / "index", model, data / "zeroshot_classes.txt"


@pytest.fixture(scope="module")
def client(demo_index):
    from starlette.testclient import TestClient

    from cnclip.search_app import create_app

    index, model, classes = demo_index
    app = create_app(Searcher.open(index, model, "cpu"), max_upload_bytes=200_000)
    return TestClient(app)


def png(color=(220, 40, 40), size=(96, 80)) -> bytes:
    return image_bytes(color, size, "circle")


def test_api_text_and_image_search_match_the_library(client, demo_index):
    index, model, _ = demo_index
    searcher = Searcher.open(index, model, "cpu")
    r = client.get("/api/search", params={"q": QUERY, "k": 5})
    assert r.status_code == 200
    assert [h["ref"] for h in r.json()["results"]] == [h.ref for h in searcher.by_text(QUERY, 5)]
    item = searcher.index.items[7]
    r = client.post("/api/image?k=3", content=read_payload(item))
    assert r.json()["results"][0]["ref"] == item.ref and r.json()["results"][0]["score"] > 0.999
    thumb = client.get(r.json()["results"][0]["thumb"])
    assert thumb.headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(thumb.content)).size[0] <= 256
    page = client.get("/")
    assert "http://" not in page.text and "https://" not in page.text and "90 images" in page.text


def test_api_zero_shot_classifies_with_the_default_templates(client):
    r = client.post("/api/classify", params={"classes": "红色\n绿色\nblue: 蓝色, 蓝"}, content=png())
    body = r.json()
    assert r.status_code == 200 and body["templates"] > 1
    assert sorted(c["name"] for c in body["classes"]) == ["红色", "绿色", "蓝色"]
    assert sum(c["probability"] for c in body["classes"]) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("request_kwargs, status, message", [
    (dict(method="GET", url="/api/search", params={"q": " "}), 400, "type some text"),
    (dict(method="GET", url="/api/search", params={"q": "红色", "k": "lots"}), 400, "k must be a whole number"),
    (dict(method="GET", url="/api/search", params={"q": "红色", "k": "0"}), 400, "k must be between 1 and"),
    (dict(method="POST", url="/api/image", content=b"GIF89a not really"), 400, "cannot read the uploaded file"),
    (dict(method="POST", url="/api/image", content=b""), 400, "no image in the request"),
    (dict(method="POST", url="/api/image", content=b"\0" * 300_000), 413, "the limit is"),
    (dict(method="POST", url="/api/classify", params={"classes": "红色"}, content=b"x"), 400, "at least two"),
    (dict(method="GET", url="/thumb/99999"), 404, "no image"),
    (dict(method="GET", url="/thumb/..%2F..%2Fetc%2Fpasswd"), 404, "nothing at"),
    (dict(method="GET", url="/thumb/-1"), 404, "no image"),
])
def test_api_bad_input_gets_a_clear_message(client, request_kwargs, status, message):
    r = client.request(**request_kwargs)
    assert r.status_code == status and message in r.json()["error"]


def test_api_refuses_a_decompression_bomb_from_its_header(client):
    buf = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buf, format="PNG")  # 144 MP, a few kB compressed
    r = client.post("/api/image", content=buf.getvalue())
    assert r.status_code == 400 and "image too large" in r.json()["error"]


# ---------------------------------------------------------------- the page in a real browser


def find_browser() -> str | None:
    for path in (os.environ.get("CNCLIP_CHROMIUM"), *BROWSER_CANDIDATES, shutil.which("chromium")):
        if path and os.access(path, os.X_OK):
            return path
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(demo_index):
    index, model, classes = demo_index
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cnclip.serve", str(index), "--port", str(port), "--model", model,
                             "--classes", str(classes), "--max-upload-mb", "1", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url + "api/info", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"cnclip serve did not start: {proc.stdout.read()}")
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_page_in_a_real_browser(server, demo_index, tmp_path):
    browser_path = find_browser()
    if browser_path is None:
        pytest.skip("no Chromium executable found (apt-get install chromium; .ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright-python is in the test extra")
    index_path, model, _ = demo_index
    index = SearchIndex.load(index_path)
    searcher = Searcher.open(index_path, model, "cpu")
    expected = [h.ref for h in searcher.by_text(QUERY, 12)]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=browser_path, headless=True, args=BROWSER_ARGS,
            viewport={"width": 1280, "height": 860})
        try:
            page = browser.new_page()
            page.goto(server)
            assert "90 images" in page.text_content("header")
            # text search: the page shows the index's answer, in order, as loaded thumbnails
            page.fill("#query", QUERY)
            page.click("#search")
            page.wait_for_function("document.querySelectorAll('#results img.thumb').length == 12")
            page.wait_for_function("[...document.querySelectorAll('#results img.thumb')]"
                                   ".every(i => i.complete && i.naturalWidth > 0)")
            assert page.eval_on_selector_all("#results img.thumb", "els => els.map(e => e.dataset.ref)") == expected
            captions = page.eval_on_selector_all("#results .label", "els => els.map(e => e.textContent)")
            by_ref = {i.ref: i.caption for i in index.items}
            assert captions[0] == f"1. {by_ref[expected[0]]}"
            page.screenshot(path=str(ARTIFACTS / "search_app.png"), full_page=True)

            # image search: upload an indexed drawing; it comes back first
            item = index.items[11]
            upload = tmp_path / "query.png"
            decode_base64_image(base64.urlsafe_b64encode(read_payload(item))).save(upload)
            page.set_input_files("#upload", str(upload))
            page.wait_for_function("document.querySelector('#status').textContent.includes('uploaded image')")
            first = page.get_attribute("#results img.thumb", "data-ref")
            assert first == item.ref

            # zero-shot classify the uploaded image against the pre-filled demo colour classes
            page.click("#classify")
            page.wait_for_selector("#classes-result table")
            probs = page.eval_on_selector_all("#classes-result td:last-child", "els => els.map(e => e.textContent)")
            assert len(probs) == 5 and all(t.endswith("%") for t in probs)
            page.screenshot(path=str(ARTIFACTS / "search_app_image.png"), full_page=True)

            # a corrupt upload and an oversized one: a clear message, and the page still works
            bad = tmp_path / "broken.jpg"
            bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
            page.set_input_files("#upload", str(bad))
            page.wait_for_selector("#error", state="visible")
            assert "cannot read the uploaded file" in page.text_content("#error")
            huge = tmp_path / "huge.png"
            huge.write_bytes(png() + np.random.default_rng(0).bytes(1_200_000))
            page.set_input_files("#upload", str(huge))
            page.wait_for_function("document.querySelector('#error').textContent.includes('limit')")
            page.fill("#query", "蓝色的正方形")
            page.click("#search")
            page.wait_for_function("document.querySelector('#status').textContent.includes('蓝色的正方形')")
            assert page.is_hidden("#error")
        finally:
            browser.close()
