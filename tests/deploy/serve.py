"""Run the production server command (scripts/serve.sh) on the test database, as a child process."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import TracebackType

from backends.mock_vllm import free_port
from core.procs import stop_process, wait_http
from tests.conftest import MASTER_KEY
from tests.live import ROOT, test_database_url

SECRET_KEY = "test-production-secret-key-" + "k7Qp2xZ9" * 6
PRODUCTION_ENV = {
    "DJANGO_DEBUG": "0",
    "DJANGO_SECRET_KEY": SECRET_KEY,
    "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
    "DJANGO_SETTINGS_MODULE": "llm_platform.settings",
}


class ServeProcess:
    """`scripts/serve.sh` (uvicorn, production settings) on a free port; output goes to a log file."""

    def __init__(self, *, log_path: Path, env: dict[str, str] | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        venv_bin = str(Path(sys.executable).parent)
        self.env = {
            **os.environ,
            **PRODUCTION_ENV,
            "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
            "DATABASE_URL": test_database_url(),
            "ROUTER_MASTER_KEY": MASTER_KEY,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "WEB_CONCURRENCY": "1",
            "COLLECTSTATIC": "0",
            "ROUTER_REGISTRY_POLL_S": "0.2",
            "LOG_LEVEL": "WARNING",
            "UVICORN_LOG_LEVEL": "warning",
            "PROMETHEUS_MULTIPROC_DIR": str(log_path.parent / f"metrics-{self.port}"),
            "STATIC_ROOT": str(log_path.parent / "static"),
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def launch(self) -> subprocess.Popen[bytes]:
        """Start the command without waiting for it."""
        Path(self.env["STATIC_ROOT"]).mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                ["bash", "scripts/serve.sh"], cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        return self.proc

    def start(self, timeout_s: float = 60.0) -> ServeProcess:
        """Start the command and wait until /readyz answers 200."""
        self.proc = self.launch()
        if wait_http(f"{self.url}/readyz", timeout_s, self.proc, interval_s=0.05):
            return self
        if self.proc.poll() is not None:
            raise RuntimeError(f"serve.sh exited with {self.proc.returncode}:\n{self.log()}")
        self.stop()
        raise RuntimeError(f"serve.sh did not become ready in {timeout_s} s:\n{self.log()}")

    def terminate(self) -> None:
        """Send SIGTERM, as a container engine or Kubernetes does."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float) -> int:
        """Wait for the process to exit; return its exit status."""
        assert self.proc is not None
        return self.proc.wait(timeout=timeout_s)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 15 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        stop_process(self.proc, grace_s=15)

    def log(self) -> str:
        """Everything the process printed so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _socket_inodes(port: int, state: str) -> set[str]:
    """Inodes of the IPv4 TCP sockets whose local port is `port`, in a /proc/net/tcp state (0A listen, 01 open)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == state:
            inodes.add(fields[9])
    return inodes


def sockets_by_pid(port: int, *, state: str) -> dict[int, int]:
    """How many sockets of local port `port` in `state` each process holds ("0A" listening, "01" established)."""
    wanted = _socket_inodes(port, state)
    counts: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:
            continue  # gone, or not ours to read
        links = []
        for fd in fds:
            # one at a time: a process closes descriptors while we read, which must not hide its others
            with contextlib.suppress(OSError):
                links.append(os.readlink(fd))
        held = sum(1 for link in links if link.startswith("socket:[") and link[8:-1] in wanted)
        if held:
            counts[int(entry.name)] = held
    return counts
