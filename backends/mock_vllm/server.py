"""Run the mock vLLM app on a real socket in a background thread (for streaming/disconnect tests).

Usage::

    with MockServer(latency_s=0.01) as mock:          # or: async with MockServer() as mock:
        httpx.post(f"{mock.url}/v1/chat/completions", json={...})
        mock.config.fail_next = 2                      # knobs, in-process
        assert wait_until(lambda: mock.stats.open_requests == 0)

Startup takes a few milliseconds and shutdown is immediate (connections are closed and the
in-flight requests cancelled), so a server per test is affordable.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

import uvicorn

from backends.mock_vllm.app import MockConfig, MockStats, MockVLLM
from core.procs import free_port

__all__ = ["MockServer", "await_until", "free_port", "wait_until"]


def wait_until(predicate: Callable[[], bool], timeout: float = 2.0, interval: float = 0.002) -> bool:
    """Poll predicate until it is true or timeout seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return bool(predicate())
        time.sleep(interval)


async def await_until(predicate: Callable[[], bool], timeout: float = 2.0, interval: float = 0.002) -> bool:
    """Async variant of `wait_until` (does not block the event loop)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return bool(predicate())
        await asyncio.sleep(interval)


class MockServer:
    """Serve a `MockVLLM` with uvicorn in a daemon thread on host:port (port 0 = a free port)."""

    def __init__(
        self,
        app: MockVLLM | None = None,
        *,
        config: MockConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        http: str = "httptools",
        loop: str = "asyncio",
        log_level: str | None = None,
        **overrides: Any,
    ) -> None:
        """Wrap app (or build one from config / MockConfig field overrides); call start() or use `with`."""
        if app is not None and (config is not None or overrides):
            raise ValueError("pass either an app or config/overrides, not both")
        self.app: MockVLLM = app if app is not None else MockVLLM(config, **overrides)
        self.host = host
        self._requested_port = port
        self.port: int = port
        self._http = http
        self._loop_name = loop
        self._log_level = log_level
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None

    # -- conveniences ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL of the server, e.g. 'http://127.0.0.1:54321' (no trailing slash, no /v1)."""
        return f"http://{self.host}:{self.port}"

    @property
    def config(self) -> MockConfig:
        """The live configuration of the served app."""
        return self.app.config

    @property
    def stats(self) -> MockStats:
        """The live counters of the served app."""
        return self.app.stats

    def reset(self) -> None:
        """Restore the app's construction-time configuration and zero its counters."""
        self.app.reset()

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> MockServer:
        """Bind the socket, start the server thread and wait until it accepts connections."""
        if self._thread is not None:
            raise RuntimeError("MockServer already started")
        # proto must be IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on accepted sockets whose
        # proto says TCP, and without it Nagle + delayed ACKs add ~40 ms to every keep-alive request.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self._requested_port))
        sock.setblocking(False)
        self.port = int(sock.getsockname()[1])
        self._ready.clear()
        self._error = None
        name = f"mock-vllm-{self.port}"
        self._thread = threading.Thread(target=self._run, args=(sock,), name=name, daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout=10.0):
            raise RuntimeError("mock vLLM server did not start within 10 s")
        if self._error is not None:
            raise RuntimeError("mock vLLM server failed to start") from self._error
        return self

    def stop(self) -> None:
        """Close all connections, cancel in-flight requests and join the thread."""
        thread, loop, stop_event = self._thread, self._event_loop, self._stop_event
        if thread is None:
            return
        if loop is not None and stop_event is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop_event.set)
            except RuntimeError:  # loop already closed
                pass
        thread.join(timeout=10.0)
        close = getattr(self.app, "close", None)  # the mock's KV-cache event socket (any ASGI app may be served)
        if close is not None:
            close()
        self._thread = None
        self._event_loop = None
        self._stop_event = None

    def __enter__(self) -> MockServer:
        """Start the server."""
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Stop the server."""
        self.stop()

    async def __aenter__(self) -> MockServer:
        """Start the server without blocking the running event loop."""
        return await asyncio.to_thread(self.start)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Stop the server without blocking the running event loop."""
        await asyncio.to_thread(self.stop)

    # -- thread body -----------------------------------------------------------------------------

    def _loop_factory(self) -> Callable[[], asyncio.AbstractEventLoop] | None:
        """Return the event loop factory for the server thread."""
        if self._loop_name == "uvloop":
            import uvloop

            return uvloop.new_event_loop
        return None

    def _run(self, sock: socket.socket) -> None:
        """Thread body: run the server until stop() is called."""
        try:
            with asyncio.Runner(loop_factory=self._loop_factory()) as runner:
                runner.run(self._serve(sock))
        except BaseException as exc:  # reported to start() if it happens before readiness
            self._error = exc
        finally:
            sock.close()
            self._ready.set()

    async def _serve(self, sock: socket.socket) -> None:
        """Start uvicorn's protocol server on sock, wait for stop, then shut down fast."""
        self._event_loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            http=self._http,
            ws="none",
            access_log=False,
            log_config=None,
            log_level=self._log_level,
        )
        server = uvicorn.Server(config)
        config.load()
        server.lifespan = config.lifespan_class(config)
        await server.startup(sockets=[sock])
        self._ready.set()
        await self._stop_event.wait()
        await _fast_shutdown(server)


async def _fast_shutdown(server: uvicorn.Server) -> None:
    """Stop listening, drop every connection and cancel the in-flight request tasks."""
    for listener in getattr(server, "servers", []):
        listener.close()
    state = server.server_state
    for conn in list(state.connections):
        transport = getattr(conn, "transport", None)
        if transport is not None:
            transport.close()
    tasks: list[asyncio.Task[None]] = list(state.tasks)
    if tasks:
        # Closing the transports marks the requests disconnected: they end by themselves quickly.
        _, pending = await asyncio.wait(tasks, timeout=0.5)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1.0)
    await _wait_closed(getattr(server, "servers", []))


async def _wait_closed(listeners: list[Any]) -> None:
    """Wait for the asyncio listeners to close (bounded)."""
    waits: list[Awaitable[None]] = [listener.wait_closed() for listener in listeners]
    if waits:
        await asyncio.wait([asyncio.ensure_future(w) for w in waits], timeout=1.0)
