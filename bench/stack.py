"""Starting the platform for the bench scripts the way `make run` does: fresh SQLite, migrate, setup, uvicorn."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PY = sys.executable

from core import procs  # noqa: E402
from core.procs import uvicorn_argv  # noqa: E402


def wait_http(url: str, timeout_s: float = 30.0) -> None:
    """Poll until the URL answers 200, or raise."""
    if not procs.wait_http(url, timeout_s):
        raise RuntimeError(f"{url} did not come up")


def platform_env(state: Path, master_key: str, **extra: str) -> dict[str, str]:
    """The environment of a throw-away platform: its own state folder and SQLite database."""
    return {
        **os.environ,
        "LOCAL_STATE_DIR": str(state),
        "DATABASE_URL": f"sqlite:///{state}/db.sqlite3",
        "ROUTER_MASTER_KEY": master_key,
        "DJANGO_SETTINGS_MODULE": "llm_platform.settings",
        **extra,
    }


def start_mock(port: int) -> subprocess.Popen[bytes]:
    """The bundled mock vLLM serving `mock-chat` and `mock-embed` on `port` (not yet ready: wait for /health)."""
    argv = [PY, "-m", "backends.mock_vllm", "--port", str(port), "--model", "mock-chat", "--embed-model", "mock-embed"]
    return subprocess.Popen(argv, cwd=ROOT)


def create_api_key(env: dict[str, str], name: str, *options: str) -> str:
    """A new API key of the platform in `env` (`manage.py create_api_key --name <name> <options>`): its secret."""
    argv = [PY, "manage.py", "create_api_key", "--name", name, *options]
    out = subprocess.run(argv, cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1]


def start_platform(
    env: dict[str, str], mock_urls: list[str], port: int, *, cpu: int | None = None, log_level: str = "warning"
) -> subprocess.Popen[bytes]:
    """Migrate, register the mocks as the demo pool, start one uvicorn process and wait until it is ready."""
    subprocess.run([PY, "manage.py", "migrate", "-v", "0"], cwd=ROOT, env=env, check=True)
    setup = [PY, "manage.py", "setup_platform"]
    for url in mock_urls:
        setup += ["--mock-url", url]
    subprocess.run(setup, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    argv = uvicorn_argv(port, log_level=log_level, python=PY)
    if cpu is not None:
        argv = ["taskset", "-c", str(cpu), *argv]
    web = subprocess.Popen(argv, cwd=ROOT, env=env)
    wait_http(f"http://127.0.0.1:{port}/readyz")
    return web
