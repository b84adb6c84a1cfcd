"""A fast local image server for the download benchmark: 127.0.0.1 only, in its own process.

GET /l{MS}/f{PCT}/{N}.jpg answers after MS milliseconds with image N of a pool of photo-like
JPEGs; PCT percent of the N (chosen by N, so every tool sees the same failures) fail, half as
404 and half as 500. asyncio, HTTP/1.1 keep-alive: thousands of requests/s on one core, so the
client, not the server, is what is measured. Stops when the benchmark stops it.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import re
from multiprocessing.connection import Connection

_PATH = re.compile(rb"^/l(\d+)/f(\d+)/(\d+)\.jpg$")


def failure_kind(n: int, percent: int) -> int | None:
    """404, 500 or None for image N at a failure rate of `percent`."""
    if (n * 7919) % 100 >= percent:
        return None
    return 404 if n % 2 else 500


async def _serve(pool: list[bytes], conn: Connection) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await reader.readline()
                if not request:
                    break
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
                parts = request.split()
                match = _PATH.match(parts[1]) if len(parts) > 1 else None
                if match is None:
                    status, body, kind = 404, b"no", b"text/plain"
                else:
                    latency, percent, n = (int(g) for g in match.groups())
                    if latency:
                        await asyncio.sleep(latency / 1000)
                    failure = failure_kind(n, percent)
                    status, body, kind = (failure, b"error", b"text/plain") if failure else (200, pool[n % len(pool)], b"image/jpeg")
                writer.write(b"HTTP/1.1 %d X\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n" % (status, kind, len(body)) + body)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
    conn.send(server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()


def _main(pool: list[bytes], conn: Connection) -> None:
    asyncio.run(_serve(pool, conn))


class ImageHTTPServer:
    """Context manager: the server process and its base URL."""

    def __init__(self, pool: list[bytes]) -> None:
        self.pool = pool

    def __enter__(self) -> ImageHTTPServer:
        parent, child = multiprocessing.Pipe()
        self.process = multiprocessing.get_context("spawn").Process(target=_main, args=(self.pool, child), daemon=True)
        self.process.start()
        self.port = parent.recv()
        return self

    def url(self, n: int, latency_ms: int, failure_percent: int) -> str:
        return f"http://127.0.0.1:{self.port}/l{latency_ms}/f{failure_percent}/{n}.jpg"

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.join(10)
