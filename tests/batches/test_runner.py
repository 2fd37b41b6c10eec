"""The batch runner in-process (a Gateway built from settings, the mock vLLM on a real port): each line gets the
live request lifecycle (limits, dispatcher, usage), limits and busy pools delay lines without failing them."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

import orjson
import pytest
from django.utils import timezone

from backends.mock_vllm import MockServer
from backends.models import GpuPool
from batches import runner as batch_runner
from batches.models import Batch, BatchLine
from batches.runner import batch_run
from batches.services import batch_create, file_create, file_read, line_finish, lines_claim
from core.errors import APIError
from governance.auth import MASTER, Principal
from governance.events import UsageEvent
from governance.models import UsageRecord, key_hash
from governance.ratelimit import LocalRateLimiter, rate_limited
from governance.selectors import key_snapshot_build
from governance.services import api_key_create, api_key_revoke
from routing.gateway import Gateway
from tests.batches.conftest import chat_line, jsonl

pytestmark = pytest.mark.django_db(transaction=True)


def _principal(name: str, **limits: Any) -> Principal:
    _, secret = api_key_create(name=name, **limits)

    snap = key_snapshot_build().by_hash[key_hash(secret)]
    return Principal(name=name, is_master=False, key=snap)


def _batch(principal: Principal, lines: list[dict[str, Any]], capture: Any) -> Batch:
    file = file_create(principal=principal, filename="in.jsonl", purpose="batch", content=jsonl(lines))
    with capture(execute=False):  # the worker is this test: nothing is sent to Celery
        return batch_create(
            principal=principal,
            input_file=file,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata=None,
        )


def _results(batch: Batch) -> dict[str, dict[str, Any]]:
    batch.refresh_from_db()
    out: dict[str, dict[str, Any]] = {}
    for file in (batch.output_file, batch.error_file):
        if file is not None:
            for line in file_read(file=file).splitlines():
                item = orjson.loads(line)
                out[item["custom_id"]] = item
    return out


async def _run(batch: Batch, gateway: Gateway | None = None) -> str | None:
    return await batch_run(batch.pk, gateway=gateway)


def _close(gateway: Gateway) -> None:
    async def close() -> None:
        await gateway.usage.aclose()  # type: ignore[attr-defined]
        await gateway.dispatcher.aclose()

    asyncio.run(close())


def test_lines_run_through_the_lifecycle_with_usage_per_line(
    mock_server: MockServer, chat_model: Any, batch_files_dir: Any, django_capture_on_commit_callbacks: Any
) -> None:
    # given a key's batch with a good line, a line for an unknown model and a line the backend rejects (400)
    principal = _principal("team-usage")
    batch = _batch(
        principal,
        [
            chat_line("good"),
            {**chat_line("ghost"), "body": {**chat_line("x")["body"], "model": "ghost"}},
            chat_line("big"),
        ],
        django_capture_on_commit_callbacks,
    )
    mock_server.config.max_model_len = 10_000
    BatchLine.objects.filter(batch=batch, custom_id="big").update(
        body={"model": "chat-model", "messages": [{"role": "user", "content": "x"}], "max_tokens": 50_000}
    )
    # when a worker runs it
    assert asyncio.run(_run(batch)) == "completed"
    # then the good line is in the output; the others in the error file with their statuses; counts add up
    results = _results(batch)
    assert results["good"]["response"]["status_code"] == 200
    assert results["ghost"]["response"]["status_code"] == 404
    assert results["ghost"]["response"]["body"]["error"]["code"] == "model_not_found"
    assert results["big"]["response"]["status_code"] == 400
    assert (batch.completed, batch.failed, batch.status) == (1, 2, "completed")
    assert batch.output_file is not None and batch.error_file is not None
    assert batch.output_file.lines == 1 and batch.error_file.lines == 2
    # and each line became one usage record of the key, as live traffic does; the batch sums its tokens
    assert principal.key is not None
    records = UsageRecord.objects.filter(key_id=principal.key.id)
    assert sorted(records.values_list("status", flat=True)) == [200, 400, 404]
    good = BatchLine.objects.get(batch=batch, custom_id="good")
    assert good.prompt_tokens > 0 and good.completion_tokens == 1
    assert (batch.prompt_tokens, batch.completion_tokens) == (
        sum(BatchLine.objects.filter(batch=batch).values_list("prompt_tokens", flat=True)),
        sum(BatchLine.objects.filter(batch=batch).values_list("completion_tokens", flat=True)),
    )
    # and the records were written with the results (not buffered): the key's charge is the batch's usage
    assert (batch.prompt_tokens, batch.completion_tokens) == (
        sum(records.values_list("prompt_tokens", flat=True)),
        sum(records.values_list("completion_tokens", flat=True)),
    )
    assert records.get(status=200).request_id == results["good"]["response"]["request_id"]


def _event(principal: Principal, request_id: str, prompt_tokens: int) -> UsageEvent:
    assert principal.key is not None
    return UsageEvent(
        request_id=request_id,
        principal=principal.name,
        key_id=principal.key.id,
        endpoint="chat.completions",
        model="chat-model",
        backend="mock-a",
        status=200,
        prompt_tokens=prompt_tokens,
        completion_tokens=1,
        latency_ms=1.0,
        ttft_ms=None,
        stream=False,
    )


def test_a_superseded_claim_records_neither_its_result_nor_its_usage(
    batch_files_dir: Any, django_capture_on_commit_callbacks: Any
) -> None:
    # given a line claimed by a worker that stalled past its lease, then claimed again by another worker
    principal = _principal("team-race")
    batch = _batch(principal, [chat_line("a")], django_capture_on_commit_callbacks)
    (stalled,) = lines_claim(batch_id=batch.pk, limit=1, lease_s=60)
    BatchLine.objects.filter(pk=stalled.pk).update(lease_until=timezone.now() - timedelta(seconds=1))
    (second,) = lines_claim(batch_id=batch.pk, limit=1, lease_s=60)
    assert (stalled.pk, stalled.attempts, second.attempts) == (second.pk, 1, 2)
    # when both finish, the second claim first
    kept = line_finish(
        line=second, request_id="r2", status_code=200, response={}, error=None, prompt_tokens=7, completion_tokens=1,
        usage=_event(principal, "r2", 7),
    )  # fmt: skip
    late = line_finish(
        line=stalled, request_id="r1", status_code=200, response={}, error=None, prompt_tokens=9, completion_tokens=1,
        usage=_event(principal, "r1", 9),
    )  # fmt: skip
    # then only the current claim's result, count and usage record are kept: the key is charged once
    assert (kept, late) == (True, False)
    assert principal.key is not None
    records = UsageRecord.objects.filter(key_id=principal.key.id)
    assert list(records.values_list("request_id", "prompt_tokens")) == [("r2", 7)]
    batch.refresh_from_db()
    assert (batch.completed, batch.failed, batch.prompt_tokens) == (1, 0, 7)
    assert BatchLine.objects.get(pk=second.pk).request_id == "r2"


class _LimitedAtFirst(LocalRateLimiter):
    """A limiter that answers 429 (retry in 1 s) to the first `refusals` admissions."""

    def __init__(self, refusals: int) -> None:
        super().__init__()
        self.refusals = refusals
        self.calls = 0

    async def admit(self, key: Any, tokens: int) -> Any:
        self.calls += 1
        if self.calls <= self.refusals:
            raise rate_limited(key, "rpm", 0.3, ())
        return await super().admit(key, tokens)


def test_a_rate_limited_line_waits_and_is_retried_not_failed(
    mock_server: MockServer, chat_model: Any, batch_files_dir: Any, django_capture_on_commit_callbacks: Any
) -> None:
    # given a limited key whose first three admissions are refused with 429
    principal = _principal("team-limited", rpm_limit=1000)
    batch = _batch(principal, [chat_line("a"), chat_line("b")], django_capture_on_commit_callbacks)
    gateway = Gateway.from_settings(None)
    limiter = _LimitedAtFirst(refusals=3)
    gateway.limiter = limiter
    try:
        # when the batch runs
        assert asyncio.run(_run(batch, gateway)) == "completed"
    finally:
        _close(gateway)
    # then both lines succeeded after waiting, each sent once to the backend
    batch.refresh_from_db()
    assert (batch.completed, batch.failed) == (2, 0)
    assert limiter.calls == 5
    assert mock_server.stats.completed_requests == 2


def test_lines_wait_while_the_pool_is_busy_with_live_traffic(
    mock_server: MockServer,
    chat_model: Any,
    batch_files_dir: Any,
    django_capture_on_commit_callbacks: Any,
    settings: Any,
) -> None:
    # given a pool whose engine reports queued requests for the first 1.2 s
    settings.BATCH_BACKOFF_S = 0.1
    batch = _batch(MASTER, [chat_line("a")], django_capture_on_commit_callbacks)
    gateway = Gateway.from_settings(None)
    busy_until = time.monotonic() + 1.2
    first_request: list[float] = []

    def stats() -> dict[str, dict[str, object]]:
        return {"mock-a": {"vllm_waiting": 3 if time.monotonic() < busy_until else 0}}

    gateway.dispatcher.runtime_stats = stats  # type: ignore[method-assign]
    original = gateway.dispatcher.send

    async def send(**kwargs: Any) -> Any:
        first_request.append(time.monotonic())
        return await original(**kwargs)

    gateway.dispatcher.send = send  # type: ignore[method-assign]
    try:
        assert asyncio.run(_run(batch, gateway)) == "completed"
    finally:
        _close(gateway)
    # then the line was sent only once the pool was no longer busy
    assert first_request and first_request[0] >= busy_until


def test_pool_concurrency_is_bounded(
    mock_server: MockServer,
    chat_model: Any,
    batch_files_dir: Any,
    django_capture_on_commit_callbacks: Any,
    settings: Any,
) -> None:
    # given a slow backend, a batch of 8 lines and at most 2 lines of a pool at once
    settings.BATCH_MAX_CONCURRENCY_PER_POOL = 2
    mock_server.config.latency_s = 0.1
    batch = _batch(MASTER, [chat_line(str(i)) for i in range(8)], django_capture_on_commit_callbacks)
    peak = current = 0
    gateway = Gateway.from_settings(None)
    original = gateway.dispatcher.send

    async def send(**kwargs: Any) -> Any:
        nonlocal peak, current
        current += 1
        peak = max(peak, current)
        try:
            return await original(**kwargs)
        finally:
            current -= 1

    gateway.dispatcher.send = send  # type: ignore[method-assign]
    try:
        assert asyncio.run(_run(batch, gateway)) == "completed"
    finally:
        _close(gateway)
    assert peak == 2


def test_a_batch_of_a_revoked_key_fails(
    mock_server: MockServer, chat_model: Any, batch_files_dir: Any, django_capture_on_commit_callbacks: Any
) -> None:
    principal = _principal("team-revoked")
    batch = _batch(principal, [chat_line("a")], django_capture_on_commit_callbacks)
    from governance.models import ApiKey

    assert principal.key is not None
    api_key_revoke(key=ApiKey.objects.get(pk=principal.key.id))
    assert asyncio.run(_run(batch)) == "failed"
    batch.refresh_from_db()
    assert batch.errors is not None and batch.errors["data"][0]["code"] == "invalid_api_key"
    assert mock_server.stats.total_requests == 0


def test_an_expired_batch_ends_expired_with_unrun_lines_in_the_error_file(
    mock_server: MockServer, chat_model: Any, batch_files_dir: Any, django_capture_on_commit_callbacks: Any
) -> None:
    batch = _batch(MASTER, [chat_line("a"), chat_line("b")], django_capture_on_commit_callbacks)
    Batch.objects.filter(pk=batch.pk).update(expires_at="2020-01-01T00:00:00Z")
    assert asyncio.run(_run(batch)) == "expired"
    results = _results(batch)
    assert {r["error"]["code"] for r in results.values()} == {"batch_expired"}
    assert batch.expired_at is not None and mock_server.stats.total_requests == 0


def test_limit_codes_are_the_ones_the_limiter_and_dispatcher_use() -> None:
    from routing import errors

    assert str(errors.capacity_exceeded("m", queue_full=True).code) in batch_runner.LIMIT_CODES
    assert isinstance(errors.capacity_exceeded("m", queue_full=True), APIError)
    assert str(errors.capacity_exceeded("m", queue_full=True, shed=True).code) in batch_runner.LIMIT_CODES


def test_batch_lines_run_in_the_lowest_class_whatever_they_ask(
    mock_server: MockServer, chat_model: Any, batch_files_dir: Any, django_capture_on_commit_callbacks: Any
) -> None:
    # given a pool running vLLM's priority scheduler and a key allowed `critical` whose line asks for it
    GpuPool.objects.filter(name="gpu-a").update(priority_scheduling=True)
    principal = _principal("team-urgent", priority_max="critical", priority_default="critical")
    batch = _batch(principal, [chat_line("urgent", priority=-5)], django_capture_on_commit_callbacks)
    # when a worker runs it
    assert asyncio.run(_run(batch)) == "completed"
    # then vLLM was asked for the batch class's priority
    assert _results(batch)["urgent"]["response"]["status_code"] == 200
    assert mock_server.stats.last_request["priority"] == 10


def test_create_answers_the_batch_as_created_even_when_a_worker_finishes_it_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # given a worker that finishes a batch the moment it is handed over (a fast queue, a small batch)
    from batches import services

    def instant_worker(*, batch_id: str) -> None:
        Batch.objects.filter(pk=batch_id).update(status="completed", completed_at=timezone.now())

    monkeypatch.setattr(services, "batch_enqueue", instant_worker)
    principal = _principal("instant")
    file = file_create(principal=principal, filename="in.jsonl", purpose="batch", content=jsonl([chat_line("a")]))
    # when the batch is created
    batch = batch_create(
        principal=principal, input_file=file, endpoint="/v1/chat/completions", completion_window="24h", metadata=None
    )
    # then the answer is the batch as created (in progress), whatever the worker did since; the worker did run
    assert batch.status == "in_progress" and batch.completed_at is None
    assert Batch.objects.get(pk=batch.pk).status == "completed"
