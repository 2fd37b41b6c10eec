"""The request log's routing side: every usage event says how many backends were tried, why each failed attempt
failed, how long the request waited for a backend slot, and the trace id the Lifecycle carries."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from backends.mock_vllm import MockVLLM
from core import telemetry
from routing.gateway import Gateway
from tests.conftest import AUTH, usage_events
from tests.factories import backend_snap, registry_snap
from tests.routing.conftest import HostRouter

CHAT = {"model": "chat-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
MODELS: dict[str, Any] = {"models": ["served-chat", "served-text"], "embed_models": ["served-embed"]}
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{CLIENT_TRACE}-00f067aa0ba902b7-01"


def _client(gateway: Gateway) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway), base_url="http://router", headers=AUTH)


async def test_a_failed_attempt_is_in_the_retry_history(make_gateway: Callable[..., Gateway]) -> None:
    # given a pool of a backend that refuses connections ("down": no app at its host) and a working one
    registry = registry_snap(
        backends=[backend_snap("down", base_url="http://down"), backend_snap("up", base_url="http://up")]
    )
    gateway = make_gateway(registry=registry, transport=HostRouter({"up": MockVLLM(**MODELS)}))
    # when a few requests are made (round robin sends some to "down" first)
    async with _client(gateway) as client:
        codes = [(await client.post("/v1/chat/completions", json=CHAT)).status_code for _ in range(4)]
    assert codes == [200] * 4
    events = list(usage_events(gateway))
    # then the retried ones name the failed backend and why, and every answer came from "up"
    retried = [e for e in events if e.attempts == 2]
    assert retried, [(e.attempts, e.failures) for e in events]
    assert all(e.failures == (("down", "connect_error"),) for e in retried)
    assert all(e.backend == "up" and e.queue_wait_ms == 0.0 for e in events)
    direct = [e for e in events if e.attempts == 1]
    assert len(direct) + len(retried) == 4 and all(e.failures == () for e in direct)


async def test_a_503_retried_elsewhere_is_named_by_status(make_gateway: Callable[..., Gateway]) -> None:
    sick = MockVLLM(**MODELS)
    sick.config.fail_status = 503
    registry = registry_snap(
        backends=[backend_snap("sick", base_url="http://sick"), backend_snap("ok", base_url="http://ok")]
    )
    gateway = make_gateway(registry=registry, transport=HostRouter({"sick": sick, "ok": MockVLLM(**MODELS)}))
    async with _client(gateway) as client:
        for _ in range(3):
            assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
    reasons = {f for e in usage_events(gateway) for f in e.failures}
    assert reasons == {("sick", "http_503")}


async def test_every_attempt_failing_still_names_them(make_gateway: Callable[..., Gateway]) -> None:
    # given two backends that both refuse connections
    registry = registry_snap(backends=[backend_snap("a", base_url="http://a"), backend_snap("b", base_url="http://b")])
    gateway = make_gateway(registry=registry, transport=HostRouter({}))
    async with _client(gateway) as client:
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 502
    (event,) = usage_events(gateway)
    # then the record has no serving backend but both failed attempts, in order
    assert event.backend == "" and event.attempts == 2
    assert sorted(event.failures) == [("a", "connect_error"), ("b", "connect_error")]


async def test_queue_wait_is_measured(make_gateway: Callable[..., Gateway]) -> None:
    # given one backend taking one request at a time, 0.3 s each
    mock = MockVLLM(latency_s=0.3, **MODELS)
    registry = registry_snap(backends=[backend_snap("b1", base_url="http://b1", max_concurrent_requests=1)])
    gateway = make_gateway(registry=registry, transport=HostRouter({"b1": mock}))
    gateway.dispatcher.queue_timeout_s = 5.0
    # when two requests arrive together
    async with _client(gateway) as client:
        results = await asyncio.gather(*(client.post("/v1/chat/completions", json=CHAT) for _ in range(2)))
    assert [r.status_code for r in results] == [200, 200]
    waits = sorted(e.queue_wait_ms or 0.0 for e in usage_events(gateway))
    # then the first did not wait and the second waited about one request's time
    assert waits[0] == 0.0
    assert 200.0 <= waits[1] < 5000.0


async def test_a_request_refused_after_waiting_records_its_wait(make_gateway: Callable[..., Gateway]) -> None:
    mock = MockVLLM(latency_s=0.5, **MODELS)
    registry = registry_snap(backends=[backend_snap("b1", base_url="http://b1", max_concurrent_requests=1)])
    gateway = make_gateway(registry=registry, transport=HostRouter({"b1": mock}))
    gateway.dispatcher.queue_timeout_s = 0.1
    async with _client(gateway) as client:
        results = await asyncio.gather(*(client.post("/v1/chat/completions", json=CHAT) for _ in range(2)))
    assert sorted(r.status_code for r in results) == [200, 429]
    refused = next(e for e in usage_events(gateway) if e.status == 429)
    assert refused.attempts == 0 and refused.queue_wait_ms is not None and 90.0 <= refused.queue_wait_ms < 450.0


async def test_a_request_never_dispatched_has_no_queue_wait(make_gateway: Callable[..., Gateway]) -> None:
    gateway = make_gateway()
    async with _client(gateway) as client:
        assert (await client.post("/v1/chat/completions", json={"model": "chat-model"})).status_code == 400
    (event,) = usage_events(gateway)
    assert event.queue_wait_ms is None and event.attempts == 0 and event.failures == ()


async def test_the_trace_id_of_a_traced_request_is_recorded(make_gateway: Callable[..., Gateway]) -> None:
    # given tracing on (spans kept in memory) and a client that sends a W3C traceparent
    exporter = InMemorySpanExporter()
    telemetry.install(telemetry.provider_for_tests(exporter))
    try:
        gateway = make_gateway(transport=HostRouter({"mock-a": MockVLLM(**MODELS)}))
        async with _client(gateway) as client:
            traced = await client.post("/v1/chat/completions", json=CHAT, headers={"traceparent": TRACEPARENT})
            assert traced.status_code == 200
            new = await client.post("/v1/chat/completions", json=CHAT)  # no traceparent: a new trace
            assert new.status_code == 200
    finally:
        telemetry.install(None)
    first, second = usage_events(gateway)
    # then the usage record carries the trace id of its request's spans
    assert first.trace_id == CLIENT_TRACE
    roots = {format(span.context.trace_id, "032x") for span in exporter.get_finished_spans() if span.parent is None}
    assert second.trace_id is not None and second.trace_id != CLIENT_TRACE and second.trace_id in roots


async def test_without_tracing_there_is_no_trace_id(make_gateway: Callable[..., Gateway]) -> None:
    gateway = make_gateway(transport=HostRouter({"mock-a": MockVLLM(**MODELS)}))
    async with _client(gateway) as client:
        answer = await client.post("/v1/chat/completions", json=CHAT, headers={"traceparent": TRACEPARENT})
        assert answer.status_code == 200
    (event,) = usage_events(gateway)
    assert event.trace_id is None
