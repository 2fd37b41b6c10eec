"""The production server bounds a request head: its size (431) and how long it may take to arrive (408/close).

uvicorn's httptools protocol has neither bound: one connection sending an endless header line made it buffer
without end, and a head sent a byte at a time held the connection open for as long as the client wished.
`llm_platform/serve.py` serves with a protocol that cuts both (MAX_REQUEST_HEAD_BYTES, REQUEST_HEAD_TIMEOUT_S);
these tests run the production command (scripts/serve.sh, as `make serve` and the image do) and attack it.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.serve import ServeProcess

pytestmark = pytest.mark.django_db(transaction=True)

HEAD_TIMEOUT_S = 2.0
MAX_HEAD_BYTES = 65536


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServeProcess]:
    log = tmp_path / "serve.log"
    env = {"REQUEST_HEAD_TIMEOUT_S": str(HEAD_TIMEOUT_S), "MAX_REQUEST_HEAD_BYTES": str(MAX_HEAD_BYTES)}
    with ServeProcess(log_path=log, env=env) as process:
        yield process


def _connect(server: ServeProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def _read_all(conn: socket.socket, timeout_s: float) -> tuple[bytes, bool]:
    """What the server sends until it closes (True) or `timeout_s` passes (False)."""
    conn.settimeout(timeout_s)
    received = b""
    try:
        while chunk := conn.recv(65536):
            received += chunk
    except TimeoutError:
        return received, False
    except ConnectionResetError:
        pass
    return received, True


def _one_response(conn: socket.socket) -> bytes:
    """One complete response (head + Content-Length body) on a keep-alive connection."""
    conn.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        assert chunk, data
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        chunk = conn.recv(65536)
        assert chunk, data
        body += chunk
    return head + b"\r\n\r\n" + body


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0


def _error_body(response: bytes) -> dict:
    return json.loads(response.split(b"\r\n\r\n", 1)[1])["error"]


def test_an_endless_header_line_is_cut_with_431_after_the_limit(server: ServeProcess) -> None:
    # given a connection that starts a header line and never ends it
    conn = _connect(server)
    conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Endless: ")
    sent, started, response, closed = 0, time.monotonic(), b"", False
    # when it keeps sending (at most 8 MiB or 10 s, far past any bound)
    conn.settimeout(0.05)
    while sent < 8 * 2**20 and time.monotonic() - started < 10 and not response:
        try:
            conn.sendall(b"a" * 16384)
            sent += 16384
        except TimeoutError:
            pass  # the server stopped reading
        except (BrokenPipeError, ConnectionResetError):
            closed = True
            break
        try:
            response += conn.recv(65536)
        except TimeoutError:
            pass
        except ConnectionResetError:
            closed = True
            break
    if not closed:
        more, closed = _read_all(conn, 5)
        response += more
    conn.close()
    # then the server answered 431 in OpenAI's error shape and closed, long before 8 MiB
    assert _status(response) == 431, (sent, response[:200], server.log()[-2000:])
    assert _error_body(response)["code"] == "request_header_fields_too_large"
    assert closed and sent < MAX_HEAD_BYTES + 2 * 2**20, sent


def test_a_head_of_many_headers_over_the_limit_is_refused(server: ServeProcess) -> None:
    # given a complete head of 80 KiB (many short header lines) in one write
    headers = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"v" * 64) for i in range(1100))
    conn = _connect(server)
    conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + headers + b"\r\n")
    # when the server reads it / then 431 and the connection closes
    response, closed = _read_all(conn, 5)
    conn.close()
    assert _status(response) == 431 and closed, response[:200]


def test_a_head_sent_one_byte_at_a_time_is_cut_after_the_head_timeout(server: ServeProcess) -> None:
    # given a connection sending a head one byte every 0.25 s (it would take minutes to finish)
    conn = _connect(server)
    conn.settimeout(0.25)
    started = time.monotonic()
    line = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"s" * 1000
    response, closed = b"", False
    for byte in line:
        try:
            conn.sendall(bytes([byte]))
            response += conn.recv(4096)
        except TimeoutError:
            pass
        except (BrokenPipeError, ConnectionResetError):
            closed = True
            break
        if response:
            more, closed = _read_all(conn, 3)
            response += more
            break
        if time.monotonic() - started > HEAD_TIMEOUT_S + 8:
            break
    elapsed = time.monotonic() - started
    conn.close()
    # then the server gave up within the head timeout (+ its one-second check interval), answering 408
    assert closed, f"still open after {elapsed:.1f} s"
    assert elapsed < HEAD_TIMEOUT_S + 2.5, elapsed
    assert _status(response) == 408 and _error_body(response)["code"] == "request_timeout", response[:200]


def test_a_connection_that_sends_nothing_is_closed_after_the_head_timeout(server: ServeProcess) -> None:
    # given a connection that never sends a byte / when we wait
    conn = _connect(server)
    started = time.monotonic()
    response, closed = _read_all(conn, HEAD_TIMEOUT_S + 8)
    conn.close()
    # then the server closed it silently within the head timeout
    assert closed and response == b"" and time.monotonic() - started < HEAD_TIMEOUT_S + 2.5


def test_normal_requests_large_bodies_and_idle_keep_alive_still_work(server: ServeProcess) -> None:
    conn = _connect(server)
    # a normal request
    conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert _status(_one_response(conn)) == 200
    # a legal head of 40 KiB
    conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"b" * 40960 + b"\r\n\r\n")
    assert _status(_one_response(conn)) == 200
    # a keep-alive connection idle for longer than the head timeout is not closed (the keep-alive timeout rules)
    time.sleep(HEAD_TIMEOUT_S + 1.5)
    # a 1 MiB body sent with its head in one write is not mistaken for a large head
    body = json.dumps({"model": "nope", "messages": [{"role": "user", "content": "x" * 2**20}]}).encode()
    conn.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    response = _one_response(conn)
    assert _status(response) == 401, response[:300]  # no key: the application answered, not the head limit
    conn.close()


def test_uvicorns_own_supervisor_applies_the_bounds_too(tmp_path: Path) -> None:
    # given SHARED_SOCKET=1: uvicorn's supervisor, which pickles its configuration to the workers it spawns
    env = {"SHARED_SOCKET": "1", "WEB_CONCURRENCY": "2", "REQUEST_HEAD_TIMEOUT_S": str(HEAD_TIMEOUT_S)}
    with ServeProcess(log_path=tmp_path / "serve.log", env=env) as server:
        # when a head stops halfway / then a worker answers 408 within the timeout
        conn = _connect(server)
        started = time.monotonic()
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        response, closed = _read_all(conn, HEAD_TIMEOUT_S + 8)
        conn.close()
        assert closed and _status(response) == 408, (response[:200], server.log()[-2000:])
        assert time.monotonic() - started < HEAD_TIMEOUT_S + 2.5
