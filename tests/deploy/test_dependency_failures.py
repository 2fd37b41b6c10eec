"""What a web process does when PostgreSQL or Redis goes away (marked `services`; docs/deploy.md, Failure
behaviour). Nothing shared is stopped: the process reaches both through TCP proxies that the test cuts."""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import redis
from django.db import connection

from backends.mock_vllm import MockServer
from governance.services import api_key_create
from tests.conftest import MASTER_KEY
from tests.factories import backend_create, model_create, pool_create
from tests.governance.test_ratelimit import _wait_for_fresh_minute
from tests.live import PlatformProcess
from tests.live import test_database_url as database_url

REDIS_URL = os.environ.get("REDIS_URL", "")
pytestmark = [
    pytest.mark.services,
    pytest.mark.skipif(not REDIS_URL, reason="needs REDIS_URL (a real Redis)"),
    pytest.mark.django_db(transaction=True),
]


class TcpProxy:
    """Forwards a local port to host:port until `cut()`, which closes the listener and every open connection."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.closed = False
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                if self.closed:
                    client.close()
                    return
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                return
            with self.lock:
                self.sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        """The dependency is gone: new connections are refused, open ones are closed."""
        self.closed = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() (close alone does not)
        except OSError:
            pass
        self.listener.close()
        with self.lock:
            for s in self.sockets:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()


def via(proxy: TcpProxy, url: str) -> str:
    """The URL with its host and port replaced by the proxy's."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@127.0.0.1:{proxy.port}" if userinfo else f"127.0.0.1:{proxy.port}"
    return urlunsplit(parts._replace(netloc=netloc))


@pytest.fixture
def chat_backend() -> Iterator[MockServer]:
    """A mock vLLM serving `dep-chat` (registry on PostgreSQL)."""
    if connection.vendor != "postgresql":
        pytest.skip("needs DATABASE_URL on PostgreSQL")
    with MockServer(models=["served-chat"]) as mock:
        pool = pool_create()
        backend_create(pool=pool, base_url=mock.url)
        model_create(pool=pool, name="dep-chat", served_name="served-chat")
        yield mock


def test_serving_goes_on_without_postgresql_and_rate_limits_fall_back_without_redis(
    chat_backend: MockServer,
) -> None:
    key, secret = api_key_create(name=f"dep-{uuid.uuid4().hex[:6]}", rpm_limit=6)
    client = redis.Redis.from_url(REDIS_URL)
    client.delete(*client.keys(f"llm:rl:{key.id}.*") or ["-"])
    db_url, redis_url = database_url(), REDIS_URL
    db_proxy = TcpProxy(urlsplit(db_url).hostname or "127.0.0.1", urlsplit(db_url).port or 5432)
    redis_proxy = TcpProxy(urlsplit(redis_url).hostname or "127.0.0.1", urlsplit(redis_url).port or 6379)
    env = {
        "DATABASE_URL": via(db_proxy, db_url),
        "REDIS_URL": via(redis_proxy, redis_url),
        "RATE_LIMIT_ON_REDIS_ERROR": "local",
    }
    body = {"model": "dep-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    auth = {"Authorization": f"Bearer {secret}"}
    with PlatformProcess(master_key=MASTER_KEY, env=env) as web:
        assert httpx.post(f"{web.url}/v1/chat/completions", json=body, headers=auth, timeout=10).status_code == 200

        # PostgreSQL goes away: the registry and the keys are served from the process's snapshot
        db_proxy.cut()
        for _ in range(3):
            response = httpx.post(f"{web.url}/v1/chat/completions", json=body, headers=auth, timeout=10)
            assert response.status_code == 200, response.text
        models = httpx.get(f"{web.url}/v1/models", headers={"Authorization": f"Bearer {MASTER_KEY}"}, timeout=10)
        assert models.status_code == 200 and "dep-chat" in models.text
        assert httpx.get(f"{web.url}/healthz", timeout=5).status_code == 200
        ready = httpx.get(f"{web.url}/readyz", timeout=10)
        assert ready.json()["database"] == "unreachable" and ready.json()["registry_loaded"] is True

        # Redis goes away too: with RATE_LIMIT_ON_REDIS_ERROR=local the key's limit is counted in the process
        # (4 requests already counted in Redis are forgotten: the key gets its 6 again, then 429)
        _wait_for_fresh_minute(margin_s=10.0)  # the 8 counted requests must fall in one fixed minute window
        redis_proxy.cut()
        codes = [
            httpx.post(f"{web.url}/v1/chat/completions", json=body, headers=auth, timeout=10).status_code
            for _ in range(8)
        ]
        assert codes == [200] * 6 + [429] * 2, codes
