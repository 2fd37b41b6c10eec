"""Prefix-aware routing gives one decision across processes: two platform processes sharing Redis send repeated
prefixes to the same backend (marked `services`: real PostgreSQL and Redis)."""

from __future__ import annotations

import asyncio
import collections
import os
import random
from typing import Any

import httpx
import pytest
from django.db import connection

from backends.mock_vllm import MockServer
from routing.prefix import PrefixIndex, PrefixSync
from tests.conftest import MASTER_KEY
from tests.factories import backend_create, model_create, pool_create
from tests.live import PlatformProcess

REDIS_URL = os.environ.get("REDIS_URL", "")
pytestmark = [
    pytest.mark.services,
    pytest.mark.skipif(not REDIS_URL, reason="needs REDIS_URL (a real Redis)"),
]


async def test_sync_carries_an_insert_to_another_process() -> None:
    # given two processes' indexes joined through Redis
    first_index, second_index = PrefixIndex(), PrefixIndex()
    first = PrefixSync(REDIS_URL, process_id="p1", interval_s=0.01)
    second = PrefixSync(REDIS_URL, process_id="p2", interval_s=0.01)
    first.attach("pool", first_index)
    second.attach("pool", second_index)
    first.ensure_running()
    second.ensure_running()
    try:
        # when the first process routes a prompt to b2 (again until the subscriber has joined: pub/sub keeps no
        # message for a subscriber that is not there yet)
        first_index.insert("b2", (11, 12, 13))
        # then the second process learns it
        async with asyncio.timeout(10):
            while second_index.match((11, 12, 13), "b2") < 3:
                first.publish("pool", "b2", (11, 12, 13))
                await asyncio.sleep(0.2)
        assert second.received >= 1 and first.received == 0  # its own messages are not applied to itself
    finally:
        await first.aclose()
        await second.aclose()


async def test_sync_carries_open_requests_to_another_process() -> None:
    # given two processes joined through Redis, the first with two requests open on b1
    first = PrefixSync(REDIS_URL, process_id="load-1", interval_s=0.01, heartbeat_s=0.05)
    second = PrefixSync(REDIS_URL, process_id="load-2", interval_s=0.01, heartbeat_s=0.05)
    in_flight = {"b1": 2, "b2": 0}
    first.load_source = lambda: in_flight
    first.ensure_running()
    second.ensure_running()
    try:
        # when the second process listens (the heartbeat repeats the counts until it has joined)
        async with asyncio.timeout(10):
            while second.peer_in_flight != {"b1": 2}:
                await asyncio.sleep(0.05)
            # and the first process's requests end
            in_flight["b1"] = 0
            while second.peer_in_flight:
                await asyncio.sleep(0.05)
        # then the second process saw them open, then closed; the first never counts itself
        assert first.peer_in_flight == {}
    finally:
        await first.aclose()
        await second.aclose()


@pytest.mark.django_db(transaction=True)
def test_two_processes_send_repeated_prefixes_to_the_same_backend() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("needs DATABASE_URL on PostgreSQL (the processes share it)")
    options: dict[str, Any] = {"models": ["served-chat"], "prefill_ms_per_token": 0.3}
    with MockServer(**options) as a, MockServer(**options) as b:
        pool = pool_create(name="docs", routing_strategy="prefix_aware")
        backend_create(pool=pool, name="docs-a", base_url=a.url)
        backend_create(pool=pool, name="docs-b", base_url=b.url)
        model_create(pool=pool, name="docs-chat", served_name="served-chat")
        env = {"REDIS_URL": REDIS_URL}
        with (
            PlatformProcess(master_key=MASTER_KEY, env=env) as one,
            PlatformProcess(master_key=MASTER_KEY, env=env) as two,
        ):
            served = asyncio.run(_shared_documents([one.url, two.url]))
    # then for each document, at least 90 % of its repeated questions went to the backend of its first question
    repeated = agreeing = 0
    for backends in served.values():
        repeated += len(backends) - 1
        agreeing += sum(1 for name in backends[1:] if name == backends[0])
    assert agreeing / repeated >= 0.9, served


async def _shared_documents(urls: list[str]) -> dict[int, list[str]]:
    """12 documents x 6 questions, shuffled, 6 at a time, alternating between the processes."""
    rng = random.Random(3)
    documents = [" ".join(f"doc{d}-word{i}" for i in range(300)) for d in range(12)]
    jobs = [(d, q) for d in range(12) for q in range(6)]
    rng.shuffle(jobs)
    served: dict[int, list[str]] = collections.defaultdict(list)
    queue: asyncio.Queue[tuple[int, tuple[int, int]]] = asyncio.Queue()
    for n, job in enumerate(jobs):
        queue.put_nowait((n, job))

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            n, (doc, question) = queue.get_nowait()
            body = {
                "model": "docs-chat",
                "max_tokens": 2,
                "messages": [
                    {"role": "system", "content": documents[doc]},
                    {"role": "user", "content": f"Question {question} about this document?"},
                ],
            }
            response = await client.post(f"{urls[n % 2]}/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
            served[doc].append(response.headers["x-router-backend"])

    headers = {"Authorization": f"Bearer {MASTER_KEY}"}
    async with httpx.AsyncClient(headers=headers, timeout=30) as client:
        await asyncio.gather(*(worker(client) for _ in range(6)))
    return served
