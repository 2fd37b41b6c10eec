"""`make run`'s supervisor: starts web, worker + beat and the mock, serves, and leaves nothing behind when stopped.

Every process it starts carries the test's LOCAL_STATE_DIR in its environment, so "what remains" is found by that
marker (/proc/PID/environ), whatever became of the process tree — an orphan re-parented to init included.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from backends.mock_vllm import free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent.parent
BANNER = "Ctrl-C stops everything"

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG are Linux")


def _ours(marker: str) -> dict[int, str]:
    """pid → command line of every live process whose environment holds `marker`."""
    found = {}
    needle = marker.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return found


def _kill_all(marker: str) -> None:
    """Test clean-up: SIGKILL whatever is left (only processes of this test carry the marker)."""
    for pid in _ours(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _nothing_left(marker: str, timeout_s: float) -> dict[int, str]:
    """Wait until no process of the test is left; return those still alive after `timeout_s`."""
    wait_until(lambda: not _ours(marker), timeout=timeout_s, interval=0.2)
    return _ours(marker)


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class Run:
    """`make run` (or the supervisor alone) on free ports, with its output in a file and its own marker."""

    def __init__(self, tmp_path: Path, *, via_make: bool, port: int | None = None, mock_port: int | None = None):
        self.port, self.mock_port = port or free_port(), mock_port or free_port()
        self.state = tmp_path / "state"
        self.marker = f"LOCAL_STATE_DIR={self.state}"
        self.log_path = tmp_path / "run.log"
        self.env = {
            **os.environ,
            "LOCAL_STATE_DIR": str(self.state),
            "PORT": str(self.port),
            "MOCK_PORT": str(self.mock_port),
            "DATABASE_URL": f"sqlite:///{tmp_path}/db.sqlite3",
            "DJANGO_SUPERUSER_PASSWORD": "",
            "REDIS_URL": "",
        }
        self.env.pop("ROUTER_MASTER_KEY", None)
        self.env.pop("MAKEFLAGS", None)
        self.argv = ["make", "-s", "run"] if via_make else [sys.executable, "scripts/run_platform.py"]
        self.proc: subprocess.Popen[bytes] | None = None

    def launch(self) -> subprocess.Popen[bytes]:
        # A session of its own: its process group is what a terminal, CI runner or service manager signals.
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self.proc

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def start(self, timeout_s: float = 120) -> Run:
        proc = self.launch()
        ready = wait_until(lambda: BANNER in self.output() or proc.poll() is not None, timeout=timeout_s, interval=0.2)
        assert ready and proc.poll() is None, self.output()
        return self

    def supervisor_pid(self) -> int:
        return next(pid for pid, cmd in _ours(self.marker).items() if "scripts/run_platform.py" in cmd)


@pytest.fixture
def run_factory(tmp_path: Path) -> Iterator[list[Run]]:
    runs: list[Run] = []
    yield runs
    for run in runs:  # whatever a failing test left
        _kill_all(run.marker)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_run_serves_and_sigterm_to_its_process_group_leaves_nothing(
    tmp_path: Path, run_factory: list[Run]
) -> None:
    # given `make run`, up and serving
    run = Run(tmp_path, via_make=True)
    run_factory.append(run)
    run.start()
    key = (run.state / "master_key").read_text().strip()
    assert key in run.output() and (run.state / "admin_password").exists()
    response = httpx.post(
        f"http://127.0.0.1:{run.port}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={
            "model": "mock-chat",
            "messages": [{"role": "user", "content": "In one word, can you provide me the capital of France?"}],
        },
        timeout=10,
    )
    assert response.json()["choices"][0]["message"]["content"] == "Paris"
    started = _ours(run.marker)
    assert len(started) >= 5, started  # make, the supervisor, mock, web, celery (+ its pool)
    # when SIGTERM reaches its whole process group, again and again (timeout, a CI runner, a closing terminal)
    assert run.proc is not None
    for _ in range(3):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.proc.pid, signal.SIGTERM)
        time.sleep(0.3)
    run.proc.wait(timeout=60)
    # then every process it started ends, and the ports are free again
    assert not _nothing_left(run.marker, timeout_s=30), run.output()[-3000:]
    assert not _port_open(run.port) and not _port_open(run.mock_port)
    # in order: every child stopped on its SIGTERM within the grace period, nothing had to be killed
    assert "all processes stopped" in run.output() and "did not stop in time" not in run.output()


def test_a_killed_supervisor_takes_every_child_along(tmp_path: Path, run_factory: list[Run]) -> None:
    # given the supervisor, up and serving
    run = Run(tmp_path, via_make=False)
    run_factory.append(run)
    run.start()
    assert len(_ours(run.marker)) >= 4
    # when it is killed outright (SIGKILL: no handler runs)
    assert run.proc is not None
    run.proc.kill()
    run.proc.wait(timeout=10)
    # then its children follow it (the kernel signals them when their parent dies)
    assert not _nothing_left(run.marker, timeout_s=30), run.output()[-3000:]
    assert not _port_open(run.port) and not _port_open(run.mock_port)


class _Stale(http.server.BaseHTTPRequestHandler):
    """An old server still on the port: answers 200 to everything."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("taken", ["web", "mock"])
def test_run_refuses_to_start_when_a_port_it_needs_is_taken(tmp_path: Path, run_factory: list[Run], taken: str) -> None:
    # given an old server answering on the web (or the mock's) port
    stale = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Stale)
    threading.Thread(target=stale.serve_forever, daemon=True).start()
    port = stale.server_address[1]
    run = Run(tmp_path, via_make=False, **({"port": port} if taken == "web" else {"mock_port": port}))
    run_factory.append(run)
    try:
        # when the supervisor starts
        proc = run.launch()
        status = proc.wait(timeout=60)
        # then it refuses at once, naming the port, and starts nothing
        assert status != 0 and f"port {port}" in run.output(), run.output()
        assert "is up" not in run.output()
        assert not _nothing_left(run.marker, timeout_s=5)
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200  # left alone
    finally:
        stale.shutdown()
        stale.server_close()
