"""Helpers to run the platform for tests: as a real uvicorn process, or any ASGI app in a thread."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from types import TracebackType
from typing import Any

from django.db import connection

from backends.mock_vllm import MockServer, free_port
from core.procs import stop_process, uvicorn_argv, wait_http

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
        self.proc = subprocess.Popen(
            uvicorn_argv(self.port, log_level="warning", workers=self._workers), cwd=ROOT, env=self._env
        )
        if not wait_http(f"{self.url}/readyz", 30, self.proc, interval_s=0.05):
            code = self.proc.poll()
            self.stop()
            raise RuntimeError(
                f"platform process exited with {code}"
                if code is not None
                else "platform process did not become ready within 30 s"
            )
        return self

    def stop(self) -> None:
        """Terminate the process and wait for it."""
        stop_process(self.proc)

    def __enter__(self) -> PlatformProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def serve_in_thread(app: Any) -> MockServer:
    """Serve any ASGI app with uvicorn in a background thread (the mock's server runner is app-agnostic)."""
    return MockServer(app)
