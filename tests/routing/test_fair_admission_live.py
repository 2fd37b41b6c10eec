"""Fair admission in a real platform process (uvicorn, the test database) with two API keys and the mock on a socket."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest

from backends.mock_vllm import MockServer
from backends.models import GpuPool
from governance.services import api_key_create
from tests.conftest import MASTER_KEY
from tests.factories import backend_create, model_create, pool_create
from tests.live import PlatformProcess

pytestmark = pytest.mark.django_db(transaction=True)
CHAT = {"model": "chat-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture
def slow_mock() -> Iterator[MockServer]:
    """The mock answering after 0.25 s."""
    with MockServer(models=["served-chat"], embed_models=["served-embed"], latency_s=0.25) as server:
        yield server


def test_two_keys_in_a_full_pool_of_a_live_process(slow_mock: MockServer) -> None:
    # given a pool whose one backend takes one request at a time, a flooding key and a key allowed `critical`
    pool = pool_create(name="gpu-a")
    backend_create(pool=pool, name="mock-a", base_url=slow_mock.url, max_concurrent_requests=1)
    model_create(pool=pool, name="chat-model", served_name="served-chat")
    _, flood = api_key_create(name="flood")
    _, pager = api_key_create(name="pager", priority_max="critical")

    async def scenario(url: str) -> tuple[list[str], httpx.Response]:
        done: list[str] = []

        async def post(client: httpx.AsyncClient, secret: str, **headers: str) -> httpx.Response:
            response = await client.post(
                "/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {secret}", **headers}
            )
            done.append(f"{'flood' if secret == flood else 'pager'}:{response.status_code}")
            return response

        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            floods = [asyncio.create_task(post(client, flood)) for _ in range(6)]
            await asyncio.sleep(0.15)  # the flood's first request holds the backend, five wait
            # when the second key asks for `critical`
            answer = await post(client, pager, **{"x-priority": "critical"})
            await asyncio.gather(*floods)
        return done, answer

    with PlatformProcess(master_key=MASTER_KEY) as platform:
        time.sleep(0.5)  # the keys reach the process's key cache
        done, answer = asyncio.run(scenario(platform.url))
    # then it is answered right after the request in service, ahead of the five waiting, and says its class
    assert answer.status_code == 200 and answer.headers["x-priority"] == "critical"
    assert done.index("pager:200") <= 1, done
    assert sorted(done) == ["flood:200"] * 6 + ["pager:200"]
    # and the pool runs FCFS: vLLM never saw a priority field
    assert "priority" not in slow_mock.stats.last_request


def test_a_priority_scheduling_pool_receives_the_class_as_vllms_priority() -> None:
    with MockServer(models=["served-chat"], embed_models=["served-embed"]) as mock:
        pool = pool_create(name="gpu-p")
        GpuPool.objects.filter(pk=pool.pk).update(priority_scheduling=True)
        backend_create(pool=pool, name="mock-p", base_url=mock.url)
        model_create(pool=pool, name="chat-model", served_name="served-chat")
        _, jobs = api_key_create(name="jobs", priority_default="batch", priority_max="batch")
        with PlatformProcess(master_key=MASTER_KEY) as platform:
            time.sleep(0.5)
            auth = {"Authorization": f"Bearer {jobs}"}
            asked = httpx.post(f"{platform.url}/v1/chat/completions", json={**CHAT, "priority": -1}, headers=auth)
            assert asked.status_code == 200 and asked.headers["x-priority"] == "batch"  # clamped to its ceiling
            assert mock.stats.last_request["priority"] == 10
            master = {"Authorization": f"Bearer {MASTER_KEY}", "x-priority": "critical"}
            assert httpx.post(f"{platform.url}/v1/chat/completions", json=CHAT, headers=master).status_code == 200
            assert mock.stats.last_request["priority"] == -10
