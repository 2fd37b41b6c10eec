"""Dispatch: circuit breaking, fallback pools, 503/429, retries and their budget, drain, degraded-last."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from backends.mock_vllm import MockServer, MockVLLM, await_until
from backends.snapshot import ModelSnap, PoolSnap
from routing.dispatch import Dispatcher
from routing.gateway import Gateway
from routing.health import CircuitBreakers, CircuitState, RetryBudget
from tests.conftest import AUTH
from tests.factories import backend_snap, registry_snap
from tests.live import serve_in_thread
from tests.routing.conftest import HostRouter

CHAT = {"model": "chat-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
MODELS: dict[str, Any] = {"models": ["served-chat", "served-text"], "embed_models": ["served-embed"]}


class Clock:
    """A manual clock for breakers and budgets."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _client(gateway: Gateway) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway), base_url="http://router", headers=AUTH)


# --- circuit breaker ---------------------------------------------------------------------------------------------


def test_circuit_opens_after_threshold_half_opens_then_closes() -> None:
    clock = Clock()
    breakers = CircuitBreakers(threshold=3, cooldown_s=10, clock=clock)
    # given two failures: still closed
    breakers.failure("b1", "boom")
    breakers.failure("b1", "boom")
    assert breakers.state("b1") is CircuitState.CLOSED and breakers.allows("b1")
    # when the third fails: open, no traffic
    breakers.failure("b1", "boom")
    assert breakers.state("b1") is CircuitState.OPEN and not breakers.allows("b1")
    # after the cool-down: one trial only
    clock.now += 10
    assert breakers.allows("b1")
    breakers.acquire("b1")
    assert breakers.state("b1") is CircuitState.HALF_OPEN and not breakers.allows("b1")
    # a failed trial re-opens it
    breakers.failure("b1", "still down")
    assert breakers.state("b1") is CircuitState.OPEN and not breakers.allows("b1")
    # a successful trial closes it
    clock.now += 10
    breakers.acquire("b1")
    breakers.success("b1")
    assert breakers.state("b1") is CircuitState.CLOSED and breakers.allows("b1")
    assert [t.new for t in breakers.transitions] == ["open", "half_open", "open", "half_open", "closed"]


async def test_dead_backend_leaves_rotation_within_a_few_requests(make_gateway: Callable[..., Gateway]) -> None:
    # given a pool of a dead backend (connection refused) and a healthy one, threshold 3
    healthy = MockVLLM(**MODELS)
    router = HostRouter({"good": healthy})
    gateway = make_gateway(
        registry=registry_snap(
            backends=[backend_snap("dead", base_url="http://dead"), backend_snap("good", base_url="http://good")]
        ),
        transport=router,
    )
    gateway.dispatcher.circuits.threshold = 3
    async with _client(gateway) as client:
        # when 20 requests are made, all succeed (retried on the healthy one)
        for _ in range(20):
            assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
    # then the dead backend was tried only until its circuit opened
    assert router.requests.count("dead") == 3
    assert gateway.dispatcher.circuits.state("dead") is CircuitState.OPEN


# --- fallback and no backend ---------------------------------------------------------------------------------------


async def test_fallback_pool_used_when_own_pool_unusable(make_gateway: Callable[..., Gateway]) -> None:
    mock = MockVLLM(**MODELS)
    fallback = PoolSnap("p2", "round_robin", True, (backend_snap("f1", pool="p2", base_url="http://f1"),))
    model = ModelSnap("chat-model", "served-chat", "chat", "p1", ("p2",), 2048, 0)
    registry = registry_snap(backends=[backend_snap("b1", state="draining")], models=[model], extra_pools=[fallback])
    gateway = make_gateway(registry=registry, transport=HostRouter({"f1": mock}))
    async with _client(gateway) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200 and response.headers["x-router-backend"] == "f1"


async def test_503_with_retry_after_names_the_model(make_gateway: Callable[..., Gateway]) -> None:
    registry = registry_snap(backends=[backend_snap("b1", status="unhealthy"), backend_snap("b2", state="disabled")])
    gateway = make_gateway(registry=registry, transport=HostRouter({}))
    async with _client(gateway) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 503 and response.headers["retry-after"]
    assert "chat-model" in response.json()["error"]["message"]


async def test_degraded_backends_used_only_when_no_healthy_one(make_gateway: Callable[..., Gateway]) -> None:
    mocks = {"d": MockVLLM(**MODELS), "h": MockVLLM(**MODELS)}
    registry = registry_snap(
        backends=[backend_snap("d", base_url="http://d", status="degraded"), backend_snap("h", base_url="http://h")]
    )
    gateway = make_gateway(registry=registry, transport=HostRouter(mocks))
    async with _client(gateway) as client:
        served = {(await client.post("/v1/chat/completions", json=CHAT)).headers["x-router-backend"] for _ in range(10)}
    assert served == {"h"}
    only_degraded = registry_snap(backends=[backend_snap("d", base_url="http://d", status="degraded")])
    gateway = make_gateway(registry=only_degraded, transport=HostRouter(mocks))
    async with _client(gateway) as client:
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200


# --- admission -------------------------------------------------------------------------------------------------


async def test_concurrency_limit_queues_then_429(make_gateway: Callable[..., Gateway]) -> None:
    # given one backend that takes 1 request at a time, 0.8 s each, a queue of 1 waiting 0.1 s at most
    mock = MockVLLM(latency_s=0.8, **MODELS)
    registry = registry_snap(backends=[backend_snap("b1", base_url="http://b1", max_concurrent_requests=1)])
    gateway = make_gateway(registry=registry, transport=HostRouter({"b1": mock}))
    gateway.dispatcher.queue_max = 1
    gateway.dispatcher.queue_timeout_s = 0.1
    async with _client(gateway) as client:
        # when three requests arrive together
        results = await asyncio.gather(*(client.post("/v1/chat/completions", json=CHAT) for _ in range(3)))
    codes = sorted(r.status_code for r in results)
    # then one is served, one waited and timed out, one found the queue full: 429 with Retry-After
    assert codes == [200, 429, 429]
    rejected = [r for r in results if r.status_code == 429]
    assert all(r.headers["retry-after"] == "1" for r in rejected)
    assert {r.json()["error"]["code"] for r in rejected} == {"backend_capacity"}
    assert mock.stats.total_requests == 1


async def test_queued_request_is_served_when_a_slot_frees(make_gateway: Callable[..., Gateway]) -> None:
    mock = MockVLLM(latency_s=0.05, **MODELS)
    registry = registry_snap(backends=[backend_snap("b1", base_url="http://b1", max_concurrent_requests=1)])
    gateway = make_gateway(registry=registry, transport=HostRouter({"b1": mock}))
    async with _client(gateway) as client:
        results = await asyncio.gather(*(client.post("/v1/chat/completions", json=CHAT) for _ in range(4)))
    assert [r.status_code for r in results] == [200] * 4
    assert gateway.dispatcher.in_flight["b1"] == 0 and gateway.dispatcher.waiting == 0


# --- retries -----------------------------------------------------------------------------------------------------


async def test_retry_budget_caps_retries(make_gateway: Callable[..., Gateway]) -> None:
    # given a pool where one backend always answers 503 and a budget of 2 retries
    bad, good = MockVLLM(fail_status=503, **MODELS), MockVLLM(**MODELS)
    registry = registry_snap(
        backends=[backend_snap("bad", base_url="http://bad"), backend_snap("good", base_url="http://good")]
    )
    gateway = make_gateway(registry=registry, transport=HostRouter({"bad": bad, "good": good}))
    dispatcher = gateway.dispatcher
    dispatcher.retry_budget = RetryBudget(ratio=0.0, min_retries=2)
    dispatcher.circuits.threshold = 1000  # keep the bad backend in rotation for this test
    async with _client(gateway) as client:
        codes = [(await client.post("/v1/chat/completions", json=CHAT)).status_code for _ in range(10)]
    # then exactly two requests that hit the bad backend were retried; the other bad picks failed with 503
    assert dispatcher.retries == 2
    assert dispatcher.retry_budget.denied == bad.stats.total_requests - 2
    assert codes.count(503) == bad.stats.total_requests - 2
    assert codes.count(200) == good.stats.total_requests


def test_retry_budget_allows_a_fraction_of_recent_requests() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.2, min_retries=0, window_s=10, clock=clock)
    for _ in range(50):
        budget.request()
    assert sum(budget.try_retry() for _ in range(20)) == 10
    clock.now += 11  # the window moved on
    assert not budget.try_retry()


async def test_no_retry_after_first_byte(make_gateway: Callable[..., Gateway]) -> None:
    # given two backends that die after 2 streamed tokens
    with MockServer(die_after_tokens=2, **MODELS) as a, MockServer(die_after_tokens=2, **MODELS) as b:
        gateway = make_gateway(
            registry=registry_snap(backends=[backend_snap("a", base_url=a.url), backend_snap("b", base_url=b.url)])
        )
        with serve_in_thread(gateway) as server:
            async with httpx.AsyncClient(base_url=server.url, headers=AUTH) as client:
                response = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 10, "stream": True})
        # then the client got an error event, and only one backend ever saw the request
        assert "event: error" in response.text
        assert a.stats.total_requests + b.stats.total_requests == 1
        assert gateway.dispatcher.retries == 0


# --- drain ---------------------------------------------------------------------------------------------------------


async def test_drain_lets_running_stream_finish_while_new_requests_go_elsewhere(
    make_gateway: Callable[..., Gateway],
) -> None:
    with MockServer(token_delay_s=0.02, **MODELS) as a, MockServer(**MODELS) as b:
        backends = [backend_snap("a", base_url=a.url), backend_snap("b", base_url=b.url)]
        gateway = make_gateway(registry=registry_snap(backends=backends, strategy="round_robin"))
        with serve_in_thread(gateway) as server:
            async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=10) as client:
                async with client.stream(
                    "POST", "/v1/chat/completions", json={**CHAT, "max_tokens": 15, "stream": True}
                ) as stream:
                    assert stream.headers["x-router-backend"] == "a"
                    # when the operator drains `a` while its stream runs
                    drained = registry_snap(
                        backends=[backend_snap("a", base_url=a.url, state="draining"), backends[1]], version=2
                    )
                    gateway.registry.snapshot = drained
                    assert gateway.dispatcher.in_flight["a"] == 1
                    others = [await client.post("/v1/chat/completions", json=CHAT) for _ in range(3)]
                    body = b"".join([chunk async for chunk in stream.aiter_bytes()])
        # then new requests went to b and the running stream finished normally
        assert {r.headers["x-router-backend"] for r in others} == {"b"}
        assert body.endswith(b"data: [DONE]\n\n")
        assert await await_until(lambda: gateway.dispatcher.in_flight["a"] == 0, timeout=1.0)


def test_dispatcher_runtime_stats_show_in_flight_and_circuit() -> None:
    dispatcher = Dispatcher()
    dispatcher.in_flight["b1"] += 2
    dispatcher.circuits.failure("b2", "x")
    stats = dispatcher.runtime_stats()
    assert stats["b1"]["in_flight"] == 2 and stats["b2"]["circuit"] == "closed"


@pytest.mark.parametrize("status", [500, 504])
async def test_backend_5xx_counts_against_its_circuit(make_gateway: Callable[..., Gateway], status: int) -> None:
    mock = MockVLLM(fail_status=status, **MODELS)
    gateway = make_gateway(
        registry=registry_snap(backends=[backend_snap("b1", base_url="http://b1")]), transport=HostRouter({"b1": mock})
    )
    gateway.dispatcher.circuits.threshold = 2
    async with _client(gateway) as client:
        codes = [(await client.post("/v1/chat/completions", json=CHAT)).status_code for _ in range(4)]
    assert codes == [502, 502, 503, 503]
    assert mock.stats.total_requests == 2


class _ResetTransport(httpx.AsyncBaseTransport):
    """Resets the connection of requests to host `reset` after they were sent (a backend dying mid-request)."""

    def __init__(self, good: MockVLLM) -> None:
        self.good = httpx.ASGITransport(app=good)
        self.reset_hits = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == "reset":
            self.reset_hits += 1
            raise httpx.ReadError("[Errno 104] Connection reset by peer", request=request)
        return await self.good.handle_async_request(request)


async def test_request_in_flight_on_a_dying_backend_is_retried(make_gateway: Callable[..., Gateway]) -> None:
    transport = _ResetTransport(MockVLLM(**MODELS))
    registry = registry_snap(
        backends=[backend_snap("reset", base_url="http://reset"), backend_snap("good", base_url="http://good")]
    )
    gateway = make_gateway(registry=registry, transport=transport)
    async with _client(gateway) as client:
        codes = [(await client.post("/v1/chat/completions", json=CHAT)).status_code for _ in range(6)]
    assert codes == [200] * 6 and transport.reset_hits >= 1
