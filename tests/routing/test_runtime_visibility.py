"""Runtime visibility: admin's pool page and /api/pools/ show live routing state; views merge across processes."""

from __future__ import annotations

import asyncio
import os
import uuid
from typing import Any

import httpx
import pytest
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient

from backends.mock_vllm import MockServer
from governance.metrics import render_metrics
from routing.dispatch import Dispatcher, RequestContext
from routing.runtime import KEY_PREFIX, RuntimePublisher, merge_views, runtime_stats_collect
from tests.conftest import MASTER_KEY
from tests.factories import backend_create, backend_snap, pool_create, registry_snap


def test_merge_views_sums_in_flight_and_keeps_worst_circuit() -> None:
    merged = merge_views(
        [
            {"b1": {"in_flight": 2, "circuit": "closed", "latency_ms": 10.0}},
            {"b1": {"in_flight": 3, "circuit": "open", "latency_ms": 30.0, "kv_cache_usage": 0.5}},
        ]
    )
    assert merged["b1"]["in_flight"] == 5 and merged["b1"]["circuit"] == "open"
    assert merged["b1"]["latency_ms"] == 20.0 and merged["b1"]["kv_cache_usage"] == 0.5
    assert merged["b1"]["processes"] == 2 and merged["b1"]["circuits_open"] == 1


@pytest.mark.django_db
def test_pool_page_and_api_show_live_state(admin_client: Client) -> None:
    name = f"node-{uuid.uuid4().hex[:8]}"
    pool = pool_create(name="gpu-live")
    backend_create(pool=pool, name=name, state="draining")
    dispatcher = Dispatcher()  # alive in this process, as the gateway's is in `make run`
    dispatcher.in_flight[name] += 2
    for _ in range(3):
        dispatcher.circuits.failure(name, "boom")
    page = admin_client.get(reverse("admin:backends_gpupool_change", args=[pool.pk])).content.decode()
    assert name in page and "open" in page and "Draining" in page and "<td>2</td>" in page
    # a backend with requests in flight cannot be deleted yet
    backend_page = admin_client.get(reverse("admin:backends_backend_changelist")).content.decode()
    assert 'class="field-in_flight">2</td>' in backend_page
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {MASTER_KEY}")
    pools = api.get("/api/pools/").json()
    live = next(b for p in pools if p["name"] == "gpu-live" for b in p["backends"])
    assert live["in_flight"] == 2 and live["circuit"] == "open" and live["state"] == "draining"
    del dispatcher


@pytest.mark.django_db
def test_backend_with_requests_in_flight_cannot_be_deleted(admin_client: Client) -> None:
    name = f"node-{uuid.uuid4().hex[:8]}"
    backend = backend_create(name=name, state="draining")
    dispatcher = Dispatcher()
    dispatcher.in_flight[name] += 1
    url = reverse("admin:backends_backend_delete", args=[backend.pk])
    assert admin_client.get(url).status_code == 403
    dispatcher.in_flight[name] -= 1
    assert admin_client.get(url).status_code == 200


@pytest.mark.services
@pytest.mark.skipif(not os.environ.get("REDIS_URL"), reason="needs REDIS_URL (a real Redis)")
async def test_runtime_views_published_through_redis_merge() -> None:
    import redis.asyncio as aioredis

    name = f"node-{uuid.uuid4().hex[:8]}"
    other = Dispatcher()
    other.in_flight[name] += 4
    publisher = RuntimePublisher(other, redis_url=os.environ["REDIS_URL"], interval_s=0.05)
    client = aioredis.Redis.from_url(os.environ["REDIS_URL"])
    # simulate another process: publish under a foreign key
    import orjson

    await client.set(KEY_PREFIX + "other-host:1", orjson.dumps(other.runtime_stats()), ex=5)
    publisher.ensure_running()
    import asyncio

    await asyncio.sleep(0.1)
    await publisher.aclose()
    merged = await asyncio.to_thread(runtime_stats_collect, os.environ["REDIS_URL"])
    # the foreign key's 4 plus this process's own dispatcher (4, counted once locally)
    assert merged[name]["in_flight"] == 8
    await client.delete(KEY_PREFIX + "other-host:1")
    await client.aclose()


@pytest.mark.django_db(transaction=True)
def test_prefix_index_and_engine_hit_rate_are_visible(admin_client: Client) -> None:
    """Given a prefix_aware pool that routed a prompt three times and scraped its engine's prefix-cache counters,
    the pool page, /api/pools/ and /metrics show the index size, the estimated and the engine's hit rates."""
    name = f"px-{uuid.uuid4().hex[:8]}"
    body = {"messages": [{"role": "system", "content": "a long shared document " * 40}]}
    with MockServer(models=["served-chat"]) as mock:
        pool = pool_create(name="gpu-prefix", routing_strategy="prefix_aware")
        backend_create(pool=pool, name=name, base_url=mock.url)
        snapshot = registry_snap(backends=[backend_snap(name, base_url=mock.url)], strategy="prefix_aware")
        dispatcher = Dispatcher()
        context = RequestContext(endpoint="chat.completions", data=body)
        # the engine saw the prompt twice: its second prefill hit the cache
        chat = {"model": "served-chat", "messages": body["messages"], "max_tokens": 1}
        for _ in range(2):
            assert httpx.post(f"{mock.url}/v1/chat/completions", json=chat).status_code == 200

        async def route_and_scrape() -> None:
            for _ in range(3):
                backend, _ = dispatcher.pick(snapshot.models["chat-model"], snapshot, set(), context)
                assert backend is not None and backend.name == name
            await dispatcher.scraper.aclose()
            async with httpx.AsyncClient() as client:
                await dispatcher.scraper.scrape_once([backend_snap(name, base_url=mock.url)], client)

        asyncio.run(route_and_scrape())

    stats: dict[str, Any] = dispatcher.runtime_stats()[name]
    assert stats["prefix_index_blocks"] > 0 and stats["prefix_estimated_hit_ratio"] == pytest.approx(2 / 3)
    assert 0 < stats["engine_prefix_cache_hit_rate"] < 1
    page = admin_client.get(reverse("admin:backends_gpupool_change", args=[pool.pk])).content.decode()
    assert f"{stats['prefix_index_blocks']:,} blocks (67 %)" in page
    assert f"{stats['engine_prefix_cache_hit_rate'] * 100:.0f} %" in page
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {MASTER_KEY}")
    live = next(b for p in api.get("/api/pools/").json() if p["name"] == "gpu-prefix" for b in p["backends"])
    assert live["prefix_index_blocks"] == stats["prefix_index_blocks"]
    assert live["engine_prefix_cache_hit_rate"] == stats["engine_prefix_cache_hit_rate"]
    text = render_metrics().decode()
    assert f'llm_backend_prefix_index_blocks{{backend="{name}",pool="gpu-prefix"}}' in text
    assert f'llm_backend_engine_prefix_cache_hit_ratio{{backend="{name}",pool="gpu-prefix"}}' in text
