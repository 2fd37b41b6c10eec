"""Graceful shutdown of the production server: on SIGTERM new connections are refused at once, open streams
finish within GRACEFUL_TIMEOUT_S, and a stream longer than that is cut when the grace period ends."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from backends.mock_vllm import MockServer
from tests.conftest import MASTER_KEY
from tests.deploy.serve import ServeProcess
from tests.factories import backend_create, model_create, pool_create

pytestmark = pytest.mark.django_db(transaction=True)

TOKEN_DELAY_S = 0.05


@pytest.fixture
def slow_backend() -> Iterator[MockServer]:
    """A mock vLLM streaming one token every 50 ms, registered as the only backend of `chat-model`."""
    with MockServer(models=["served-chat"], token_delay_s=TOKEN_DELAY_S) as mock:
        pool = pool_create()
        backend_create(pool=pool, base_url=mock.url, read_timeout_s=30)
        model_create(pool=pool, name="chat-model", served_name="served-chat")
        yield mock


def _stream(url: str, max_tokens: int) -> Iterator[str]:
    body = {
        "model": "chat-model",
        "messages": [{"role": "user", "content": "Tell me"}],
        "stream": True,
        "max_tokens": max_tokens,
    }
    headers = {"Authorization": f"Bearer {MASTER_KEY}"}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=30) as response:
        assert response.status_code == 200
        yield from response.iter_lines()


def _refused(url: str) -> bool:
    """Whether a new connection is turned away: refused, or reset/closed unanswered.

    A connection that reached the listen backlog just before the socket closed is reset by the kernel
    (ReadError) or closed by the server unanswered (RemoteProtocolError): not served either.
    """
    try:
        httpx.get(f"{url}/healthz", timeout=1)
    except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
        return True
    return False


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_lets_the_open_stream_finish_and_refuses_new_connections(
    slow_backend: MockServer, tmp_path: Path, workers: str
) -> None:
    # given the production server (one worker, or two behind the supervisor; 10 s grace) streaming 40 tokens
    env = {"GRACEFUL_TIMEOUT_S": "10", "WEB_CONCURRENCY": workers}
    with ServeProcess(log_path=tmp_path / "serve.log", env=env) as server:
        lines: list[str] = []
        refused_after_s = None
        for line in _stream(server.url, max_tokens=40):
            lines.append(line)
            if refused_after_s is None and line.startswith("data: {"):
                # when SIGTERM arrives after the first token
                server.terminate()
                sent = time.monotonic()
                while not _refused(server.url):
                    assert time.monotonic() - sent < 2, "still accepting connections 2 s after SIGTERM"
                    time.sleep(0.02)
                refused_after_s = time.monotonic() - sent
        # then new connections were refused at once, while the stream went on to its end
        assert refused_after_s is not None and refused_after_s < 1
        data = [line for line in lines if line.startswith("data: ")]
        assert data[-1] == "data: [DONE]"
        assert len(data) >= 40
        # and the server exits once the stream is done (a lone uvicorn ends by re-raising the SIGTERM it handled)
        assert server.wait(timeout_s=10) in (0, -signal.SIGTERM), server.log()
        assert "Traceback" not in server.log()


def test_a_stream_longer_than_the_grace_period_is_cut_when_it_ends(slow_backend: MockServer, tmp_path: Path) -> None:
    # given a 1 s grace period and a stream of about 10 s
    with ServeProcess(log_path=tmp_path / "serve.log", env={"GRACEFUL_TIMEOUT_S": "1"}) as server:
        lines: list[str] = []
        started = None
        with pytest.raises(httpx.HTTPError):  # the connection closes before the chunked body ends
            for line in _stream(server.url, max_tokens=200):
                lines.append(line)
                if started is None and line.startswith("data: {"):
                    server.terminate()
                    started = time.monotonic()
        assert started is not None
        # then the stream was cut about 1 s after SIGTERM, without [DONE], and the process is gone soon after
        assert time.monotonic() - started < 4
        assert "data: [DONE]" not in lines
        server.wait(timeout_s=10)
