"""The production web server: uvicorn workers, each with its own SO_REUSEPORT listening socket.

    python -m llm_platform.serve --host 0.0.0.0 --port 8000 --workers 4     # scripts/serve.sh runs this

Why not `uvicorn --workers N`: its supervisor binds one socket and every worker accepts from that one queue.
The kernel wakes the waiting workers in LIFO order and uvloop accepts a burst at a time, so a few workers take
most connections and keep them (clients hold keep-alive connections for minutes): measured with 4 workers
limited to a quarter core each, two workers served every request and the platform ran at half its capacity
(bench/scaling.py, docs/performance.md). Here every worker binds its own socket to the same address with
SO_REUSEPORT and the kernel spreads new connections over the workers' queues by a hash of the 4-tuple, so each
worker gets its share whoever is awake.

The supervisor (this process) only starts, watches and stops the workers; it never holds a listening socket
(a connection hashed to a socket that nobody accepts on would hang). Before starting them it checks that the
address is free with a plain bind: SO_REUSEPORT would otherwise let a second server on the same port join the
group and take part of the traffic unnoticed. A worker that dies is restarted; one that fails during start-up
(a broken app, a lifespan error) stops the whole server with exit status 3, as uvicorn does. SIGTERM and SIGINT
are passed to every worker, which stops accepting at once and gives open requests and streams
`--graceful-timeout` seconds; workers still alive `--graceful-timeout` + 10 s later are killed. Workers die
with the supervisor (PR_SET_PDEATHSIG), so a killed supervisor leaves no orphan holding the port.

One worker (`--workers 1`) runs in this process with no supervisor. Where SO_REUSEPORT does not balance (not
Linux) or `--shared-socket` is given, it falls back to uvicorn's own supervisor.

Request heads are bounded (`BoundedHttpToolsProtocol`): uvicorn's httptools protocol has no limit on the size of a
request head nor on the time it takes to arrive, so one connection sending an endless header line made a worker
buffer without end and a head sent a byte at a time held its connection for as long as the client liked. Here a
head larger than `--max-head-bytes` (MAX_REQUEST_HEAD_BYTES, 64 KiB: request line and every header line) is
answered 431 and the connection closed; a head not complete `--head-timeout` seconds (REQUEST_HEAD_TIMEOUT_S, 10)
after the connection was accepted, or after its first byte on a keep-alive connection (the idle wait between
requests stays the keep-alive timeout's), is answered 408 (or, when nothing came at all, closed silently).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass
from multiprocessing.context import SpawnProcess
from types import FrameType
from typing import Any

import httptools
import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger("uvicorn.error")

APP = "llm_platform.asgi:application"
KILL_MARGIN_S = 10.0  # after the graceful timeout, how long the supervisor waits before SIGKILL
RESTART_BACKOFF_S = 1.0  # a worker that keeps dying is restarted at most this often
PR_SET_PDEATHSIG = 1
REUSE_PORT_BALANCES = sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")
DEFAULT_MAX_HEAD_BYTES = 65536
DEFAULT_HEAD_TIMEOUT_S = 10.0
HEAD_CHECK_INTERVAL_S = 1.0  # how often a worker looks for heads past their timeout (at most)
LINGER_S = 1.0  # after a 431/408, how long input is read and dropped so the client can read the answer


def _env_number(name: str, default: float) -> float:
    """A number from the environment (the defaults of the command line), else `default`."""
    raw = os.environ.get(name, "").strip()
    try:
        return float(raw) if raw else default
    except ValueError:
        logger.error("%s=%r is not a number: using %s", name, raw, default)
        return default


def _error_response(status: int, reason: bytes, message: str, code: str) -> bytes:
    """A complete HTTP/1.1 answer with an OpenAI-shaped JSON error that closes the connection."""
    body = json.dumps(
        {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    ).encode()
    return b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s" % (
        status,
        reason,
        len(body),
        body,
    )


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bounded request head: at most `max_head_bytes`, within `head_timeout_s`.

    Size: while a head is incomplete, the bytes received for it are counted (per read, so a head that ends in a read
    together with a body is measured exactly, from its URL and header lines, only when that read passes the limit).
    Time: a head is timed from the connection's accept, or from the first byte after the previous request (the
    idle wait between keep-alive requests stays uvicorn's keep-alive timeout); one timer per worker checks every
    connection once per `HEAD_CHECK_INTERVAL_S` instead of one timer per request, so a request costs two
    attribute writes. 0 disables a bound. Subclasses set the class attributes (`bounded_protocol`).
    """

    max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES
    head_timeout_s: float = DEFAULT_HEAD_TIMEOUT_S
    _limit: int = DEFAULT_MAX_HEAD_BYTES  # max_head_bytes, or no limit for 0 (set with it: bounded_protocol)

    # Per connection: the next bytes belong to a request head; when that head started (None: not started, or the
    # connection is idle between keep-alive requests); its bytes so far; answered with an error and closing.
    _in_head = True
    _head_since: float | None = None
    _head_bytes = 0
    _refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_since = self.loop.time()
        if self.head_timeout_s > 0:
            _HeadWatch.ensure(self)

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            if self._refused:
                return  # the answer is written; drop what still comes until the connection closes
            if self._head_since is None:
                self._head_since = self.loop.time()  # first byte of the next head on a keep-alive connection
            self._head_bytes += len(data)
        # HttpToolsProtocol.data_received (uvicorn 0.54), inlined: this runs for every read
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self._refused:
                return  # the parser stopped because of our own 431, already written
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        # a head still incomplete after this read (a completed one reset the count to 0)
        if self._head_bytes > self._limit and not self.transport.is_closing():
            self.refuse_head(431)

    def on_headers_complete(self) -> None:
        if self._head_bytes > self._limit:
            # the read that completed the head passed the limit: measure the head itself (body bytes excluded)
            size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
            if size > self._limit:
                self.refuse_head(431)
                raise _HeadRefused  # stops the parser; data_received drops the rest
        self._in_head = False
        self._head_since = None
        self._head_bytes = 0
        HttpToolsProtocol.on_headers_complete(self)

    def on_message_complete(self) -> None:
        HttpToolsProtocol.on_message_complete(self)
        self._in_head = True  # what comes next on this connection is the next request's head

    def head_overdue(self, now: float) -> bool:
        """Whether a head has been arriving for longer than the timeout (checked by _HeadWatch)."""
        since = self._head_since
        return since is not None and self._in_head and now - since > self.head_timeout_s

    def refuse_head(self, status: int) -> None:
        """Answer 431 or 408 (when no response is under way), then close; a silent close when nothing came."""
        if self._refused or self.transport.is_closing():
            return
        self._refused = True
        self._in_head = True  # data_received then drops whatever comes
        self._head_since = None
        busy = self.cycle is not None and not self.cycle.response_complete
        if busy or (status == 408 and self._head_bytes == 0):
            self.transport.close()  # a response is being written (pipelining), or an idle new connection
            return
        if status == 431:
            answer = _error_response(
                431,
                b"Request Header Fields Too Large",
                f"The request head is larger than {self.max_head_bytes} bytes.",
                "request_header_fields_too_large",
            )
        else:
            answer = _error_response(
                408,
                b"Request Timeout",
                f"The request head did not arrive within {self.head_timeout_s:g} seconds.",
                "request_timeout",
            )
        self.logger.warning("%s: refused a request head (%d)", self.client and self.client[0], status)
        self.transport.write(answer)
        # Close our side after the answer but keep reading (and dropping) for a moment: closing with unread input
        # would reset the connection and could destroy the answer before the client reads it.
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()

    def eof_received(self) -> None:
        if self._refused:
            self.transport.close()
        super().eof_received()


class _HeadRefused(Exception):
    """Raised in a parser callback to stop parsing a refused head."""


class _HeadWatch:
    """One timer per server (worker): every interval, refuse the heads past their timeout."""

    def __init__(self, connections: set[Any], loop: asyncio.AbstractEventLoop, interval_s: float) -> None:
        self.connections = connections
        self.loop = loop
        self.interval_s = interval_s
        self.loop.call_later(interval_s, self.tick)

    @classmethod
    def ensure(cls, protocol: BoundedHttpToolsProtocol) -> None:
        """Start the watch of this protocol's server once (kept on uvicorn's ServerState)."""
        state = protocol.server_state
        if getattr(state, "head_watch", None) is None:
            interval = max(0.05, min(HEAD_CHECK_INTERVAL_S, protocol.head_timeout_s / 4))
            state.head_watch = cls(protocol.connections, protocol.loop, interval)  # type: ignore[attr-defined]

    def tick(self) -> None:
        now = self.loop.time()
        for connection in list(self.connections):
            overdue = getattr(connection, "head_overdue", None)
            if overdue is not None and overdue(now):
                connection.refuse_head(408)
        self.loop.call_later(self.interval_s, self.tick)


class EnvBoundedHttpToolsProtocol(BoundedHttpToolsProtocol):
    """The bounds from the environment at import: for uvicorn's own supervisor, which pickles its configuration
    (so the protocol must be named by an import string) to workers that inherit the environment."""

    max_head_bytes = max(0, int(_env_number("MAX_REQUEST_HEAD_BYTES", DEFAULT_MAX_HEAD_BYTES)))
    head_timeout_s = max(0.0, _env_number("REQUEST_HEAD_TIMEOUT_S", DEFAULT_HEAD_TIMEOUT_S))
    _limit = max_head_bytes or sys.maxsize


def bounded_protocol(max_head_bytes: int, head_timeout_s: float) -> type[asyncio.Protocol] | str:
    """The HTTP protocol class for these bounds ("httptools", uvicorn's own, when both are 0)."""
    if max_head_bytes <= 0 and head_timeout_s <= 0:
        return "httptools"
    return type(
        "BoundedHttpToolsProtocol",
        (BoundedHttpToolsProtocol,),
        {
            "max_head_bytes": max(0, max_head_bytes),
            "head_timeout_s": max(0.0, head_timeout_s),
            "_limit": max_head_bytes if max_head_bytes > 0 else sys.maxsize,
        },
    )


@dataclass(frozen=True)
class ServeOptions:
    """What the workers are started with (pickled to each spawned worker)."""

    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    graceful_timeout_s: int = 30
    keepalive_timeout_s: int = 75
    forwarded_allow_ips: str = "127.0.0.1"
    log_level: str = "info"
    access_log: bool = False
    backlog: int = 2048
    max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES
    head_timeout_s: float = DEFAULT_HEAD_TIMEOUT_S
    _limit: int = DEFAULT_MAX_HEAD_BYTES  # max_head_bytes, or no limit for 0 (set with it: bounded_protocol)

    def uvicorn_kwargs(self) -> dict[str, Any]:
        """Settings of every worker: the flags `make run` and the benchmark use, plus the production ones."""
        return {
            "host": self.host,
            "port": self.port,
            "loop": "uvloop",
            "http": bounded_protocol(self.max_head_bytes, self.head_timeout_s),
            "lifespan": "on",
            "timeout_graceful_shutdown": self.graceful_timeout_s,
            "timeout_keep_alive": self.keepalive_timeout_s,
            "proxy_headers": True,
            "forwarded_allow_ips": self.forwarded_allow_ips,
            "server_header": False,  # no `server: uvicorn` on every answer: it tells a client only what to attack
            "log_level": self.log_level,
            "access_log": self.access_log,
            "backlog": self.backlog,
            # A WebSocket frame is never larger than a request body (the consumer checks both, tighter before
            # authentication); without this uvicorn reads frames of up to 16 MiB before the app sees them.
            "ws_max_size": _env_int("ROUTER_MAX_BODY_BYTES", 4 * 1024 * 1024) + 64 * 1024,
        }

    def uvicorn_config(self) -> uvicorn.Config:
        """One worker's uvicorn configuration."""
        return uvicorn.Config(APP, **self.uvicorn_kwargs())


def _env_int(name: str, default: int) -> int:
    """An integer environment variable, or the default when unset or not an integer."""
    try:
        return int(os.environ.get(name, ""))
    except ValueError:
        return default


def _family(host: str) -> socket.AddressFamily:
    """IPv6 for an address with a colon, else IPv4 (as uvicorn decides)."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def reuse_port_socket(host: str, port: int, backlog: int) -> socket.socket:
    """A listening socket on host:port that joins the address's SO_REUSEPORT group."""
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def address_is_free(host: str, port: int) -> OSError | None:
    """None when nothing is bound to host:port, else the bind error (a plain bind fails on a reuse-port group)."""
    probe = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are no conflict
        probe.bind((host, port))
    except OSError as exc:
        return exc
    finally:
        probe.close()
    return None


def _die_with_parent() -> None:
    """Ask the kernel to SIGTERM this process when the supervisor dies (Linux; elsewhere nothing)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _forget_metrics_of(pid: int | None) -> None:
    """Drop a gone worker's live gauges from the multiprocess metrics (its counters stay, as they must)."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if pid is None or not directory:
        return
    from prometheus_client import multiprocess

    with contextlib.suppress(OSError):
        multiprocess.mark_process_dead(pid, directory)


def worker_main(options: dict[str, Any]) -> None:
    """Entry point of a spawned worker: bind its own socket and serve until told to stop."""
    _die_with_parent()
    opts = ServeOptions(**options)
    config = opts.uvicorn_config()
    try:
        sock = reuse_port_socket(opts.host, opts.port, opts.backlog)
    except OSError as exc:
        logger.error("worker %d cannot listen on %s:%d: %s", os.getpid(), opts.host, opts.port, exc)
        sys.exit(STARTUP_FAILURE)
    logger.info("worker %d listening on %s:%d (SO_REUSEPORT)", os.getpid(), opts.host, opts.port)
    uvicorn.Server(config).run(sockets=[sock])


class Supervisor:
    """Starts `workers` worker processes, restarts those that die, and stops them all on SIGTERM/SIGINT."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.context = multiprocessing.get_context("spawn")
        self.workers: list[SpawnProcess] = []
        self.stopping = False
        self.failed = False
        self.last_restart = 0.0

    def _spawn(self) -> SpawnProcess:
        process = self.context.Process(target=worker_main, args=(asdict(self.options),), name="llm-platform-web")
        process.start()
        return process

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self.stopping:
            logger.info("supervisor: %s, stopping %d worker(s)", signal.Signals(signum).name, len(self.workers))
        self.stopping = True

    def run(self) -> int:
        """Serve until a signal or a start-up failure; return the exit status."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        logger.info(
            "supervisor %d: %d workers on %s:%d, one SO_REUSEPORT socket each",
            os.getpid(),
            self.options.workers,
            self.options.host,
            self.options.port,
        )
        self.workers = [self._spawn() for _ in range(self.options.workers)]
        while not self.stopping:
            time.sleep(0.2)
            self._watch()
        return self._stop()

    def _watch(self) -> None:
        """Replace dead workers; a start-up failure stops the server."""
        for index, process in enumerate(self.workers):
            if process.is_alive() or self.stopping:
                continue
            _forget_metrics_of(process.pid)
            if process.exitcode == STARTUP_FAILURE:
                logger.error("worker %d failed to start: stopping the server", process.pid)
                self.failed = self.stopping = True
                return
            wait = self.last_restart + RESTART_BACKOFF_S - time.monotonic()
            if wait > 0:
                return  # a crash loop: try again on a later tick
            logger.warning("worker %d died (exit status %s): starting a new one", process.pid, process.exitcode)
            self.last_restart = time.monotonic()
            self.workers[index] = self._spawn()

    def _stop(self) -> int:
        """SIGTERM every worker, wait for the graceful period plus a margin, then SIGKILL what is left."""
        for process in self.workers:
            if process.is_alive() and process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.options.graceful_timeout_s + KILL_MARGIN_S
        for process in self.workers:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                logger.error("worker %d did not stop in time: killing it", process.pid)
                process.kill()
                process.join()
            _forget_metrics_of(process.pid)
        logger.info("supervisor %d: all workers stopped", os.getpid())
        return STARTUP_FAILURE if self.failed else 0


def serve(options: ServeOptions, *, shared_socket: bool = False) -> int:
    """Run the server with these options; return the exit status."""
    if options.workers <= 1:
        server = uvicorn.Server(options.uvicorn_config())
        server.run()
        return 0 if server.started else STARTUP_FAILURE
    if shared_socket or not REUSE_PORT_BALANCES:
        kwargs = options.uvicorn_kwargs()
        if not isinstance(kwargs["http"], str):
            # uvicorn's supervisor pickles the configuration for its spawned workers: a class made at run time
            # cannot travel, so the workers import EnvBoundedHttpToolsProtocol and read the bounds it inherits.
            os.environ["MAX_REQUEST_HEAD_BYTES"] = str(options.max_head_bytes)
            os.environ["REQUEST_HEAD_TIMEOUT_S"] = str(options.head_timeout_s)
            kwargs["http"] = "llm_platform.serve:EnvBoundedHttpToolsProtocol"
        uvicorn.run(APP, workers=options.workers, **kwargs)
        return 0
    busy = address_is_free(options.host, options.port)
    if busy is not None:
        logger.error("cannot listen on %s:%d: %s", options.host, options.port, busy)
        return STARTUP_FAILURE
    return Supervisor(options).run()


def parse_args(argv: list[str] | None = None) -> tuple[ServeOptions, bool]:
    """Command line → options (defaults: those of ServeOptions)."""
    defaults = ServeOptions()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default=defaults.host)
    parser.add_argument("--port", type=int, default=defaults.port)
    parser.add_argument("--workers", type=int, default=defaults.workers)
    parser.add_argument("--graceful-timeout", type=int, default=defaults.graceful_timeout_s)
    parser.add_argument("--keepalive-timeout", type=int, default=defaults.keepalive_timeout_s)
    parser.add_argument("--forwarded-allow-ips", default=defaults.forwarded_allow_ips)
    parser.add_argument("--log-level", default=defaults.log_level)
    parser.add_argument("--access-log", action="store_true")
    parser.add_argument("--backlog", type=int, default=defaults.backlog)
    parser.add_argument(
        "--max-head-bytes",
        type=int,
        default=int(_env_number("MAX_REQUEST_HEAD_BYTES", defaults.max_head_bytes)),
        help="largest request head (request line + header lines); larger: 431 and close; 0: no limit "
        "(default: MAX_REQUEST_HEAD_BYTES, else %(default)s)",
    )
    parser.add_argument(
        "--head-timeout",
        type=float,
        default=_env_number("REQUEST_HEAD_TIMEOUT_S", defaults.head_timeout_s),
        help="seconds a request head may take from accept (or from its first byte on a keep-alive connection); "
        "later: 408 and close; 0: no limit (default: REQUEST_HEAD_TIMEOUT_S, else %(default)s)",
    )
    parser.add_argument(
        "--shared-socket",
        action="store_true",
        help="use uvicorn's own supervisor (one socket shared by the workers) instead of SO_REUSEPORT",
    )
    args = parser.parse_args(argv)
    options = ServeOptions(
        host=args.host,
        port=args.port,
        workers=max(1, args.workers),
        graceful_timeout_s=args.graceful_timeout,
        keepalive_timeout_s=args.keepalive_timeout,
        forwarded_allow_ips=args.forwarded_allow_ips,
        log_level=args.log_level,
        access_log=args.access_log,
        backlog=args.backlog,
        max_head_bytes=max(0, args.max_head_bytes),
        head_timeout_s=max(0.0, args.head_timeout),
    )
    return options, args.shared_socket


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and serve."""
    options, shared_socket = parse_args(argv)
    # The supervisor's own messages go where uvicorn's go (its workers configure logging themselves).
    options.uvicorn_config()  # configures the uvicorn loggers at the chosen level
    return serve(options, shared_socket=shared_socket)


if __name__ == "__main__":
    raise SystemExit(main())
