"""`make run`'s supervisor: starts web, worker + beat and the mock, serves, and SIGTERM stops all it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from backends.mock_vllm import free_port

ROOT = Path(__file__).resolve().parent.parent.parent


def _children(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True, check=True).stdout
    pairs = [tuple(map(int, line.split())) for line in out.splitlines() if line.strip()]
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in pairs if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def test_run_serves_and_sigterm_stops_everything(tmp_path: Path) -> None:
    port, mock_port = free_port(), free_port()
    env = {
        **os.environ,
        "LOCAL_STATE_DIR": str(tmp_path),
        "PORT": str(port),
        "MOCK_PORT": str(mock_port),
        "DATABASE_URL": f"sqlite:///{tmp_path}/db.sqlite3",
        "DJANGO_SUPERUSER_PASSWORD": "",
        "REDIS_URL": "",
    }
    env.pop("ROUTER_MASTER_KEY", None)
    proc = subprocess.Popen(
        [sys.executable, "scripts/run_platform.py"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        output = ""
        while "Ctrl-C stops everything" not in output:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            assert line or proc.poll() is None, output
            output += line
            assert time.monotonic() < deadline, output
        key = (tmp_path / "master_key").read_text().strip()
        assert key in output and (tmp_path / "admin_password").exists()
        response = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={
                "model": "mock-chat",
                "messages": [{"role": "user", "content": "In one word, can you provide me the capital of France?"}],
            },
            timeout=10,
        )
        assert response.json()["choices"][0]["message"]["content"] == "Paris"
        started = _children(proc.pid)
        assert len(started) >= 3  # mock, web, celery worker (+ its pool processes)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    time.sleep(0.5)
    assert not [pid for pid in started if _alive(pid)]
