"""Starting and waiting for local server processes: one copy for `make run`, the benchmarks and the live tests.

Standard library only (scripts/run_platform.py imports it before Django is set up).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

ASGI_APP = "llm_platform.asgi:application"
HTTP_PROTOCOL = "llm_platform.serve:EnvBoundedHttpToolsProtocol"  # httptools with bounded request heads


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def uvicorn_argv(
    port: int,
    *,
    host: str = "127.0.0.1",
    workers: int = 1,
    log_level: str | None = None,
    python: str = sys.executable,
) -> list[str]:
    """The platform under uvicorn as the tools run it: uvloop, the HTTP protocol of `make run` and `make serve`
    (llm_platform/serve.py: httptools with bounded request heads, the bounds from MAX_REQUEST_HEAD_BYTES and
    REQUEST_HEAD_TIMEOUT_S), lifespan on, no access log, no `server` header."""
    argv = [python, "-m", "uvicorn", ASGI_APP, "--host", host, "--port", str(port)]
    argv += ["--loop", "uvloop", "--http", HTTP_PROTOCOL, "--lifespan", "on", "--no-access-log", "--no-server-header"]
    if log_level:
        argv += ["--log-level", log_level]
    if workers > 1:
        argv += ["--workers", str(workers)]
    return argv


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    """Whether GET url answers 200 now."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def wait_http(
    url: str, timeout_s: float, proc: subprocess.Popen[bytes] | None = None, *, interval_s: float = 0.1
) -> bool:
    """Poll a URL until it answers 200 (True), the process exits or the time is up (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        if http_ok(url):
            return True
        time.sleep(interval_s)
    return False


def stop_process(proc: subprocess.Popen[bytes] | None, grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `grace_s`; wait for the exit either way."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
