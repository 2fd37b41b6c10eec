"""FastUpstream against hostile backends (issue 14 items 1-2): limits, deadlines, framing errors, early closes.

Each test scripts a raw server that reads one request and then writes chosen bytes. Limits and timeouts are
small so that every attack is answered quickly; every test is bounded by `asyncio.timeout` so that a regression
fails instead of hanging.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from routing.upstream import (
    FastUpstream,
    Timeouts,
    UpstreamClosed,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamReadTimeout,
    UpstreamResponse,
    UpstreamTooLarge,
)

SHORT = Timeouts(connect=2.0, read=0.5, write=2.0, pool=2.0)
LIMITS: dict[str, Any] = {
    "max_header_line_bytes": 256,
    "max_headers": 16,
    "max_head_bytes": 2048,
    "max_body_bytes": 4096,
}
BOUND = 10.0  # seconds any test may take before it counts as hung

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class Scripted:
    """A loopback server that reads each request (head, Content-Length body), then runs `script` for it.

    The script gets the connection's request number (1 for the first on that connection); the connection is
    closed when the script returns without having set `keep`.
    """

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests = 0
        self.server: asyncio.Server | None = None
        self.url = ""
        self.keep = False

    async def __aenter__(self) -> Scripted:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/x"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                self.requests += 1
                number += 1
                self.keep = False
                await self.script(reader, writer, number)
                await writer.drain()
                if not self.keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()


@pytest.fixture
async def client() -> AsyncIterator[FastUpstream]:
    """A FastUpstream with small limits."""
    upstream = FastUpstream(**LIMITS)
    yield upstream
    await upstream.aclose()


async def send(
    upstream: FastUpstream, url: str, *, stream: bool = False, timeouts: Timeouts = SHORT
) -> UpstreamResponse:
    return await upstream.send("POST", url, headers={}, content=b"{}", timeouts=timeouts, stream=stream)


def ok(body: bytes = b"hello", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def expect(
    upstream: FastUpstream, url: str, error: type[UpstreamError], *, stream: bool = False, **kwargs: Any
) -> UpstreamError:
    """Send, read the whole body, and return the error raised (failing if none or another one)."""
    async with asyncio.timeout(BOUND):
        with pytest.raises(error) as caught:
            response = await send(upstream, url, stream=stream, **kwargs)
            try:
                await response.aread()
            finally:
                await response.aclose()
    return caught.value


# --- limits (issue 14.1) ---------------------------------------------------------------------------------------


async def test_endless_header_line_is_cut_at_the_head_limit(client: FastUpstream) -> None:
    # Given a backend that sends one header line without end
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nx-endless: ")
        for _ in range(10_000):
            writer.write(b"a" * 1024)
            await writer.drain()

    async with Scripted(endless) as server:
        # When it is asked, then the request fails as too large, with a reason that names no address
        error = await expect(client, server.url, UpstreamTooLarge)
    assert "head" in str(error) and "127.0.0.1" not in str(error)


async def test_long_header_line_is_refused(client: FastUpstream) -> None:
    async def long_line(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        writer.write(ok(extra=b"x-long: " + b"a" * 300 + b"\r\n"))

    async with Scripted(long_line) as server:
        error = await expect(client, server.url, UpstreamTooLarge)
    assert "header line" in str(error)


async def test_too_many_headers_are_refused(client: FastUpstream) -> None:
    async def many(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        writer.write(ok(extra=b"".join(b"x-h%d: 1\r\n" % i for i in range(20))))

    async with Scripted(many) as server:
        error = await expect(client, server.url, UpstreamTooLarge)
    assert "headers" in str(error)


async def test_endless_stream_of_headers_is_cut(client: FastUpstream) -> None:
    # Many short headers sent for ever: the count limit (or the head limit) stops it.
    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\n")
        for i in range(100_000):
            writer.write(b"x-%d: 1\r\n" % i)
            if i % 100 == 0:
                await writer.drain()

    async with Scripted(flood) as server:
        await expect(client, server.url, UpstreamTooLarge)


async def test_endless_informational_heads_are_cut(client: FastUpstream) -> None:
    async def continues(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        for _ in range(10_000):
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()

    async with Scripted(continues) as server:
        await expect(client, server.url, UpstreamTooLarge)


async def test_huge_content_length_body_is_refused_before_it_is_read(client: FastUpstream) -> None:
    # Given a backend announcing 2 GB and sending it
    sent = 0

    async def huge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        nonlocal sent
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2000000000\r\n\r\n")
        for _ in range(2_000_000):
            writer.write(b"a" * 1000)
            sent += 1000
            await writer.drain()

    async with Scripted(huge) as server:
        error = await expect(client, server.url, UpstreamTooLarge)
    assert "body" in str(error)
    assert sent < 50_000_000  # refused on its announced length, not after buffering it


async def test_long_chunked_body_is_cut_at_the_body_limit(client: FastUpstream) -> None:
    async def chunks(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(1_000_000):
            writer.write(b"400\r\n" + b"a" * 1024 + b"\r\n")
            await writer.drain()

    async with Scripted(chunks) as server:
        await expect(client, server.url, UpstreamTooLarge)


async def test_body_until_eof_is_cut_at_the_body_limit(client: FastUpstream) -> None:
    async def eof_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\n\r\n")
        for _ in range(1_000_000):
            writer.write(b"a" * 1024)
            await writer.drain()

    async with Scripted(eof_body) as server:
        await expect(client, server.url, UpstreamTooLarge)


async def test_streamed_body_read_whole_is_cut_at_the_body_limit(client: FastUpstream) -> None:
    # A streamed response read whole (the dispatcher reads error bodies so) is bounded as well.
    async def chunks(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        writer.write(b"HTTP/1.1 502 Bad Gateway\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(1_000_000):
            writer.write(b"400\r\n" + b"a" * 1024 + b"\r\n")
            await writer.drain()

    async with Scripted(chunks) as server:
        await expect(client, server.url, UpstreamTooLarge, stream=True)


async def test_endless_trailer_is_cut(client: FastUpstream) -> None:
    async def trailer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nx-trailer: ")
        for _ in range(10_000):
            writer.write(b"a" * 1024)
            await writer.drain()

    async with Scripted(trailer) as server:
        for stream in (False, True):
            await expect(client, server.url, UpstreamTooLarge, stream=stream)


async def test_answers_within_the_limits_pass(client: FastUpstream) -> None:
    # Given an answer just within every limit
    body = b"b" * LIMITS["max_body_bytes"]
    headers = b"".join(b"x-h%d: %s\r\n" % (i, b"v" * 80) for i in range(LIMITS["max_headers"] - 1))

    async def fits(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        server.keep = True
        writer.write(ok(body, extra=headers))

    async with Scripted(fits) as server:
        async with asyncio.timeout(BOUND):
            for _ in range(2):
                response = await send(client, server.url)
                assert (response.status_code, response.content) == (200, body)
        assert server.connections == 1  # and the connection was kept


async def test_a_limit_hit_closes_the_connection(client: FastUpstream) -> None:
    async def first_too_long(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        server.keep = True
        writer.write(ok(extra=b"x-long: " + b"a" * 300 + b"\r\n") if server.requests == 1 else ok())

    async with Scripted(first_too_long) as server:
        await expect(client, server.url, UpstreamTooLarge)
        async with asyncio.timeout(BOUND):
            assert (await send(client, server.url)).content == b"hello"
        assert server.connections == 2


# --- deadlines (issue 14.2) ------------------------------------------------------------------------------------


async def test_head_trickled_a_byte_at_a_time_hits_the_read_deadline(client: FastUpstream) -> None:
    # Given a backend sending its head one byte every 0.1 s (each gap well within the 0.5 s read timeout)
    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        for byte in ok():
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.1)

    async with Scripted(trickle) as server:
        # Then the head's total deadline (the read timeout) fails it, streamed or not (the whole trickle would
        # take ~4 s and, read by read, never time out)
        for stream in (False, True):
            error = await expect(client, server.url, UpstreamReadTimeout, stream=stream)
            assert "head" in str(error) or not stream


async def test_non_streamed_body_trickled_hits_the_read_deadline(client: FastUpstream) -> None:
    async def trickle_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n")
        for _ in range(100):
            writer.write(b"a")
            await writer.drain()
            await asyncio.sleep(0.1)

    async with Scripted(trickle_body) as server:
        await expect(client, server.url, UpstreamReadTimeout)


async def test_streamed_body_keeps_a_per_read_timeout(client: FastUpstream) -> None:
    # A streamed body (tokens) may take longer than the read timeout in all, as long as it never goes silent.
    async def tokens(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(8):
            await asyncio.sleep(0.1)
            writer.write(b"1\r\na\r\n")
            await writer.drain()
        writer.write(b"0\r\n\r\n")

    async with Scripted(tokens) as server, asyncio.timeout(BOUND):
        response = await send(client, server.url, stream=True)
        assert b"".join([chunk async for chunk in response.aiter_raw()]) == b"a" * 8


async def test_junk_after_a_complete_body_does_not_hang(client: FastUpstream) -> None:
    # Given a backend answering `content-length: 5`, `hello`, then JUNK (and keeping the connection open)
    async def junk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        writer.write(ok() + b"JUNK")
        await writer.drain()
        await asyncio.sleep(3)

    async with Scripted(junk) as server:
        for stream in (False, True):
            async with asyncio.timeout(BOUND):
                # Then the complete response is delivered (the junk belongs to no response) ...
                response = await send(client, server.url, stream=stream)
                assert (response.status_code, await response.aread()) == (200, b"hello")
                await response.aclose()
        # ... and the connection is not reused: the next request gets a new one
        assert server.connections == 2
    stats = next(iter(client.pool_stats().values()))
    assert stats.idle == 0


async def test_junk_after_a_complete_body_in_a_later_packet(client: FastUpstream) -> None:
    async def junk_later(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        server.keep = True
        writer.write(ok())
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"JUNK")

    async with Scripted(junk_later) as server, asyncio.timeout(BOUND):
        for _ in range(3):
            assert (await send(client, server.url)).content == b"hello"
            await asyncio.sleep(0.1)


async def test_a_second_response_after_the_body_is_not_taken_for_the_next_request(client: FastUpstream) -> None:
    async def two(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        server.keep = True
        writer.write(ok(b"first") + ok(b"unasked"))

    async with Scripted(two) as server, asyncio.timeout(BOUND):
        assert (await send(client, server.url)).content == b"first"
        assert (await send(client, server.url)).content == b"first"
        assert server.connections == 2


async def test_half_a_head_then_close_is_not_retryable(client: FastUpstream) -> None:
    # Given a kept-alive connection, then a backend that sends half a head and closes
    async def half(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        if number == 1:
            server.keep = True
            writer.write(ok())
        else:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-le")

    async with Scripted(half) as server:
        async with asyncio.timeout(BOUND):
            assert (await send(client, server.url)).status_code == 200
        # Then the failure is not "closed without a response" (which the dispatcher retries elsewhere)
        error = await expect(client, server.url, UpstreamDisconnected)
        assert not isinstance(error, UpstreamClosed)
        assert server.requests == 2  # and it was not re-sent


async def test_close_without_a_byte_on_a_new_connection_is_not_retryable(client: FastUpstream) -> None:
    # The backend had the request: it may have started it, so it is not sent again.
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        return

    async with Scripted(hang_up) as server:
        error = await expect(client, server.url, UpstreamDisconnected)
        assert not isinstance(error, UpstreamClosed)
        assert server.requests == 1


async def test_stale_keepalive_connection_is_retried_once(client: FastUpstream) -> None:
    # A reused connection closed with no response byte: the backend cannot have started the request.
    async def close_after_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        if number == 1:
            server.keep = True
            writer.write(ok())

    async with Scripted(close_after_first) as server, asyncio.timeout(BOUND):
        assert (await send(client, server.url)).content == b"hello"
        assert (await send(client, server.url)).content == b"hello"
        assert server.connections == 2


async def test_close_mid_body_is_a_protocol_error(client: FastUpstream) -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")

    async with Scripted(cut) as server:
        for stream in (False, True):
            error = await expect(client, server.url, UpstreamProtocolError, stream=stream)
            assert not isinstance(error, UpstreamClosed)


async def test_bad_chunk_size_is_a_protocol_error(client: FastUpstream) -> None:
    async def bad(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(3)

    async with Scripted(bad) as server:
        for stream in (False, True):
            await expect(client, server.url, UpstreamProtocolError, stream=stream)


async def test_streamed_body_read_whole_hits_the_read_deadline(client: FastUpstream) -> None:
    # The dispatcher reads a streamed error answer whole: it gets the same total deadline as a non-streamed body.
    async def trickle_error(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 100\r\n\r\n")
        for _ in range(100):
            writer.write(b"a")
            await writer.drain()
            await asyncio.sleep(0.1)

    async with Scripted(trickle_error) as server:
        await expect(client, server.url, UpstreamReadTimeout, stream=True)
