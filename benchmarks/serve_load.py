"""Load test of `cnclip serve` on loopback: text queries at 1, 8 and 32 concurrent clients; prints JSON.

Starts `python -m cnclip.serve INDEX --backend onnx --model EXPORT --workers N` on 127.0.0.1 (a free port),
then per concurrency level sends a bounded number of GET /api/search requests (httpx async clients, one
connection each) and stops issuing new ones past a time limit. Reported per level: requests sent and
answered, p50/p95 latency (client side, ms), requests/s, errors, wrong answers; and the server's RSS
(VmRSS from /proc/PID/status) after a warm-up and after every level.

Correctness: every query's expected top hit is computed offline in this process (the same export, numpy
brute force over the index's stored vectors); queries whose best two images score within --margin of each
other are left out (their order is float noise, not an answer) and counted. A response is wrong when its
first result is not the expected row. A request is lost when it gets no HTTP response or a non-200 status.

    cnclip export RUN --format onnx --to export/ && cnclip search index photos/ --backend onnx --model export/ --out idx/
    python benchmarks/serve_load.py --index idx/ --model export/ --workers 2 --requests 400
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

COLOURS = ("红色", "蓝色", "绿色", "黄色", "黑色", "白色", "粉色", "紫色")
THINGS = ("连衣裙", "手机壳", "帽子", "托特包", "猫", "汽车", "花朵", "的圆形")


def default_queries() -> list[str]:
    return [f"{c}{t}" for c in COLOURS for t in THINGS]


def expected_answers(index: Path, model: Path, queries: list[str], margin: float) -> tuple[dict[str, int], int]:
    """query -> the row of its exact top hit, for the queries with a clear winner; and how many were left out."""
    from cnclip.onnx_runtime import OnnxEmbedder
    from cnclip.search_index import SearchIndex

    vectors = SearchIndex.load(index).vectors
    embedder = OnnxEmbedder(model)
    # One query a call, as the server embeds them: the same token shapes, so the same arithmetic.
    scores = np.concatenate([embedder.embed_texts([q]) for q in queries]) @ vectors.T
    answers, unclear = {}, 0
    for query, row in zip(queries, scores):
        top2 = np.sort(row)[-2:] if len(row) > 1 else np.array([-np.inf, row[0]])
        if top2[1] - top2[0] < margin:
            unclear += 1
        else:
            answers[query] = int(np.argmax(row))
    return answers, unclear


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index: Path, model: Path, workers: int, port: int, log_path: Path,
                 startup_s: float = 120) -> subprocess.Popen:
    import httpx

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "cnclip.serve", str(index), "--backend", "onnx", "--model",
                             str(model), "--port", str(port), "--workers", str(workers)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + startup_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}): {log_path.read_text(errors='replace')[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/info", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"the server did not answer within {startup_s} s")


async def run_level(port: int, answers: dict[str, int], clients: int, requests: int, time_limit: float,
                    k: int) -> dict:
    """`requests` queries over `clients` connections; no new request past `time_limit` seconds."""
    import httpx

    queries = list(answers)
    latencies: list[float] = []
    errors: list[str] = []
    wrong: list[dict] = []
    next_request = 0
    started = time.perf_counter()

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal next_request
        while next_request < requests and time.perf_counter() - started < time_limit:
            query = queries[next_request % len(queries)]
            next_request += 1
            tic = time.perf_counter()
            try:
                response = await http.get("/api/search", params={"q": query, "k": k})
            except httpx.HTTPError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            latencies.append(time.perf_counter() - tic)
            if response.status_code != 200:
                errors.append(f"HTTP {response.status_code}: {response.text[:200]}")
                continue
            results = response.json()["results"]
            row = int(results[0]["thumb"].rsplit("/", 1)[1]) if results else -1
            if row != answers[query]:
                wrong.append({"query": query, "got": row, "expected": answers[query]})

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=120) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    elapsed = time.perf_counter() - started
    ms = sorted(1000 * x for x in latencies)
    return {
        "clients": clients, "sent": next_request, "answered": len(latencies) - sum(e.startswith("HTTP") for e in errors),
        "errors": len(errors), "error_examples": errors[:3], "wrong": len(wrong), "wrong_examples": wrong[:3],
        "seconds": round(elapsed, 2), "requests_per_s": round(len(latencies) / elapsed, 1) if elapsed else None,
        "p50_ms": round(statistics.median(ms), 1) if ms else None,
        "p95_ms": round(ms[min(len(ms) - 1, int(0.95 * len(ms)))], 1) if ms else None,
    }


def run(index: Path, model: Path, *, workers: int = 1, levels=(1, 8, 32), requests: int = 200,
        time_limit: float = 60, warmup: int = 20, k: int = 5, margin: float = 1e-5,
        queries: list[str] | None = None, log_path: Path | None = None) -> dict:
    answers, unclear = expected_answers(index, model, queries or default_queries(), margin)
    if not answers:
        raise SystemExit(f"no query has a clear top hit (margin {margin}); give other --queries")
    port = free_port()
    server = start_server(index, model, workers, port, log_path or Path(f"/tmp/serve_load_{port}.log"))
    try:
        asyncio.run(run_level(port, answers, 1, warmup, time_limit, k))  # first calls allocate onnxruntime's arenas
        rss = {"after_warmup_mb": round(rss_mb(server.pid), 1)}
        results = []
        for clients in levels:
            results.append(asyncio.run(run_level(port, answers, clients, requests, time_limit, k)))
            rss[f"after_{clients}_clients_mb"] = round(rss_mb(server.pid), 1)
        maps = Path(f"/proc/{server.pid}/maps").read_text()
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {
        "index": str(index), "model": str(model), "workers": workers, "k": k, "queries": len(answers),
        "queries_left_out_as_ties": unclear, "levels": results, "rss": rss,
        "rss_growth_mb": round(max(rss.values()) - rss["after_warmup_mb"], 1),
        "server_loaded_torch": "libtorch" in maps,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "load_average": os.getloadavg()},
    }


def table(result: dict) -> str:
    lines = ["| clients | requests sent / answered | errors | wrong | p50 ms | p95 ms | requests/s |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["levels"]:
        lines.append(f"| {r['clients']} | {r['sent']} / {r['answered']} | {r['errors']} | {r['wrong']} | "
                     f"{r['p50_ms']} | {r['p95_ms']} | {r['requests_per_s']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", type=Path, required=True, help="an index built with --backend onnx (or the "
                                                                  "same weights)")
    parser.add_argument("--model", type=Path, required=True, help="the ONNX export directory")
    parser.add_argument("--workers", type=int, default=1, help="cnclip serve --workers")
    parser.add_argument("--clients", default="1,8,32", help="concurrency levels (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=200, help="requests per level (default: %(default)s)")
    parser.add_argument("--time-limit", type=float, default=60, help="seconds per level before no new request")
    parser.add_argument("--margin", type=float, default=1e-5, help="queries whose two best scores differ by less "
                                                                  "are left out (default: %(default)s; "
                                                                  "float noise across thread counts is ~1e-7)")
    parser.add_argument("--queries", type=Path, help="file of queries, one a line (default: 64 built in)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    queries = None
    if args.queries:
        queries = [q.strip() for q in args.queries.read_text(encoding="utf-8").splitlines() if q.strip()]
    result = run(args.index, args.model, workers=args.workers, levels=tuple(int(c) for c in args.clients.split(",")),
                 requests=args.requests, time_limit=args.time_limit, margin=args.margin, queries=queries)
    text = json.dumps(result, ensure_ascii=False, indent=2)
    print(text)
    print(table(result), file=sys.stderr)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
