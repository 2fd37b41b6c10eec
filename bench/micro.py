"""Component micro-benchmarks behind docs/performance.md: CPU time per call of the hot path's big pieces.

    .venv/bin/python bench/micro.py            # all
    .venv/bin/python bench/micro.py validate   # DRF validation: per-request serializer vs one reused instance
    .venv/bin/python bench/micro.py upstream   # upstream client: httpx (as Dispatcher builds it) vs asyncio+httptools
    .venv/bin/python bench/micro.py admission  # prepare + admit + a backend slot taken and released, no contention
    MICRO_ROOT=/path/to/other/checkout .venv/bin/python bench/micro.py admission   # the same on another checkout

CPU time (time.process_time) of this process only, so another process on the machine inflates it little. The
upstream comparison starts the bundled mock on CPU 0 and pins itself to CPU 1 (as `make bench` places the
platform); it sends the benchmark's non-streaming chat request with 1, 16 and 64 concurrent connections.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parent.parent
BODY = b'{"model":"mock-chat","messages":[{"role":"user","content":"Hello, how are you today?"}],"max_tokens":4}'


def cpu_per_call(func: Callable[[], Any], n: int) -> float:
    """Microseconds of CPU per call of func (after a short warm-up)."""
    for _ in range(min(200, n)):
        func()
    start = time.process_time()
    for _ in range(n):
        func()
    return (time.process_time() - start) / n * 1e6


def bench_validate(n: int = 3000) -> None:
    """validate_request (a new serializer per request, as the gateway does) vs one prebuilt serializer."""
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llm_platform.settings")
    import django

    django.setup()
    import orjson

    from routing.serializers import ChatCompletionRequestSerializer, validate_request

    body = orjson.loads(BODY)
    shared = ChatCompletionRequestSerializer()
    shared.fields  # noqa: B018 - bind the fields once
    cases: list[tuple[str, Callable[[], Any]]] = [
        (
            "validate_request (a new serializer each time)",
            lambda: validate_request(ChatCompletionRequestSerializer, dict(body)),
        ),
        ("one prebuilt serializer, run_validation()", lambda: shared.run_validation(dict(body))),
        ("constructing a serializer and its .fields", lambda: ChatCompletionRequestSerializer().fields),
        ("orjson.loads + orjson.dumps of the body", lambda: orjson.dumps(orjson.loads(BODY))),
    ]
    print("validation of the benchmark's chat body (CPU per request):")
    for label, func in cases:
        print(f"  {label:<48} {cpu_per_call(func, n):7.1f} us")


# --- upstream clients -----------------------------------------------------------------------------------------


class _RawProtocol(asyncio.Protocol):
    """The smallest keep-alive HTTP/1.1 client: one request at a time, httptools parses the response."""

    def __init__(self, request: bytes) -> None:
        import httptools

        self.request = request
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[bytes] | None = None
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        """Feed the parser."""
        self.parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        """httptools callback: a piece of the body."""
        self.body.append(body)

    def on_message_complete(self) -> None:
        """httptools callback: the response is complete."""
        waiter, self.waiter = self.waiter, None
        if waiter is not None:
            waiter.set_result(b"".join(self.body))
        self.body = []

    async def send(self) -> bytes:
        """Send the request and wait for the whole response body."""
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(self.request)
        return await self.waiter


async def _load(concurrency: int, n: int, one: Callable[[int], Awaitable[Any]]) -> float:
    """CPU microseconds per request of `concurrency` workers sending n requests in all."""

    async def worker(index: int, count: int) -> None:
        for _ in range(count):
            await one(index)

    await asyncio.gather(*(worker(i, 20) for i in range(concurrency)))
    start = time.process_time()
    await asyncio.gather(*(worker(i, n // concurrency) for i in range(concurrency)))
    return (time.process_time() - start) / (n // concurrency * concurrency) * 1e6


async def _httpx(url: str, concurrency: int, n: int, module: str) -> float:
    httpx: Any = __import__(module)
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
    async with httpx.AsyncClient(limits=limits, timeout=None, follow_redirects=False) as client:
        headers = {"content-type": "application/json", "x-request-id": "bench"}

        async def one(_: int) -> None:
            request = client.build_request("POST", url + "/v1/chat/completions", content=BODY, headers=headers)
            response = await client.send(request)
            _ = response.content

        return await _load(concurrency, n, one)


async def _raw(port: int, concurrency: int, n: int) -> float:
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
    request = (head + f"content-length: {len(BODY)}\r\n\r\n").encode() + BODY
    loop = asyncio.get_running_loop()
    protocols = []
    for _ in range(concurrency):
        _, protocol = await loop.create_connection(lambda: _RawProtocol(request), "127.0.0.1", port)
        protocols.append(protocol)

    async def one(index: int) -> None:
        await protocols[index].send()

    try:
        return await _load(concurrency, n, one)
    finally:
        for protocol in protocols:
            if protocol.transport is not None:
                protocol.transport.close()


def bench_upstream(n: int = 6400) -> None:
    """httpx 0.28 (the Dispatcher's client), httpx2 if installed, and a raw asyncio+httptools client."""
    import uvloop

    for name in ("httpx", "httpx2", "httpcore", "httpcore2"):
        logging.getLogger(name).setLevel(logging.WARNING)  # Django's LOGGING (bench_validate) logs requests
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cpus = sorted(os.sched_getaffinity(0))
    pin = ["taskset", "-c", str(cpus[0])] if len(cpus) > 1 else []
    argv = [*pin, sys.executable, "-m", "backends.mock_vllm", "--host", "127.0.0.1", "--port", str(port)]
    mock = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                urllib.request.urlopen(url + "/health", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        if len(cpus) > 1:
            os.sched_setaffinity(0, {cpus[1]})
        clients: list[tuple[str, Callable[[int], Coroutine[Any, Any, float]]]] = [
            ("httpx 0.28 AsyncClient", lambda c: _httpx(url, c, n, "httpx")),
        ]
        try:
            __import__("httpx2")
            clients.append(("httpx2 AsyncClient", lambda c: _httpx(url, c, n, "httpx2")))
        except ImportError:
            pass
        clients.append(("asyncio.Protocol + httptools", lambda c: _raw(port, c, n)))
        print("upstream client, one non-streaming chat request to the mock (CPU per request):")
        print(f"  {'client':<30} {'c1':>9} {'c16':>9} {'c64':>9}")
        for name, run in clients:
            figures: list[float] = [uvloop.run(run(c)) for c in (1, 16, 64)]
            print(f"  {name:<30} " + " ".join(f"{f:7.0f}us" for f in figures))
    finally:
        mock.terminate()
        mock.wait(timeout=10)


def bench_admission(n: int = 20000) -> None:
    """The hot path's admission steps without contention: `Gateway.prepare` of the benchmark's chat body (with the
    request's priority choice), `Lifecycle.admit` for an unlimited client key, and `Dispatcher.acquire` + `done` of
    a backend with a concurrency limit (the admission queue's fast path). MICRO_ROOT measures another checkout's
    code (e.g. main before a change) with this same script."""
    root = Path(os.environ.get("MICRO_ROOT", ROOT)).resolve()
    sys.path.insert(0, str(root))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llm_platform.settings")
    import django

    django.setup()
    import orjson

    from governance.auth import Principal
    from governance.snapshot import KeySnap
    from routing.dispatch import Dispatcher
    from routing.gateway import ENDPOINTS, Gateway
    from routing.registry import RegistryCache
    from tests.factories import backend_snap, registry_snap

    registry = registry_snap(backends=[backend_snap("b1", max_concurrent_requests=64)])
    body = orjson.loads(BODY.replace(b"mock-chat", b"chat-model"))
    headers = [(b"host", b"router"), (b"authorization", b"Bearer sk-x"), (b"content-type", b"application/json")]
    key = KeySnap(1, "k", None, None, None, None, None)
    principal = Principal(name="k", is_master=False, key=key)
    endpoint = ENDPOINTS["/v1/chat/completions"]
    model = registry.models["chat-model"]

    async def run() -> list[tuple[str, float]]:
        dispatcher = Dispatcher()
        gateway = Gateway(None, registry=RegistryCache.static(registry), dispatcher=dispatcher, master_key="m")

        async def prepare_admit() -> None:
            prepared = await gateway.prepare(endpoint, dict(body), headers=headers, size=len(BODY))
            await gateway.lifecycle(endpoint, "r", 0.0, principal).admit(prepared, len(BODY))

        async def slot() -> None:
            backend = await dispatcher.acquire(model, registry, set())
            assert backend is not None
            dispatcher.done(backend, True)

        out = []
        for label, step in (("prepare + admit", prepare_admit), ("acquire + done (free slot)", slot)):
            for _ in range(500):
                await step()
            start = time.process_time()
            for _ in range(n):
                await step()
            out.append((label, (time.process_time() - start) / n * 1e6))
        await dispatcher.aclose()
        return out

    print(f"admission without contention, code of {root} (CPU per request):")
    for label, us in asyncio.run(run()):
        print(f"  {label:<48} {us:7.2f} us")


def main(argv: list[str]) -> int:
    """Run the named micro-benchmarks (all when none is named)."""
    names = argv or ["validate", "upstream", "admission"]
    for name in names:
        {"validate": bench_validate, "upstream": bench_upstream, "admission": bench_admission}[name]()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
