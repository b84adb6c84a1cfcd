"""Fetch image URLs for build-pairs --download: concurrent, polite, bounded, SSRF-guarded.

Guarantees, for every URL handed to `Downloader.run`:

* exactly one `Fetched` comes back: the body bytes, or one `Reason` (see records.py) and a
  detail that never contains credentials or query strings (`redact`);
* nothing is sent to an address `netguard` refuses, for the URL and for every redirect hop,
  checked on the resolved address at connect time (unless allow_private_network);
* at most `concurrency` downloads run at once, at most `per_host_connections` per host, and,
  if `per_host_rate` is set, requests to one host start at most that many per second. A 429 or
  503 with Retry-After holds back every request to that host, not only the one retried;
* connection errors, timeouts, 429 and 5xx are retried `retries` times with exponential
  backoff (or after Retry-After, if the server says so and it is within `max_retry_after`);
* at most `max_redirects` redirects; a loop is recognised as such;
* the body is streamed and abandoned as soon as it passes `max_bytes` (a declared
  Content-Length beyond it is refused before reading). The cap holds for the raw bytes received
  and for the bytes a Content-Encoding decodes to: the body is read raw and decoded here, each
  step asked for at most the bytes left under the cap, so a compression bomb costs no more
  memory than an honest body of `max_bytes` (tests/test_download.py measures both bombs). One coding is accepted, identity, gzip (x-gzip)
  or deflate; stacked codings ("gzip, gzip") and any other are refused unread (`bad_encoding`);
* the Content-Type and the first decoded bytes (magic numbers) are checked before the image is
  decoded;
* `X-Robots-Tag: noai`, `noimageai`, `noindex` or `noimageindex`, for every user agent or for
  ours ("cnclip: noai"), refuses the image, the way img2dataset does.

Client: httpx (AsyncClient over httpcore). It is async (hundreds of connections in one thread,
no thread per request), streams bodies, has separate connect/read/pool timeouts, and lets the
network backend be replaced, which is where netguard checks resolved addresses. aiohttp could
do the same, but its resolver hook is a separate layer from the socket connect, so a check
there still leaves the connect to a second lookup; httpcore's backend does both in one call.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import logging
import ssl
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpcore
import httpx

from cnclip.counts import parse_count
from data_tools import __version__
from data_tools.netguard import BlockedAddress, GuardedBackend
from data_tools.records import Reason

K = TypeVar("K")
log = logging.getLogger(__name__)
USER_AGENT_TOKEN = "cnclip"  # what an X-Robots-Tag addressed to us names
DEFAULT_USER_AGENT = f"{USER_AGENT_TOKEN}-data_tools/{__version__} (image-text pairs for CLIP training; honours X-Robots-Tag noai)"
DISALLOWED_DIRECTIVES = frozenset({"noai", "noimageai", "noindex", "noimageindex"})
RETRYABLE = frozenset({Reason.DOWNLOAD_TIMEOUT, Reason.CONNECTION_ERROR, Reason.HTTP_429, Reason.HTTP_5XX})
REDIRECTS = frozenset({301, 302, 303, 307, 308})
# Content types a server may send with an image; anything else (text/html, application/json...) is refused.
_IMAGE_CONTENT_TYPES = frozenset({"", "application/octet-stream", "binary/octet-stream", "application/binary",
                                  "application/force-download", "application/x-download"})
_MAGIC_BYTES_NEEDED = 12
# Content-Encodings decoded under the size cap, with their zlib window bits. Brotli and zstd are
# refused: we ask for identity (Accept-Encoding), and decoding them under a cap needs decoder APIs
# (an output limit per call) that not every installed version of their libraries has.
_ZLIB_CODINGS = {"gzip": zlib.MAX_WBITS | 16, "x-gzip": zlib.MAX_WBITS | 16, "deflate": zlib.MAX_WBITS}


@dataclass(frozen=True)
class DownloadOptions:
    """How to fetch. None of these change which bytes a successful download returns."""

    concurrency: int = 64  # downloads in flight per worker process
    per_host_connections: int = 8
    per_host_rate: float | None = None  # request starts per second per host; None: no limit
    connect_timeout: float = 10.0
    read_timeout: float = 20.0  # longest wait for the next bytes
    total_timeout: float = 60.0  # one request, body included: a slow drip cannot hold a slot forever
    retries: int = 3  # extra attempts after a retryable failure
    backoff: float = 1.0  # seconds before the first retry; doubled each time
    max_retry_after: float = 60.0  # a longer Retry-After fails the record now (retryable with --retry-failed)
    max_redirects: int = 5
    user_agent: str = DEFAULT_USER_AGENT
    allow_private_network: bool = False

    def __post_init__(self) -> None:
        for name in ("concurrency", "per_host_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"download {name} must be >= 1, got {getattr(self, name)}")
        for name in ("connect_timeout", "read_timeout", "total_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"download {name} must be > 0, got {getattr(self, name)}")
        if self.per_host_rate is not None and not self.per_host_rate > 0:
            raise ValueError(f"per-host rate must be > 0, got {self.per_host_rate}")
        if self.retries < 0 or self.backoff < 0 or self.max_redirects < 0 or self.max_retry_after < 0:
            raise ValueError("download retries, backoff, max_retry_after and max_redirects must be >= 0")


@dataclass(frozen=True)
class Fetched:
    """One URL's outcome: `data` on success, else `reason` (and a credential-free `detail`)."""

    host: str
    data: bytes | None = None
    reason: Reason | None = None
    detail: str = ""
    retry_after: float | None = field(default=None, compare=False)  # the server's wish, for the retry loop

    @property
    def retryable(self) -> bool:
        return self.reason in RETRYABLE


def redact(url: str) -> str:
    """The URL as it may appear in reports and logs: no user:password@, no query string or fragment.

    Without an authority ("//host"), nothing tells a host from a path ("javascript:user:pw@host/",
    "http:/user:pw@host"), so only the scheme is shown.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparsable URL>"
    if not parts.netloc:
        return f"{parts.scheme[:20]}:..." if parts.scheme else "<URL without scheme or host>"
    if ":" in host:
        host = f"[{host}]"
    query = "?..." if parts.query else ""
    return f"{parts.scheme}://{host}{port}{parts.path[:200]}{query}"


def host_of(url: str) -> str:
    try:
        return (urlsplit(url).hostname or "").lower() or "<no host>"
    except ValueError:
        return "<no host>"


def robots_disallow(values: list[str], token: str = USER_AGENT_TOKEN) -> str | None:
    """The X-Robots-Tag directive that forbids use, as img2dataset decides it; None if allowed.

    Each header value is "[agent:] directive, directive"; a value naming another agent is ignored.
    """
    for value in values:
        agent, sep, directives = value.partition(":")
        if not sep:
            directives = value
        elif agent.strip().lower() != token:
            continue
        for directive in directives.split(","):
            if directive.strip().lower() in DISALLOWED_DIRECTIVES:
                return directive.strip().lower()
    return None


def image_signature(head: bytes) -> str | None:
    """The image format the first bytes announce (those Pillow decodes), or None."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith(b"BM"):
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis", b"heic", b"heix", b"mif1"):
        return "avif/heif"
    return None


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After in seconds (delta-seconds or an HTTP date), or None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    seconds = parse_count(value)  # ASCII digits only: '²' and '٣' are digits to str.isdigit
    if seconds is not None:
        return float(seconds)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class _HostGate:
    """Per-host connection limit, optional start rate, and a shared hold after Retry-After."""

    def __init__(self, connections: int, rate: float | None) -> None:
        self.slots = asyncio.Semaphore(connections)
        self.interval = 1.0 / rate if rate else 0.0
        self.next_start = 0.0

    async def wait_turn(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        start = max(now, self.next_start)
        self.next_start = start + self.interval
        if start > now:
            await asyncio.sleep(start - now)

    def hold(self, seconds: float) -> None:
        self.next_start = max(self.next_start, asyncio.get_running_loop().time() + seconds)


class _PoolTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport (request/response mapping, httpcore exceptions -> httpx ones) over a
    given httpcore pool. httpx builds its pool with httpcore's default network backend; the guard
    must be the backend, because that is where names are resolved and sockets opened."""

    def __init__(self, pool: httpcore.AsyncConnectionPool) -> None:  # not super().__init__: it would build an unused pool
        self._pool = pool


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    """Certificate verification on (system/certifi CAs), built once per process: loading CAs is slow."""
    return httpx.create_ssl_context(trust_env=False)


class _Failure(Exception):
    def __init__(self, reason: Reason, detail: str, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.reason, self.detail, self.retry_after = reason, detail, retry_after


class Downloader:
    """Fetches URLs; each `run` has its own event loop, clients and per-host gates."""

    def __init__(self, options: DownloadOptions, max_bytes: int) -> None:
        self.options = options
        self.max_bytes = max_bytes

    def run(self, jobs: Iterable[tuple[K, str]], on_result: Callable[[K, Fetched], Any]) -> None:
        """Fetch every (key, url); `on_result(key, fetched)` is called as each finishes, in this thread.

        Results arrive in completion order; callers that need input order index them by key.
        `on_result` runs between network events, so it may do CPU work (decode an image) while
        other downloads wait in the kernel's buffers; an exception in it stops the run.
        """
        asyncio.run(self._run(iter(jobs), on_result))

    async def _run(self, jobs: Any, on_result: Callable[[K, Fetched], Any]) -> None:
        gates: dict[str, _HostGate] = {}
        backend = GuardedBackend(allow_private=self.options.allow_private_network)

        async def worker() -> None:
            async with self._client(backend) as client:
                for key, url in jobs:  # one shared iterator: each job is taken by exactly one worker
                    on_result(key, await self._fetch(client, url, gates))

        async with asyncio.TaskGroup() as group:
            for _ in range(self.options.concurrency):
                group.create_task(worker())

    def _client(self, backend: GuardedBackend) -> httpx.AsyncClient:
        """One client per worker coroutine: its pool holds the worker's one live connection (plus one
        kept alive), so httpcore's per-request scan of the pool stays short (a pool shared by 64
        connections spent a quarter of the CPU time there)."""
        o = self.options
        pool = httpcore.AsyncConnectionPool(
            ssl_context=_ssl_context(),
            max_connections=2,  # the live request, and an idle one it may close to open a new one
            max_keepalive_connections=1,
            keepalive_expiry=5.0,
            network_backend=backend,
        )
        return httpx.AsyncClient(
            transport=_PoolTransport(pool),
            timeout=httpx.Timeout(connect=o.connect_timeout, read=o.read_timeout, write=o.read_timeout, pool=None),
            headers={"User-Agent": o.user_agent, "Accept": "image/*,*/*;q=0.5", "Accept-Encoding": "identity"},
            follow_redirects=False,  # followed by hand: counted, loop-checked, each hop through the guard
            trust_env=False,  # a proxy would resolve names itself, out of the guard's reach
        )

    async def _fetch(self, client: httpx.AsyncClient, url: str, gates: dict[str, _HostGate]) -> Fetched:
        host = host_of(url)
        o = self.options
        attempt = 0
        while True:
            try:
                return Fetched(host, data=await self._attempt(client, url, gates))
            except _Failure as failure:
                result = Fetched(host, reason=failure.reason, detail=failure.detail, retry_after=failure.retry_after)
            except Exception as err:  # a client error nothing above foresaw: this URL fails, the run goes on
                log.warning("unexpected download error on %s: %s", redact(url), type(err).__name__)
                return Fetched(host, reason=Reason.UNEXPECTED_ERROR, detail=f"{redact(url)}: {type(err).__name__}")
            if not result.retryable or attempt >= o.retries:
                return result
            delay = result.retry_after if result.retry_after is not None else o.backoff * 2**attempt
            if delay > o.max_retry_after:
                return result
            attempt += 1
            await asyncio.sleep(delay)

    async def _attempt(self, client: httpx.AsyncClient, url: str, gates: dict[str, _HostGate]) -> bytes:
        """One attempt: follow redirects, check the final response, stream the body; raises _Failure."""
        seen = {url}
        current = url
        for _ in range(self.options.max_redirects + 1):
            target = await self._request(client, current, gates)
            if isinstance(target, bytes):
                return target
            if target in seen:
                raise _Failure(Reason.REDIRECT_LOOP, f"{redact(current)} redirects back to {redact(target)}")
            seen.add(target)
            current = target
        raise _Failure(Reason.TOO_MANY_REDIRECTS, f"{redact(url)}: more than {self.options.max_redirects} redirects")

    async def _request(self, client: httpx.AsyncClient, url: str, gates: dict[str, _HostGate]) -> bytes | str:
        """GET one URL: its body, or the absolute URL it redirects to."""
        host = host_of(url)
        gate = gates.get(host)
        if gate is None:
            gate = gates[host] = _HostGate(self.options.per_host_connections, self.options.per_host_rate)
        async with gate.slots:
            await gate.wait_turn()  # time spent waiting for the host's turn is not the download's
            try:
                async with asyncio.timeout(self.options.total_timeout), client.stream("GET", url) as response:
                    return await self._read(response, url, gate)
            except TimeoutError:
                raise _Failure(Reason.DOWNLOAD_TIMEOUT, f"{redact(url)}: over {self.options.total_timeout:g} s") from None
            except BlockedAddress as err:
                raise _Failure(Reason.BLOCKED_ADDRESS, str(err)) from None
            except httpx.TimeoutException as err:
                raise _Failure(Reason.DOWNLOAD_TIMEOUT, f"{redact(url)}: {type(err).__name__}") from None
            except (httpx.InvalidURL, httpx.UnsupportedProtocol, UnicodeError) as err:  # UnicodeError: a host IDNA refuses
                raise _Failure(Reason.BAD_URL, f"{redact(url)}: {type(err).__name__}") from None
            except httpx.RequestError as err:  # connect, read, write and protocol errors
                raise _Failure(Reason.CONNECTION_ERROR, f"{redact(url)}: {type(err).__name__}: {_first_line(err)}") from None

    async def _read(self, response: httpx.Response, url: str, gate: _HostGate) -> bytes | str:
        status = response.status_code
        if status in REDIRECTS:
            location = response.headers.get("location")
            if not location:
                raise _Failure(Reason.BAD_REDIRECT, f"{redact(url)}: HTTP {status} without Location")
            try:
                target = response.url.join(location)
            except httpx.InvalidURL:
                raise _Failure(Reason.BAD_REDIRECT, f"{redact(url)}: unparsable Location") from None
            if target.scheme not in ("http", "https"):
                raise _Failure(Reason.BAD_REDIRECT, f"{redact(url)}: redirect to a {target.scheme}: URL")
            return str(target)
        if status >= 300:
            raise self._status_failure(response, url, gate)
        directive = robots_disallow(response.headers.get_list("x-robots-tag"))
        if directive:
            raise _Failure(Reason.ROBOTS_DISALLOWED, f"{redact(url)}: X-Robots-Tag {directive}")
        content_type = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if not (content_type.startswith("image/") or content_type in _IMAGE_CONTENT_TYPES):
            raise _Failure(Reason.NOT_AN_IMAGE, f"{redact(url)}: Content-Type {content_type[:80]}")
        declared = response.headers.get("content-length", "")
        declared_bytes = parse_count(declared.strip())
        if declared_bytes is not None and declared_bytes > self.max_bytes:
            raise _Failure(Reason.TOO_LARGE, f"{redact(url)}: Content-Length {declared} > {self.max_bytes}")
        return await self._body(response, url)

    async def _body(self, response: httpx.Response, url: str) -> bytes:
        """The body, streamed raw and decoded here: abandoned past max_bytes (raw or decoded), or as
        soon as its first bytes are no image."""
        decoder = CappedDecoder(content_coding(response.headers.get_list("content-encoding", split_commas=True), url),
                                self.max_bytes, url)
        chunks: list[bytes] = []
        size = raw = 0
        checked = False
        async for chunk in response.aiter_raw():  # not aiter_bytes: httpx would decode without a cap
            raw += len(chunk)
            if raw > self.max_bytes:  # e.g. endless data after the end of a gzip stream
                raise _Failure(Reason.TOO_LARGE, f"{redact(url)}: body beyond {self.max_bytes} bytes")
            decoded = decoder.feed(chunk)
            chunks.append(decoded)
            size += len(decoded)
            if not checked and size >= _MAGIC_BYTES_NEEDED:
                self._check_magic(b"".join(chunks)[:_MAGIC_BYTES_NEEDED], url)
                checked = True
        data = b"".join(chunks)
        if not checked:
            self._check_magic(data, url)
        return data

    @staticmethod
    def _check_magic(head: bytes, url: str) -> None:
        if image_signature(head) is None:
            shown = head[:8].hex() if head else "empty body"
            raise _Failure(Reason.NOT_IMAGE_BYTES, f"{redact(url)}: starts with {shown}, no image format")

    def _status_failure(self, response: httpx.Response, url: str, gate: _HostGate) -> _Failure:
        status = response.status_code
        detail = f"{redact(url)}: HTTP {status}"
        retry_after = parse_retry_after(response.headers.get("retry-after")) if status in (429, 503) else None
        if retry_after is not None:
            gate.hold(min(retry_after, self.options.max_retry_after))  # the whole host waits, not one request
        if status == 429:
            return _Failure(Reason.HTTP_429, detail, retry_after)
        if status >= 500:
            return _Failure(Reason.HTTP_5XX, detail, retry_after)
        specific = {403: Reason.HTTP_403, 404: Reason.HTTP_404, 410: Reason.HTTP_410}
        if status in specific:
            return _Failure(specific[status], detail)
        if 400 <= status < 500:
            return _Failure(Reason.HTTP_4XX, detail)
        return _Failure(Reason.BAD_REDIRECT, f"{detail} (a 3xx that is no redirect)")


def content_coding(values: list[str], url: str) -> str:
    """The one Content-Encoding to decode ("identity" for none); raises _Failure(BAD_ENCODING) for a
    stack of codings or one not in _ZLIB_CODINGS. `identity` entries are no-ops and are dropped."""
    codings = [value.strip().lower() for value in values]
    codings = [coding for coding in codings if coding and coding != "identity"]
    if len(codings) > 1:  # each layer multiplies a bomb's ratio (about 1000x per gzip)
        raise _Failure(Reason.BAD_ENCODING, f"{redact(url)}: stacked Content-Encoding {', '.join(codings)[:80]}")
    if codings and codings[0] not in _ZLIB_CODINGS:
        raise _Failure(Reason.BAD_ENCODING, f"{redact(url)}: unsupported Content-Encoding {codings[0][:40]}")
    return codings[0] if codings else "identity"


class CappedDecoder:
    """Decodes a body chunk by chunk and fails with TOO_LARGE as soon as the output passes `limit`.

    Every zlib call is given the bytes left under the limit (plus one, to see it pass) as its
    `max_length`, and the input it could not consume yet is fed again in the next call, so no
    call ever produces more than the limit, whatever the compression ratio. All output is
    returned to the caller, which keeps it: at most `limit` + 1 decoded bytes exist at any time.
    """

    def __init__(self, coding: str, limit: int, url: str) -> None:
        self.coding, self.limit, self.url = coding, limit, url
        self.produced = 0
        self._zlib = zlib.decompressobj(_ZLIB_CODINGS[coding]) if coding != "identity" else None
        self._started = False

    def feed(self, raw: bytes) -> bytes:
        if self._zlib is None:
            return self._count(raw)
        try:
            return self._inflate(raw)
        except zlib.error:
            if self.coding == "deflate" and not self._started:
                # "deflate" is meant to be zlib-wrapped, but some servers send a raw deflate stream (as httpx accepts)
                self._zlib = zlib.decompressobj(-zlib.MAX_WBITS)
                self._started = True
                return self.feed(raw)
            raise _Failure(Reason.BAD_ENCODING, f"{redact(self.url)}: body does not decode as {self.coding}") from None

    def _inflate(self, data: bytes) -> bytes:
        assert self._zlib is not None
        parts = []
        while data and not self._zlib.eof:  # after the end of the stream, trailing bytes are ignored (as httpx does)
            out = self._zlib.decompress(data, self.limit - self.produced + 1)
            self._started = True
            parts.append(self._count(out))
            data = self._zlib.unconsumed_tail
        return b"".join(parts)

    def _count(self, out: bytes) -> bytes:
        self.produced += len(out)
        if self.produced > self.limit:
            raise _Failure(Reason.TOO_LARGE, f"{redact(self.url)}: body decodes beyond {self.limit} bytes")
        return out


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else ""
