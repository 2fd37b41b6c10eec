"""Fair admission with two keys through the gateway: priority classes, fairness in a full pool, shedding, vLLM's
`priority` sent only to pools running its priority scheduler."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import httpx
import pytest

from backends.mock_vllm import MockVLLM, await_until
from backends.snapshot import PoolSnap
from governance.models import key_hash
from governance.priority import Flow, Priority
from governance.snapshot import KeySnap, KeySnapshot
from routing.dispatch import Dispatcher
from routing.gateway import Gateway
from routing.registry import RegistryCache
from tests.factories import backend_snap, registry_snap
from tests.routing.conftest import HostRouter, assert_openai_error

MODELS: dict[str, Any] = {"models": ["served-chat", "served-text"], "embed_models": ["served-embed"]}
CHAT = {"model": "chat-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
FLOOD, WEB, PAGER = "sk-flood", "sk-web", "sk-pager"


def _key(key_id: int, name: str, **fields: Any) -> KeySnap:
    return KeySnap(
        id=key_id,
        name=name,
        allowed_models=None,
        expires_at=None,
        rpm_limit=None,
        tpm_limit=None,
        daily_token_budget=None,
        **fields,
    )


KEYS = {
    FLOOD: _key(1, "flood"),
    WEB: _key(2, "web"),
    PAGER: _key(3, "pager", priority_max=Priority.CRITICAL),
}


def _gateway(
    make_gateway: Callable[..., Gateway], mock: MockVLLM, *, limit: int = 1, priority_scheduling: bool = False
) -> Gateway:
    """One backend taking `limit` requests at a time, in a pool that runs vLLM's priority scheduler or not."""
    backend = backend_snap("b1", base_url="http://b1", max_concurrent_requests=limit)
    registry = registry_snap(
        backends=[],
        extra_pools=[PoolSnap("p1", "round_robin", True, (backend,), priority_scheduling=priority_scheduling)],
    )
    gateway = make_gateway(registry=registry, transport=HostRouter({"b1": mock}))
    gateway.keys = RegistryCache.static(KeySnapshot(1, {key_hash(secret): key for secret, key in KEYS.items()}))
    return gateway


def _client(gateway: Gateway) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway), base_url="http://router", timeout=30)


async def _post(
    client: httpx.AsyncClient, secret: str, done: list[tuple[str, int, float]] | None = None, **extra: Any
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {secret}", **extra.pop("headers", {})}
    response = await client.post("/v1/chat/completions", json={**CHAT, **extra}, headers=headers)
    if done is not None:
        done.append((secret, response.status_code, time.monotonic()))
    return response


async def test_a_key_with_one_request_is_not_served_behind_a_flooding_keys_backlog(
    make_gateway: Callable[..., Gateway],
) -> None:
    # given a backend taking one request at a time, and one key with six requests sent together (five wait)
    mock = MockVLLM(latency_s=0.05, **MODELS)
    gateway = _gateway(make_gateway, mock)
    done: list[tuple[str, int, float]] = []
    async with _client(gateway) as client:
        flood = [asyncio.create_task(_post(client, FLOOD, done)) for _ in range(6)]
        assert await await_until(lambda: gateway.dispatcher.waiting == 5)
        # when a second key sends one request
        web = await _post(client, WEB, done)
        await asyncio.gather(*flood)
    # then it is served right after the flood's request in service and its next one, not after all six
    assert web.status_code == 200 and web.headers.get("x-priority") is None
    order = [secret for secret, _, _ in done]
    assert order.index(WEB) <= 2, order
    assert [status for _, status, _ in done] == [200] * 7
    assert gateway.dispatcher.in_flight["b1"] == 0 and gateway.dispatcher.waiting == 0


async def test_two_flooding_keys_of_equal_weight_share_the_backend(make_gateway: Callable[..., Gateway]) -> None:
    # given two keys each sending twelve requests at once to a backend taking one at a time
    mock = MockVLLM(latency_s=0.05, **MODELS)
    gateway = _gateway(make_gateway, mock)
    done: list[tuple[str, int, float]] = []
    async with _client(gateway) as client:
        first = [asyncio.create_task(_post(client, FLOOD, done)) for _ in range(12)]
        assert await await_until(lambda: gateway.dispatcher.waiting == 11)
        second = [asyncio.create_task(_post(client, WEB, done)) for _ in range(12)]
        await asyncio.gather(*first, *second)
    # then, while both wait, they are answered in turn: the first 12 answers are half each (give or take the one
    # the flood had in service before the second key came)
    assert [status for _, status, _ in done] == [200] * 24
    shares = Counter(secret for secret, _, _ in done[:12])
    assert abs(shares[FLOOD] - shares[WEB]) <= 2, shares


async def test_a_critical_request_goes_before_queued_standard_ones_and_a_key_cannot_exceed_its_ceiling(
    make_gateway: Callable[..., Gateway],
) -> None:
    # given a flood of standard requests waiting for the backend
    mock = MockVLLM(latency_s=0.2, **MODELS)
    gateway = _gateway(make_gateway, mock)
    done: list[tuple[str, int, float]] = []
    async with _client(gateway) as client:
        flood = [asyncio.create_task(_post(client, FLOOD, done)) for _ in range(5)]
        assert await await_until(lambda: gateway.dispatcher.waiting == 4)
        # when a key allowed `critical` asks for it (header) and a key whose ceiling is standard asks too (body)
        web = asyncio.create_task(_post(client, WEB, done, priority="critical"))
        assert await await_until(lambda: gateway.dispatcher.waiting == 5)
        pager = await _post(client, PAGER, done, headers={"x-priority": "critical"})
        await asyncio.gather(*flood, web)
    # then the critical one is served next, ahead of everything queued, and says so
    assert pager.status_code == 200 and pager.headers["x-priority"] == "critical"
    assert [secret for secret, _, _ in done][1] == PAGER
    # and the other ran as standard (clamped, not refused): behind the flood's first queued one
    assert web.result().status_code == 200 and web.result().headers["x-priority"] == "standard"
    order = [secret for secret, _, _ in done]
    assert order.index(WEB) > order.index(PAGER)


async def test_a_full_queue_sheds_the_floods_newest_request_with_a_quick_429(
    make_gateway: Callable[..., Gateway],
) -> None:
    # given a backend busy with the flood's first request and a queue of two filled by the flood
    mock = MockVLLM(latency_s=0.3, **MODELS)
    gateway = _gateway(make_gateway, mock)
    gateway.dispatcher.queue_max = 2
    done: list[tuple[str, int, float]] = []
    async with _client(gateway) as client:
        flood = [asyncio.create_task(_post(client, FLOOD, done)) for _ in range(3)]
        assert await await_until(lambda: gateway.dispatcher.waiting == 2)
        # when another key's request arrives, and then the flood sends one more
        started = time.monotonic()
        web = asyncio.create_task(_post(client, WEB, done))
        assert await await_until(lambda: len(done) == 1)
        refused = await _post(client, FLOOD, done)
        await asyncio.gather(*flood, web)
    # then the flood's newest queued request was shed at once (429, Retry-After) to make room
    secret, status, at = done[0]
    assert (secret, status) == (FLOOD, 429) and at - started < 0.25
    shed = next(t.result() for t in flood if t.result().status_code == 429)
    assert_openai_error(shed, 429, type="rate_limit_error", param=None, code="backend_capacity")
    assert shed.headers["retry-after"] == "1"
    # the flood's next one was refused (it would have been served last), and the other key was served
    assert refused.status_code == 429
    assert web.result().status_code == 200
    assert sorted(t.result().status_code for t in flood) == [200, 200, 429]
    assert mock.stats.total_requests == 3


@pytest.mark.parametrize(
    ("secret", "asked", "sent"),
    [
        (PAGER, {"headers": {"x-priority": "critical"}}, -10),
        (PAGER, {"priority": -3}, -10),
        (WEB, {"headers": {"x-priority": "critical"}}, 0),  # clamped to its ceiling
        (WEB, {"priority": "batch"}, 10),
        (WEB, {}, 0),
        (WEB, {"priority": 7, "headers": {"x-priority": "standard"}}, 0),  # the header wins
    ],
)
async def test_the_class_is_sent_as_vllms_priority_to_a_pool_running_its_priority_scheduler(
    make_gateway: Callable[..., Gateway], secret: str, asked: dict[str, Any], sent: int
) -> None:
    mock = MockVLLM(**MODELS)
    gateway = _gateway(make_gateway, mock, limit=0, priority_scheduling=True)
    async with _client(gateway) as client:
        response = await _post(client, secret, **asked)
    assert response.status_code == 200, response.text
    assert mock.stats.last_request["priority"] == sent
    assert mock.stats.last_request["model"] == "served-chat"


async def test_the_priority_field_is_removed_for_other_pools(make_gateway: Callable[..., Gateway]) -> None:
    # given a pool whose vLLM runs the default FCFS scheduler
    mock = MockVLLM(**MODELS)
    gateway = _gateway(make_gateway, mock, limit=0)
    async with _client(gateway) as client:
        # when a request carries vLLM's priority field
        response = await _post(client, PAGER, priority=-5)
    # then it is served, in the class it asked for, and the backend never sees the field
    assert response.status_code == 200 and response.headers["x-priority"] == "critical"
    assert "priority" not in mock.stats.last_request


@pytest.mark.parametrize(
    ("asked", "param"),
    [({"priority": "urgent"}, "priority"), ({"priority": 1.5}, "priority"), ({"headers": {"x-priority": "p0"}}, None)],
)
async def test_an_unknown_priority_is_a_400(
    make_gateway: Callable[..., Gateway], asked: dict[str, Any], param: str | None
) -> None:
    mock = MockVLLM(**MODELS)
    gateway = _gateway(make_gateway, mock, limit=0)
    async with _client(gateway) as client:
        response = await _post(client, WEB, **asked)
    assert_openai_error(response, 400, type="invalid_request_error", param=param, code="invalid_priority")
    assert mock.stats.total_requests == 0


async def test_a_waiter_cancelled_after_a_slot_was_handed_to_it_gives_the_slot_back() -> None:
    # given a backend taking one request, held, and a request waiting for it
    registry = registry_snap(backends=[backend_snap("b1", max_concurrent_requests=1)])
    model = registry.models["chat-model"]
    dispatcher = Dispatcher()
    try:
        held = await dispatcher.acquire(model, registry, set())
        assert held is not None
        waiter = asyncio.create_task(dispatcher.acquire(model, registry, set(), flow=Flow("k")))
        assert await await_until(lambda: dispatcher.waiting == 1)
        # when the slot is released (handed to the waiter) and the waiter is cancelled before it resumes
        dispatcher.done(held, True)
        assert dispatcher.in_flight["b1"] == 1 and dispatcher.waiting == 0  # handed over, not free
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        # then the slot is free again
        assert dispatcher.in_flight["b1"] == 0
        assert await dispatcher.acquire(model, registry, set()) is not None
    finally:
        await dispatcher.aclose()


async def test_a_queued_request_takes_a_slot_freed_in_its_models_fallback_pool() -> None:
    # given a model whose own pool and fallback pool each take one request; both busy, one request waiting
    spare = backend_snap("s1", pool="spare", base_url="http://s1", max_concurrent_requests=1)
    registry = registry_snap(
        backends=[backend_snap("b1", base_url="http://b1", max_concurrent_requests=1)],
        extra_pools=[PoolSnap("spare", "round_robin", True, (spare,))],
    )
    model = replace(registry.models["chat-model"], fallback_pools=("spare",))
    dispatcher = Dispatcher()
    try:
        own = await dispatcher.acquire(model, registry, set())
        fallback = await dispatcher.acquire(model, registry, set())
        assert own is not None and fallback is not None and (own.name, fallback.name) == ("b1", "s1")
        waiter = asyncio.create_task(dispatcher.acquire(model, registry, set()))
        assert await await_until(lambda: dispatcher.waiting == 1)
        # when the fallback pool's slot frees
        dispatcher.done(fallback, True)
        # then the waiter gets it
        assert (await asyncio.wait_for(waiter, 1)).name == "s1"  # type: ignore[union-attr]
    finally:
        await dispatcher.aclose()
