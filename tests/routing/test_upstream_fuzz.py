"""Hypothesis fuzz of FastUpstream's response handling (issue 15.2): hostile responses, split at any byte.

A response is built from parts (status, header lines, a body framed by Content-Length, chunks or the end of the
connection), then maybe spoiled (junk after the body, a bad chunk size, the connection closed early), and written
by a loopback server in pieces cut at chosen offsets (sometimes every single byte). An oracle computed from the
parts says what the client must answer: the status and the exact body, or an error of the right class. Every
example is bounded, so a response the client waits on for ever fails the test rather than hanging it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routing.upstream import (
    FastUpstream,
    Timeouts,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTooLarge,
)

LIMITS: dict[str, Any] = {
    "max_header_line_bytes": 200,
    "max_headers": 12,
    "max_head_bytes": 1024,
    "max_body_bytes": 2048,
}
TIMEOUTS = Timeouts(connect=5.0, read=5.0, write=5.0, pool=5.0)
BOUND = 8.0  # seconds for one example: every answer here needs no timeout, so reaching this is a hang
REASONS = {200: b"OK", 201: b"Created", 400: b"Bad Request", 404: b"Not Found", 500: b"Error", 503: b"Unavailable"}

NAME = st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=20).map(lambda s: ("x-" + s).encode())
VALUE = st.one_of(
    st.binary(max_size=0),
    st.text("abcdefghijklmnopqrstuvwxyz0123456789;=/.,_", min_size=1, max_size=60).map(str.encode),
    st.integers(150, 320).map(lambda n: b"v" * n),  # near or over the line limit
)

# Heads near the head limit made of lines within the line and count limits.
BIG_HEAD = st.lists(st.tuples(NAME, st.integers(60, 170).map(lambda n: b"h" * n)), min_size=6, max_size=11)


@dataclass
class Case:
    """A response as parts, the spoiling applied, and how it is written."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    framing: str  # "length" | "chunked" | "eof"
    chunk_sizes: list[int] = field(default_factory=list)
    spoil: str = "none"  # "none" | "junk" | "bad_chunk" | "close_early"
    junk: bytes = b""
    cut: float = 0.0  # close_early: the fraction of the response written before closing
    splits: list[int] = field(default_factory=list)  # offsets at which the bytes are cut into writes
    every_byte: bool = False
    stream: bool = False

    def head(self) -> bytes:
        lines = [b"HTTP/1.1 %d %s\r\n" % (self.status, REASONS[self.status])]
        lines += [name + b": " + value + b"\r\n" for name, value in self.all_headers()]
        return b"".join(lines) + b"\r\n"

    def all_headers(self) -> list[tuple[bytes, bytes]]:
        framing = {
            "length": [(b"content-length", b"%d" % len(self.body))],
            "chunked": [(b"transfer-encoding", b"chunked")],
        }
        return self.headers + framing.get(self.framing, [])

    def framed_body(self) -> bytes:
        if self.framing != "chunked":
            return self.body
        out, at = [], 0
        for index, size in enumerate(self.chunk_sizes):
            size_line = b"zz" if self.spoil == "bad_chunk" and index == len(self.chunk_sizes) // 2 else b"%x" % size
            out.append(size_line + b"\r\n" + self.body[at : at + size] + b"\r\n")
            at += size
        return b"".join(out) + b"0\r\n\r\n"

    def wire(self) -> bytes:
        data = self.head() + self.framed_body()
        if self.spoil == "junk":
            data += self.junk
        if self.spoil == "close_early":
            data = data[: int(len(data) * self.cut)]
        return data

    def closes(self) -> bool:
        """Whether the server closes the connection after writing (else it keeps it open, silent)."""
        return self.framing == "eof" or self.spoil == "close_early"


@st.composite
def cases(draw: st.DrawFn) -> Case:
    framing = draw(st.sampled_from(["length", "chunked", "eof"]))
    body = draw(st.one_of(st.binary(max_size=300), st.integers(1900, 2200).map(lambda n: b"b" * n)))
    case = Case(
        status=draw(st.sampled_from(sorted(REASONS))),
        headers=draw(st.one_of(st.lists(st.tuples(NAME, VALUE), max_size=draw(st.sampled_from([4, 16]))), BIG_HEAD)),
        body=body,
        framing=framing,
        stream=draw(st.booleans()),
    )
    if framing == "chunked":
        sizes, left = [], len(body)
        while left:
            size = draw(st.integers(1, max(1, min(left, 700))))
            sizes.append(size)
            left -= size
        case.chunk_sizes = sizes
    spoils = ["none", "close_early"] + (["junk"] if framing != "eof" else [])
    spoils += ["bad_chunk"] if framing == "chunked" and case.chunk_sizes else []
    case.spoil = draw(st.sampled_from(spoils))
    if case.spoil == "junk":
        case.junk = draw(
            st.one_of(st.binary(min_size=1, max_size=64), st.just(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc"))
        )
    if case.spoil == "close_early":
        case.cut = draw(st.floats(0.0, 1.0, exclude_max=True))
    total = len(case.wire())
    case.every_byte = total <= 400 and draw(st.booleans())
    case.splits = sorted(set(draw(st.lists(st.integers(1, max(1, total - 1)), max_size=8))))
    return case


Outcome = tuple[int, bytes] | type[UpstreamError] | tuple[type[UpstreamError], ...]


def expected(case: Case) -> Outcome:
    """What the client must answer: (status, body), an error class, or a tuple of acceptable error classes."""
    head = case.head()
    headers = case.all_headers()
    line_over = any(len(name) + len(value) > LIMITS["max_header_line_bytes"] for name, value in headers)
    count_over = len(headers) > LIMITS["max_headers"]
    lines_bytes = sum(len(name) + len(value) + 4 for name, value in headers)
    head_over = lines_bytes > LIMITS["max_head_bytes"]
    # Between the two measures of a head (its header lines; all its bytes before it completed), whether it is
    # refused depends on how it was cut into reads: either answer is right.
    head_maybe_over = len(head) > LIMITS["max_head_bytes"]
    wire = case.wire()
    complete_head = len(wire) >= len(head)
    if case.spoil == "close_early" and not complete_head:
        return (
            (UpstreamDisconnected, UpstreamTooLarge)
            if line_over or count_over or head_maybe_over
            else UpstreamDisconnected
        )
    if line_over or count_over or head_over:
        return UpstreamTooLarge
    if case.spoil == "bad_chunk":
        return UpstreamProtocolError  # or too large, if the body passed its limit before the bad chunk
    if case.spoil == "close_early" and case.framing != "eof":
        return UpstreamProtocolError  # the body (or the chunked end) was cut
    body = wire[len(head) :] if case.framing == "eof" else case.body
    if len(body) > LIMITS["max_body_bytes"]:
        return UpstreamTooLarge
    return (case.status, body)  # (check() also accepts UpstreamTooLarge for a head in the uncertain band)


async def serve_and_ask(case: Case) -> tuple[int, bytes] | UpstreamError:
    """Write the case's bytes for one request, in its pieces; return what the client made of them."""
    wire = case.wire()
    cuts = list(range(1, len(wire))) if case.every_byte else [c for c in case.splits if c < len(wire)]
    pieces = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True) if b > a]
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(2)
            for piece in pieces:
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0)
            if not case.closes():
                await done.wait()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    client = FastUpstream(**LIMITS)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/x"
    try:
        async with asyncio.timeout(BOUND):
            try:
                response = await client.send(
                    "POST", url, headers={}, content=b"{}", timeouts=TIMEOUTS, stream=case.stream
                )
                try:
                    body = await response.aread()
                finally:
                    await response.aclose()
            except UpstreamError as exc:
                return exc
            return response.status_code, body
    finally:
        done.set()
        await client.aclose()
        server.close()


def check(case: Case, run: Callable[[Coroutine[Any, Any, Any]], Any]) -> None:
    outcome = expected(case)
    got = run(serve_and_ask(case))
    maybe_too_large = len(case.head()) > LIMITS["max_head_bytes"]
    if isinstance(outcome, tuple) and outcome and isinstance(outcome[0], int):
        if maybe_too_large and isinstance(got, UpstreamTooLarge):
            return
        assert got == outcome, f"expected {outcome!r:.200}, got {got!r:.200}"
    else:
        assert isinstance(got, UpstreamError), f"expected {outcome}, got {got!r:.200}"
        assert isinstance(got, outcome), f"expected {outcome}, got {got!r}"


FUZZ = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


@FUZZ
@given(case=cases())
def test_fuzz_hostile_responses_asyncio(case: Case) -> None:
    check(case, asyncio.run)


@FUZZ
@given(case=cases())
def test_fuzz_hostile_responses_uvloop(case: Case) -> None:
    check(case, uvloop.run)


@pytest.mark.parametrize("every_byte", [True, False])
def test_fuzz_oracle_sanity(every_byte: bool) -> None:
    # The oracle and the server agree with a plain answer, cut at every byte or not at all.
    case = Case(status=200, headers=[(b"x-a", b"1")], body=b"hello", framing="chunked", chunk_sizes=[2, 3])
    case.every_byte = every_byte
    assert expected(case) == (200, b"hello")
    check(case, asyncio.run)
