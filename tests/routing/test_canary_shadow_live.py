"""Canary and shadow traffic on the real stack: a uvicorn platform process on the test database, in front of two
mock vLLMs on real sockets (one per model version), configured through registry rows as admin saves them."""

from __future__ import annotations

import concurrent.futures
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
from django.test import Client

from backends.mock_vllm import MockServer
from backends.models import ModelRoute, ServedModel, ShadowComparison
from tests.conftest import AUTH, MASTER_KEY
from tests.factories import backend_create, model_create, pool_create
from tests.live import PlatformProcess

pytestmark = pytest.mark.django_db(transaction=True)

PROMPT = [{"role": "user", "content": "Tell me about canaries"}]


@pytest.fixture
def mocks() -> Iterator[tuple[MockServer, MockServer]]:
    with (
        MockServer(models=["served-v1"], embed_models=[]) as v1,
        MockServer(models=["served-v2"], embed_models=[]) as v2,
    ):
        yield v1, v2


@pytest.fixture
def versions(mocks: tuple[MockServer, MockServer]) -> dict[str, ServedModel]:
    """chat-v1 on pool a (mock v1), chat-v2 on pool b (mock v2), and mychat, served by v1's backends too."""
    v1, v2 = mocks
    a, b = pool_create(name="pool-a"), pool_create(name="pool-b")
    backend_create(pool=a, name="mock-v1", base_url=v1.url)
    backend_create(pool=b, name="mock-v2", base_url=v2.url)
    return {
        "mychat": model_create(pool=a, name="mychat", served_name="served-v1"),
        "chat-v1": model_create(pool=a, name="chat-v1", served_name="served-v1"),
        "chat-v2": model_create(pool=b, name="chat-v2", served_name="served-v2"),
    }


def chat(platform: PlatformProcess, model: str, **extra: object) -> httpx.Response:
    body = {"model": model, "messages": PROMPT, "max_tokens": 3, **extra}
    return httpx.post(f"{platform.url}/v1/chat/completions", json=body, headers=AUTH, timeout=30)


def sequential(platform: PlatformProcess, model: str, n: int = 3) -> list[float]:
    """Each request's latency, one after the other (temperature 0, so that shadows are compared)."""
    latencies = []
    for _ in range(n):
        started = time.perf_counter()
        response = chat(platform, model, temperature=0)
        latencies.append(time.perf_counter() - started)
        assert response.status_code == 200 and response.json()["model"] == model
    return latencies


def flood(platform: PlatformProcess, model: str, n: int = 30) -> float:
    """Seconds to answer n requests sent at once; all must succeed."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
        started = time.perf_counter()
        statuses = list(pool.map(lambda _: chat(platform, model, temperature=0).status_code, range(n)))
        elapsed = time.perf_counter() - started
    assert statuses == [200] * n
    return elapsed


def test_split_live_sticky_and_reweighted_within_two_seconds(
    mocks: tuple[MockServer, MockServer], versions: dict[str, ServedModel]
) -> None:
    v1, v2 = mocks
    # given mychat -> 50 % chat-v2 (the rest on mychat itself, i.e. v1's backends), sticky per user
    ModelRoute.objects.create(model=versions["mychat"], kind="split", target=versions["chat-v2"], percent=50)
    versions["mychat"].split_sticky_key = "user"
    versions["mychat"].save()
    with PlatformProcess(master_key=MASTER_KEY) as platform:
        served: dict[str, set[str]] = {}
        for i in range(60):
            response = chat(platform, "mychat", user=f"user-{i % 30}")
            assert response.status_code == 200, response.text
            assert response.json()["model"] == "mychat"
            served.setdefault(f"user-{i % 30}", set()).add(response.headers.get("x-router-model", "mychat"))
        # then every user stayed on one version, and both versions served
        assert all(len(s) == 1 for s in served.values()), served
        assert Counter(next(iter(s)) for s in served.values()).keys() == {"mychat", "chat-v2"}
        assert v1.stats.total_requests > 0 and v2.stats.total_requests > 0
        # when the operator moves the whole split to chat-v2 (a save, as admin does)
        route = ModelRoute.objects.get()
        route.percent = 100
        route.save()
        # then within 2 s every request is served by chat-v2
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            if all(chat(platform, "mychat").headers.get("x-router-model") == "chat-v2" for _ in range(5)):
                break
            time.sleep(0.05)
        else:
            pytest.fail("the new split was not in effect within 2 s")
        before = v1.stats.total_requests
        assert {chat(platform, "mychat", user=f"user-{i}").headers["x-router-model"] for i in range(20)} == {"chat-v2"}
        assert v1.stats.total_requests == before


def test_shadow_live_slow_shadow_bounded_and_compared_in_admin(
    mocks: tuple[MockServer, MockServer], versions: dict[str, ServedModel], admin_client: Client
) -> None:
    _, v2 = mocks
    # given chat-v1 mirrored (100 %) to a chat-v2 that takes 1.5 s per answer, one mirror at a time, two waiting
    ModelRoute.objects.create(model=versions["chat-v1"], kind="shadow", target=versions["chat-v2"], percent=100)
    v2.config.latency_s = 1.5
    env = {"ROUTER_SHADOW_CONCURRENCY": "1", "ROUTER_SHADOW_QUEUE": "2", "ROUTER_SHADOW_FLUSH_S": "0.2"}
    with PlatformProcess(master_key=MASTER_KEY, env=env) as platform:
        # unloaded figure: chat-v2 called directly takes its 1.5 s
        started = time.perf_counter()
        assert chat(platform, "chat-v2").status_code == 200
        assert time.perf_counter() - started >= 1.5
        # baseline: mychat, on the same backend as chat-v1 but without a shadow
        base_sequential = sequential(platform, "mychat")
        base_flood = flood(platform, "mychat")
        # when clients call chat-v1 one after the other, the shadow never delays them: a request that waited for
        # its mirror would take the shadow's 1.5 s at least (the margins are wide so that a loaded machine's
        # scheduling cannot fail the test; what it catches is a wait on the shadow, not a slow machine)
        window_start = time.monotonic()
        shadowed_sequential = sequential(platform, "chat-v1")
        assert max(shadowed_sequential) < max(base_sequential) + 1.0, (shadowed_sequential, base_sequential)
        # and a flood of 30 concurrent requests is not held behind the mirrors (one at a time, 1.5 s each: 45 s if
        # it were), while most mirrors drop
        shadowed_flood = flood(platform, "chat-v1")
        assert shadowed_flood < base_flood * 2 + 1.0, (shadowed_flood, base_flood)
        window_s = time.monotonic() - window_start
        # the mirrors are sent at most one at a time; wait for the queue to drain and the rollup to be written
        deadline = time.monotonic() + 15
        row = None
        while time.monotonic() < deadline:
            row = ShadowComparison.objects.filter(primary="chat-v1", shadow="chat-v2").first()
            if row is not None and row.mirrored + row.dropped == 33:
                break
            time.sleep(0.2)
        assert row is not None and row.mirrored + row.dropped == 33, row and row.__dict__
        # 3 + 30 mirrors asked for; one running (each takes 1.5 s) and two waiting: the rest were dropped
        assert row.dropped > 0
        assert row.mirrored <= 1 + 2 + window_s / 1.5, (row.mirrored, window_s)
        assert row.errors == 0 and row.compared == row.mirrored and row.matched == row.mirrored
        assert row.shadow_latency_ms_sum > row.primary_latency_ms_sum
        assert v2.stats.total_requests == 1 + row.mirrored
    # and admin shows the pair
    page = admin_client.get("/admin/backends/shadowcomparison/").content.decode()
    assert "chat-v1" in page and "chat-v2" in page and f"100.0 % of {row.compared}" in page
