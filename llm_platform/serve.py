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
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
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

import uvicorn
from uvicorn.config import STARTUP_FAILURE

logger = logging.getLogger("uvicorn.error")

APP = "llm_platform.asgi:application"
KILL_MARGIN_S = 10.0  # after the graceful timeout, how long the supervisor waits before SIGKILL
RESTART_BACKOFF_S = 1.0  # a worker that keeps dying is restarted at most this often
PR_SET_PDEATHSIG = 1
REUSE_PORT_BALANCES = sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


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

    def uvicorn_kwargs(self) -> dict[str, Any]:
        """Settings of every worker: the flags `make run` and the benchmark use, plus the production ones."""
        return {
            "host": self.host,
            "port": self.port,
            "loop": "uvloop",
            "http": "httptools",
            "lifespan": "on",
            "timeout_graceful_shutdown": self.graceful_timeout_s,
            "timeout_keep_alive": self.keepalive_timeout_s,
            "proxy_headers": True,
            "forwarded_allow_ips": self.forwarded_allow_ips,
            "log_level": self.log_level,
            "access_log": self.access_log,
            "backlog": self.backlog,
        }

    def uvicorn_config(self) -> uvicorn.Config:
        """One worker's uvicorn configuration."""
        return uvicorn.Config(APP, **self.uvicorn_kwargs())


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
        uvicorn.run(APP, workers=options.workers, **options.uvicorn_kwargs())
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
