"""A local image server on 127.0.0.1 for the download tests: hostile and well-behaved routes, request counts.

Routes (N is any integer; images are deterministic in N, so runs can be compared byte for byte):
  /img/N.jpg        a 64x48 JPEG
  /404              404
  /flaky/N          500 the first time, then the image
  /ratelimit/N      429 with Retry-After: 1 the first time, then the image
  /down/N           503 while `server.down` is true, then the image
  /wait/N           the image after 0.2 s (`server.max_active`: most such requests at once)
  /slow             waits 2 s before answering
  /endless          image/jpeg headers, a JPEG start, then bytes for ever (until the client hangs up)
  /html             an HTML page, text/html
  /fake.jpg         an HTML page sent as image/jpeg
  /redirect/K/N     K redirects (302) before the image
  /loop/a, /loop/b  redirect to each other
  /noai             the image with X-Robots-Tag: noai
  /truncated        the first half of a JPEG
  /badgzip          image/jpeg with Content-Encoding: gzip and a body that does not decode
  /gzip/N, /deflate/N, /rawdeflate/N   the image of /img/N.jpg sent gzip, zlib or raw-deflate encoded
  /gzipbomb         Content-Encoding: gzip, no Content-Length, 2.1 MB that decode to a JPEG start and 2 GiB of zeros
  /gzip2bomb        Content-Encoding: gzip, gzip, no Content-Length: 4.9 KB that decode (twice) to the same 2 GiB
  /br               Content-Encoding: br (never decoded by the client)
  /tiny             a 16x16 JPEG
Every request is counted by path (`server.counts`) and timed (`server.times`).
"""

from __future__ import annotations

import functools
import io
import socket
import struct
import threading
import time
import zlib
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image


def jpeg(seed: int, size: tuple[int, int] = (64, 48)) -> bytes:
    cells = np.random.default_rng(seed).integers(0, 255, (6, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(cells).resize(size, Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


BOMB_MIB = 2048  # what the bombs decode to


@functools.cache
def gzip_bomb() -> bytes:
    """A gzip stream of a JPEG start and BOMB_MIB MiB of zeros, built in about half a second.

    Deflate is asked for a full flush after each MiB, which resets its state, so every MiB of zeros
    compresses to the same bytes: the stream is one compressed MiB repeated, not 2 GiB compressed.
    """
    block = bytes(1 << 20)
    head = b"\xff\xd8\xff\xe0" + block[4:]

    def deflated(data: bytes) -> bytes:
        compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        return compressor.compress(data) + compressor.flush(zlib.Z_FULL_FLUSH)

    crc = zlib.crc32(head)
    for _ in range(BOMB_MIB - 1):
        crc = zlib.crc32(block, crc)
    end = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS).flush()
    trailer = struct.pack("<II", crc, (BOMB_MIB << 20) & 0xFFFFFFFF)
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + deflated(head) + deflated(block) * (BOMB_MIB - 1) + end + trailer


def gzip_twice_bomb() -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    return compressor.compress(gzip_bomb()) + compressor.flush()


def gzip(data: bytes) -> bytes:
    compressor = zlib.compressobj(6, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    return compressor.compress(data) + compressor.flush()


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


HTML = b"<!doctype html><html><head><title>not an image</title></head><body>hello</body></html>"


class _Handler(BaseHTTPRequestHandler):
    server: ImageServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        with self.server.lock:
            self.server.counts[path] += 1
            self.server.times[path].append(time.monotonic())
            seen = self.server.counts[path]
        parts = path.strip("/").split("/")
        route = parts[0]
        if route == "img":
            self._send(200, jpeg(int(parts[1].split(".")[0])))
        elif route == "404":
            self._send(404, b"not found", "text/plain")
        elif route == "flaky":
            self._send(500, b"oops", "text/plain") if seen == 1 else self._send(200, jpeg(int(parts[1])))
        elif route == "ratelimit":
            if seen == 1:
                self._send(429, b"slow down", "text/plain", {"Retry-After": "1"})
            else:
                self._send(200, jpeg(int(parts[1])))
        elif route == "down":
            self._send(503, b"down", "text/plain") if self.server.down else self._send(200, jpeg(int(parts[1])))
        elif route == "wait":
            with self.server.lock:
                self.server.active += 1
                self.server.max_active = max(self.server.max_active, self.server.active)
            time.sleep(0.2)
            with self.server.lock:
                self.server.active -= 1
            self._send(200, jpeg(int(parts[1])))
        elif route == "slow":
            time.sleep(2)
            self._send(200, jpeg(1))
        elif route == "endless":
            self._endless()
        elif route == "html":
            self._send(200, HTML, "text/html; charset=utf-8")
        elif route == "fake.jpg":
            self._send(200, HTML, "image/jpeg")
        elif route == "redirect":
            left, n = int(parts[1]), parts[2]
            target = f"/redirect/{left - 1}/{n}" if left > 1 else f"/img/{n}.jpg"
            self._send(302, b"", "text/plain", {"Location": target})
        elif route == "loop":
            self._send(302, b"", "text/plain", {"Location": "/loop/b" if parts[1] == "a" else "/loop/a"})
        elif route == "noai":
            self._send(200, jpeg(7), headers={"X-Robots-Tag": "noai"})
        elif route == "truncated":
            data = jpeg(8)
            self._send(200, data[: len(data) // 2])
        elif route == "badgzip":
            self._send(200, b"\x1f\x8b\x08\x00garbage, not a gzip stream", headers={"Content-Encoding": "gzip"})
        elif route == "gzip":
            self._send(200, gzip(jpeg(int(parts[1]))), headers={"Content-Encoding": "gzip"})
        elif route == "deflate":
            self._send(200, zlib.compress(jpeg(int(parts[1]))), headers={"Content-Encoding": "deflate"})
        elif route == "rawdeflate":
            self._send(200, raw_deflate(jpeg(int(parts[1]))), headers={"Content-Encoding": "deflate"})
        elif route == "gzipbomb":
            self._send(200, gzip_bomb(), headers={"Content-Encoding": "gzip"}, chunked=True)
        elif route == "gzip2bomb":
            self._send(200, gzip_twice_bomb(), headers={"Content-Encoding": "gzip, gzip"}, chunked=True)
        elif route == "br":
            self._send(200, b"\x1b\x03\x00\xf8\x25\x00\x22\x00", headers={"Content-Encoding": "br"})
        elif route == "tiny":
            self._send(200, jpeg(9, (16, 16)))
        else:
            self._send(404, b"no such route", "text/plain")

    def _send(self, status: int, body: bytes, content_type: str = "image/jpeg", headers: dict[str, str] | None = None,
              chunked: bool = False) -> None:
        """`chunked`: no Content-Length, so only the client's streamed count can refuse a large body."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        try:
            self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if chunked else body)
        except OSError:
            self.close_connection = True  # the client hung up: what a refused bomb looks like from here

    def _endless(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chunk = b"\xff\xd8\xff\xe0" + b"\0" * 65532
        try:
            for _ in range(100_000):  # bounded: 6.5 GB at most, the client hangs up long before
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                with self.server.lock:
                    self.server.endless_bytes += len(chunk)
        except OSError:
            pass
        self.close_connection = True


class ImageServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, 0), _Handler)
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.times: defaultdict[str, list[float]] = defaultdict(list)
        self.down = True
        self.endless_bytes = 0
        self.active = self.max_active = 0
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    def handle_error(self, request, client_address) -> None:
        pass  # clients hanging up on /slow and /endless is the point of those routes

    @property
    def port(self) -> int:
        return self.server_address[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def total(self) -> int:
        with self.lock:
            return sum(self.counts.values())

    def __enter__(self) -> ImageServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()
