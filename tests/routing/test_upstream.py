"""Conformance of the upstream clients: every behaviour against both `FastUpstream` and `HttpxUpstream`.

Backends are the mock vLLM on a real socket (`MockServer`, uvicorn in a thread) and, for what it cannot do
(count connections, close idle connections, odd framings, garbage), a tiny raw asyncio server in the test's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import orjson
import pytest
import uvloop

from backends.mock_vllm import MockServer, await_until, free_port
from routing.upstream import (
    FastUpstream,
    HttpxUpstream,
    Timeouts,
    UpstreamClient,
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamPoolTimeout,
    UpstreamProtocolError,
    UpstreamReadTimeout,
    UpstreamResponse,
)

T = Timeouts(connect=5.0, read=5.0, write=5.0, pool=5.0)
PATIENT = Timeouts(connect=5.0, read=30.0, write=5.0, pool=30.0)  # waits in the pool under load (slow CI)
JSON = {"content-type": "application/json", "x-request-id": "rid-1"}
CHAT = "/v1/chat/completions"

Make = Callable[..., UpstreamClient]


def chat(stream: bool = False, **extra: Any) -> bytes:
    """A chat request body for the mock."""
    body: dict[str, Any] = {"model": "mock-chat", "messages": [{"role": "user", "content": "Hi"}], **extra}
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


@pytest.fixture(params=["fast", "httpx"])
async def make_upstream(request: pytest.FixtureRequest) -> AsyncIterator[Make]:
    """Build upstream clients of the parametrized kind (closed at the end of the test)."""
    made: list[UpstreamClient] = []

    def make(max_connections: int = 100, max_keepalive: int = 20) -> UpstreamClient:
        client: UpstreamClient
        if request.param == "fast":
            client = FastUpstream(max_connections_per_host=max_connections, max_keepalive_per_host=max_keepalive)
        else:
            client = HttpxUpstream(max_connections=max_connections, max_keepalive=max_keepalive)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.aclose()


@pytest.fixture
async def upstream(make_upstream: Make) -> UpstreamClient:
    """An upstream client of the parametrized kind with default limits."""
    return make_upstream()


@pytest.fixture
def mock() -> Iterator[MockServer]:
    """A mock vLLM on a loopback socket; tests turn its knobs."""
    with MockServer() as server:
        yield server


# --- a raw server: counts connections, misbehaves on demand ----------------------------------------------------

Responder = Callable[[bytes, asyncio.StreamWriter], Awaitable[bool]]


class RawServer:
    """An HTTP/1.1 server in the test's loop: reads each request (Content-Length bodies) and lets `respond`
    write the answer; `respond` returns whether to keep the connection open."""

    def __init__(self, respond: Responder) -> None:
        self.respond = respond
        self.connections = 0
        self.open = 0
        self.max_open = 0
        self.requests = 0
        self.server: asyncio.Server | None = None
        self.url = ""

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, limit=1 << 22)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                self.requests += 1
                if not await self.respond(body, writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self.open -= 1
            writer.close()


def fixed(body: bytes, *, extra: bytes = b"", keep: bool = True, delay: float = 0.0) -> Responder:
    """Answer every request with body (Content-Length framing, extra header lines), then keep or close."""

    async def respond(_: bytes, writer: asyncio.StreamWriter) -> bool:
        if delay:
            await asyncio.sleep(delay)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), extra, body))
        await writer.drain()
        return keep

    return respond


def closed_error(client: UpstreamClient) -> type[UpstreamError]:
    """What a close after the request was sent and before a complete head raises: FastUpstream tells it apart
    from the keep-alive race (not retryable: the backend may have started the request); httpx cannot."""
    return UpstreamDisconnected if isinstance(client, FastUpstream) else UpstreamClosed


async def _send(client: UpstreamClient, url: str, body: bytes = b"{}", **kwargs: Any) -> UpstreamResponse:
    options: dict[str, Any] = {"headers": JSON, "content": body, "timeouts": T, "stream": False} | kwargs
    return await client.send("POST", url, **options)


# --- the happy paths --------------------------------------------------------------------------------------------


async def test_json_200(upstream: UpstreamClient, mock: MockServer) -> None:
    mock.config.answer_override = "Hello there, friend."
    response = await _send(upstream, mock.url + CHAT, chat())
    assert response.status_code == 200
    headers = dict(response.headers)
    assert headers[b"content-type"] == b"application/json"
    assert int(headers[b"content-length"]) == len(response.content)
    data = orjson.loads(response.content)
    assert data["choices"][0]["message"]["content"] == "Hello there, friend."
    assert await response.aread() == response.content
    assert [chunk async for chunk in response.aiter_raw()] == [response.content]
    sent = mock.stats.last_headers
    assert sent["x-request-id"] == "rid-1"
    assert sent["host"] == mock.url.removeprefix("http://")
    assert sent["content-length"] == str(len(chat()))


async def test_exact_body_bytes(upstream: UpstreamClient) -> None:
    body = b'{"exact":"bytes \xc3\xa9"}'
    async with RawServer(fixed(body, extra=b"X-Custom: Yes\r\n")) as server:
        response = await _send(upstream, server.url + "/x")
    assert (response.status_code, response.content) == (200, body)
    assert (b"x-custom", b"Yes") in response.headers


@pytest.mark.parametrize("stream", [False, True])
async def test_error_statuses_with_bodies(upstream: UpstreamClient, mock: MockServer, stream: bool) -> None:
    mock.config.fail_status = 503
    response = await _send(upstream, mock.url + CHAT, chat(stream=stream), stream=stream)
    assert response.status_code == 503
    raw = await response.aread()
    await response.aclose()
    assert orjson.loads(raw)["error"]["code"] == 503
    mock.config.fail_status = None
    response = await _send(upstream, mock.url + CHAT, orjson.dumps({"model": "nope", "messages": []}))
    assert response.status_code in (400, 404)
    assert "error" in orjson.loads(response.content)


async def test_streaming_token_by_token(upstream: UpstreamClient, mock: MockServer) -> None:
    mock.config.token_delay_s = 0.08
    response = await _send(upstream, mock.url + CHAT, chat(stream=True, max_tokens=8), stream=True)
    assert response.status_code == 200
    assert dict(response.headers)[b"content-type"].startswith(b"text/event-stream")
    arrivals: list[float] = []
    chunks: list[bytes] = []
    async for chunk in response.aiter_raw():
        arrivals.append(time.monotonic())
        chunks.append(chunk)
    await response.aclose()
    # tokens come one by one, not buffered until the end (margins allow a stalled read on a loaded machine)
    assert len(chunks) >= 4, chunks
    assert arrivals[-1] - arrivals[0] >= 0.3  # 7 gaps of 80 ms between the 8 tokens
    events = b"".join(chunks).split(b"\n\n")
    assert events[-2] == b"data: [DONE]"
    assert sum(1 for e in events if b'"content"' in e) >= 8
    assert await await_until(lambda: mock.stats.completed_requests == 1)  # the server thread counts it after


async def test_stream_read_whole(upstream: UpstreamClient, mock: MockServer) -> None:
    response = await _send(upstream, mock.url + CHAT, chat(stream=True), stream=True)
    raw = await response.aread()
    await response.aclose()
    assert raw.endswith(b"data: [DONE]\n\n")
    assert response.content == raw


# --- connections --------------------------------------------------------------------------------------------------


async def test_keepalive_reuse(upstream: UpstreamClient) -> None:
    async with RawServer(fixed(b'{"ok":true}')) as server:
        for _ in range(50):
            assert (await _send(upstream, server.url + "/x")).content == b'{"ok":true}'
        assert server.requests == 50
        assert server.connections == 1
    if isinstance(upstream, FastUpstream):
        stats = next(iter(upstream.pool_stats().values()))
        assert (stats.created, stats.requests, stats.reused, stats.idle) == (1, 50, 49, 1)


async def test_keepalive_reuse_with_the_mock(upstream: UpstreamClient, mock: MockServer) -> None:
    for _ in range(20):
        response = await _send(upstream, mock.url + CHAT, chat())
        assert response.status_code == 200
        stream = await _send(upstream, mock.url + CHAT, chat(stream=True), stream=True)
        await stream.aread()
        await stream.aclose()
    assert await await_until(lambda: mock.stats.completed_requests == 40)
    if isinstance(upstream, FastUpstream):
        stats = upstream.pool_stats()[mock.url.removeprefix("http://")]
        assert stats.created == 1 and stats.reused == 39


async def test_server_closing_idle_connections(upstream: UpstreamClient) -> None:
    # Closes after each response without saying `Connection: close`: the next request meets a dead connection.
    async with RawServer(fixed(b"{}", keep=False)) as server:
        for _ in range(20):
            assert (await _send(upstream, server.url + "/x")).status_code == 200
        assert server.connections == server.requests == 20
    if isinstance(upstream, FastUpstream):
        stats = next(iter(upstream.pool_stats().values()))
        assert stats.created == 20 and stats.retried >= 1  # the race happened, and was retried transparently


async def test_keepalive_race_is_retried_once(upstream: UpstreamClient) -> None:
    # The server closes idle connections without a response while the client already reuses them.
    async with RawServer(fixed(b"{}", keep=False)) as server:
        await _send(upstream, server.url + "/x")
        await asyncio.sleep(0.05)  # the close is already seen: a plain reconnect
        await _send(upstream, server.url + "/x")
        await _send(upstream, server.url + "/x")  # the close is not seen yet: the race
        assert server.requests == 3
    if isinstance(upstream, FastUpstream):
        stats = next(iter(upstream.pool_stats().values()))
        assert (stats.created, stats.retried) == (3, 1)


async def test_connection_close_responses(upstream: UpstreamClient) -> None:
    async with RawServer(fixed(b"{}", extra=b"connection: close\r\n", keep=False)) as server:
        for _ in range(5):
            assert (await _send(upstream, server.url + "/x")).content == b"{}"
        assert server.connections == 5
    if isinstance(upstream, FastUpstream):
        stats = next(iter(upstream.pool_stats().values()))
        assert (stats.idle, stats.retried) == (0, 0)


async def test_body_until_eof(upstream: UpstreamClient) -> None:
    async def respond(_: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\npart one, ")
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(b"part two")
        return False

    async with RawServer(respond) as server:
        for stream in (False, True):
            response = await _send(upstream, server.url + "/x", stream=stream)
            assert await response.aread() == b"part one, part two"
            await response.aclose()


@pytest.mark.parametrize("stream", [False, True])
async def test_chunked_responses(upstream: UpstreamClient, stream: bool) -> None:
    pieces = [b"a" * 10, b"b" * 3000, b"c", b"d" * 70000]

    async def respond(_: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for piece in pieces:
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0.002)
        writer.write(b"0\r\n\r\n")
        return True

    async with RawServer(respond) as server:
        for _ in range(3):
            response = await _send(upstream, server.url + "/x", stream=stream)
            assert await response.aread() == b"".join(pieces)
            await response.aclose()
        assert server.connections == 1


async def test_large_bodies(upstream: UpstreamClient) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB

    async def echo(body: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body))
        writer.write(body)
        await writer.drain()
        return True

    async with RawServer(echo) as server:
        for stream in (False, True):
            response = await _send(upstream, server.url + "/echo", payload, stream=stream)
            assert await response.aread() == payload
            await response.aclose()
        assert server.connections == 1


async def test_large_bodies_with_the_mock(upstream: UpstreamClient, mock: MockServer) -> None:
    mock.config.max_model_len = 10**7
    mock.config.answer_override = "word " * 210_000  # ~1 MB of answer
    prompt = "hello " * 175_000  # ~1 MB of request
    response = await _send(
        upstream,
        mock.url + CHAT,
        orjson.dumps({"model": "mock-chat", "messages": [{"role": "user", "content": prompt}]}),
    )
    assert response.status_code == 200, response.content[:300]
    assert len(response.content) > 1_000_000
    assert orjson.loads(response.content)["choices"][0]["message"]["content"] == mock.config.answer_override.strip()
    assert mock.stats.last_request["messages"][0]["content"] == prompt


async def test_concurrency_over_a_small_pool(make_upstream: Make) -> None:
    upstream = make_upstream(max_connections=10, max_keepalive=10)
    async with RawServer(fixed(b'{"ok":1}', delay=0.002)) as server:
        responses = await asyncio.gather(*(_send(upstream, server.url + "/x", timeouts=PATIENT) for _ in range(200)))
        assert all(r.status_code == 200 and r.content == b'{"ok":1}' for r in responses)
        assert server.requests == 200
        assert server.max_open <= 10
        assert server.connections <= 10


async def test_concurrency_with_the_mock(make_upstream: Make, mock: MockServer) -> None:
    upstream = make_upstream(max_connections=10, max_keepalive=10)
    mock.config.latency_s = 0.005

    async def one(i: int) -> int:
        if i % 2:
            response = await _send(upstream, mock.url + CHAT, chat(stream=True), stream=True, timeouts=PATIENT)
            raw = await response.aread()
            await response.aclose()
            assert raw.endswith(b"[DONE]\n\n")
            return response.status_code
        return (await _send(upstream, mock.url + CHAT, chat(), timeouts=PATIENT)).status_code

    assert await asyncio.gather(*(one(i) for i in range(200))) == [200] * 200
    assert await await_until(lambda: mock.stats.completed_requests == 200)
    if isinstance(upstream, FastUpstream):
        assert upstream.pool_stats()[mock.url.removeprefix("http://")].created <= 10


async def test_mixed_load_with_cancellations_leaks_nothing(make_upstream: Make, mock: MockServer) -> None:
    upstream = make_upstream(max_connections=8, max_keepalive=4)
    mock.config.token_delay_s = 0.002
    rnd = random.Random(7)

    async def one() -> None:
        if rnd.random() < 0.3:
            assert (await _send(upstream, mock.url + CHAT, chat(max_tokens=5), timeouts=PATIENT)).status_code == 200
            return
        response = await _send(upstream, mock.url + CHAT, chat(stream=True), stream=True, timeouts=PATIENT)
        try:
            if rnd.random() < 0.5:
                assert (await response.aread()).endswith(b"[DONE]\n\n")
            else:
                await anext(response.aiter_raw())  # then leave early
        finally:
            await response.aclose()

    async def maybe_cancelled() -> None:
        task = asyncio.ensure_future(one())
        if rnd.random() < 0.2:
            await asyncio.sleep(rnd.random() * 0.02)
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    await asyncio.gather(*(maybe_cancelled() for _ in range(200)))
    assert await await_until(lambda: mock.stats.open_requests == 0, timeout=2.0)
    assert (await _send(upstream, mock.url + CHAT, chat())).status_code == 200
    if isinstance(upstream, FastUpstream):
        stats = upstream.pool_stats()[mock.url.removeprefix("http://")]
        assert stats.connections <= 8 and stats.idle <= 4 and stats.waiting == 0


# --- failures ------------------------------------------------------------------------------------------------------


async def test_connection_refused(upstream: UpstreamClient) -> None:
    with pytest.raises(UpstreamConnectError):
        await _send(upstream, f"http://127.0.0.1:{free_port()}/x")


async def test_connect_timeout(upstream: UpstreamClient) -> None:
    # A listener with a full backlog drops further SYNs: connecting hangs.
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        filler.connect(listener.getsockname())
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/x"
        started = time.monotonic()
        with pytest.raises(UpstreamConnectTimeout):
            await _send(upstream, url, timeouts=Timeouts(connect=0.2, read=5, write=5, pool=5))
        assert time.monotonic() - started < 2


async def test_hang_read_timeout(upstream: UpstreamClient, mock: MockServer) -> None:
    mock.config.hang = True
    started = time.monotonic()
    with pytest.raises(UpstreamReadTimeout):
        await _send(upstream, mock.url + CHAT, chat(), timeouts=Timeouts(connect=5, read=0.2, write=5, pool=5))
    assert 0.15 <= time.monotonic() - started < 2
    assert await await_until(lambda: mock.stats.open_requests == 0, timeout=1.0)  # the connection was dropped


async def test_read_timeout_between_chunks(upstream: UpstreamClient, mock: MockServer) -> None:
    mock.config.token_delay_s = 1.0
    timeouts = Timeouts(connect=5, read=0.3, write=5, pool=5)
    response = await _send(upstream, mock.url + CHAT, chat(stream=True), timeouts=timeouts, stream=True)
    assert response.status_code == 200
    received = b""
    with pytest.raises(UpstreamReadTimeout):
        async for chunk in response.aiter_raw():
            received += chunk
    await response.aclose()
    assert received.startswith(b"data: ")  # the first token came in time, the next one did not
    assert await await_until(lambda: mock.stats.open_requests == 0, timeout=1.0)


async def test_read_timeout_is_per_read_not_total(upstream: UpstreamClient) -> None:
    # FastUpstream: per read for a streamed body only (test_upstream_hostile: a body read whole has a deadline).
    async def trickle(_: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
        for byte in b"abcde":
            await asyncio.sleep(0.1)
            writer.write(bytes([byte]))
        return True

    timeouts = Timeouts(connect=5, read=0.4, write=5, pool=5)  # each gap is 0.1 s: 300 ms of margin
    async with RawServer(trickle) as server:
        for stream in (True,) if isinstance(upstream, FastUpstream) else (False, True):
            started = time.monotonic()
            response = await _send(upstream, server.url + "/x", timeouts=timeouts, stream=stream)
            assert b"".join([chunk async for chunk in response.aiter_raw()]) == b"abcde"
            await response.aclose()
            assert time.monotonic() - started > 0.45  # longer than the read timeout in all


async def test_die_after_tokens_mid_stream(upstream: UpstreamClient, mock: MockServer) -> None:
    mock.config.die_after_tokens = 3
    response = await _send(upstream, mock.url + CHAT, chat(stream=True), stream=True)
    assert response.status_code == 200
    received = b""
    with pytest.raises(UpstreamProtocolError):
        async for chunk in response.aiter_raw():
            received += chunk
    await response.aclose()
    assert received.count(b"data: ") >= 3
    assert b"[DONE]" not in received


async def test_die_after_tokens_read_whole(upstream: UpstreamClient, mock: MockServer) -> None:
    mock.config.die_after_tokens = 2
    response = await _send(upstream, mock.url + CHAT, chat(stream=True), stream=True)
    with pytest.raises(UpstreamProtocolError):
        await response.aread()
    await response.aclose()
    assert (await _send(upstream, mock.url + CHAT, chat())).status_code == 200  # the pool is still usable


async def test_aclose_mid_stream_aborts_the_backend(upstream: UpstreamClient, mock: MockServer) -> None:
    mock.config.token_delay_s = 0.05
    response = await _send(upstream, mock.url + CHAT, chat(stream=True, max_tokens=100), stream=True)
    iterator = response.aiter_raw()
    await anext(iterator)
    await anext(iterator)
    assert mock.stats.open_requests == 1
    await response.aclose()
    assert await await_until(lambda: mock.stats.open_requests == 0, timeout=1.0)
    assert mock.stats.cancelled_requests == 1
    assert (await _send(upstream, mock.url + CHAT, chat())).status_code == 200


async def test_closed_without_response(upstream: UpstreamClient) -> None:
    async def hang_up(_: bytes, writer: asyncio.StreamWriter) -> bool:
        return False

    async with RawServer(hang_up) as server:
        with pytest.raises(closed_error(upstream)):
            await _send(upstream, server.url + "/x")


async def test_closed_mid_head(upstream: UpstreamClient) -> None:
    async def half(_: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-le")
        return False

    async with RawServer(half) as server:
        with pytest.raises(closed_error(upstream)):
            await _send(upstream, server.url + "/x")


async def test_no_retry_once_response_bytes_came(upstream: UpstreamClient) -> None:
    # On a reused connection, a close after part of a head is not the keep-alive race: no transparent retry.
    async def first_ok_then_half(_: bytes, writer: asyncio.StreamWriter) -> bool:
        if server.requests == 1:
            return await fixed(b"{}")(_, writer)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-le")
        await writer.drain()
        return False

    async with RawServer(first_ok_then_half) as server:
        assert (await _send(upstream, server.url + "/x")).status_code == 200
        with pytest.raises(closed_error(upstream)):
            await _send(upstream, server.url + "/x")
        assert (server.requests, server.connections) == (2, 1)


async def test_informational_head_is_skipped(upstream: UpstreamClient) -> None:
    async def respond(_: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.01)
        return await fixed(b'{"final":true}', extra=b"x-final: 1\r\n")(_, writer)

    async with RawServer(respond) as server:
        for _ in range(2):
            response = await _send(upstream, server.url + "/x")
            assert (response.status_code, response.content) == (200, b'{"final":true}')
            assert (b"x-final", b"1") in response.headers
        assert server.connections == 1


async def test_malformed_response(upstream: UpstreamClient) -> None:
    async def garbage(_: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"garbage\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.5)
        return False

    async with RawServer(garbage) as server:
        with pytest.raises(UpstreamProtocolError):
            await _send(upstream, server.url + "/x")


async def test_body_cut_short(upstream: UpstreamClient) -> None:
    async def short(_: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
        return False

    async with RawServer(short) as server:
        with pytest.raises(UpstreamProtocolError):
            await _send(upstream, server.url + "/x")
        response = await _send(upstream, server.url + "/x", stream=True)
        with pytest.raises(UpstreamProtocolError):
            await response.aread()
        await response.aclose()


async def test_pool_timeout(make_upstream: Make, mock: MockServer) -> None:
    upstream = make_upstream(max_connections=1, max_keepalive=1)
    mock.config.hang = True
    first = asyncio.ensure_future(_send(upstream, mock.url + CHAT, chat()))
    assert await await_until(lambda: mock.stats.open_requests == 1)
    started = time.monotonic()
    with pytest.raises(UpstreamPoolTimeout):
        await _send(upstream, mock.url + CHAT, chat(), timeouts=Timeouts(connect=5, read=5, write=5, pool=0.2))
    assert 0.15 <= time.monotonic() - started < 2
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await await_until(lambda: mock.stats.open_requests == 0, timeout=1.0)
    mock.config.hang = False
    assert (await _send(upstream, mock.url + CHAT, chat())).status_code == 200  # the slot came back


async def test_slow_consumer_is_flow_controlled(upstream: UpstreamClient) -> None:
    size = 48 * 1024 * 1024
    piece = b"x" * (1 << 20)
    pending: list[int] = []

    async def flood(_: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
        for _piece in range(size // len(piece)):
            writer.write(piece)
        await asyncio.sleep(0.3)
        pending.append(writer.transport.get_write_buffer_size())
        await writer.drain()
        return True

    async with RawServer(flood) as server:
        response = await _send(upstream, server.url + "/x", stream=True)
        await asyncio.sleep(0.4)  # not reading: the client buffers a bounded amount, the rest waits server-side
        assert pending and pending[0] > size // 2, pending
        total = 0
        async for chunk in response.aiter_raw():
            total += len(chunk)
        await response.aclose()
        assert total == size


# --- event loops ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fast", "httpx"])
def test_new_event_loops_and_uvloop(kind: str) -> None:
    client: UpstreamClient = FastUpstream() if kind == "fast" else HttpxUpstream()

    async def exchange(url: str) -> None:
        assert (await _send(client, url + CHAT, chat())).status_code == 200
        response = await _send(client, url + CHAT, chat(stream=True), stream=True)
        assert (await response.aread()).endswith(b"[DONE]\n\n")
        await response.aclose()

    with MockServer() as server:
        asyncio.run(exchange(server.url))
        uvloop.run(exchange(server.url))  # a new loop: the pools of the dead one are dropped
        asyncio.run(exchange(server.url))
        asyncio.run(client.aclose())


@pytest.mark.parametrize("kind", ["fast", "httpx"])
def test_streams_timeouts_and_aborts_under_uvloop(kind: str) -> None:
    client: UpstreamClient = FastUpstream() if kind == "fast" else HttpxUpstream()

    async def scenario(server: MockServer) -> None:
        url = server.url + CHAT
        server.config.token_delay_s = 0.05
        response = await _send(client, url, chat(stream=True, max_tokens=6), stream=True)
        chunks = [chunk async for chunk in response.aiter_raw()]
        await response.aclose()
        assert len(chunks) >= 3 and chunks[-1].endswith(b"[DONE]\n\n")
        response = await _send(client, url, chat(stream=True, max_tokens=100), stream=True)
        await anext(response.aiter_raw())
        await response.aclose()
        assert await await_until(lambda: server.stats.open_requests == 0, timeout=1.0)
        server.config.token_delay_s = 0.0
        server.config.die_after_tokens = 2
        response = await _send(client, url, chat(stream=True), stream=True)
        with pytest.raises(UpstreamProtocolError):
            await response.aread()
        await response.aclose()
        server.config.die_after_tokens = None
        server.config.hang = True
        with pytest.raises(UpstreamReadTimeout):
            await _send(client, url, chat(), timeouts=Timeouts(connect=5, read=0.1, write=5, pool=5))
        server.config.hang = False
        assert (await _send(client, url, chat())).status_code == 200
        await client.aclose()

    with MockServer() as server:
        uvloop.run(scenario(server))


# --- FastUpstream specifics --------------------------------------------------------------------------------------


async def test_fast_supports_http_and_https() -> None:
    client = FastUpstream()
    assert client.supports("http://10.0.0.1:8000") and client.supports("HTTPS://vllm.example")
    assert not client.supports("ftp://vllm.example") and HttpxUpstream.supports("https://vllm.example")
    with pytest.raises(ValueError, match="http://"):
        await _send(client, "ftp://127.0.0.1:1/x")


async def test_fast_rejects_header_injection() -> None:
    with pytest.raises(ValueError, match="CR or LF"):
        await FastUpstream().send(
            "POST", "http://127.0.0.1:1/x", headers={"x-request-id": "a\r\nx: y"}, content=b"", timeouts=T, stream=False
        )


async def test_fast_cancelled_request_frees_its_slot(mock: MockServer) -> None:
    client = FastUpstream(max_connections_per_host=1)
    mock.config.hang = True
    task = asyncio.ensure_future(_send(client, mock.url + CHAT, chat()))
    assert await await_until(lambda: mock.stats.open_requests == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await await_until(lambda: mock.stats.open_requests == 0, timeout=1.0)
    stats = client.pool_stats()[mock.url.removeprefix("http://")]
    assert (stats.connections, stats.idle, stats.waiting) == (0, 0, 0)
    await client.aclose()


async def test_fast_aclose_fails_waiters_and_in_flight_requests(mock: MockServer) -> None:
    client = FastUpstream(max_connections_per_host=1)
    mock.config.hang = True
    first = asyncio.ensure_future(_send(client, mock.url + CHAT, chat()))
    assert await await_until(lambda: mock.stats.open_requests == 1)
    second = asyncio.ensure_future(_send(client, mock.url + CHAT, chat()))
    assert await await_until(lambda: client.pool_stats()[mock.url.removeprefix("http://")].waiting == 1)
    await client.aclose()
    with pytest.raises(UpstreamProtocolError):
        await first
    with pytest.raises(UpstreamConnectError):
        await second
    assert await await_until(lambda: mock.stats.open_requests == 0, timeout=1.0)
