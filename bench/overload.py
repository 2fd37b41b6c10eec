"""Overload runs: the platform beyond saturation, and a backend slower than the clients' timeout.

    .venv/bin/python bench/overload.py [--seconds 8]      (also run by `make bench`)

Starts one mock vLLM process and one platform process (uvicorn, fresh SQLite, an API key), then:
1. **2x saturation**: non-streaming chat from wrk at twice the concurrency that saturates the platform (c64
   saturates one process in `make bench`; this runs c128), with a backend limit of 32 concurrent requests and a
   wait queue of 32, so admission control answers the excess with 429.
2. **slow backend**: the mock answers after 3 s while the backend's read timeout is 1 s and the clients give up
   after 5 s.
For each it checks: every request got an answer, and only 200 or a clear 429/503/504 (a client timeout counts as
a hang); the mock's counters agree with what the clients saw (requests that reached the backend = 200s + 504s;
the platform's own 429s never reached it); no request is left open on the mock; and the platform's RSS returns
to within 10 % of its idle level once the load stops. Exits non-zero on any violation. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
MASTER = "overload-master-key"
sys.path.insert(0, str(ROOT))

from backends.mock_vllm import free_port  # noqa: E402
from bench.stack import create_api_key, platform_env, start_mock, start_platform, wait_http  # noqa: E402
from core.procs import stop_process  # noqa: E402

CLEAR = {200, 429, 503, 504}


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def _load(url: str, key: str, concurrency: int, seconds: float, timeout_s: float) -> dict[str, Any]:
    """Closed-loop clients for `seconds`; counts statuses, client timeouts (hangs) and transport errors."""
    statuses: collections.Counter[int] = collections.Counter()
    hangs = errors = 0
    body = {"model": "mock-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal hangs, errors
        while time.monotonic() < deadline:
            try:
                response = await client.post(f"{url}/v1/chat/completions", json=body)
                statuses[response.status_code] += 1
            except httpx.TimeoutException:
                hangs += 1
            except httpx.HTTPError:
                errors += 1

    async with httpx.AsyncClient(
        headers={"Authorization": f"Bearer {key}"}, timeout=timeout_s, limits=limits
    ) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return {
        "statuses": dict(statuses),
        "hangs": hangs,
        "errors": errors,
        "sent": sum(statuses.values()) + hangs + errors,
    }


def _wrk(url: str, key: str, concurrency: int, seconds: float, timeout_s: float) -> dict[str, Any]:
    """The saturation load from wrk (bench/chat.lua: exact sent/answered counts, status histogram)."""
    import json
    import math
    import shutil

    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is required (make bench installs it): apt-get install -y wrk")
    out = subprocess.run(
        # -d is the window plus a 2 s drain (the slowest answer here is a 0.5 s queue wait): a longer drain leaves
        # the parked connections idle past uvicorn's keep-alive timeout, and wrk counts their closing as errors.
        [
            "taskset",
            "-c",
            "0",
            wrk,
            "-t2",
            f"-c{concurrency}",
            f"-d{math.ceil(seconds + 2)}s",
            f"--timeout={int(timeout_s)}s",
            "-s",
            str(ROOT / "bench" / "chat.lua"),
            f"{url}/v1/chat/completions",
            "--",
            str(seconds),
            key,
            "mock-chat",
            "4",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    report = json.loads(next(line for line in out.splitlines() if line.startswith("BENCH_JSON "))[11:])
    statuses = {int(code): n for code, n in report["statuses"].items()}
    socket = report["socket_errors"]
    return {
        "statuses": statuses,
        "hangs": socket["timeout"] + (report["sent"] - report["answered"]),
        "errors": socket["connect"] + socket["read"] + socket["write"],
        "sent": report["sent"],
    }


@dataclass
class Stack:
    """The running mock and platform, and the API key the loads use."""

    mock_url: str
    base: str
    key: str
    web: subprocess.Popen[bytes]
    api: httpx.Client


@dataclass(frozen=True)
class Scenario:
    """One overload run: the load, the backend's settings (management API) and the mock's knobs."""

    name: str
    concurrency: int
    timeout_s: float
    backend: dict[str, Any]
    knobs: dict[str, Any]
    use_wrk: bool = False


SCENARIOS = (
    Scenario(
        "2x saturation (wrk), backend limit 32, queue 32",
        128,
        10.0,
        {"max_concurrent_requests": 32, "read_timeout_s": 60},
        {"latency_s": 0.0},
        use_wrk=True,
    ),
    Scenario(
        "backend slower than the clients' timeout",
        32,
        5.0,
        {"max_concurrent_requests": 0, "read_timeout_s": 1.0},
        {"latency_s": 3.0},
    ),
)


def _stack(env: dict[str, str], mock_url: str, port: int, web: subprocess.Popen[bytes]) -> Stack:
    """The running platform with an API key for the loads."""
    key = create_api_key(env, "overload")
    time.sleep(1.0)  # the new key reaches the running process within the 0.5 s reload interval
    base = f"http://127.0.0.1:{port}"
    api = httpx.Client(base_url=f"{base}/api", headers={"Authorization": f"Bearer {MASTER}"}, timeout=10)
    return Stack(mock_url, base, key, web, api)


def _run(stack: Stack, scenario: Scenario, seconds: float) -> tuple[str, list[str]]:
    """Run one scenario: its Markdown table row and the checks it failed."""
    name, concurrency, timeout_s = scenario.name, scenario.concurrency, scenario.timeout_s
    mock_url, base, key, pid = stack.mock_url, stack.base, stack.key, stack.web.pid
    stack.api.patch("/backends/demo-mock-1/", json=scenario.backend).raise_for_status()
    httpx.post(f"{mock_url}/mock/reset", timeout=5)
    httpx.post(f"{mock_url}/mock/config", json=scenario.knobs, timeout=5).raise_for_status()
    time.sleep(1.2)  # registry reload
    asyncio.run(_load(base, key, 4, 1.0, timeout_s))  # warm-up
    time.sleep(0.5)
    idle = _rss_mib(pid)
    before = httpx.get(f"{mock_url}/mock/stats", timeout=5).json()["total_requests"]
    if scenario.use_wrk:
        result = _wrk(base, key, concurrency, seconds, timeout_s)
    else:
        result = asyncio.run(_load(base, key, concurrency, seconds, timeout_s))
    peak = _rss_mib(pid)
    time.sleep(3.0)  # the slow backend's requests were closed by the platform; let the mock notice
    stats = httpx.get(f"{mock_url}/mock/stats", timeout=5).json()
    after = _rss_mib(pid)
    reached = stats["total_requests"] - before
    statuses = result["statuses"]
    expected_reached = statuses.get(200, 0) + statuses.get(504, 0)
    failures = []
    unclear = {s: n for s, n in statuses.items() if s not in CLEAR}
    if unclear or result["hangs"] or result["errors"]:
        failures.append(f"{name}: unclear {unclear}, hangs {result['hangs']}, errors {result['errors']}")
    if reached != expected_reached:
        failures.append(f"{name}: backend saw {reached}, clients got {expected_reached} answers from it")
    if stats["open_requests"]:
        failures.append(f"{name}: {stats['open_requests']} requests still open on the backend")
    if after > idle * 1.10 + 5:
        failures.append(f"{name}: RSS {after:.0f} MiB after vs {idle:.0f} MiB idle")
    shown = ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items()))
    row = (
        f"| {name} | c{concurrency}, client timeout {timeout_s:g} s | {result['sent']:,} | {shown} | "
        f"{result['hangs']} | {reached:,} = {expected_reached:,} | {stats['open_requests']} | "
        f"{idle:.0f} / {peak:.0f} / {after:.0f} |"
    )
    return row, failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="overload-"))
    env = platform_env(
        state,
        MASTER,
        LOG_LEVEL="ERROR",
        ROUTER_QUEUE_TIMEOUT_S="0.5",
        ROUTER_QUEUE_MAX="32",
        ROUTER_CIRCUIT_FAILURES="1000000",
    )
    mock_port, port = free_port(), free_port()
    mock = start_mock(mock_port)
    mock_url = f"http://127.0.0.1:{mock_port}"
    web: subprocess.Popen[bytes] | None = None
    failures: list[str] = []
    rows: list[str] = []
    try:
        wait_http(f"{mock_url}/health")
        web = start_platform(env, [mock_url], port, cpu=1, log_level="error")
        stack = _stack(env, mock_url, port, web)
        for scenario in SCENARIOS:
            row, failed = _run(stack, scenario, args.seconds)
            rows.append(row)
            failures += failed
    finally:
        stop_process(web, 15)
        stop_process(mock, 15)
    print(
        "| run | load | sent | answers (status: count) | hangs | backend = 200s + 504s | left open | "
        "RSS MiB idle / peak / after |"
    )
    print("|---|---|---:|---|---:|---|---:|---|")
    print("\n".join(rows))
    for failure in failures:
        print(f"FAIL {failure}")
    print("overload: PASS" if not failures else "overload: FAIL")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
