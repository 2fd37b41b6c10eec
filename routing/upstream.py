"""Upstream HTTP clients: how the router talks to its vLLM backends.

Two implementations of one small interface (`UpstreamClient` -> `UpstreamResponse`, errors as `UpstreamError`):

- `FastUpstream`: plain asyncio (`asyncio.Protocol`, works under uvloop) + httptools' C response parser, HTTP/1.1
  over `http://` and `https://` (asyncio's TLS, `ssl_context`), a keep-alive pool per (host, port, TLS) and event
  loop. It exists because httpx costs several hundred microseconds of CPU per proxied request and aiohttp ~150-200;
  this costs a few tens (`bench/upstream_micro.py`, docs/performance.md "Upstream client").
- `HttpxUpstream`: httpx, for tests that inject httpx transports (ASGITransport, ...).

Both map their failures onto the same exceptions, so the dispatcher's retry policy does not depend on the client:
`UpstreamConnectError`, `UpstreamConnectTimeout` and `UpstreamPoolTimeout` mean nothing was sent; `UpstreamClosed`
means the backend cannot have started the request (safe to send elsewhere); `UpstreamReadTimeout` and
`UpstreamProtocolError` (with `UpstreamDisconnected`: closed after the request was sent, and `UpstreamTooLarge`: a
limit broken) may come from `send()` or later while reading a streamed body.

What a backend may send to FastUpstream is bounded (`Limits`): a header line, the header lines of a head, the head
(1xx heads before it included), bytes of chunk framing or trailers in a row, and a body read whole. Timeouts: the
head must be complete within `timeouts.read` of the request (a non-streamed response: all of it), whatever the
pace of its bytes; a streamed body may then take any time, but never `timeouts.read` without a byte.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

import certifi
import h11
import httptools
import httpx

from core.aio import running_loop

__all__ = [
    "FastUpstream",
    "HttpxUpstream",
    "Limits",
    "PoolStats",
    "Timeouts",
    "UpstreamClient",
    "UpstreamClosed",
    "UpstreamConnectError",
    "UpstreamConnectTimeout",
    "UpstreamDisconnected",
    "UpstreamError",
    "UpstreamPoolTimeout",
    "UpstreamProtocolError",
    "UpstreamReadTimeout",
    "UpstreamResponse",
    "UpstreamTooLarge",
]


# --- the interface ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds allowed: to connect; `read`: for the head in all (FastUpstream: for a body read whole too) and
    between two reads of a streamed body (httpx: per read throughout); to write the request; for a pool slot."""

    connect: float
    read: float
    write: float
    pool: float


class UpstreamError(Exception):
    """Base class of every upstream failure."""


class UpstreamConnectError(UpstreamError):
    """The connection could not be made (refused, DNS, reset while connecting): nothing was sent."""


class UpstreamConnectTimeout(UpstreamError):
    """The connection was not made within `timeouts.connect`: nothing was sent."""


class UpstreamPoolTimeout(UpstreamError):
    """No connection slot became free within `timeouts.pool`: nothing was sent."""


class UpstreamClosed(UpstreamError):
    """The server closed the connection before any response byte, when it cannot have started the request
    (safe to send elsewhere). FastUpstream raises it only for a connection closed before the request was written
    (a reused connection it retried once already); HttpxUpstream for any close before a complete head."""


class UpstreamReadTimeout(UpstreamError):
    """No bytes arrived within `timeouts.read` (waiting for the head, or between body chunks)."""


class UpstreamProtocolError(UpstreamError):
    """A malformed response, a body cut short (mid-stream), or another transport failure."""


class UpstreamDisconnected(UpstreamProtocolError):
    """The server closed a connection it had the request on before a complete response head (half a head, or
    nothing on a new connection): it may have started the request, so it must not be sent again."""


class UpstreamTooLarge(UpstreamProtocolError):
    """The response broke a limit (header line, header count, head size, non-streamed body size)."""


class UpstreamResponse(Protocol):
    """A response: status and head at once; the body read whole (`aread`) or as it arrives (`aiter_raw`)."""

    status_code: int
    headers: list[tuple[bytes, bytes]]  # lower-cased names
    content: bytes  # only after aread() / for non-streamed sends

    async def aread(self) -> bytes:
        """Read (the rest of) the body and return all of it."""
        ...

    def aiter_raw(self) -> AsyncIterator[bytes]:
        """De-chunked body bytes as they arrive."""
        ...

    async def aclose(self) -> None:
        """Release the response; before the end of the body this closes the connection (vLLM aborts)."""
        ...


class UpstreamClient(Protocol):
    """Sends one request to a backend."""

    async def send(
        self, method: str, url: str, *, headers: Mapping[str, str], content: bytes, timeouts: Timeouts, stream: bool
    ) -> UpstreamResponse:
        """Send the request; the body is read when not `stream`, else left to the caller (who must aclose())."""
        ...

    async def aclose(self) -> None:
        """Close every pooled connection."""
        ...


# --- httpx --------------------------------------------------------------------------------------------------------


def _from_httpx(exc: httpx.HTTPError, *, head: bool) -> UpstreamError:
    """The Upstream* equivalent of an httpx error raised before the response head (`head`) or in the body."""
    message = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectTimeout):
        return UpstreamConnectTimeout(message)
    if isinstance(exc, httpx.ConnectError):
        return UpstreamConnectError(message)
    if isinstance(exc, httpx.PoolTimeout):
        return UpstreamPoolTimeout(message)
    if isinstance(exc, httpx.ReadTimeout):
        return UpstreamReadTimeout(message)
    if head and isinstance(exc, (httpx.RemoteProtocolError, httpx.NetworkError)) and not _is_parse_error(exc):
        return UpstreamClosed(message)  # closed or reset before a complete head (a malformed head is not "closed")
    return UpstreamProtocolError(message)


def _is_parse_error(exc: BaseException) -> bool:
    """Whether h11 rejected the bytes (a malformed head) rather than the server closing before answering."""
    seen: BaseException | None = exc
    for _ in range(4):  # httpx error <- httpcore error <- h11 error
        if seen is None:
            return False
        if isinstance(seen, h11.RemoteProtocolError) or (seen.args and isinstance(seen.args[0], h11.ProtocolError)):
            return True
        seen = seen.__cause__
    return False


class _HttpxResponse:
    """An httpx response behind the `UpstreamResponse` interface (httpx errors mapped to Upstream* ones)."""

    __slots__ = ("_read", "_response", "content", "headers", "status_code")

    def __init__(self, response: httpx.Response) -> None:
        """Wrap a response whose head was received (its body not read yet)."""
        self._response = response
        self._read = False
        self.status_code: int = response.status_code
        self.headers: list[tuple[bytes, bytes]] = [(name.lower(), value) for name, value in response.headers.raw]
        self.content: bytes = b""

    async def aread(self) -> bytes:
        """Read the whole body (closing the response on failure)."""
        try:
            self.content = await self._response.aread()
        except httpx.HTTPError as exc:
            await self._close_quietly()
            raise _from_httpx(exc, head=False) from exc
        self._read = True
        return self.content

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body bytes as they arrive (closing the response on failure); the content once if already read."""
        if self._read:
            if self.content:
                yield self.content
            return
        try:
            async for chunk in self._response.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            await self._close_quietly()
            raise _from_httpx(exc, head=False) from exc

    async def aclose(self) -> None:
        """Close the response (httpcore drops the connection when the body was not read to its end)."""
        await self._close_quietly()

    async def _close_quietly(self) -> None:
        """Close the httpx response, ignoring transport errors."""
        with contextlib.suppress(httpx.HTTPError):
            await self._response.aclose()


class HttpxUpstream:
    """`UpstreamClient` over one pooled `httpx.AsyncClient` per event loop (any scheme, injectable transports)."""

    def __init__(
        self,
        client_factory: Callable[[], httpx.AsyncClient] | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        max_connections: int = 1000,
        max_keepalive: int = 200,
    ) -> None:
        """Build clients with client_factory, else with these limits and transport (None: real sockets)."""
        if client_factory is not None and transport is not None:
            raise ValueError("pass either client_factory or transport, not both")
        self._factory = client_factory
        self._transport = transport
        self._limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_keepalive)
        self._client: httpx.AsyncClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._timeouts: dict[Timeouts, httpx.Timeout] = {}

    @staticmethod
    def supports(url: str) -> bool:
        """Every URL httpx can fetch (http and https)."""
        return url[:8].lower() == "https://" or url[:7].lower() == "http://"

    def client(self) -> httpx.AsyncClient:
        """The pooled client of the running event loop (a new loop, e.g. in tests, gets a new client)."""
        loop = running_loop()
        if self._client is None or self._client_loop is not loop:
            if self._factory is not None:
                self._client = self._factory()
            else:
                self._client = httpx.AsyncClient(
                    limits=self._limits, timeout=None, follow_redirects=False, transport=self._transport
                )
            self._client_loop = loop
        return self._client

    async def send(
        self, method: str, url: str, *, headers: Mapping[str, str], content: bytes, timeouts: Timeouts, stream: bool
    ) -> _HttpxResponse:
        """Send the request; read the body unless `stream`. Raises `UpstreamError` subclasses."""
        client = self.client()
        timeout = self._timeouts.get(timeouts)
        if timeout is None:
            timeout = self._timeouts[timeouts] = httpx.Timeout(
                connect=timeouts.connect, read=timeouts.read, write=timeouts.write, pool=timeouts.pool
            )
        request = client.build_request(method, url, content=content, headers=headers, timeout=timeout)
        try:
            # Always streamed at the httpx level, so that a failure in the body is told apart from one before it.
            response = await client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise _from_httpx(exc, head=True) from exc
        wrapped = _HttpxResponse(response)
        if not stream:
            await wrapped.aread()
        return wrapped

    async def aclose(self) -> None:
        """Close the client and its connections (a client of another, dead, loop is just dropped)."""
        client, self._client = self._client, None
        if client is not None and self._client_loop is asyncio.get_running_loop():
            await client.aclose()


# --- asyncio + httptools ----------------------------------------------------------------------------------------

_STREAM_HIGH_WATER = 256 * 1024  # buffered body bytes of a streamed response above which reading pauses
_SPLIT_WRITE = 64 * 1024  # bodies larger than this are written after the head rather than copied into one buffer
_RESERVED = frozenset({"host", "content-length", "transfer-encoding", "connection"})  # framing is ours
_NO_BODY_STATUSES = frozenset({204, 304})

# Limits on what a backend may send (aiohttp's client defaults for lines and count; ROUTER_UPSTREAM_MAX_*).
DEFAULT_MAX_HEADER_LINE_BYTES = 8190  # one header line (name + value)
DEFAULT_MAX_HEADERS = 128  # header lines of one head
DEFAULT_MAX_HEAD_BYTES = 64 * 1024  # the head, 1xx heads before it included; also chunk framing/trailers in a row
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024  # a body read whole (non-streamed answers, error bodies)


@dataclass(frozen=True, slots=True)
class Limits:
    """What one response may hold before it fails with `UpstreamTooLarge` (its connection is closed)."""

    max_header_line_bytes: int = DEFAULT_MAX_HEADER_LINE_BYTES
    max_headers: int = DEFAULT_MAX_HEADERS
    max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    def __post_init__(self) -> None:
        """Every limit must be positive."""
        if min(self.max_header_line_bytes, self.max_headers, self.max_head_bytes, self.max_body_bytes) < 1:
            raise ValueError("upstream limits must be >= 1")


class _LimitHit(Exception):
    """Raised in a parser callback to stop parsing; the connection's `limit_error` says which limit."""


@dataclass(frozen=True, slots=True)
class PoolStats:
    """Counters of one (host, port) pool of a `FastUpstream`."""

    connections: int  # open (or opening) connections, idle ones included
    idle: int
    waiting: int  # requests waiting for a slot
    created: int  # connections opened since the pool was made
    requests: int
    reused: int  # requests sent on a connection that had already served a response
    retried: int  # requests re-sent because a reused connection turned out to be closed (the keep-alive race)


class _Target:
    """A URL parsed once: pool key and the request's first bytes (`POST /path HTTP/1.1`, `Host`)."""

    __slots__ = ("head", "host", "key", "port", "tls")

    def __init__(self, method: str, url: str) -> None:
        """Parse url; raise ValueError for anything but http:// and https://."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"FastUpstream supports http:// and https:// URLs only, not {url!r}")
        if method in ("HEAD", "CONNECT"):
            raise ValueError(f"FastUpstream does not send {method} requests")
        if not parts.hostname or parts.username is not None:
            raise ValueError(f"unsupported URL {url!r}")
        self.tls: bool = parts.scheme == "https"
        default_port = 443 if self.tls else 80
        self.host: str = parts.hostname
        self.port: int = parts.port or default_port
        self.key: tuple[str, int, bool] = (self.host, self.port, self.tls)
        host = f"[{self.host}]" if ":" in self.host else self.host
        if parts.port is not None and parts.port != default_port:
            host = f"{host}:{parts.port}"
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.head: bytes = f"{method} {target} HTTP/1.1\r\nhost: {host}\r\n".encode("ascii")


class _StaleConnection(UpstreamClosed):
    """A reused keep-alive connection was closed by the server before any response byte (retried once)."""


class _FastResponse:
    """A response of `FastUpstream`; its body arrives through the connection's parser callbacks.

    Streamed: `aiter_raw()` (this object) hands out what the connection buffered, waiting for more when the buffer
    is empty. The connection goes back to the pool as soon as the whole body has arrived, even while the consumer
    still holds some of it in the buffer.
    """

    __slots__ = (
        "_chunks",
        "_complete",
        "_conn",
        "_error",
        "_framed",
        "_headed",
        "_informational",
        "_limit",
        "_read",
        "_size",
        "_stream",
        "_waiter",
        "content",
        "headers",
        "status_code",
    )

    def __init__(self, conn: _Connection | None, stream: bool, read: float, limit: float = math.inf) -> None:
        """A response about to be received on conn (None for a throwaway sink); limit: body bytes kept whole."""
        self._conn = conn
        self._stream = stream
        self._read = read
        self._limit = limit  # body bytes a non-streamed response (or aread of a streamed one) may hold
        self._chunks: list[bytes] = []
        self._size = 0
        self._waiter: asyncio.Future[None] | None = None
        self._headed = False  # the head is complete
        self._complete = False  # the whole body has arrived
        self._error: UpstreamError | None = None
        self._framed = False  # Content-Length or Transfer-Encoding present (else the body runs to EOF)
        self._informational = False  # a 1xx head is being skipped
        self.status_code = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.content = b""

    def _wake(self) -> None:
        """Resolve the consumer's waiter, if any (results only: the consumer reads the state)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _set_error(self, error: UpstreamError) -> None:
        """Record the first failure and wake the consumer."""
        if self._error is None and not self._complete:
            self._error = error
        self._conn = None
        self._wake()

    async def _wait(self) -> None:
        """Wait for the connection to deliver something (head, data, end or failure), within the read timeout."""
        conn = self._conn
        assert conn is not None
        waiter = self._waiter = conn.loop.create_future()
        conn.arm_read_timer(self._read)
        try:
            await waiter
        finally:
            self._waiter = None

    def aiter_raw(self) -> AsyncIterator[bytes]:
        """De-chunked body bytes: all that is buffered at each step (the content once if already read)."""
        if not self._stream:
            return _once(self.content)
        return self

    def __aiter__(self) -> _FastResponse:
        """The response is its own body iterator."""
        return self

    async def __anext__(self) -> bytes:
        """The next body bytes; StopAsyncIteration at the end, UpstreamError if the body was cut or timed out."""
        while True:
            chunks = self._chunks
            if chunks:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._size = 0
                conn = self._conn
                if conn is not None and conn.reading_paused:
                    conn.resume_reading()
                return data
            if self._complete:
                raise StopAsyncIteration
            if self._error is not None:
                raise self._error
            await self._wait()

    async def aread(self) -> bytes:
        """Read the rest of the body; return all of it (also kept in `content`)."""
        if self._stream:
            conn = self._conn
            if conn is not None:  # read whole: the rest of the body within one read timeout, as a non-streamed one
                conn.deadline = conn.loop.time() + self._read
            parts = []
            size = 0
            async for chunk in self:
                size += len(chunk)
                if size > self._limit:
                    await self.aclose()
                    raise UpstreamTooLarge(f"the response body is over {self._limit} bytes")
                parts.append(chunk)
            self.content = parts[0] if len(parts) == 1 else b"".join(parts)
            self._stream = False
        return self.content

    async def aclose(self) -> None:
        """Release the response: before the end of the body, close the connection (the backend sees us leave)."""
        conn = self._conn
        if conn is not None and not self._complete:
            conn.fail(UpstreamProtocolError("the response was closed before the end of its body"))
            self._chunks.clear()


def _announced(value: bytes) -> int:
    """A Content-Length value as a number (0 when it is not one: the parser rejects it)."""
    try:
        return int(value)
    except ValueError:
        return 0


async def _once(content: bytes) -> AsyncIterator[bytes]:
    """Yield content (if any) once."""
    if content:
        yield content


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: one exchange at a time, responses parsed by httptools.

    The parser calls `on_*` for the response being received (`self.resp`); `data_received` then hands the
    finished response over and returns the connection to its pool. The read timeout is one timer per
    connection, re-armed lazily: waits only move a deadline mark, so a steady stream of requests costs no timer
    allocation at all.
    """

    __slots__ = (
        "closed",
        "deadline",
        "discarded",
        "drain",
        "extra",
        "head_bytes",
        "header_bytes",
        "idle_bytes",
        "keep_alive",
        "limit_error",
        "limits",
        "loop",
        "mark",
        "parser",
        "pool",
        "read_timeout",
        "reading_paused",
        "received",
        "resp",
        "reused",
        "timer",
        "timer_when",
        "transport",
        "write_paused",
    )

    def __init__(self, pool: _Pool) -> None:
        """A connection of pool, not connected yet."""
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.resp: _FastResponse | None = None
        self.received = False  # a byte of the current response arrived
        self.reused = False  # served a response before the current one
        self.keep_alive = False  # the last complete response allows reuse
        self.extra = False  # bytes beyond the response were received (the connection cannot be reused)
        self.closed = False
        self.discarded = False  # no longer counted by the pool
        self.reading_paused = False
        self.write_paused = False
        self.drain: asyncio.Future[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.timer_when = 0.0  # loop time at which `timer` fires
        self.mark = 0.0  # loop time from which the read timeout counts (a wait started or bytes arrived)
        self.read_timeout = 0.0
        self.deadline = math.inf  # loop time by which the head (non-streamed: the whole response) must be in
        self.limits = pool.limits
        self.head_bytes = 0  # bytes received before the (final) head was complete
        self.header_bytes = 0  # bytes of the header lines parsed so far (a head that arrives in one read)
        self.idle_bytes = 0  # bytes in a row after the head that carried no body byte (framing, trailers)
        self.limit_error: UpstreamTooLarge | None = None  # set by a parser callback before it raises _LimitHit

    # -- asyncio.Protocol --------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        """Feed the parser; hand over a complete response, or wake a streaming consumer; enforce the limits."""
        resp = self.resp
        if resp is None:  # nothing asked: a server talking out of turn
            self.close()
            return
        self.received = True
        self.mark = self.loop.time()
        headed = resp._headed
        size = resp._size
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if resp._complete:
                # Bytes after a complete response that are no response: deliver it, never reuse the connection.
                self.extra = True
                self.finish(resp)
            elif self.limit_error is not None:
                self.fail(self.limit_error)
            elif isinstance(exc, httptools.HttpParserUpgrade):
                self.fail(UpstreamProtocolError("unexpected protocol upgrade"))
            else:
                self.fail(UpstreamProtocolError(f"malformed response: {exc}"))
            return
        if resp._complete:
            self.finish(resp)
            return
        if not resp._headed:
            self.head_bytes += len(data)
            if self.head_bytes > self.limits.max_head_bytes:
                self.fail(UpstreamTooLarge(f"the response head is over {self.limits.max_head_bytes} bytes"))
                return
        elif headed and resp._size == size:
            # After the head, bytes that bring no body byte (chunk framing, extensions, trailers) are bounded too.
            self.idle_bytes += len(data)
            if self.idle_bytes > self.limits.max_head_bytes:
                self.fail(UpstreamTooLarge(f"over {self.limits.max_head_bytes} bytes of body framing without data"))
                return
        else:
            self.idle_bytes = 0
        if resp._stream and resp._chunks:
            resp._wake()
            if resp._size > _STREAM_HIGH_WATER and not self.reading_paused and self.transport is not None:
                # A slow consumer: stop reading; TCP flow control then slows the backend down.
                self.reading_paused = True
                self.transport.pause_reading()
        if self.drain is not None:
            self.wake_drain()  # an early response: stop waiting for the request to be written

    def eof_received(self) -> bool:
        """Let the transport close; `connection_lost` settles the response."""
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        """Settle the response in progress (end of an until-EOF body, or a failure) and leave the pool."""
        self.closed = True
        self.cancel_timer()
        resp = self.resp
        if resp is not None:
            if resp._headed and not resp._framed and not resp._informational:
                resp._complete = True  # the body of a response without Content-Length runs until EOF
                self.keep_alive = False
                self.finish(resp)
            else:
                self.resp = None
                if resp._headed:
                    error: UpstreamError = UpstreamProtocolError("the server closed the connection mid-body")
                elif not self.received and self.reused:
                    error = _StaleConnection("a kept-alive connection was closed by the server")
                elif self.received:
                    error = UpstreamDisconnected("the server closed the connection in the middle of the response head")
                else:
                    error = UpstreamDisconnected("the server closed the connection without sending a response")
                resp._set_error(error)
        self.wake_drain()
        self.pool.forget(self)

    def pause_writing(self) -> None:
        """The request is not being written fast enough (a large body)."""
        self.write_paused = True

    def resume_writing(self) -> None:
        """The request is (mostly) written."""
        self.write_paused = False
        self.wake_drain()

    # -- httptools callbacks -----------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        """A response starts; anything after a complete response goes to a throwaway sink."""
        resp = self.resp
        if resp is not None and resp._complete:
            self.extra = True
            self.resp = _FastResponse(None, False, 0.0)
            self.resp._complete = True  # stays "complete": data_received finishes the real one

    def on_header(self, name: bytes, value: bytes) -> None:
        """A header line (trailers of a chunked body are ignored); _LimitHit past a limit."""
        resp = self.resp
        if resp is None or resp._headed:
            return
        limits = self.limits
        if len(name) + len(value) > limits.max_header_line_bytes:
            self.limit_error = UpstreamTooLarge(f"a response header line is over {limits.max_header_line_bytes} bytes")
            raise _LimitHit
        if len(resp.headers) >= limits.max_headers:
            self.limit_error = UpstreamTooLarge(f"the response has more than {limits.max_headers} headers")
            raise _LimitHit
        self.header_bytes += len(name) + len(value) + 4
        if self.header_bytes > limits.max_head_bytes:
            self.limit_error = UpstreamTooLarge(f"the response head is over {limits.max_head_bytes} bytes")
            raise _LimitHit
        name = name.lower()
        if name == b"content-length" or name == b"transfer-encoding":
            resp._framed = True
            if name == b"content-length" and not resp._stream and _announced(value) > resp._limit:
                self.limit_error = UpstreamTooLarge(f"the response body is over {resp._limit} bytes")
                raise _LimitHit
        resp.headers.append((name, value))

    def on_headers_complete(self) -> None:
        """The head is complete (a 1xx head is skipped: the real one follows)."""
        resp = self.resp
        if resp is None:
            return
        status = self.parser.get_status_code()
        if status < 200:
            resp._informational = True
            resp.headers = []
            return
        resp.status_code = status
        resp._headed = True
        if status in _NO_BODY_STATUSES:
            resp._framed = True
        if resp._stream:
            self.deadline = math.inf  # a streamed body only has the per-read timeout
            resp._wake()

    def on_body(self, body: bytes) -> None:
        """A piece of de-chunked body (_LimitHit when a body read whole grows past its limit)."""
        resp = self.resp
        if resp is not None:
            resp._chunks.append(body)
            resp._size += len(body)
            if resp._size > resp._limit and not resp._stream:
                self.limit_error = UpstreamTooLarge(f"the response body is over {resp._limit} bytes")
                raise _LimitHit

    def on_message_complete(self) -> None:
        """The response is complete (keep-alive is decided now: the parser forgets it for the next message)."""
        resp = self.resp
        if resp is None:
            return
        if resp._informational:
            resp._informational = False
            resp._framed = False
            return
        resp._complete = True
        self.keep_alive = self.parser.should_keep_alive()

    # -- exchanges ---------------------------------------------------------------------------------------------

    async def exchange(self, head: bytes, body: bytes, timeouts: Timeouts, stream: bool) -> _FastResponse:
        """Write the request (body given apart when large); wait for the head (stream) or the whole response."""
        transport = self.transport
        assert transport is not None
        if self.closed or transport.is_closing():  # closed while handed over from another request
            raise _StaleConnection("a kept-alive connection was closed before its reuse")
        resp = _FastResponse(self, stream, timeouts.read, self.limits.max_body_bytes)
        self.resp = resp
        self.received = False
        self.extra = False
        self.head_bytes = self.header_bytes = self.idle_bytes = 0
        self.limit_error = None
        self.deadline = self.loop.time() + timeouts.read
        transport.write(head)
        if body:
            transport.write(body)
        try:
            if self.write_paused:
                await self.wait_drained(timeouts.write)
            while not (resp._headed if stream else resp._complete):
                if resp._error is not None:
                    raise resp._error
                await resp._wait()
        except BaseException:
            # Cancelled, timed out, failed: the exchange is in an unknown state, the connection cannot be reused.
            if not self.closed:
                self.fail(UpstreamProtocolError("the request was abandoned"))
            raise
        return resp  # a streamed body that fails later raises while it is iterated

    def finish(self, resp: _FastResponse) -> None:
        """The whole response has arrived: give it its body, and the connection back to the pool."""
        self.resp = None
        resp._conn = None
        if not resp._stream:
            chunks = resp._chunks
            resp.content = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            resp._chunks = []
        resp._wake()
        keep = self.keep_alive and not self.extra and not self.closed
        if keep and self.transport is not None and self.transport.get_write_buffer_size():
            keep = False  # answered before reading the whole request: the rest would be taken as the next one
        self.reused = True
        self.pool.release(self, keep)

    def fail(self, error: UpstreamError) -> None:
        """Fail the response in progress with error and close the connection."""
        resp = self.resp
        self.resp = None
        if resp is not None:
            resp._set_error(error)
        self.close()

    def close(self) -> None:
        """Close the socket now (the pool forgets the connection at once)."""
        self.closed = True
        self.cancel_timer()
        if self.transport is not None:
            self.transport.abort()
        self.pool.forget(self)

    def resume_reading(self) -> None:
        """The consumer caught up: read again."""
        self.reading_paused = False
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    # -- write flow control ------------------------------------------------------------------------------------

    async def wait_drained(self, timeout: float) -> None:
        """Wait until the request is written (or the response starts), within timeout."""
        self.drain = self.loop.create_future()
        try:
            async with asyncio.timeout(timeout):
                await self.drain
        except TimeoutError:
            raise UpstreamProtocolError(f"the request could not be written within {timeout} s") from None
        finally:
            self.drain = None

    def wake_drain(self) -> None:
        """Resolve the drain waiter, if any."""
        drain = self.drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    # -- read timeout ------------------------------------------------------------------------------------------

    def arm_read_timer(self, timeout: float) -> None:
        """Start a wait of at most timeout seconds without bytes (reusing the pending timer if it fires earlier)."""
        now = self.loop.time()
        self.mark = now
        self.read_timeout = timeout
        deadline = min(now + timeout, self.deadline)
        timer = self.timer
        if timer is None or self.timer_when > deadline:
            if timer is not None:
                timer.cancel()
            self.timer = self.loop.call_at(deadline, self.on_timer)
            self.timer_when = deadline

    def on_timer(self) -> None:
        """Fail the waiting consumer if no bytes came for read_timeout seconds, else re-arm for what is left."""
        self.timer = None
        resp = self.resp
        if resp is None or resp._waiter is None or resp._waiter.done():
            return  # nobody waits: the next wait re-arms
        deadline = min(self.mark + self.read_timeout, self.deadline)
        if self.loop.time() >= deadline:
            if deadline == self.deadline:
                what = "response head" if resp._stream and not resp._headed else "response"
                self.fail(UpstreamReadTimeout(f"the {what} did not arrive whole within {self.read_timeout} s"))
            else:
                self.fail(UpstreamReadTimeout(f"no bytes from the backend within {self.read_timeout} s"))
        else:
            self.timer = self.loop.call_at(deadline, self.on_timer)
            self.timer_when = deadline

    def cancel_timer(self) -> None:
        """Drop the read timer."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class _Pool:
    """The connections to one (host, port) on one event loop: idle ones (LIFO), a limit, and a FIFO of waiters.

    `total` counts open connections, connections being opened, and slots handed to a waiter that will open one.
    A waiter's future resolves to an idle connection, or to None (a free slot: open a connection).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        host: str,
        port: int,
        limit: int,
        keepalive: int,
        limits: Limits,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """An empty pool (of TLS connections when tls is given)."""
        self.loop = loop
        self.host = host
        self.port = port
        self.limits = limits
        self.tls = tls
        self.limit = limit
        self.keepalive = keepalive
        self.idle: list[_Connection] = []
        self.conns: set[_Connection] = set()
        self.total = 0
        self.waiters: collections.deque[asyncio.Future[_Connection | None]] = collections.deque()
        self.created = 0
        self.requests = 0
        self.reused = 0
        self.retried = 0

    async def acquire(self, timeouts: Timeouts, fresh: bool = False) -> _Connection:
        """An idle connection (unless `fresh`), else a new one within the limit, else wait up to timeouts.pool."""
        idle = self.idle
        while idle and not fresh:
            conn = idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
            conn.close()
        if fresh and idle and self.total >= self.limit:
            idle[0].close()  # the oldest idle connection makes room
        if self.total < self.limit:
            self.total += 1
            return await self.connect(timeouts.connect)
        waiter: asyncio.Future[_Connection | None] = self.loop.create_future()
        self.waiters.append(waiter)
        expiry = self.loop.call_later(timeouts.pool, _expire_waiter, waiter, timeouts.pool)
        try:
            conn_or_slot = await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.give_back(waiter.result())  # handed over just as we were cancelled
            raise
        finally:
            expiry.cancel()
        if conn_or_slot is not None:
            return conn_or_slot
        return await self.connect(timeouts.connect)

    async def connect(self, timeout: float) -> _Connection:
        """Open a connection in a slot already counted in `total` (the slot is freed on failure)."""
        conn = _Connection(self)
        try:
            async with asyncio.timeout(timeout):
                if self.tls is None:
                    await self.loop.create_connection(lambda: conn, self.host, self.port)
                else:
                    await self.loop.create_connection(
                        lambda: conn, self.host, self.port, ssl=self.tls, server_hostname=self.host
                    )
        except BaseException as exc:
            conn.closed = True
            self.forget(conn)
            if isinstance(exc, TimeoutError):
                raise UpstreamConnectTimeout(f"cannot connect to {self.host}:{self.port} within {timeout} s") from None
            if isinstance(exc, OSError):
                raise UpstreamConnectError(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
            raise
        self.conns.add(conn)
        self.created += 1
        return conn

    def release(self, conn: _Connection, keep: bool) -> None:
        """A connection finished an exchange: hand it to a waiter, keep it idle, or close it."""
        if keep:
            waiters = self.waiters
            while waiters:
                waiter = waiters.popleft()
                if not waiter.done():
                    waiter.set_result(conn)
                    return
            if len(self.idle) < self.keepalive:
                self.idle.append(conn)
                return
        conn.close()

    def give_back(self, conn: _Connection | None) -> None:
        """Return what a cancelled waiter was handed: a connection, or a slot (None)."""
        if conn is not None:
            self.release(conn, True)
        else:
            self.total -= 1
            self.slot_freed()

    def forget(self, conn: _Connection) -> None:
        """A connection is closed: free its slot (once)."""
        if conn.discarded:
            return
        conn.discarded = True
        self.conns.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)
        self.total -= 1
        self.slot_freed()

    def slot_freed(self) -> None:
        """Hand a free slot to the first live waiter."""
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                self.total += 1
                waiter.set_result(None)
                return

    def close_all(self) -> None:
        """Fail the waiters and close every connection, in use or idle (their loop may be closed already)."""
        waiters, self.waiters = self.waiters, collections.deque()
        for waiter in waiters:
            if not waiter.done():
                with contextlib.suppress(RuntimeError):
                    waiter.set_exception(UpstreamConnectError("the upstream client was closed"))
        for conn in list(self.conns):
            with contextlib.suppress(RuntimeError):
                conn.fail(UpstreamProtocolError("the upstream client was closed"))
        self.idle.clear()
        self.conns.clear()

    def stats(self) -> PoolStats:
        """The pool's counters now."""
        return PoolStats(
            connections=len(self.conns),
            idle=len(self.idle),
            waiting=sum(1 for w in self.waiters if not w.done()),
            created=self.created,
            requests=self.requests,
            reused=self.reused,
            retried=self.retried,
        )


def _expire_waiter(waiter: asyncio.Future[_Connection | None], timeout: float) -> None:
    """Pool timeout: fail a waiter that got neither a connection nor a slot."""
    if not waiter.done():
        waiter.set_exception(UpstreamPoolTimeout(f"no connection slot free within {timeout} s"))


class FastUpstream:
    """`UpstreamClient` over asyncio + httptools for http:// and https:// backends (ValueError for other URLs)."""

    def __init__(
        self,
        *,
        max_connections_per_host: int = 1000,
        max_keepalive_per_host: int = 200,
        max_header_line_bytes: int = DEFAULT_MAX_HEADER_LINE_BYTES,
        max_headers: int = DEFAULT_MAX_HEADERS,
        max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """Pools of at most max_connections_per_host connections, keeping max_keepalive_per_host idle ones.

        The max_* limits bound each response (`UpstreamTooLarge` past one); ssl_context is used for https://
        backends (default: certificates and host names verified against certifi's CAs, as httpx does).
        """
        if max_connections_per_host < 1 or max_keepalive_per_host < 0:
            raise ValueError("max_connections_per_host must be >= 1 and max_keepalive_per_host >= 0")
        self.max_connections_per_host = max_connections_per_host
        self.max_keepalive_per_host = max_keepalive_per_host
        self.limits = Limits(
            max_header_line_bytes=max_header_line_bytes,
            max_headers=max_headers,
            max_head_bytes=max_head_bytes,
            max_body_bytes=max_body_bytes,
        )
        self._ssl_context = ssl_context
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pools: dict[tuple[str, int, bool], _Pool] = {}
        self._targets: dict[tuple[str, str], _Target] = {}

    @staticmethod
    def supports(url: str) -> bool:
        """Whether url can be fetched by this client (http:// and https://)."""
        return url[:8].lower() == "https://" or url[:7].lower() == "http://"

    def pool_stats(self) -> dict[str, PoolStats]:
        """Counters of the current loop's pools, by "host:port" (prefixed "https://" for TLS pools)."""
        return {
            f"{'https://' if tls else ''}{host}:{port}": pool.stats() for (host, port, tls), pool in self._pools.items()
        }

    def ssl_context(self) -> ssl.SSLContext:
        """The TLS context of https:// connections (made on first use): certifi's CAs, as httpx verifies."""
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context(cafile=certifi.where())
        return self._ssl_context

    def _pool(self, target: _Target) -> _Pool:
        """The pool of target on the running loop (pools of another, dead, loop are dropped)."""
        loop = running_loop()
        if loop is not self._loop:
            for stale in self._pools.values():
                stale.close_all()
            self._pools = {}
            self._loop = loop
        pool = self._pools.get(target.key)
        if pool is None:
            pool = self._pools[target.key] = _Pool(
                loop,
                target.host,
                target.port,
                self.max_connections_per_host,
                self.max_keepalive_per_host,
                self.limits,
                self.ssl_context() if target.tls else None,
            )
        return pool

    async def send(
        self, method: str, url: str, *, headers: Mapping[str, str], content: bytes, timeouts: Timeouts, stream: bool
    ) -> _FastResponse:
        """Send the request; read the body unless `stream`. Raises UpstreamError (ValueError: URL, CR/LF)."""
        target = self._targets.get((method, url))
        if target is None:
            if len(self._targets) >= 4096:
                self._targets.clear()
            target = self._targets[(method, url)] = _Target(method, url)
        pool = self._pool(target)

        # The request: cached first lines, the caller's headers, our Content-Length, the body.
        parts = [f"{k}: {v}\r\n" for k, v in headers.items() if k.lower() not in _RESERVED]
        lines = "".join(parts)
        if lines.count("\n") != len(parts) or lines.count("\r") != len(parts):
            raise ValueError("header names and values must not contain CR or LF")
        size = len(content)
        head = target.head + lines.encode("latin-1") + b"content-length: %d\r\n\r\n" % size
        body = b""
        if size > _SPLIT_WRITE:
            body = content
        elif size:
            head += content

        pool.requests += 1
        conn = await pool.acquire(timeouts)
        if conn.reused:
            pool.reused += 1
        try:
            return await conn.exchange(head, body, timeouts, stream)
        except _StaleConnection:
            # The keep-alive race: the server closed the idle connection as we reused it and nothing came back,
            # so it did not process the request. Retried once, on a new connection (another idle one may be
            # just as stale).
            pool.retried += 1
        conn = await pool.acquire(timeouts, fresh=True)
        return await conn.exchange(head, body, timeouts, stream)

    async def aclose(self) -> None:
        """Close every connection of the current loop's pools."""
        for pool in self._pools.values():
            pool.close_all()
        self._pools = {}
