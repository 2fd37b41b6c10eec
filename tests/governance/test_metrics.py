"""Prometheus /metrics: parses with prometheus-client's parser, series move with requests, backend state is read at
scrape time, multiprocess files are merged, and the endpoint is protected."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from backends.mock_vllm import MockConfig, MockVLLM
from governance.events import UsageEvent
from governance.metrics import RequestMetrics, render_metrics
from governance.ratelimit import LocalRateLimiter
from governance.snapshot import KeySnap, KeySnapshot
from governance.usage import BatchUsageWriter
from routing.gateway import Gateway
from routing.registry import RegistryCache
from tests.conftest import AUTH
from tests.factories import backend_create, backend_snap, pool_create, registry_snap
from tests.routing.conftest import HostRouter

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = {"model": "chat-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition text by (name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value (0 when absent)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(client: httpx.AsyncClient, **headers: str) -> Samples:
    answer = await client.get("/metrics", headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    return parse(answer.text)


@pytest.fixture
def metered(make_gateway: Callable[..., Gateway]) -> Callable[..., Gateway]:
    """A gateway whose usage sink is the batched writer (with metrics) over the given backends' transport."""

    def build(**options: Any) -> Gateway:
        gateway = make_gateway(**options)
        gateway.usage = BatchUsageWriter(flush_interval_s=3600, dispatcher=gateway.dispatcher, write=lambda e: len(e))
        return gateway

    return build


def test_metrics_parse_and_move_with_requests(metered: Callable[..., Gateway], mock_vllm: MockVLLM) -> None:
    # given two backends (b1 answers 503, b2 works) and backend rows in the database
    pool = pool_create(name="p1")
    backend_create(pool=pool, name="b1", status="healthy")
    backend_create(pool=pool, name="b2", status="unhealthy", state="draining")
    failing = MockVLLM(MockConfig(models=["served-chat"], fail_status=503))
    gateway = metered(
        registry=registry_snap(
            backends=[backend_snap("b1", base_url="http://b1"), backend_snap("b2", base_url="http://b2")]
        ),
        transport=HostRouter({"b1": failing, "b2": mock_vllm}),
    )
    seen: dict[str, Any] = {"in": 0, "out": 0}

    async def scenario() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway), base_url="http://r") as client:
            seen["before"] = await scrape(client)
            # when requests are made: plain, streamed, and invalid
            for _ in range(4):
                answer = await client.post("/v1/chat/completions", headers=AUTH, json=CHAT)
                assert answer.status_code == 200
                seen["in"] += answer.json()["usage"]["prompt_tokens"]
                seen["out"] += answer.json()["usage"]["completion_tokens"]
            stream = await client.post("/v1/chat/completions", headers=AUTH, json={**CHAT, "stream": True})
            assert stream.status_code == 200
            invalid = await client.post("/v1/chat/completions", headers=AUTH, json={"model": "chat-model"})
            assert invalid.status_code == 400
            seen["after"] = await scrape(client)

    asyncio.run(scenario())
    before, after, tokens_in, tokens_out = seen["before"], seen["after"], seen["in"], seen["out"]

    # then the counters moved by exactly what was done
    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    ok = {"model": "chat-model", "backend": "b2", "status": "200"}
    assert delta("llm_requests_total", **ok) == 5
    assert delta("llm_requests_total", model="none", backend="none", status="400") == 1
    assert delta("llm_request_duration_seconds_count", model="chat-model") == 5
    assert delta("llm_time_to_first_token_seconds_count", model="chat-model") == 1
    assert delta("llm_tokens_total", model="chat-model", direction="in") >= tokens_in > 0
    assert delta("llm_tokens_total", model="chat-model", direction="out") > tokens_out > 0  # plus the stream's
    assert delta("llm_retries_total") == 3  # b1 answered 503 (retried on b2) until its circuit opened after 3
    # and backend state was read at scrape time: health and state from the database, circuit from the dispatcher
    assert value(after, "llm_backend_health_status", backend="b1", pool="p1", status="healthy") == 1
    assert value(after, "llm_backend_health_status", backend="b2", pool="p1", status="healthy") == 0
    assert value(after, "llm_backend_state", backend="b2", pool="p1", state="draining") == 1
    assert value(after, "llm_backend_up", backend="b1", pool="p1") == 1
    assert value(after, "llm_backend_circuit_state", backend="b1", pool="p1", state="open") == 1
    assert value(after, "llm_backend_in_flight", backend="b2", pool="p1") == 0


async def test_rate_limit_rejections_are_counted(metered: Callable[..., Gateway], mock_vllm: MockVLLM) -> None:
    key = KeySnap(
        id=7, name="limited", allowed_models=None, expires_at=None, rpm_limit=1, tpm_limit=None, daily_token_budget=None
    )
    keys = RegistryCache.static(KeySnapshot(version=1, by_hash={_sha("sk-limited"): key}))
    gateway = metered(
        transport=httpx.ASGITransport(app=mock_vllm), keys=keys, limiter=LocalRateLimiter(clock=lambda: 1_000_000.0)
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway), base_url="http://r") as client:
        before = await scrape(client)
        statuses = [
            (
                await client.post("/v1/chat/completions", headers={"Authorization": "Bearer sk-limited"}, json=CHAT)
            ).status_code
            for _ in range(3)
        ]
        after = await scrape(client)
    assert statuses == [200, 429, 429]
    labels = {"key": "limited", "code": "rate_limit_exceeded"}
    assert (
        value(after, "llm_ratelimit_rejections_total", **labels)
        - value(before, "llm_ratelimit_rejections_total", **labels)
        == 2
    )


def _sha(secret: str) -> str:
    import hashlib

    return hashlib.sha256(secret.encode()).hexdigest()


def test_capacity_429s_are_not_rate_limit_rejections() -> None:
    class Dispatcher:
        retries = 0
        rejected_capacity = 0

    dispatcher = Dispatcher()
    metrics = RequestMetrics(dispatcher)
    before = parse(render_metrics().decode())
    dispatcher.rejected_capacity += 1
    metrics.observe(_event(status=429, principal="k"))  # the dispatcher refused it: capacity
    metrics.observe(_event(status=429, principal="k"))  # no new capacity refusal: the key's limit
    after = parse(render_metrics().decode())
    labels = {"key": "k", "code": "rate_limit_exceeded"}
    assert value(after, "llm_capacity_rejections_total") - value(before, "llm_capacity_rejections_total") == 1
    assert (
        value(after, "llm_ratelimit_rejections_total", **labels)
        - value(before, "llm_ratelimit_rejections_total", **labels)
        == 1
    )


def _event(**fields: Any) -> UsageEvent:
    values: dict[str, Any] = {
        "request_id": "r",
        "principal": "master",
        "key_id": None,
        "endpoint": "chat.completions",
        "model": "mp-model",
        "backend": "b1",
        "status": 200,
        "prompt_tokens": 2,
        "completion_tokens": 3,
        "latency_ms": 5.0,
        "ttft_ms": None,
        "stream": False,
    }
    values.update(fields)
    return UsageEvent(**values)


# --- protection -----------------------------------------------------------------------------------------------------


async def test_protected_by_address_or_token(settings: Any, make_gateway: Callable[..., Gateway]) -> None:
    gateway = make_gateway()
    transport = httpx.ASGITransport(app=gateway, client=("10.1.2.3", 5555))
    async with httpx.AsyncClient(transport=transport, base_url="http://r") as client:
        denied = await client.get("/metrics")
        assert denied.status_code == 403 and denied.json()["error"]["code"] == "forbidden"
        settings.METRICS_TOKEN = "scrape-secret"
        assert (await client.get("/metrics", headers={"Authorization": "Bearer wrong"})).status_code == 403
        assert (await client.get("/metrics", headers={"Authorization": "Bearer scrape-secret"})).status_code == 200
        settings.METRICS_TOKEN = ""
        settings.METRICS_ALLOWED_CIDRS = ["10.0.0.0/8"]
        assert (await client.get("/metrics")).status_code == 200
        assert (await client.post("/metrics")).status_code == 405
    local6 = httpx.ASGITransport(app=gateway, client=("::1", 5555))
    settings.METRICS_ALLOWED_CIDRS = ["127.0.0.1/32", "::1/128"]
    async with httpx.AsyncClient(transport=local6, base_url="http://r") as client:
        assert (await client.get("/metrics")).status_code == 200


# --- multiprocess ---------------------------------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    from governance.metrics import RequestMetrics
    from governance.events import UsageEvent
    metrics = RequestMetrics()
    for _ in range(3):
        metrics.observe(UsageEvent("r", "master", None, "chat", "mp-model", "b1", 200, 2, 3, 5.0, 1.0, True))
    """
)


def test_multiprocess_series_are_merged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # given two processes that served requests with PROMETHEUS_MULTIPROC_DIR set
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "DJANGO_SETTINGS_MODULE": "llm_platform.settings"}
    children = [subprocess.Popen([sys.executable, "-c", CHILD], env=env) for _ in range(2)]
    assert [child.wait(timeout=60) for child in children] == [0, 0]
    # when a scrape is rendered in multiprocess mode
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    samples = parse(render_metrics().decode())
    # then it sums both processes' series
    assert value(samples, "llm_requests_total", model="mp-model", backend="b1", status="200") == 6
    assert value(samples, "llm_tokens_total", model="mp-model", direction="out") == 18
    assert value(samples, "llm_time_to_first_token_seconds_count", model="mp-model") == 6
