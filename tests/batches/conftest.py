"""Fixtures of the Batch API tests: the mock vLLM on a real port, registry rows, keys, a Celery worker process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest

from backends.mock_vllm import MockServer
from tests import live
from tests.factories import backend_create, model_create, pool_create

CAPITAL = "In one word, can you provide me the capital of France?"


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    """A JSONL file of the given objects."""
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


def chat_line(custom_id: str, content: str = CAPITAL, **body: Any) -> dict[str, Any]:
    """One batch request line for /v1/chat/completions on `chat-model`."""
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "chat-model", "messages": [{"role": "user", "content": content}], "max_tokens": 20, **body},
    }


@pytest.fixture
def batch_files_dir(settings: Any, tmp_path: Any) -> Any:
    """Batch files in a temporary directory (STORAGES["batches"])."""
    location = tmp_path / "batch-files"
    settings.STORAGES = {
        **settings.STORAGES,
        "batches": {"BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": str(location)}},
    }
    return location


@pytest.fixture
def mock_server() -> Iterator[MockServer]:
    """The mock vLLM on a real port, serving `served-chat`."""
    with MockServer(models=["served-chat"], embed_models=["served-embed"]) as server:
        yield server


@pytest.fixture
def chat_model(mock_server: MockServer) -> Any:
    """A pool with one backend (the mock) and the chat model `chat-model`."""
    pool = pool_create(name="gpu-a")
    backend_create(pool=pool, name="mock-a", base_url=mock_server.url)
    return model_create(pool=pool, name="chat-model", served_name="served-chat")


class Worker:
    """A real Celery worker process on the test database, consuming a queue of its own."""

    def __init__(self, queue: str, env: dict[str, str]) -> None:
        self.queue = queue
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Worker:
        argv = [
            sys.executable, "-m", "celery", "-A", "llm_platform", "worker", "--queues", self.queue, "--pool", "solo",
            "--hostname", f"{self.queue}-{uuid.uuid4().hex[:6]}@%h", "--without-gossip", "--without-mingle",
            "--without-heartbeat", "--loglevel", "warning",
        ]  # fmt: skip
        self.proc = subprocess.Popen(argv, cwd=live.ROOT, env=self.env)
        return self

    def kill(self) -> None:
        """SIGKILL: the worker dies mid-work, nothing is cleaned up."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def batch_env(batch_files_dir: Any) -> dict[str, str]:
    """Environment shared by the platform process and the workers: test database, batch files, own queue."""
    return {
        **os.environ,
        "DATABASE_URL": live.test_database_url(),
        "DJANGO_SETTINGS_MODULE": "llm_platform.settings",
        "LOG_LEVEL": "WARNING",
        "BATCH_FILES_DIR": str(batch_files_dir),
        "BATCH_CELERY_QUEUE": f"batches-test-{uuid.uuid4().hex[:10]}",
        "ROUTER_REGISTRY_POLL_S": "0.2",
    }


@pytest.fixture
def start_worker(batch_env: dict[str, str]) -> Iterator[Callable[..., Worker]]:
    """Start Celery workers on the batch queue (stopped at the end of the test)."""
    workers: list[Worker] = []

    def start(**env: str) -> Worker:
        worker = Worker(batch_env["BATCH_CELERY_QUEUE"], {**batch_env, **env}).start()
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()


def wait_for(predicate: Callable[[], Any], *, timeout_s: float, what: str) -> Any:
    """Poll until predicate() is truthy; its value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout_s} s: {what}")
