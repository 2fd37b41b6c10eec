"""A small fleet for the operations dashboard: two pools, backends in every state, traffic in the 5-minute
buckets, a nightly check run, and a live dispatcher of this process (the runtime view) with requests in flight
and an open circuit."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from django.utils import timezone

import routing.runtime  # noqa: F401  (registers this process's dispatchers as the local runtime view)
from backends.checks.models import CheckCause, CheckResult, CheckRun, Outcome, RunStatus, RunTrigger
from backends.mock_vllm import MockVLLM
from backends.models import Backend, BackendState, GpuPool, HealthStatus
from governance.events import UsageEvent
from governance.usage import usage_records_write
from routing.dispatch import Dispatcher
from routing.health import CircuitBreakers, MetricsScraper
from tests.factories import backend_create, backend_snap, pool_create

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def usage(backend: str, **fields: Any) -> UsageEvent:
    """A usage event of `backend` (a 200 non-streamed chat completion unless told)."""
    values: dict[str, Any] = {
        "request_id": "r",
        "principal": "team-a",
        "key_id": None,
        "endpoint": "chat.completions",
        "model": "llama-3-8b",
        "backend": backend,
        "status": 200,
        "prompt_tokens": 12,
        "completion_tokens": 30,
        "latency_ms": 420.0,
        "ttft_ms": None,
        "stream": False,
        "attempts": 1,
        "queue_wait_ms": 0.0,
    }
    values.update(fields)
    return UsageEvent(**values)


@dataclass
class Fleet:
    """What the fixture made."""

    chat: GpuPool
    batch: GpuPool
    gpu1: Backend
    gpu2: Backend
    gpu3: Backend
    run: CheckRun
    dispatcher: Dispatcher
    now: datetime


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    now = timezone.now()
    chat = pool_create(name="chat-a100", routing_strategy="kv_cache_aware")
    batch = pool_create(name="batch-l4")
    gpu1 = backend_create(pool=chat, name="gpu-1", status=HealthStatus.HEALTHY)
    gpu2 = backend_create(
        pool=chat, name="gpu-2", status=HealthStatus.UNHEALTHY, last_error="cannot connect: connection refused"
    )
    gpu3 = backend_create(pool=batch, name="gpu-3", status=HealthStatus.HEALTHY, state=BackendState.DRAINING)
    # traffic: gpu-1 answered 8 streams (TTFT 80..220 ms) and one 503, one request retried from gpu-2 to gpu-1;
    # gpu-3 answered 2 requests; one request reached no backend (429); and 2 requests of yesterday on gpu-1
    at = (now - timedelta(seconds=30)).timestamp()
    events = [
        (at, usage("gpu-1", stream=True, ttft_ms=80.0 + 20 * i, request_id=f"s{i}", trace_id=TRACE if i == 0 else None))
        for i in range(8)
    ]
    events += [
        (at, usage("gpu-1", status=503, request_id="e1")),
        (at, usage("gpu-1", attempts=2, failures=(("gpu-2", "connect_error"),), request_id="retried")),
        (at, usage("gpu-3", request_id="b1")),
        (at, usage("gpu-3", request_id="b2")),
        (at, usage("", status=429, attempts=0, request_id="busy")),
    ]
    yesterday = (now - timedelta(hours=20)).timestamp()
    events += [(yesterday, usage("gpu-1", request_id=f"old{i}")) for i in range(2)]
    usage_records_write(events)
    # the nightly check run: gpu-1 passed both cases, gpu-2 failed one
    run = CheckRun.objects.create(
        trigger=RunTrigger.SCHEDULE,
        status=RunStatus.FAILED,
        started_at=now - timedelta(hours=8),
        finished_at=now - timedelta(hours=8) + timedelta(seconds=40),
        total=4,
        passed=3,
        failed=1,
    )
    for backend, case, outcome, error in (
        (gpu1, "arithmetic", Outcome.PASS, ""),
        (gpu1, "capital", Outcome.PASS, ""),
        (gpu2, "arithmetic", Outcome.PASS, ""),
        (gpu2, "capital", Outcome.FAIL, "the answer does not contain 'Paris'"),
    ):
        CheckResult.objects.create(
            run=run,
            backend=backend,
            backend_name=backend.name,
            model_name="llama-3-8b",
            case_name=case,
            outcome=outcome,
            cause=CheckCause.WRONG_ANSWER if error else "",
            error=error,
            latency_ms=300.0,
        )
    # the runtime view of this process: 3 requests in flight on gpu-1, gpu-2's circuit open, and gpu-1's engine
    # figures scraped from a mock vLLM's /metrics (2 waiting, KV cache 42 % full, 620 of 1000 prompt tokens cached)
    dispatcher = Dispatcher(
        circuits=CircuitBreakers(threshold=1, cooldown_s=3600), scraper=MetricsScraper(stale_after_s=3600)
    )
    dispatcher.in_flight["gpu-1"] = 3
    dispatcher.circuits.failure("gpu-2", "connect error")
    engine = MockVLLM(num_requests_waiting=2, kv_cache_usage_perc=0.42)
    engine.stats.prefix_cache_queries_total, engine.stats.prefix_cache_hits_total = 1000, 620

    async def scrape() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=engine)) as client:
            await dispatcher.scraper.scrape_once([backend_snap("gpu-1", base_url="http://gpu-1")], client)

    asyncio.run(scrape())
    yield Fleet(chat, batch, gpu1, gpu2, gpu3, run, dispatcher, now.astimezone(UTC))
