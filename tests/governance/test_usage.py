"""Usage accounting: records match the requests (streams and errors included) and are written off the request
path in batches; the hourly rollup is right and idempotent; the usage API and the admin dashboard report them."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest
from django.db import IntegrityError, OperationalError
from django.db.backends.utils import CursorWrapper
from django.test import Client
from rest_framework.test import APIClient

from backends.mock_vllm import MockVLLM, await_until
from governance.events import UsageEvent
from governance.models import ApiKey, UsageBackendBucket, UsageHourly, UsageRecord, key_hash
from governance.services import api_key_create
from governance.snapshot import KeySnap, KeySnapshot
from governance.usage import (
    BatchUsageWriter,
    usage_records_write,
    usage_report,
    usage_rollup,
    usage_rollup_recent,
)
from routing.gateway import Gateway
from routing.registry import RegistryCache
from tests.conftest import AUTH, MASTER_KEY
from tests.factories import backend_snap, registry_snap

CHAT = {"model": "chat-model", "messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 8}


def event(**fields: Any) -> UsageEvent:
    """A usage event with defaults."""
    values: dict[str, Any] = {
        "request_id": "r",
        "principal": "master",
        "key_id": None,
        "endpoint": "chat.completions",
        "model": "chat-model",
        "backend": "b1",
        "status": 200,
        "prompt_tokens": 3,
        "completion_tokens": 5,
        "latency_ms": 12.0,
        "ttft_ms": None,
        "stream": False,
    }
    values.update(fields)
    return UsageEvent(**values)


def key_snapshot(key: ApiKey, secret: str) -> RegistryCache:
    """A static key cache holding one key (no database on the request path)."""
    snap = KeySnap(
        id=key.pk,
        name=key.name,
        allowed_models=None,
        expires_at=None,
        rpm_limit=None,
        tpm_limit=None,
        daily_token_budget=None,
    )
    cache = RegistryCache.static(KeySnapshot(version=1, by_hash={key_hash(secret): snap}))
    return cache


@pytest.fixture
def sql_threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, str]]]:
    """(thread id, statement) of every SQL statement run while active, in any thread."""
    seen: list[tuple[int, str]] = []
    execute, executemany = CursorWrapper.execute, CursorWrapper.executemany

    def logged_execute(self: CursorWrapper, sql: str, params: Any = None) -> object:
        seen.append((threading.get_ident(), sql))
        return execute(self, sql, params)

    def logged_executemany(self: CursorWrapper, sql: str, param_list: Any) -> object:
        seen.append((threading.get_ident(), sql))
        return executemany(self, sql, param_list)

    monkeypatch.setattr(CursorWrapper, "execute", logged_execute)
    monkeypatch.setattr(CursorWrapper, "executemany", logged_executemany)
    yield seen


# --- records match requests, nothing written on the request path ------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_records_match_requests_and_nothing_is_written_on_the_loop(
    make_gateway: Callable[..., Gateway], mock_vllm: MockVLLM, sql_threads: list[tuple[int, str]]
) -> None:
    # given a gateway with the batched writer, a client key, and the in-process mock behind one backend
    key, secret = api_key_create(name="team-a")
    gateway = make_gateway(
        registry=registry_snap(backends=[backend_snap("b1", base_url="http://mock-a")]),
        transport=httpx.ASGITransport(app=mock_vllm),
        max_attempts=1,
        keys=key_snapshot(key, secret),
    )
    writer = BatchUsageWriter(flush_interval_s=0.05, dispatcher=gateway.dispatcher)
    gateway.usage = writer
    key_auth = {"Authorization": f"Bearer {secret}"}
    sql_threads.clear()
    loop_threads: set[int] = set()
    expected_tokens = {"prompt": 0, "completion": 0}

    async def scenario() -> None:
        loop_threads.add(threading.get_ident())
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway), base_url="http://r") as client:
            # when N successful requests (master and client key), M failing ones and S streams are made
            for auth in (AUTH, AUTH, AUTH, key_auth, key_auth):
                answer = await client.post("/v1/chat/completions", headers=auth, json=CHAT)
                assert answer.status_code == 200, answer.text
                expected_tokens["prompt"] += answer.json()["usage"]["prompt_tokens"]
                expected_tokens["completion"] += answer.json()["usage"]["completion_tokens"]
            assert (
                await client.post("/v1/chat/completions", headers=AUTH, json={"model": "chat-model"})
            ).status_code == 400
            missing = {**CHAT, "model": "nope"}
            assert (await client.post("/v1/chat/completions", headers=key_auth, json=missing)).status_code == 404
            mock_vllm.config.fail_status = 500
            assert (await client.post("/v1/chat/completions", headers=AUTH, json=CHAT)).status_code == 502
            mock_vllm.config.fail_status = None
            await asyncio.sleep(0.1)  # a background flush happens between requests
            for auth in (AUTH, key_auth, AUTH):
                body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
                async with client.stream("POST", "/v1/chat/completions", headers=auth, json=body) as stream:
                    assert stream.status_code == 200
                    async for line in stream.aiter_lines():
                        if line.startswith("data: {") and '"usage"' in line:
                            usage = orjson.loads(line[6:]).get("usage")
                            if usage:
                                expected_tokens["prompt"] += usage["prompt_tokens"]
                                expected_tokens["completion"] += usage["completion_tokens"]
        await writer.aclose()

    asyncio.run(scenario())

    # then no SQL ran on the event loop's thread: every write happened in worker threads, in batches
    assert sql_threads, "the writer should have written"
    assert not [sql for thread, sql in sql_threads if thread in loop_threads]
    inserts = [
        sql
        for _, sql in sql_threads
        if sql.lstrip().upper().startswith("INSERT") and UsageRecord._meta.db_table in sql.split("(")[0]
    ]
    assert 2 <= len(inserts) < 11  # more than one flush (the background one and the final), fewer than 1 per request
    # and one record per request, with the right statuses, keys, streams and tokens
    records = list(UsageRecord.objects.order_by("created_at", "id"))
    assert len(records) == 5 + 3 + 3
    assert sorted(r.status for r in records) == [200] * 8 + [400, 404, 502]
    assert sum(r.prompt_tokens for r in records) == expected_tokens["prompt"] > 0
    assert sum(r.completion_tokens for r in records) == expected_tokens["completion"] > 0
    streams = [r for r in records if r.stream]
    assert len(streams) == 3 and all(r.ttft_ms is not None and r.ttft_ms <= r.latency_ms for r in streams)
    by_key = [r for r in records if r.key_id == key.pk]
    assert len(by_key) == 2 + 1 + 1 and {r.principal for r in by_key} == {"team-a"}
    assert {r.status for r in by_key} == {200, 404}
    failed = {r.status: r for r in records if r.status >= 400}
    assert failed[502].model == "chat-model"  # (the gateway does not name the backend of a failed request yet)
    assert failed[400].backend == "" and failed[400].prompt_tokens == 0
    assert all(r.latency_ms > 0 and r.endpoint == "chat.completions" for r in records)
    assert len({r.request_id for r in records}) == len(records)


# --- the writer ---------------------------------------------------------------------------------------------------


class FlakyWrite:
    """A write function that fails `failures` times (database down), then stores the batches."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.batches: list[list[UsageEvent]] = []

    def __call__(self, entries: Any) -> int:
        if self.failures:
            self.failures -= 1
            raise OperationalError("database is down")
        self.batches.append([e for _, e in entries])
        return len(entries)


async def test_flushes_when_the_batch_is_full_and_on_close() -> None:
    write = FlakyWrite()
    writer = BatchUsageWriter(flush_interval_s=60, flush_max=5, write=write, metrics=False)
    for i in range(5):
        writer.record(event(request_id=str(i)))
    # flushed at once, not after the 60 s interval (2 s of patience for a loaded machine)
    assert await await_until(lambda: [len(b) for b in write.batches] == [5], timeout=2.0), write.batches
    writer.record(event(request_id="late"))
    await writer.aclose()
    assert [len(b) for b in write.batches] == [5, 1] and writer.pending == 0


async def test_keeps_events_while_the_database_is_down_within_the_bound(caplog: pytest.LogCaptureFixture) -> None:
    write = FlakyWrite(failures=2)
    writer = BatchUsageWriter(flush_interval_s=60, flush_max=4, buffer_max=6, write=write, metrics=False)
    for i in range(4):
        writer.record(event(request_id=f"a{i}"))
    assert await writer.aflush() == 0  # failed: kept
    for i in range(4):
        writer.record(event(request_id=f"b{i}"))
    assert writer.pending == 6 and writer.dropped == 2  # the oldest two dropped beyond the bound
    assert await writer.aflush() == 0
    assert await writer.aflush() == 6
    assert [e.request_id for e in write.batches[0]] == ["a2", "a3", "b0", "b1", "b2", "b3"]
    assert writer.failures == 2 and "cannot write" in caplog.text
    await writer.aclose()


async def test_restarts_on_a_new_event_loop() -> None:
    write = FlakyWrite()
    writer = BatchUsageWriter(flush_interval_s=0.01, write=write, metrics=False)

    async def one() -> None:
        writer.record(event())
        await asyncio.sleep(0.05)

    await one()
    await asyncio.to_thread(asyncio.run, one())  # another loop (another thread): a new flusher there
    assert sum(len(b) for b in write.batches) == 2
    await writer.aclose()


@pytest.mark.django_db
def test_write_sanitises_and_drops_deleted_keys() -> None:
    key, _ = api_key_create(name="gone-soon")
    kept, _ = api_key_create(name="kept")
    key_id = key.pk
    key.delete()
    now = datetime.now(UTC).timestamp()
    written = usage_records_write(
        [
            (now, event(key_id=key_id, principal="gone-soon")),
            (now, event(key_id=kept.pk, principal="kept", prompt_tokens="7", completion_tokens=-1, model="m" * 300)),
        ]
    )
    assert written == 2
    gone, present = UsageRecord.objects.order_by("principal")
    assert gone.key_id is None and present.key_id == kept.pk
    assert (present.prompt_tokens, present.completion_tokens, len(present.model)) == (0, 0, 200)


@pytest.mark.django_db
def test_a_refused_row_is_dropped_not_retried_forever(monkeypatch: pytest.MonkeyPatch) -> None:
    from governance import usage

    original = usage._insert

    def insert(rows: Any, entries: Any) -> None:
        if len(rows) > 1 or rows[0][1] == "bad":
            raise IntegrityError("refused")
        original(rows, entries)

    monkeypatch.setattr(usage, "_insert", insert)
    now = datetime.now(UTC).timestamp()
    batch = [(now, event(request_id="ok-1")), (now, event(request_id="bad")), (now, event(request_id="ok-2"))]
    assert usage_records_write(batch) == 2
    assert sorted(UsageRecord.objects.values_list("request_id", flat=True)) == ["ok-1", "ok-2"]
    # and the backend traffic counts the two written requests only
    assert list(UsageBackendBucket.objects.values_list("backend", "requests")) == [("b1", 2)]


@pytest.mark.django_db
def test_a_refused_batch_is_split_in_halves_not_written_row_by_row(monkeypatch: pytest.MonkeyPatch) -> None:
    from governance import usage

    original = usage._insert
    statements: list[int] = []

    def insert(rows: Any, entries: Any) -> None:
        statements.append(len(rows))
        if any(row[1].startswith("bad") for row in rows):  # the database refuses any batch holding a bad row
            raise IntegrityError("refused")
        original(rows, entries)

    monkeypatch.setattr(usage, "_insert", insert)
    # given a batch of 256 events, two of which the database refuses
    now = datetime.now(UTC).timestamp()
    ids = [f"bad-{i}" if i in (17, 200) else f"ok-{i}" for i in range(256)]
    # when it is written
    written = usage_records_write([(now, event(request_id=request_id)) for request_id in ids])
    # then every good row is written once and the bad ones dropped
    assert written == 254
    stored = list(UsageRecord.objects.values_list("request_id", flat=True))
    assert sorted(stored) == sorted(i for i in ids if i.startswith("ok")) and len(set(stored)) == len(stored)
    # in a few dozen transactions (halving to each bad row: about 4 x log2(256) = 32), not one per row (257)
    assert len(statements) <= 4 * 8 + 1


# --- rollups ------------------------------------------------------------------------------------------------------

HOUR = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)


def records(*rows: tuple[datetime, str, str, int, int, int, float]) -> None:
    """Insert usage records: (at, principal, model, status, prompt, completion, latency)."""
    UsageRecord.objects.bulk_create(
        UsageRecord(
            created_at=at,
            request_id=f"r{i}",
            principal=principal,
            endpoint="chat.completions",
            model=model,
            status=status,
            prompt_tokens=prompt,
            completion_tokens=completion,
            latency_ms=latency,
        )
        for i, (at, principal, model, status, prompt, completion, latency) in enumerate(rows)
    )


def hourly() -> list[tuple[Any, ...]]:
    return list(
        UsageHourly.objects.order_by("hour", "principal", "model").values_list(
            "hour", "principal", "model", "requests", "errors", "prompt_tokens", "completion_tokens", "latency_ms_sum"
        )
    )


@pytest.mark.django_db
def test_rollup_sums_per_hour_key_and_model_and_is_idempotent() -> None:
    records(
        (HOUR + timedelta(minutes=1), "a", "m1", 200, 10, 20, 100.0),
        (HOUR + timedelta(minutes=59, seconds=59), "a", "m1", 429, 0, 0, 1.0),
        (HOUR + timedelta(minutes=30), "a", "m2", 502, 5, 0, 50.0),
        (HOUR + timedelta(minutes=30), "b", "m1", 499, 4, 2, 30.0),
        (HOUR + timedelta(hours=1), "a", "m1", 200, 1, 1, 10.0),
        (HOUR - timedelta(hours=1), "a", "m1", 200, 9, 9, 9.0),
    )
    assert usage_rollup(since=HOUR + timedelta(minutes=20)) == 4  # from 10:00 (the hour of `since`) on
    expected = [
        (HOUR, "a", "m1", 2, 1, 10, 20, 101.0),
        (HOUR, "a", "m2", 1, 1, 5, 0, 50.0),
        (HOUR, "b", "m1", 1, 1, 4, 2, 30.0),
        (HOUR + timedelta(hours=1), "a", "m1", 1, 0, 1, 1, 10.0),
    ]
    assert hourly() == expected  # 09:00 not touched
    assert usage_rollup(since=HOUR) == 4 and hourly() == expected  # again: same rows
    # a late record in a rolled-up hour is counted on the next run, without duplicates
    records((HOUR + timedelta(minutes=5), "b", "m1", 200, 1, 1, 1.0))
    usage_rollup(since=HOUR)
    assert hourly()[2] == (HOUR, "b", "m1", 2, 1, 5, 3, 31.0)
    assert len(hourly()) == 4
    usage_rollup(since=HOUR - timedelta(hours=1))
    assert len(hourly()) == 5 and hourly()[0][:4] == (HOUR - timedelta(hours=1), "a", "m1", 1)


@pytest.mark.django_db
def test_periodic_rollup_goes_back_to_the_last_rolled_hour() -> None:
    records((HOUR, "a", "m1", 200, 1, 1, 1.0))
    usage_rollup(since=HOUR)
    # the scheduler is down for hours while requests go on
    records(*((HOUR + timedelta(hours=h), "a", "m1", 200, 1, 1, 1.0) for h in (1, 2, 3)))
    usage_rollup_recent(lookback_hours=1, now=HOUR + timedelta(hours=6))
    assert [row[0] for row in hourly()] == [HOUR + timedelta(hours=h) for h in (0, 1, 2, 3)]


@pytest.mark.django_db
def test_report_mixes_rollups_and_recent_records() -> None:
    records((HOUR, "a", "m1", 200, 1, 2, 10.0), (HOUR + timedelta(hours=1), "a", "m1", 200, 1, 2, 10.0))
    usage_rollup(since=HOUR)
    # records after the rollup: in its last hour (still filling) and later; and an old one not yet rolled up
    records(
        (HOUR + timedelta(hours=1, minutes=30), "a", "m1", 500, 1, 0, 20.0),
        (HOUR + timedelta(hours=2), "b", "m2", 200, 3, 3, 30.0),
    )
    rows = usage_report(start=HOUR, end=HOUR + timedelta(hours=3))
    assert [(r.period, r.key, r.model, r.requests, r.errors, r.total_tokens) for r in rows] == [
        (HOUR, "a", "m1", 1, 0, 3),
        (HOUR + timedelta(hours=1), "a", "m1", 2, 1, 4),
        (HOUR + timedelta(hours=2), "b", "m2", 1, 0, 6),
    ]
    [day] = usage_report(start=HOUR, end=HOUR + timedelta(hours=3), group_by="day", by_key=False, by_model=False)
    assert (day.period, day.requests, day.errors, day.mean_latency_ms) == (HOUR.replace(hour=0), 4, 1, 17.5)


# --- API ------------------------------------------------------------------------------------------------------------


@pytest.fixture
def api() -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {MASTER_KEY}")
    return client


@pytest.mark.django_db
def test_usage_api(api: APIClient, client: Client, admin_client: Client, django_user_model: Any) -> None:
    records(
        (HOUR, "a", "m1", 200, 1, 2, 10.0),
        (HOUR + timedelta(minutes=10), "a", "m2", 400, 0, 0, 2.0),
        (HOUR + timedelta(hours=1), "b", "m1", 200, 5, 5, 30.0),
    )
    usage_rollup(since=HOUR)
    window = {"from": "2026-03-02T09:30:00Z", "to": "2026-03-02T12:00:00Z"}
    answer = api.get("/api/usage/", window)
    assert answer.status_code == 200, answer.json()
    body = answer.json()
    assert body["from"] == "2026-03-02T09:00:00Z" and body["group_by"] == "hour"
    assert [(r["key"], r["model"], r["requests"], r["errors"], r["total_tokens"]) for r in body["results"]] == [
        ("a", "m1", 1, 0, 3),
        ("a", "m2", 1, 1, 0),
        ("b", "m1", 1, 0, 10),
    ]
    assert body["totals"] == {
        "requests": 3,
        "errors": 1,
        "prompt_tokens": 6,
        "completion_tokens": 7,
        "total_tokens": 13,
        "mean_latency_ms": 14.0,
    }
    only_a = api.get("/api/usage", {**window, "key": "a", "model": "m1", "group_by": "day"}).json()
    assert [(r["period"], r["requests"]) for r in only_a["results"]] == [("2026-03-02T00:00:00Z", 1)]
    assert api.get("/api/usage/", {"from": "2026-03-02T12:00:00Z", "to": "2026-03-02T10:00:00Z"}).status_code == 400
    assert api.get("/api/usage/", {"from": "2025-01-01T00:00:00Z", "to": "2026-03-02T10:00:00Z"}).status_code == 400
    assert api.get("/api/usage/", {"group_by": "week"}).status_code == 400
    assert api.get("/api/usage/").json()["results"] == []  # default: the last 24 h
    # same protection as the registry API: master key or staff
    assert client.get("/api/usage/").status_code == 401
    assert admin_client.get("/api/usage/", window).status_code == 200
    django_user_model.objects.create_user("plain", password="pw-123456789")
    plain = Client()
    plain.login(username="plain", password="pw-123456789")
    assert plain.get("/api/usage/").status_code == 403


# --- admin ----------------------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_admin_usage_pages_render_for_staff(admin_client: Client, client: Client) -> None:
    now = datetime.now(UTC)
    records(
        (now - timedelta(hours=30), "team-<b>", "m1", 200, 10, 20, 100.0),
        (now - timedelta(hours=2), "team-<b>", "m1", 502, 1, 0, 10.0),
        (now - timedelta(minutes=5), "master", "m2", 200, 3, 4, 20.0),
    )
    usage_rollup(since=now - timedelta(days=2))
    record = UsageRecord.objects.first()
    assert record is not None
    for url in (
        "/admin/governance/usagerecord/",
        "/admin/governance/usagerecord/?status__exact=502",
        "/admin/governance/usagehourly/",
        f"/admin/governance/usagerecord/{record.pk}/change/",
    ):
        page = admin_client.get(url)
        assert page.status_code == 200, url
    day = admin_client.get("/admin/governance/usagehourly/dashboard/")
    assert day.status_code == 200
    html = day.content.decode()
    assert html.count("<svg") >= 4 and "team-&lt;b&gt;" in html and "<b>" not in html.split("team-")[1][:5]
    assert "Requests per hour" in html and "script" not in html.split('id="content-main"')[1].lower()
    week = admin_client.get("/admin/governance/usagehourly/dashboard/?window=7d").content.decode()
    assert "Requests per day" in week and ">3<" in week  # the 30-hour-old request is in the week only
    assert admin_client.get("/admin/governance/usagerecord/add/").status_code == 403
    assert client.get("/admin/governance/usagehourly/dashboard/").status_code == 302  # login first


def test_stacked_bars_are_proportional() -> None:
    import re

    from governance.charts import stacked_bars_svg

    svg = stacked_bars_svg(["a"], [("ok", "#0a0", [30.0]), ("errors", "#a00", [10.0])], "Requests")
    heights = [float(h) for h in re.findall(r'<rect x="[^"]+" y="[^"]+" width="[^"]+" height="([^"]+)"', svg)[:2]]
    assert heights[0] == pytest.approx(3 * heights[1], rel=0.02)


@pytest.mark.parametrize("stamp", [0.0, 1764680280.0, 1764680280.123456, 1764680280.5])
def test_sqlite_datetimes_are_written_as_django_writes_them(stamp: float) -> None:
    # given an aware UTC datetime of a usage event (microseconds or none)
    import django.db.backends.sqlite3.base  # noqa: F401  (the backend's module first: its operations import it)
    from django.db import connection
    from django.db.backends.sqlite3.operations import DatabaseOperations

    from governance.usage import _sqlite_datetime

    value = datetime.fromtimestamp(stamp, tz=UTC)
    # when the writer's SQLite shortcut and Django's own SQLite adaptation format it
    # then the stored text is the same (what the admin and the ORM read back)
    assert _sqlite_datetime(value) == DatabaseOperations(connection).adapt_datetimefield_value(value)


@pytest.mark.django_db
def test_records_are_written_while_queries_are_logged() -> None:
    # given a database connection that logs its queries (DEBUG, as `make run` sets it, or a query capture), and a
    # model name with the characters Django's query logging formats with
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    # when a batch of usage events is written
    with CaptureQueriesContext(connection) as captured:
        written = usage_records_write([(1764680280.0, event(request_id="logged", model="m%s 50%"))])
    # then the row is there, with its text as sent, and the statement was logged
    assert written == 1
    assert UsageRecord.objects.get(request_id="logged").model == "m%s 50%"
    assert any("INSERT" in query["sql"] for query in captured.captured_queries)
