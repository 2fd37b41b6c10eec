"""Helpers to run the platform for tests: as a real uvicorn process, or any ASGI app in a thread."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
from django.db import connection

from backends.mock_vllm import MockServer, free_port

ROOT = Path(__file__).resolve().parent.parent


def test_database_url() -> str:
    """A DATABASE_URL pointing at the database the running test uses (SQLite file or PostgreSQL)."""
    settings = connection.settings_dict
    if settings["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{settings['NAME']}"
    user = settings.get("USER") or "postgres"
    password = f":{settings['PASSWORD']}" if settings.get("PASSWORD") else ""
    host = settings.get("HOST") or "127.0.0.1"
    port = settings.get("PORT") or 5432
    return f"postgres://{user}{password}@{host}:{port}/{settings['NAME']}"


class PlatformProcess:
    """The ASGI application served by uvicorn in a child process, on the test database."""

    def __init__(self, *, master_key: str, env: dict[str, str] | None = None, workers: int = 1) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._env = {
            **os.environ,
            "DATABASE_URL": test_database_url(),
            "ROUTER_MASTER_KEY": master_key,
            "ROUTER_REGISTRY_POLL_S": "0.2",
            "DJANGO_SETTINGS_MODULE": "llm_platform.settings",
            "LOG_LEVEL": "WARNING",
            **(env or {}),
        }
        self._workers = workers
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PlatformProcess:
        """Start uvicorn and wait until /healthz answers."""
        argv = [
            sys.executable,
            "-m",
            "uvicorn",
            "llm_platform.asgi:application",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--no-access-log",
            "--lifespan",
            "on",
            "--log-level",
            "warning",
        ]
        if self._workers > 1:
            argv += ["--workers", str(self._workers)]
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=self._env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"platform process exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("platform process did not become ready within 30 s")

    def stop(self) -> None:
        """Terminate the process and wait for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> PlatformProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def serve_in_thread(app: Any) -> MockServer:
    """Serve any ASGI app with uvicorn in a background thread (the mock's server runner is app-agnostic)."""
    return MockServer(app)
