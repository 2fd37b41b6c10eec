"""Streaming load client of the benchmark: N concurrent SSE chat streams, time to first token and total time.

    python bench/stream_client.py --url http://127.0.0.1:8000 --key KEY --concurrency 16 --duration 10

Each of the N workers keeps one keep-alive connection and sends streaming chat requests back to back until
`--duration` has passed; a request started before then is always read to its end, so "sent" equals "answered"
and the backend's request counter. Per request it records the time to the first `data:` event carrying
content (TTFT) and the time to the end of the response, both from just before the request is written. It
prints one JSON object on stdout: counts, error kinds, TTFT/total summaries in milliseconds, and the
client's own CPU time (to show the client is not the bottleneck).

Two clients: `raw` (default) is a minimal HTTP/1.1 client on asyncio streams, `httpx` the library the
platform itself uses upstream; `raw` costs several times less CPU per stream (see bench/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import socket
import statistics
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson

PATH = "/v1/chat/completions"


@dataclass(slots=True)
class StreamResult:
    """What one streamed request gave."""

    status: int = 0
    ttft_s: float | None = None
    total_s: float = 0.0
    tokens: int = 0
    done: bool = False
    error: str = ""


@dataclass
class Tally:
    """Counts and samples of a whole run."""

    sent: int = 0
    answered: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    ttft_s: list[float] = field(default_factory=list)
    total_s: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    def add(self, result: StreamResult, expect_tokens: int) -> None:
        """Record one finished request, classifying anything but a complete 200 stream as an error."""
        self.answered += 1
        error = result.error
        if not error and result.status != 200:
            error = f"status_{result.status}"
        elif not error and not result.done:
            error = "no_done"
        elif not error and expect_tokens and result.tokens != expect_tokens:
            error = "wrong_token_count"
        elif not error and result.ttft_s is None:
            error = "no_content"
        if error:
            self.errors[error] = self.errors.get(error, 0) + 1
            return
        self.ok += 1
        assert result.ttft_s is not None
        self.ttft_s.append(result.ttft_s)
        self.total_s.append(result.total_s)
        self.tokens.append(result.tokens)


class SSEParser:
    """Incremental SSE framing: counts content tokens, notes the first one and `[DONE]`."""

    __slots__ = ("buffer", "result", "started")

    def __init__(self, result: StreamResult, started: float) -> None:
        self.buffer = b""
        self.result = result
        self.started = started

    def feed(self, data: bytes) -> None:
        """Take raw body bytes; parse every complete event."""
        buffer = self.buffer + data if self.buffer else data
        start = 0
        while True:
            end = buffer.find(b"\n\n", start)
            if end < 0:
                break
            self._event(buffer[start:end])
            start = end + 2
        self.buffer = buffer[start:]

    def _event(self, event: bytes) -> None:
        result = self.result
        for line in event.split(b"\n"):
            if line.startswith(b"event: error"):
                result.error = "sse_error_event"
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                result.done = True
                continue
            try:
                chunk = orjson.loads(payload)
            except orjson.JSONDecodeError:
                result.error = "bad_sse_json"
                continue
            if "error" in chunk:
                result.error = "sse_error_object"
            choices = chunk.get("choices") or ()
            for choice in choices:
                delta = choice.get("delta") or {}
                content = delta.get("content") or choice.get("text")
                if content:
                    result.tokens += 1
                    if result.ttft_s is None:
                        result.ttft_s = time.perf_counter() - self.started


def request_body(model: str, max_tokens: int) -> bytes:
    """The JSON body of one streaming chat request."""
    return orjson.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "Tell me a story about a router."}],
            "max_tokens": max_tokens,
            "stream": True,
        }
    )


# --- raw asyncio HTTP/1.1 client ------------------------------------------------------------------------------


class RawConnection:
    """One keep-alive HTTP/1.1 connection that sends a POST and reads a chunked or sized response."""

    def __init__(self, host: str, port: int, request: bytes, timeout_s: float) -> None:
        self.host = host
        self.port = port
        self.request = request
        self.timeout_s = timeout_s
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.reader is None or self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
            sock = self.writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self.reader, self.writer

    async def close(self) -> None:
        """Close the connection (if open)."""
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
        self.reader = self.writer = None

    async def stream(self) -> StreamResult:
        """Send one request and read its whole response; reconnects next time after any failure."""
        result = StreamResult()
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._exchange(result, started)
        except TimeoutError:
            result.error = "timeout"
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            result.error = type(exc).__name__
        result.total_s = time.perf_counter() - started
        if result.error:
            await self.close()
        return result

    async def _exchange(self, result: StreamResult, started: float) -> None:
        reader, writer = await self._connect()
        writer.write(self.request)
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        result.status = int(lines[0].split(b" ", 2)[1])
        chunked = False
        length = -1
        close = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"content-length":
                length = int(value)
            elif name == b"connection":
                close = b"close" in value.lower()
        parser = SSEParser(result, started)
        if chunked:
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";", 1)[0], 16)
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                        pass
                    break
                data = await reader.readexactly(size + 2)
                parser.feed(data[:-2])
        elif length >= 0:
            parser.feed(await reader.readexactly(length))
        else:
            parser.feed(await reader.read())
            close = True
        if close:
            await self.close()


async def raw_worker(
    url: str, key: str, body: bytes, deadline: float, tally: Tally, expect: int, timeout_s: float
) -> None:
    """Send streams back to back on one raw connection until the deadline."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    request = (
        f"POST {PATH} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\n{auth}Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    connection = RawConnection(host, port, request, timeout_s)
    try:
        while time.perf_counter() < deadline:
            tally.sent += 1
            tally.add(await connection.stream(), expect)
    finally:
        await connection.close()


# --- httpx client ---------------------------------------------------------------------------------------------


async def httpx_worker(
    client: Any, url: str, key: str, body: bytes, deadline: float, tally: Tally, expect: int, timeout_s: float
) -> None:
    """Send streams back to back through a shared httpx.AsyncClient until the deadline."""
    import httpx

    headers = {"content-type": "application/json", "accept": "text/event-stream"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    while time.perf_counter() < deadline:
        tally.sent += 1
        result = StreamResult()
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout_s):
                async with client.stream("POST", url + PATH, content=body, headers=headers) as response:
                    result.status = response.status_code
                    parser = SSEParser(result, started)
                    async for data in response.aiter_raw():
                        parser.feed(data)
        except TimeoutError:
            result.error = "timeout"
        except httpx.HTTPError as exc:
            result.error = type(exc).__name__
        result.total_s = time.perf_counter() - started
        tally.add(result, expect)


# --- run ------------------------------------------------------------------------------------------------------


def summarize(samples: list[float]) -> dict[str, float | int]:
    """n, median, p90, p99, min, max of samples given in seconds, reported in milliseconds."""
    if not samples:
        return {"n": 0}
    ordered = sorted(samples)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))] * 1000

    return {
        "n": len(ordered),
        "median": statistics.median(ordered) * 1000,
        "mean": statistics.fmean(ordered) * 1000,
        "p90": pct(90),
        "p99": pct(99),
        "min": ordered[0] * 1000,
        "max": ordered[-1] * 1000,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the workers and return the JSON-able report."""
    body = request_body(args.model, args.max_tokens)
    tally = Tally()
    usage_before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    deadline = started + args.duration
    url = args.url.rstrip("/")
    if args.client == "httpx":
        import httpx

        limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
        async with httpx.AsyncClient(limits=limits, timeout=None) as client:
            await asyncio.gather(
                *(
                    httpx_worker(client, url, args.key, body, deadline, tally, args.max_tokens, args.timeout)
                    for _ in range(args.concurrency)
                )
            )
    else:
        await asyncio.gather(
            *(
                raw_worker(url, args.key, body, deadline, tally, args.max_tokens, args.timeout)
                for _ in range(args.concurrency)
            )
        )
    wall = time.perf_counter() - started
    usage_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (usage_after.ru_utime - usage_before.ru_utime) + (usage_after.ru_stime - usage_before.ru_stime)
    return {
        "client": args.client,
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "wall_s": wall,
        "sent": tally.sent,
        "answered": tally.answered,
        "ok": tally.ok,
        "errors": tally.errors,
        "streams_per_s": tally.ok / wall if wall > 0 else 0.0,
        "tokens_per_stream": statistics.median(tally.tokens) if tally.tokens else 0,
        "ttft_ms": summarize(tally.ttft_s),
        "total_ms": summarize(tally.total_s),
        "client_cpu_s": cpu,
        "client_cpu_ms_per_stream": cpu * 1000 / tally.answered if tally.answered else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, print the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8000 (no /v1)")
    parser.add_argument("--key", default="", help="bearer key (empty: no Authorization header)")
    parser.add_argument("--model", default="mock-chat")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds during which new requests start")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request timeout, seconds")
    parser.add_argument("--client", choices=("raw", "httpx"), default="raw")
    args = parser.parse_args(argv)
    try:
        import uvloop

        runner: Callable[[Coroutine[Any, Any, Any]], Any] = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is in requirements.txt
        runner = asyncio.run
    report = runner(run(args))
    sys.stdout.write(orjson.dumps(report).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
