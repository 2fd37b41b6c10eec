"""The floor of a Python proxy on this stack, beside vllm-router and the platform: CPU per request at c64.

    .venv/bin/python bench/floor.py                 # 3 rounds of 8 s per system, shared placement (~3 min)
    .venv/bin/python bench/floor.py --rounds 5 --duration 10

Issue 15 asks for the platform's CPU per request to be at most 1.5x vllm-router's (the Rust router of the vLLM
project) with every feature on. This script measures what a Python proxy costs before any feature, so that the
target can be read against it. Systems, each in front of the same bundled mock vLLM, measured in the same run,
in alternating order, with nothing pinned (the shared placement of `make bench`):

- `vllm-router`: PyPI `vllm-router` (bench/prefix.py installs it in a venv of its own), `--policy round_robin`;
- `floor`: a featureless proxy written for this measurement (below): uvloop, httptools' request parser (the
  C parser uvicorn uses), one `asyncio.Protocol` per client connection, and the platform's own upstream client
  (`routing.upstream.FastUpstream`) to the mock. No ASGI, no authentication, no JSON parsing, no routing
  decision, no accounting, no metrics: request body in, response body out;
- `floor + json`: the same, plus what every OpenAI-compatible router must do at the least: parse the request
  and the response with orjson, rewrite the model name in both, and read the usage;
- `asgi floor + json`: the same JSON work as an ASGI app (below) under uvicorn with the platform's command line
  (`core.procs.uvicorn_argv`: uvloop, the HTTP protocol of llm_platform/serve.py, the proxy-headers middleware):
  what the server layer costs before any feature, i.e. the difference from `floor + json`;
- `platform`: the platform as `make run` serves it (one uvicorn process, bench/stack.py), every feature on.

Each round runs wrk (bench/chat.lua, exact counts) at c64 for `--duration` seconds per system; CPU per request
is the proxy's process tree (utime + stime, every thread) over the answered requests. The report gives each
system's median over the rounds and its multiple of vllm-router's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends.mock_vllm import free_port  # noqa: E402
from bench.stack import PY, platform_env, start_platform, wait_http  # noqa: E402
from core.procs import ASGI_APP, uvicorn_argv  # noqa: E402
from routing.upstream import FastUpstream, Timeouts  # noqa: E402

MODEL = "mock-chat"
KEY = "floor-bench-key"
MAX_TOKENS = 4
RESPONSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
ASGI_FLOOR_APP = "bench.floor:asgi_floor"
TIMEOUTS = Timeouts(connect=5.0, read=30.0, write=5.0, pool=5.0)


# --- the floor proxy ----------------------------------------------------------------------------------------


class FloorProtocol(asyncio.Protocol):
    """One client connection: parse requests with httptools, forward each body, write the answer back."""

    def __init__(self, upstream: FastUpstream, url: str, json_work: bool) -> None:
        import httptools

        self.parser = httptools.HttpRequestParser(self)
        self.upstream = upstream
        self.url = url
        self.json_work = json_work
        self.body: list[bytes] = []
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio's classes

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body, self.body = b"".join(self.body), []
        self.task = asyncio.ensure_future(self.forward(body))  # one at a time: wrk waits for each answer

    async def forward(self, body: bytes) -> None:
        import orjson

        if self.json_work:
            data = orjson.loads(body)
            requested, data["model"] = data["model"], MODEL
            body = orjson.dumps(data)
        response = await self.upstream.send(
            "POST",
            self.url,
            headers={"content-type": "application/json"},
            content=body,
            timeouts=TIMEOUTS,
            stream=False,
        )
        content = await response.aread()
        if self.json_work:
            result = orjson.loads(content)
            result["model"] = requested
            usage = result.get("usage") or {}
            _ = usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0)
            content = orjson.dumps(result)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(RESPONSE_HEAD % len(content) + content)


class AsgiFloor:
    """`floor + json` as an ASGI app (uvicorn serves it): read the body, rewrite the model, forward, answer."""

    def __init__(self) -> None:
        self.upstream: FastUpstream | None = None
        self.url = f"{os.environ.get('FLOOR_UPSTREAM', '')}/v1/chat/completions"

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        import orjson

        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                while (await receive())["type"] != "lifespan.shutdown":
                    await send({"type": "lifespan.startup.complete"})
                await send({"type": "lifespan.shutdown.complete"})
            return
        if self.upstream is None:
            self.upstream = FastUpstream()
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        data = orjson.loads(b"".join(chunks))
        requested, data["model"] = data["model"], MODEL
        response = await self.upstream.send(
            "POST",
            self.url,
            headers={"content-type": "application/json"},
            content=orjson.dumps(data),
            timeouts=TIMEOUTS,
            stream=False,
        )
        result = orjson.loads(await response.aread())
        result["model"] = requested
        usage = result.get("usage") or {}
        _ = usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0)
        content = orjson.dumps(result)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": content})


asgi_floor = AsgiFloor()


def _listening(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> str:
    """The URL of a proxy once it accepts connections on `port`; RuntimeError if it does not within timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return f"http://127.0.0.1:{port}"
        time.sleep(0.1)
    raise RuntimeError(f"the proxy on port {port} did not start")


def start_asgi_floor(mock_url: str) -> tuple[str, subprocess.Popen[bytes]]:
    """The ASGI floor under uvicorn, started as the platform is (core.procs.uvicorn_argv), app swapped."""
    port = free_port()
    argv = [ASGI_FLOOR_APP if arg == ASGI_APP else arg for arg in uvicorn_argv(port, python=PY, log_level="warning")]
    proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "FLOOR_UPSTREAM": mock_url})
    return _listening(port, proc), proc


def serve_floor(port: int, upstream_url: str, json_work: bool) -> None:
    """Run the floor proxy until SIGTERM."""
    import uvloop

    async def main() -> None:
        upstream = FastUpstream()
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: FloorProtocol(upstream, f"{upstream_url}/v1/chat/completions", json_work), "127.0.0.1", port
        )
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        async with server:
            await stop.wait()
        await upstream.aclose()

    uvloop.run(main())


# --- the measurement ----------------------------------------------------------------------------------------


@dataclass
class System:
    """One proxy under test: how clients reach it, its process, its CPU per request per round."""

    label: str
    url: str
    key: str
    proc: subprocess.Popen[bytes]
    cpu_ms: list[float] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    errors: int = 0


def start_floor(mock_url: str, json_work: bool) -> tuple[str, subprocess.Popen[bytes]]:
    """The floor proxy in a process of its own."""
    port = free_port()
    argv = [PY, str(Path(__file__).resolve()), "--serve-floor", str(port), "--upstream", mock_url]
    proc = subprocess.Popen([*argv, *(["--json"] if json_work else [])], cwd=ROOT)
    return _listening(port, proc), proc


def start_router(mock_url: str) -> tuple[str, subprocess.Popen[bytes]]:
    """vllm-router, round robin over the one mock."""
    from bench.prefix import ensure_router

    port = free_port()
    argv = [str(ensure_router()), "--host", "127.0.0.1", "--port", str(port), "--policy", "round_robin"]
    argv += ["--worker-urls", mock_url, "--log-level", "warning", "--prometheus-port", str(free_port())]
    proc = subprocess.Popen(argv, cwd=ROOT)
    wait_http(f"http://127.0.0.1:{port}/health", timeout_s=120)
    return f"http://127.0.0.1:{port}", proc


@contextlib.contextmanager
def systems(state: Path) -> Iterator[tuple[str, list[System]]]:
    """The mock and the five proxies, stopped on exit."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        mock_port = free_port()
        mock_argv = [PY, "-m", "backends.mock_vllm", "--host", "127.0.0.1", "--port", str(mock_port)]
        procs.append(subprocess.Popen([*mock_argv, "--model", MODEL], cwd=ROOT))
        mock_url = f"http://127.0.0.1:{mock_port}"
        wait_http(f"{mock_url}/health")
        found: list[System] = []
        router_url, router = start_router(mock_url)
        procs.append(router)
        found.append(System("vllm-router", router_url, "", router))
        for json_work in (False, True):
            url, proc = start_floor(mock_url, json_work)
            procs.append(proc)
            found.append(System("floor + json" if json_work else "floor", url, "", proc))
        url, proc = start_asgi_floor(mock_url)
        procs.append(proc)
        found.append(System("asgi floor + json", url, "", proc))
        port = free_port()
        web = start_platform(platform_env(state, KEY), [mock_url], port)
        procs.append(web)
        found.append(System("platform", f"http://127.0.0.1:{port}", KEY, web))
        yield mock_url, found
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=15)


def measure(wrk: str, system: System, duration: float) -> None:
    """One wrk run at c64 against the system; its CPU per answered request."""
    from bench.run import SCENARIOS, cpu_seconds, process_tree, run_wrk

    scenario = next(s for s in SCENARIOS if s.name == "chat c64")
    pids = process_tree(system.proc.pid)
    before = cpu_seconds(pids)
    report = run_wrk(wrk, None, system.url, system.key, scenario, duration)
    used = cpu_seconds(pids) - before
    answered = report["ok"]
    system.errors += report["sent"] - answered
    system.cpu_ms.append(used / answered * 1000 if answered else float("nan"))
    system.rates.append(report["rate"])
    print(
        f"[floor] {system.label}: {answered} answered, {report['rate']:,.0f} req/s, {system.cpu_ms[-1]:.3f} ms CPU/req",
        file=sys.stderr,
        flush=True,
    )


def report(found: list[System], rounds: int, duration: float, load: list[str]) -> str:
    """The Markdown table."""
    peer = statistics.median(next(s for s in found if s.label == "vllm-router").cpu_ms)
    lines = [
        f"# Python proxy floor, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"Command: `bench/floor.py --rounds {rounds} --duration {duration:g}`. Chat completions, non-streamed, c64 "
        f"(wrk, bench/chat.lua), the bundled mock; nothing pinned (2 cores shared by the mock, wrk and the proxy). "
        f"Load average {' -> '.join(load)}.",
        "",
        "| system | CPU ms / request (median) | per round | req/s (median) | x vllm-router | errors |",
        "|---|--:|---|--:|--:|--:|",
    ]
    for s in found:
        cpu = statistics.median(s.cpu_ms)
        rounds_text = " / ".join(f"{v:.3f}" for v in s.cpu_ms)
        lines.append(
            f"| {s.label} | {cpu:.3f} | {rounds_text} | {statistics.median(s.rates):,.0f} | {cpu / peer:.2f}x "
            f"| {s.errors} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of load per system and round")
    parser.add_argument("--out", type=Path, help="report (default bench/results/floor-<date>.md)")
    parser.add_argument("--serve-floor", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_floor:
        serve_floor(args.serve_floor, args.upstream, args.json)
        return 0
    from bench.run import ensure_wrk

    wrk = ensure_wrk()
    load = [f"{os.getloadavg()[0]:.1f}"]

    with tempfile.TemporaryDirectory(prefix="floor-bench-") as state, systems(Path(state)) as (_, found):
        for round_no in range(args.rounds):
            order = found if round_no % 2 == 0 else list(reversed(found))
            for system in order:
                measure(wrk, system, args.duration)
    load.append(f"{os.getloadavg()[0]:.1f}")
    text = report(found, args.rounds, args.duration, load)
    print(text)
    out = args.out or ROOT / "bench" / "results" / f"floor-{datetime.date.today():%Y-%m-%d}.md"
    out.write_text(text)
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
