"""CPU cost per proxied request of the upstream clients (`routing/upstream.py`): FastUpstream vs aiohttp vs httpx.

    .venv/bin/python bench/upstream_micro.py                       # 5,000 requests, c=1 and c=64, uvloop, 3 rounds
    .venv/bin/python bench/upstream_micro.py -n 20000 -c 1 8 64 --rounds 5 --loop asyncio --json out.json
    git show HEAD~3:routing/upstream.py > /tmp/old.py                # an older FastUpstream, same run:
    .venv/bin/python bench/upstream_micro.py --baseline /tmp/old.py --clients FastUpstream baseline

Starts the bundled mock vLLM (`python -m backends.mock_vllm`) pinned to CPU 0 with `taskset`, pins itself to
CPU 1, and sends the same non-streaming chat request the dispatcher sends (content-type, x-request-id) with
each client. The figure is this process's CPU time (`getrusage(RUSAGE_SELF)`: user + system, every thread) per
request, after a warm-up; the mock's CPU is not counted. Requests/s are shown too but are bounded by the mock.
The clients take turns within each round (so a burst of load from elsewhere hits one round of each, not one
client), and the table shows each client's median over the rounds and its range.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import httpx  # noqa: E402

from routing.upstream import FastUpstream, HttpxUpstream, Timeouts  # noqa: E402

BODY = b'{"model":"mock-chat","messages":[{"role":"user","content":"Hello, how are you today?"}],"max_tokens":4}'
HEADERS = {"content-type": "application/json", "x-request-id": "bench-0123456789abcdef"}
TIMEOUTS = Timeouts(connect=5.0, read=30.0, write=30.0, pool=30.0)
WARMUP = 300

Send = Callable[[], Awaitable[int]]


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(send: Send, n: int, concurrency: int) -> tuple[float, float]:
    """CPU microseconds per request and requests per second of n requests over `concurrency` workers."""
    per_worker = max(1, n // concurrency)

    async def worker(count: int) -> None:
        for _ in range(count):
            status = await send()
            if status != 200:
                raise RuntimeError(f"unexpected status {status}")

    await asyncio.gather(*(worker(max(1, WARMUP // concurrency)) for _ in range(concurrency)))
    cpu, wall = cpu_seconds(), time.perf_counter()
    await asyncio.gather(*(worker(per_worker) for _ in range(concurrency)))
    cpu, wall = cpu_seconds() - cpu, time.perf_counter() - wall
    total = per_worker * concurrency
    return cpu / total * 1e6, total / wall


async def run_httpx(url: str, n: int, concurrency: int) -> tuple[float, float]:
    """A bare httpx.AsyncClient used as `Dispatcher.send` uses it today."""
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
    timeout = httpx.Timeout(connect=5.0, read=30.0, write=30.0, pool=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=None, follow_redirects=False) as client:

        async def send() -> int:
            request = client.build_request("POST", url, content=BODY, headers=HEADERS, timeout=timeout)
            response = await client.send(request)
            _ = response.content
            return response.status_code

        return await measure(send, n, concurrency)


async def run_aiohttp(url: str, n: int, concurrency: int) -> tuple[float, float]:
    """An aiohttp.ClientSession configured as a proxy would use it (pool limits, per-read timeouts, no decoding)."""
    connector = aiohttp.TCPConnector(limit=1000, limit_per_host=1000, ttl_dns_cache=None, use_dns_cache=True)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5.0, sock_read=30.0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False, skip_auto_headers=("User-Agent", "Accept")
    ) as session:

        async def send() -> int:
            async with session.post(url, data=BODY, headers=HEADERS, allow_redirects=False) as response:
                await response.read()
                return response.status

        return await measure(send, n, concurrency)


async def run_upstream(upstream: Any, url: str, n: int, concurrency: int) -> tuple[float, float]:
    """An `UpstreamClient` (HttpxUpstream or FastUpstream)."""

    async def send() -> int:
        response = await upstream.send("POST", url, headers=HEADERS, content=BODY, timeouts=TIMEOUTS, stream=False)
        _ = response.content
        return int(response.status_code)

    try:
        return await measure(send, n, concurrency)
    finally:
        await upstream.aclose()


CLIENTS: dict[str, Callable[[str, int, int], Awaitable[tuple[float, float]]]] = {
    "aiohttp": run_aiohttp,
    "httpx": run_httpx,
    "HttpxUpstream": lambda url, n, c: run_upstream(HttpxUpstream(), url, n, c),
    "FastUpstream": lambda url, n, c: run_upstream(FastUpstream(), url, n, c),
}


def start_mock(cpus: list[int]) -> tuple[subprocess.Popen[bytes], str]:
    """Start the mock vLLM on a free port (pinned to the first CPU when there are several); return it and its URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    pin = ["taskset", "-c", str(cpus[0])] if len(cpus) > 1 and shutil.which("taskset") else []
    argv = [*pin, sys.executable, "-m", "backends.mock_vllm", "--host", "127.0.0.1", "--port", str(port)]
    mock = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(url + "/health", timeout=1).close()
            return mock, url
        except OSError:
            time.sleep(0.05)
    mock.terminate()
    raise RuntimeError("the mock vLLM did not start")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a table (and write JSON when asked)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", "--requests", type=int, default=5000)
    parser.add_argument("-c", "--concurrency", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the clients take turns within each")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument(
        "--clients",
        nargs="+",
        choices=[*CLIENTS, "baseline"],
        default=["FastUpstream", "aiohttp", "httpx", "HttpxUpstream"],
    )
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--baseline", help="a copy of routing/upstream.py whose FastUpstream runs as `baseline`")
    args = parser.parse_args(argv)
    if args.baseline:
        spec = importlib.util.spec_from_file_location("upstream_baseline", args.baseline)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        CLIENTS["baseline"] = lambda url, n, c: run_upstream(module.FastUpstream(), url, n, c)
    elif "baseline" in args.clients:
        parser.error("--clients baseline needs --baseline FILE")

    cpus = sorted(os.sched_getaffinity(0))
    mock, url = start_mock(cpus)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    try:
        if len(cpus) > 1:
            os.sched_setaffinity(0, {cpus[1]})
        if args.loop == "uvloop":
            import uvloop

            run: Callable[[Awaitable[tuple[float, float]]], tuple[float, float]] = uvloop.run  # type: ignore[assignment]
        else:
            run = asyncio.run  # type: ignore[assignment]
        target = url + "/v1/chat/completions"
        pinned = f"mock on CPU {cpus[0]}, client on CPU {cpus[1]}" if len(cpus) > 1 else "one CPU: not pinned"
        print(f"{args.requests} non-streaming chat requests per run, {args.loop}, {pinned}, {args.rounds} round(s)")
        samples: dict[tuple[str, int], list[tuple[float, float]]] = {}
        for round_no in range(args.rounds):
            for name in args.clients:
                for concurrency in args.concurrency:
                    cpu_us, rps = run(CLIENTS[name](target, args.requests, concurrency))
                    samples.setdefault((name, concurrency), []).append((cpu_us, rps))
                    print(f"  round {round_no + 1} {name:<14} c={concurrency:<3} {cpu_us:8.1f} us CPU {rps:8.0f} req/s")
        print(f"  {'client':<16}" + "".join(f"{f'c={c} CPU/req (range)':>30}{'req/s':>9}" for c in args.concurrency))
        for name in args.clients:
            results[name] = {}
            row = f"  {name:<16}"
            for concurrency in args.concurrency:
                runs = samples[(name, concurrency)]
                cpus_us = sorted(cpu for cpu, _ in runs)
                cpu_us = statistics.median(cpus_us)
                rps = statistics.median(r for _, r in runs)
                results[name][f"c{concurrency}"] = {
                    "cpu_us_per_request": round(cpu_us, 1),
                    "cpu_us_per_request_rounds": [round(cpu, 1) for cpu, _ in runs],
                    "requests_per_s": round(rps),
                }
                spread = f"({cpus_us[0]:.1f}-{cpus_us[-1]:.1f})"
                row += f"{cpu_us:12.1f}us {spread:>15}{rps:9.0f}"
            print(row, flush=True)
    finally:
        mock.terminate()
        mock.wait(timeout=10)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"loop": args.loop, "requests": args.requests, "rounds": args.rounds, "results": results})
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
