"""The /v1 hot path runs no database query per request, in any thread, once the registry is loaded."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from django.db.backends.utils import CursorWrapper

from backends.mock_vllm import MockVLLM
from routing.dispatch import Dispatcher
from routing.gateway import Gateway
from tests.conftest import AUTH
from tests.factories import backend_create, model_create, pool_create

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def query_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every SQL statement executed by any connection in any thread while the fixture is active."""
    statements: list[str] = []
    original = CursorWrapper.execute

    def execute(self: CursorWrapper, sql: str, params: Any = None) -> object:
        statements.append(sql)
        return original(self, sql, params)

    monkeypatch.setattr(CursorWrapper, "execute", execute)
    yield statements


def test_no_query_per_request(settings, mock_vllm: MockVLLM, query_log: list[str], django_assert_num_queries):
    # given a registry in the database and a gateway that loaded it once
    settings.ROUTER_REGISTRY_POLL_S = 3600  # keep the background poller quiet during the measurement
    settings.USAGE_FLUSH_INTERVAL_S = 3600  # and the usage writer's batches (they run off the request path)
    pool = pool_create(name="p1")
    backend_create(pool=pool, name="b1", base_url="http://mock-a")
    model_create(pool=pool, name="chat-model", served_name="served-chat")
    gateway = Gateway.from_settings(None)
    gateway.dispatcher = Dispatcher(transport=httpx.ASGITransport(app=mock_vllm))  # backend in process
    body = {"model": "chat-model", "messages": [{"role": "user", "content": "hi"}]}

    async def scenario() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway), base_url="http://r") as client:
            warm = await client.post("/v1/chat/completions", headers=AUTH, json=body)
            assert warm.status_code == 200, warm.text
            assert query_log, "the first request should have loaded the registry from the database"
            query_log.clear()
            # when requests of every kind are served
            for _ in range(20):
                assert (await client.post("/v1/chat/completions", headers=AUTH, json=body)).status_code == 200
                assert (await client.get("/v1/models", headers=AUTH)).status_code == 200
                assert (await client.post("/v1/chat/completions", headers=AUTH, json={})).status_code == 400
                assert (await client.post("/v1/chat/completions", json=body)).status_code == 401
            # then no statement ran, in this thread or any other
            assert query_log == []

    with django_assert_num_queries(0):
        asyncio.run(scenario())
