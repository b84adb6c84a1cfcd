"""The search web app: its API over HTTP (Starlette's test client) and the page in a real browser.

The browser test starts `cnclip serve` as a user would, on 127.0.0.1, drives the page in headless
Chromium from the OS packages (playwright-python with the system executable: playwright's own
browser download is not used), and saves a screenshot to tests/artifacts/search_app.png.
It is skipped, with the reason, only where no Chromium executable exists, and fails instead under CI
(the CI environment variable set), where .ci/run installs one.

The same server answers the Host-header tests over real HTTP and the upload memory tests, which read
its peak RSS from /proc (Linux). Checks that a real server's HTTP parser would stop first (a Content-Length
that is not ASCII digits, a body pulled chunk by chunk) drive the ASGI app directly, so they prove the
app's own checks.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import anyio
import numpy as np
import pytest
from PIL import Image

from cnclip.data import decode_base64_image
from cnclip.errors import UsageError
from cnclip.images import decode_rgb
from cnclip.demo_data import write_demo_dataset, write_demo_zeroshot
from cnclip.embedders import TorchEmbedder
from cnclip.search_index import Searcher, SearchIndex, build_index, read_payload

from conftest import REPO, image_bytes, missing_dependency, require

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
    build_index([str(data / "valid_imgs.tsv")], root / "index", TorchEmbedder.load(model, "cpu"),
                cache_dir=str(root / "cache"))
    write_demo_zeroshot(root / "data")
    return root / "index", model, data / "zeroshot_classes.txt"


@pytest.fixture(scope="module")
def searcher(demo_index):
    index, model, _ = demo_index
    return Searcher.open(index, model, "cpu")


@pytest.fixture(scope="module")
def app(searcher):
    from cnclip.search_app import create_app

    return create_app(searcher, max_upload_bytes=200_000)


@pytest.fixture(scope="module")
def client(app):
    from starlette.testclient import TestClient

    return TestClient(app, base_url="http://127.0.0.1:7860")  # the default allowed hosts are the loopback names


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
    (dict(method="GET", url="/thumb/-1"), 404, "no image"),
    # path parameters the router accepts (no '/' once decoded), so the app's own row check refuses them
    (dict(method="GET", url="/thumb/%2E%2E"), 404, "no image '..'"),
    (dict(method="GET", url="/thumb/..%5C..%5Cetc%5Cpasswd"), 404, "no image"),
    (dict(method="GET", url="/thumb/%C2%B2"), 404, "no image '²'"),  # str.isdigit says yes, int() raises
    (dict(method="GET", url="/thumb/%D9%A3"), 404, "no image '٣'"),  # Arabic-Indic 3: int() would read row 3
    (dict(method="GET", url="/thumb/%EF%BC%91"), 404, "no image"),  # fullwidth 1
    (dict(method="GET", url="/thumb/" + "9" * 5000), 404, "no image"),  # int() refuses 4,300 digits
    (dict(method="GET", url="/thumb/0003"), 200, None),
])
def test_api_bad_input_gets_a_clear_message(client, request_kwargs, status, message):
    r = client.request(**request_kwargs)
    assert r.status_code == status and (message is None or message in r.json()["error"])


def test_api_refuses_a_decompression_bomb_from_its_header(client):
    buf = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buf, format="PNG")  # 144 MP, a few kB compressed
    r = client.post("/api/image", content=buf.getvalue())
    assert r.status_code == 413 and "image too large: 12000x12000" in r.json()["error"]


# ---------------------------------------------------------------- the app's own checks, driven over ASGI


def call_asgi(app, method: str, path: str, headers=(), chunks=()) -> tuple[int, dict, int]:
    """One request straight into the ASGI app, its body handed over chunk by chunk as the app asks for it.

    Returns (status, JSON body, bytes of body the app pulled). A test client joins the body into one
    message and a real server's parser refuses malformed headers itself; this reaches the app's checks.
    """
    async def run():
        pulled, sent, pending = 0, [], iter(chunks)

        async def receive():
            nonlocal pulled
            chunk = next(pending, None)
            if chunk is None:
                return {"type": "http.request", "body": b"", "more_body": False}
            pulled += len(chunk)
            return {"type": "http.request", "body": chunk, "more_body": True}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                 "headers": [(b"host", b"127.0.0.1:7860"), *headers], "client": ("127.0.0.1", 50000),
                 "server": ("127.0.0.1", 7860)}
        try:
            await app(scope, receive, send)
        except Exception:  # Starlette has sent its 500 already; the status is what the test judges
            pass
        status = next(m["status"] for m in sent if m["type"] == "http.response.start")
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return status, json.loads(body or b"{}"), pulled

    return anyio.run(run)


def test_a_streamed_upload_without_content_length_is_cut_off_at_the_limit(app):
    chunk = bytes(65536)
    body = (chunk for _ in range(800))  # 50 MB offered, 200 kB allowed, no Content-Length
    status, reply, pulled = call_asgi(app, "POST", "/api/image", [(b"transfer-encoding", b"chunked")], body)
    assert status == 413 and "over the limit" in reply["error"]
    assert pulled <= 200_000 + len(chunk)  # the app stopped reading at the limit; it did not buffer 50 MB


@pytest.mark.parametrize("value", ["²".encode("latin-1"), "١٠".encode(), b"12 ", b"-5", b"0x10", b""])
def test_a_content_length_that_is_not_ascii_digits_gets_400(app, value):
    status, reply, _ = call_asgi(app, "POST", "/api/image", [(b"content-length", value)], [png()])
    assert status == 400 and "Content-Length must be a number of bytes" in reply["error"]


def test_a_content_length_of_5000_digits_is_over_the_limit(app):
    status, reply, pulled = call_asgi(app, "POST", "/api/image", [(b"content-length", b"9" * 5000)], [png()])
    assert status == 413 and "the limit is" in reply["error"] and pulled == 0


def test_an_upload_is_decoded_in_a_worker_thread(client, monkeypatch):
    import cnclip.search_app as search_app

    seen = []

    def recording_decode(*args, **kwargs):
        try:
            asyncio.get_running_loop()
            seen.append("event loop")
        except RuntimeError:
            seen.append("worker thread")
        return decode_rgb(*args, **kwargs)

    monkeypatch.setattr(search_app, "decode_rgb", recording_decode)
    assert client.post("/api/image?k=1", content=png()).status_code == 200
    assert seen == ["worker thread"]


def jpeg(size) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (30, 120, 200)).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_other_formats_are_refused(searcher):
    from starlette.testclient import TestClient

    from cnclip.images import ImageTooLarge
    from cnclip.search_app import create_app

    big = jpeg((3000, 2000))  # 6 MP under a 1 MP budget: 1/2 is still 1.5 MP, 1/4 fits
    assert decode_rgb(big, 1_000_000, shrink_jpeg=True).size == (750, 500)
    with pytest.raises(ImageTooLarge):
        decode_rgb(big, 1_000_000)
    with pytest.raises(ImageTooLarge):
        decode_rgb(jpeg((9000, 200)), 20_000, shrink_jpeg=True)  # even 1/8 is over: refused, not decoded
    assert decode_rgb(jpeg((900, 600)), 1_000_000, shrink_jpeg=True).size == (900, 600)  # within: full size
    client = TestClient(create_app(searcher, max_upload_pixels=1_000_000), base_url="http://127.0.0.1:7860")
    assert client.post("/api/image?k=1", content=big).status_code == 200
    r = client.post("/api/image?k=1", content=image_bytes((30, 120, 200), (3000, 2000)))  # PNG: no DCT scaling
    assert r.status_code == 413 and "3000x2000" in r.json()["error"] and "under 1 megapixels" in r.json()["error"]


# ---------------------------------------------------------------- which Host the app answers


ROUTES = [("GET", "/"), ("GET", "/api/info"), ("GET", "/api/search?q=%E7%BA%A2%E8%89%B2"), ("POST", "/api/image"),
          ("POST", "/api/classify?classes=a%0Ab"), ("GET", "/thumb/0"), ("GET", "/no/such/page")]


@pytest.mark.parametrize("method, path", ROUTES)
@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:7860", "127.0.0.1.attacker.example",
                                  "localhost.attacker.example", "evil", "[::2]:7860"])
def test_a_foreign_host_gets_400_on_every_route(client, method, path, host):
    r = client.request(method, path, headers={"host": host}, content=png() if method == "POST" else None)
    assert r.status_code == 400 and r.text == "Invalid host header"


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.1:7860", "localhost", "LOCALHOST:80", "[::1]", "[::1]:7860"])
def test_the_loopback_names_are_answered(client, host):
    r = client.get("/api/info", headers={"host": host})
    assert r.status_code == 200 and r.json()["images"] == 90


def test_allowed_hosts_follow_the_listening_address(monkeypatch):
    from cnclip.search_app import allowed_hosts_for

    monkeypatch.setattr(socket, "gethostname", lambda: "Photo-Box")
    assert allowed_hosts_for("127.0.0.1") == ["127.0.0.1", "localhost", "[::1]"]
    assert allowed_hosts_for("::1") == ["127.0.0.1", "localhost", "[::1]"]
    assert allowed_hosts_for("0.0.0.0") == ["127.0.0.1", "localhost", "[::1]", "0.0.0.0", "photo-box"]
    assert allowed_hosts_for("192.168.1.20") == ["192.168.1.20"]
    assert allowed_hosts_for("127.0.0.1", ["Photos.Example.com", "fd00::1", "[fd00::2]", "*.lan"]) == [
        "127.0.0.1", "localhost", "[::1]", "photos.example.com", "[fd00::1]", "[fd00::2]", "*.lan"]
    for bad in ["*", "photos.example.com:443", "http://photos.example.com", "a/b", "", "two words", "*."]:
        with pytest.raises(UsageError, match="--allowed-host"):
            allowed_hosts_for("127.0.0.1", [bad])


def test_an_allowed_host_pattern_is_answered(searcher):
    from starlette.testclient import TestClient

    from cnclip.search_app import allowed_hosts_for, create_app

    app = create_app(searcher, allowed_hosts=allowed_hosts_for("127.0.0.1", ["photos.example.com", "*.lan"]))
    client = TestClient(app)
    for host, status in [("photos.example.com", 200), ("photos.example.com:8443", 200), ("box.lan", 200),
                         ("127.0.0.1", 200), ("example.com", 400), ("testserver", 400), ("lan.evil", 400)]:
        assert client.get("/api/info", headers={"host": host}).status_code == status, host


def walk_strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from walk_strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from walk_strings(v)


def test_api_info_and_results_name_no_absolute_path(client, demo_index):
    index, model, _ = demo_index
    info = client.get("/api/info").json()
    assert info["roots"] == ["valid_imgs.tsv"] and info["images"] == 90
    hits = client.get("/api/search", params={"q": QUERY, "k": 5}).json()
    assert info["model"] == Path(model).name  # the model given as a folder: its name only
    paths = [t for t in [*walk_strings(info), *walk_strings(hits)] if not t.startswith("/thumb/")]
    for text in paths:  # the index and the model live under the test's temporary base folder
        assert not text.startswith("/") and str(index.parent.parent) not in text and "\\" not in text, text


def test_a_thumbnail_that_leaves_its_folder_is_refused_without_naming_the_folder(tiny_model_dir, tmp_path):
    """A folder index whose image is later swapped for a symlink to a file outside the folder."""
    from starlette.testclient import TestClient

    from cnclip.search_app import create_app

    photos = tmp_path / "photos"
    photos.mkdir()
    for i, color in enumerate([(200, 0, 0), (0, 0, 200)]):
        (photos / f"{i}.png").write_bytes(image_bytes(color))
    build_index([str(photos)], tmp_path / "idx", TorchEmbedder.load(str(tiny_model_dir), "cpu"),
                cache_dir=str(tmp_path / "cache"))
    secret = tmp_path / "secret.png"
    secret.write_bytes((photos / "0.png").read_bytes())  # same bytes, so only the folder check can refuse it
    (photos / "0.png").unlink()
    (photos / "0.png").symlink_to(secret)
    searcher = Searcher.open(tmp_path / "idx", str(tiny_model_dir), "cpu")
    row = next(i for i, item in enumerate(searcher.index.items) if item.ref == "0.png")
    client = TestClient(create_app(searcher), base_url="http://127.0.0.1:7860")
    r = client.get(f"/thumb/{row}")
    assert r.status_code == 410 and "0.png" in r.json()["error"] and "can no longer be read" in r.json()["error"]
    assert str(tmp_path) not in r.text
    assert client.get(f"/thumb/{1 - row}").headers["content-type"] == "image/jpeg"


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
    """`python -m cnclip.serve` on 127.0.0.1 with --allowed-host photos.example: (url, port, pid)."""
    index, model, classes = demo_index
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cnclip.serve", str(index), "--port", str(port), "--model", model,
                             "--classes", str(classes), "--max-upload-mb", "1", "--device", "cpu",
                             "--allowed-host", "photos.example"],
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
        yield SimpleNamespace(url=url, port=port, pid=proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def http_get(port: int, path: str, host: str) -> tuple[int, bytes]:
    """GET over a real socket with the Host header a browser on another origin would send."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest("GET", path, skip_host=True)
        conn.putheader("Host", host)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def test_serve_answers_only_its_own_hosts_and_allowed_host(server):
    for path in ("/", "/api/info", "/thumb/0"):
        assert http_get(server.port, path, "attacker.example") == (400, b"Invalid host header"), path
        assert http_get(server.port, path, f"attacker.example:{server.port}")[0] == 400, path
        assert http_get(server.port, path, f"127.0.0.1:{server.port}")[0] == 200, path
        assert http_get(server.port, path, f"localhost:{server.port}")[0] == 200, path
        assert http_get(server.port, path, "photos.example")[0] == 200, path  # --allowed-host photos.example


def test_serve_refuses_a_wildcard_allowed_host_before_loading_anything(demo_index):
    index, model, _ = demo_index
    proc = subprocess.run([sys.executable, "-m", "cnclip.serve", str(index), "--allowed-host", "*"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--allowed-host '*'" in proc.stderr


def peak_rss_growth(pid: int, send) -> tuple[object, int]:
    """(what send() returns, growth of the process's peak resident memory in bytes while it ran).

    Writing 5 to /proc/PID/clear_refs resets VmHWM to the current RSS, so earlier requests do not hide this one.
    """
    status = Path(f"/proc/{pid}/status")

    def kib(field: str) -> int:
        line = next(x for x in status.read_text().splitlines() if x.startswith(field + ":"))
        return int(line.split()[1]) * 1024

    Path(f"/proc/{pid}/clear_refs").write_text("5")
    before = kib("VmHWM")
    result = send()
    return result, kib("VmHWM") - before


def post(url: str, data: bytes) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, method="POST"), timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def flat_png(size, mode="I;16", fill=40000) -> bytes:
    """A flat PNG, by default grey 16-bit (mode I;16): 81 MP is 162 MB decoded, about 180 kB on the wire."""
    buf = io.BytesIO()
    Image.new(mode, size, fill).save(buf, format="PNG")
    return buf.getvalue()


def test_a_16_bit_upload_over_the_pixel_budget_is_refused_before_decoding(server):
    bomb = flat_png((9000, 9000))  # 81 MP: under Pillow's 89 MP guard and the 1 MB upload limit
    assert len(bomb) < 2**20 and Image.open(io.BytesIO(bomb)).mode == "I;16"
    assert post(server.url + "api/image?k=1", png())[0] == 200  # warm the server up before measuring
    (status, reply), growth = peak_rss_growth(server.pid, lambda: post(server.url + "api/image?k=1", bomb))
    assert status == 413 and "9000x9000" in reply["error"] and "under 40 megapixels" in reply["error"]
    assert growth < 64 * 2**20, f"peak RSS grew by {growth / 2**20:.0f} MB"


@pytest.mark.parametrize("mode, fill", [("I;16", 40000), ("RGBA", (200, 0, 0, 128))])
def test_an_upload_within_the_budget_decodes_in_bounded_memory(server, mode, fill):
    """30 MP: 16-bit grey took 21 bytes a pixel (float64 copies), RGBA 19 (whole-image RGBA temporaries); now 7, 10."""
    pixels = 6000 * 5000
    flat = flat_png((6000, 5000), mode, fill)
    assert Image.open(io.BytesIO(flat)).mode == mode
    assert post(server.url + "api/image?k=1", png())[0] == 200
    (status, reply), growth = peak_rss_growth(server.pid, lambda: post(server.url + "api/image?k=1", flat))
    assert status == 200 and len(reply["results"]) == 1
    assert growth < 13 * pixels, f"peak RSS grew by {growth / pixels:.1f} bytes a pixel"


def test_page_in_a_real_browser(server, demo_index, tmp_path):
    browser_path = find_browser()
    if browser_path is None:
        missing_dependency("no Chromium executable found (apt-get install chromium; .ci/run does)")
    sync_api = require("playwright.sync_api", "playwright-python is in the test extra")
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
            page.goto(server.url)
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
