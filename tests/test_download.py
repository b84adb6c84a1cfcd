"""build-pairs --download against a local server on 127.0.0.1: every case lands on its own reason,
nothing is sent to a refused address, and --retry-failed reruns only retryable failures.

No test here sends a packet anywhere but loopback: hosts other than IP literals and localhost are
resolved by a patched resolver, never by DNS.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest
import image_server
from image_server import ImageServer

from data_tools import netguard
from data_tools.config import config_from_dict
from data_tools.download import (
    CappedDecoder,
    Downloader,
    DownloadOptions,
    _Failure,
    content_coding,
    image_signature,
    parse_retry_after,
    redact,
    robots_disallow,
)
from data_tools.pipeline import BuildOptions, build_pairs
from data_tools.records import Reason

FILTERS = {"image": {"min_side": 32, "max_side": 64, "max_file_bytes": 300_000}, "relevance": {"mode": "off"}}
FAST = dict(connect_timeout=1.0, read_timeout=0.4, total_timeout=3.0, retries=1, backoff=0.05, max_retry_after=2.0)

# path -> the reason its record must get (None: kept)
CASES = {
    "/img/1.jpg": None,
    "/img/2.jpg": None,
    "/404": Reason.HTTP_404,
    "/flaky/3": None,  # 500, then 200 on the retry
    "/ratelimit/4": None,  # 429 Retry-After: 1, then 200
    "/slow": Reason.DOWNLOAD_TIMEOUT,
    "/endless": Reason.TOO_LARGE,
    "/html": Reason.NOT_AN_IMAGE,
    "/fake.jpg": Reason.NOT_IMAGE_BYTES,
    "/redirect/3/5": None,  # three redirects
    "/redirect/7/6": Reason.TOO_MANY_REDIRECTS,
    "/loop/a": Reason.REDIRECT_LOOP,
    "/noai": Reason.ROBOTS_DISALLOWED,
    "/truncated": Reason.UNDECODABLE_IMAGE,
    "/badgzip": Reason.BAD_ENCODING,
    "/tiny": Reason.IMAGE_TOO_SMALL,
    "/gzip/10": None,  # a legitimately encoded image, decoded
    "/deflate/11": None,
    "/rawdeflate/12": None,
    "/gzipbomb": Reason.TOO_LARGE,  # 2 GiB of zeros: stopped when the decoded bytes pass the cap
    "/gzip2bomb": Reason.BAD_ENCODING,  # stacked codings: refused unread
    "/br": Reason.BAD_ENCODING,
}
FETCHED = 10  # 8 kept + the truncated and the tiny image, rejected after the fetch


def write_crawl(path: Path, urls: list[str]) -> Path:
    lines = [json.dumps({"query": f"查询{i}", "url": url, "alt": f"商品图片说明{i}号"}, ensure_ascii=False) for i, url in enumerate(urls)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def options(crawl: Path, out: Path, allow_private: bool = True, **download) -> BuildOptions:
    return BuildOptions(
        inputs=(str(crawl),), out=out, config=config_from_dict(FILTERS), splits=(("train", 1.0),), shard_size=8,
        progress=False, download=DownloadOptions(allow_private_network=allow_private, **{**FAST, **download}),
    )


def reasons_by_url(report: dict, urls: list[str]) -> dict[str, str]:
    """Which reason each URL's record got, from the report's examples (one record per reason here)."""
    found = {}
    for reason, examples in report["examples"].items():
        for example in examples:
            line = int(example.split(":", 2)[1])  # "crawl.jsonl:LINE: detail"
            found[urls[line - 1]] = reason
    return found


@pytest.fixture()
def server():
    image_server.gzip_twice_bomb()  # built once, before any request: building takes longer than FAST's read timeout
    with ImageServer() as running:
        yield running


def test_every_case_lands_on_its_own_reason(server, tmp_path):
    urls = [server.url(path) for path in CASES]
    result = build_pairs(options(write_crawl(tmp_path / "crawl.jsonl", urls), tmp_path / "out"))
    report = result.report
    expected_rejected = Counter(reason.value for reason in CASES.values() if reason is not None)
    assert report["rejected"] == expected_rejected
    assert report["kept"] == sum(1 for reason in CASES.values() if reason is None)
    assert report["kept"] + report["rejected_total"] == report["records_read"] == len(CASES)
    by_url = reasons_by_url(report, urls)
    for path, reason in CASES.items():
        if reason is not None:
            assert by_url[server.url(path)] == reason.value, path
    # Retried: the 500 and the 429 were asked twice, the 429 only after its Retry-After.
    assert server.counts["/flaky/3"] == 2 and server.counts["/ratelimit/4"] == 2
    first, second = server.times["/ratelimit/4"]
    assert second - first >= 0.95
    assert server.counts["/404"] == 1 and server.counts["/html"] == 1  # not retryable: asked once
    assert server.counts["/slow"] == 2  # a timeout is retryable: asked twice (retries=1)
    assert server.endless_bytes < 20 * FILTERS["image"]["max_file_bytes"]  # abandoned at the cap, not read to the end
    assert server.counts["/img/5.jpg"] == 1 and server.counts["/redirect/3/5"] == 1  # the chain was followed
    assert server.counts["/loop/a"] == 1 and server.counts["/loop/b"] == 1
    downloads = report["downloads"]
    assert downloads["attempted"] == len(CASES)
    assert downloads["fetched"] == FETCHED
    assert downloads["success_rate"] == round(FETCHED / len(CASES), 4)
    assert downloads["retryable_failures"] == 1  # the timeout
    (host,) = downloads["top_failing_hosts"]
    assert host["host"] == "127.0.0.1" and host["attempted"] - host["fetched"] == len(CASES) - FETCHED


@pytest.mark.parametrize(("path", "reason"), [("/gzipbomb", Reason.TOO_LARGE), ("/gzip2bomb", Reason.BAD_ENCODING)])
def test_compression_bomb_costs_no_more_than_the_cap(server, path, reason):
    """Both bombs decode to 2 GiB; the cap is above the gzip bomb's 2.1 MB on the wire, so only the count
    of decoded bytes can stop it. Python's allocations during the download stay within a few caps
    (before: httpx decoded each 64 KB network chunk whole, about 64 MB, and a gzip, gzip body to 2 GiB)."""
    cap = 4 * 2**20
    downloader = Downloader(DownloadOptions(allow_private_network=True, **FAST), max_bytes=cap)
    results = []
    tracemalloc.start()
    try:
        downloader.run([(0, server.url(path))], lambda key, fetched: results.append(fetched))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [r.reason for r in results] == [reason]
    assert peak < 4 * cap, f"{peak / 2**20:.0f} MiB allocated"


def test_capped_decoder_never_produces_more_than_the_cap_in_one_step():
    """The whole 2.1 MB gzip bomb in one feed: one zlib call per step, each asked for the room left."""
    decoder = CappedDecoder("gzip", 100_000, "http://bomb.example/x.jpg")
    with pytest.raises(_Failure) as failure:
        decoder.feed(image_server.gzip_bomb())
    assert failure.value.reason is Reason.TOO_LARGE and decoder.produced == 100_001
    exact = image_server.gzip(b"\xff\xd8\xff" + bytes(99_997))  # exactly the cap decodes in full
    assert len(CappedDecoder("gzip", 100_000, "u").feed(exact)) == 100_000


def test_content_coding_accepts_one_known_coding():
    assert content_coding([], "u") == "identity"
    assert content_coding(["identity"], "u") == "identity"
    assert content_coding([" GZip "], "u") == "gzip"
    assert content_coding(["identity", "deflate"], "u") == "deflate"  # identity is a no-op, not a layer
    for values in (["gzip", "gzip"], ["gzip", "deflate"], ["br"], ["zstd"], ["compress"], ["x-custom"]):
        with pytest.raises(_Failure) as failure:
            content_coding(values, "u")
        assert failure.value.reason is Reason.BAD_ENCODING, values


def test_refused_addresses_get_no_request(server, tmp_path):
    port = server.port
    forms = ["127.0.0.1", "localhost", "[::1]", "127.1", "0x7f000001", "2130706433", "0177.0.0.1", "[::ffff:127.0.0.1]"]
    urls = [f"http://{host}:{port}/img/{i}.jpg" for i, host in enumerate(forms)]
    urls.append(f"http://user:secret@127.0.0.1:{port}/img/99.jpg?token=abc")
    out = tmp_path / "out"
    result = build_pairs(options(write_crawl(tmp_path / "crawl.jsonl", urls), out, allow_private=False))
    assert server.total() == 0
    # httpx refuses the octal form as an invalid IPv4 address before any lookup: bad_url, also nothing sent.
    assert result.report["rejected"] == {"blocked_address": len(urls) - 1, "bad_url": 1}
    assert "0177.0.0.1" in result.report["examples"]["bad_url"][0]
    assert result.report["downloads"]["retryable_failures"] == 0
    everything = "".join(p.read_text(errors="replace") for p in out.rglob("*") if p.is_file() and p.suffix != ".parquet")
    assert "secret" not in everything and "token=abc" not in everything  # credentials never logged


def test_redirect_to_a_refused_address_is_checked_at_connect(server, tmp_path, monkeypatch):
    """public.test -> 127.0.0.1 (treated as public here) redirects to internal.test -> 127.0.0.2 (refused)."""
    names = {"public.test": "127.0.0.1", "internal.test": "127.0.0.2"}

    async def fake_resolve(host: str, port: int):
        return [ipaddress.ip_address(names[host])]  # no DNS query leaves the machine

    real_reason = netguard.blocked_reason
    monkeypatch.setattr(netguard, "resolve", fake_resolve)
    monkeypatch.setattr(netguard, "blocked_reason", lambda a: None if str(a) == "127.0.0.1" else real_reason(a))
    port = server.port
    server_redirect = f"http://public.test:{port}/redirect-out"
    results = []
    downloader = Downloader(DownloadOptions(**FAST), max_bytes=10**6)
    downloader.run([("ok", f"http://public.test:{port}/img/3.jpg")], lambda key, fetched: results.append(fetched))
    assert results[0].data is not None and server.counts["/img/3.jpg"] == 1  # connected to the checked address
    # A redirect hop to a refused address: handler route /redirect/1/N points at /img/N.jpg on the same host,
    # so point the hop elsewhere through a Location header built here.
    monkeypatch.setattr("image_server._Handler.do_GET", _redirect_to(f"http://internal.test:{port}/img/4.jpg"))
    results.clear()
    downloader.run([("hop", server_redirect)], lambda key, fetched: results.append(fetched))
    assert results[0].reason is Reason.BLOCKED_ADDRESS and "127.0.0.2" in results[0].detail
    assert server.counts["/img/4.jpg"] == 0


def _redirect_to(location: str):
    def do_get(self) -> None:
        with self.server.lock:
            self.server.counts[self.path] += 1
        self._send(302, b"", "text/plain", {"Location": location})
    return do_get


def test_retry_failed_reruns_only_retryable_failures(server, tmp_path):
    urls = [server.url(p) for p in ("/img/1.jpg", "/down/2", "/404", "/img/3.jpg", "/down/4")]
    crawl = write_crawl(tmp_path / "crawl.jsonl", urls)
    out = tmp_path / "out"
    first = build_pairs(options(crawl, out, retries=0))
    assert first.report["rejected"] == {"http_404": 1, "http_5xx": 2} and first.report["kept"] == 2
    assert first.report["downloads"]["retryable_failures"] == 2
    before = dict(server.counts)
    server.down = False
    again = build_pairs(options(crawl, out, retries=0))  # a plain rerun reuses every shard: no request
    assert again.shards_computed == 0 and dict(server.counts) == before
    retried = build_pairs(BuildOptions(**{**options(crawl, out, retries=0).__dict__, "retry_failed": True}))
    assert retried.report["kept"] == 4 and retried.report["rejected"] == {"http_404": 1}
    assert retried.report["records_read"] == 5
    assert retried.report["downloads"] == {**retried.report["downloads"], "attempted": 5, "fetched": 4, "retryable_failures": 0}
    delta = {path: server.counts[path] - before.get(path, 0) for path in server.counts}
    assert {path: n for path, n in delta.items() if n} == {"/down/2": 1, "/down/4": 1}
    # The merged shard equals a fresh run against the now-healthy server (same pairs, same order).
    fresh = build_pairs(options(crawl, tmp_path / "fresh", retries=0))
    for name in ("train_imgs.tsv", "train_texts.jsonl"):
        assert (out / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes()
    assert fresh.report["kept"] == 4


def test_per_host_connections_and_rate(server):
    results = []
    limited = Downloader(DownloadOptions(allow_private_network=True, concurrency=8, per_host_connections=2, **FAST), 10**6)
    limited.run([(i, server.url(f"/wait/{i}")) for i in range(8)], lambda key, fetched: results.append(fetched))
    assert all(r.data for r in results) and len(results) == 8
    assert server.max_active == 2  # 8 download slots, but never more than 2 on one host
    paced = Downloader(DownloadOptions(allow_private_network=True, concurrency=8, per_host_rate=10.0, **FAST), 10**6)
    paced.run([(i, server.url(f"/img/{i}.jpg")) for i in range(6)], lambda key, fetched: results.append(fetched))
    starts = sorted(server.times[f"/img/{i}.jpg"][0] for i in range(6))
    assert starts[-1] - starts[0] >= 0.45  # 6 starts at 10 per second: 0.5 s from first to last


def test_without_download_a_url_is_no_image(server, tmp_path):
    crawl = write_crawl(tmp_path / "crawl.jsonl", [server.url("/img/1.jpg")])
    result = build_pairs(BuildOptions(inputs=(str(crawl),), out=tmp_path / "out", config=config_from_dict(FILTERS), progress=False))
    assert result.report["rejected"] == {"no_image": 1} and server.total() == 0
    assert "downloads" not in result.report


def test_guard_refuses_every_non_public_range():
    for address in ("127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.100.100.200",
                    "100.64.0.1", "0.0.0.0", "224.0.0.1", "240.0.0.1", "255.255.255.255", "::1", "::", "fe80::1",
                    "fc00::1", "fd00:ec2::254", "ff02::1", "::ffff:10.0.0.1", "64:ff9b::a9fe:a9fe", "2002:7f00:1::"):
        assert netguard.blocked_reason(ipaddress.ip_address(address)) is not None, address
    for address in ("93.184.216.34", "8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8"):  # only classified, never contacted
        assert netguard.blocked_reason(ipaddress.ip_address(address)) is None, address


def test_helpers():
    assert redact("https://user:pw@img.example.com:8443/a/b.jpg?sig=SECRET#x") == "https://img.example.com:8443/a/b.jpg?..."
    assert redact("javascript:user:pw@img.example.com/x") == "javascript:..."  # no "//": host and path are one blur
    assert robots_disallow(["noai"]) == "noai"
    assert robots_disallow(["otherbot: noindex", "max-image-preview:large"]) is None
    assert robots_disallow(["CNCLIP: noimageai, nofollow"]) == "noimageai"
    assert robots_disallow(["nofollow, NoImageIndex"]) == "noimageindex"
    assert image_signature(b"\xff\xd8\xff\xe0") == "jpeg" and image_signature(b"<!doctype html>") is None
    assert parse_retry_after("3") == 3.0 and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    with pytest.raises(ValueError):
        DownloadOptions(concurrency=0)


def test_ipv6_loopback_server_gets_no_request(tmp_path):
    """[::1] refused even where something listens on it."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        server = ImageServer("::1")
    except OSError:
        pytest.skip("cannot listen on ::1")
    with server:
        crawl = write_crawl(tmp_path / "crawl.jsonl", [f"http://[::1]:{server.port}/img/1.jpg"])
        result = build_pairs(options(crawl, tmp_path / "out", allow_private=False))
        assert result.report["rejected"] == {"blocked_address": 1} and server.total() == 0
