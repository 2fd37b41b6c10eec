"""The request log: usage records keep the trace id, queue wait, attempts and retry history; the writer adds
per-backend 5-minute traffic buckets (with a bounded TTFT histogram) in the same transaction; admin searches and
filters the log and links a record to its trace."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from governance.events import UsageEvent
from governance.models import TTFT_BOUNDS_MS, UsageBackendBucket, UsageRecord
from governance.selectors import trace_url
from governance.tasks import usage_rollup_task
from governance.usage import (
    Traffic,
    bucket_start,
    ttft_bucket_index,
    usage_backend_traffic,
    usage_records_write,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
NOW = datetime(2026, 12, 1, 10, 7, 30, tzinfo=UTC)


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


@pytest.mark.django_db
def test_the_record_keeps_trace_queue_wait_and_retry_history() -> None:
    at = NOW.timestamp()
    usage_records_write(
        [
            (
                at,
                event(
                    request_id="retried",
                    trace_id=TRACE.upper(),
                    queue_wait_ms=42.5,
                    attempts=2,
                    failures=(("b2", "connect_error"),),
                    ttft_ms=80.0,
                    stream=True,
                ),
            ),
            (at, event(request_id="plain", trace_id="not-a-trace-id", attempts=1)),
            (at, event(request_id="never-sent", backend="", status=400)),
        ]
    )
    records = {r.request_id: r for r in UsageRecord.objects.all()}
    retried = records["retried"]
    assert retried.trace_id == TRACE  # normalised to lower case
    assert (retried.queue_wait_ms, retried.attempts, retried.ttft_ms) == (42.5, 2, 80.0)
    assert retried.retry_history == [["b2", "connect_error"]]
    assert records["plain"].trace_id is None  # a malformed id is not kept
    assert records["plain"].retry_history == [] and records["plain"].attempts == 1
    assert records["never-sent"].queue_wait_ms is None and records["never-sent"].attempts == 0


def test_a_retry_history_is_bounded() -> None:
    from governance.usage import _history

    long = tuple((f"backend-{i}" + "x" * 200, "reason" * 20) for i in range(50))
    history = _history(long)
    assert len(history) == 10 and all(len(b) <= 100 and len(r) <= 40 for b, r in history)


@pytest.mark.django_db
def test_backend_buckets_sum_requests_errors_attempts_and_ttft() -> None:
    # given events in two 5-minute buckets: b1 answers (one 503, one 429), a failed attempt on b2 retried to b1
    first = NOW.timestamp()
    later = (NOW + timedelta(minutes=5)).timestamp()
    usage_records_write(
        [
            (first, event(ttft_ms=40.0, stream=True, latency_ms=100.0)),
            (first, event(ttft_ms=150.0, stream=True, latency_ms=300.0, queue_wait_ms=20.0)),
            (first, event(status=503, latency_ms=5.0)),
            (first, event(status=429, backend="", attempts=0)),
            (first, event(attempts=2, failures=(("b2", "http_503"),))),
            (later, event(ttft_ms=20_000.0, stream=True)),
        ]
    )
    rows = {(r.bucket, r.backend): r for r in UsageBackendBucket.objects.all()}  # bucket starts are 5-minute aligned
    start = bucket_start(NOW)
    assert start == datetime(2026, 12, 1, 10, 5, tzinfo=UTC)
    b1 = rows[(start, "b1")]
    assert (b1.requests, b1.errors, b1.client_errors, b1.failed_attempts) == (4, 1, 0, 0)
    assert b1.ttft_count == 2 and b1.ttft_ms_sum == 190.0 and b1.queue_wait_ms_sum == 20.0
    assert b1.ttft_histogram[ttft_bucket_index(40.0)] == 1 and b1.ttft_histogram[ttft_bucket_index(150.0)] == 1
    assert sum(b1.ttft_histogram) == 2
    b2 = rows[(start, "b2")]
    assert (b2.requests, b2.failed_attempts) == (0, 1)
    unrouted = rows[(start, "")]
    assert (unrouted.requests, unrouted.client_errors) == (1, 1)
    overflow = rows[(start + timedelta(minutes=5), "b1")]
    assert overflow.ttft_histogram[-1] == 1  # above the last bound

    # when more events of the same bucket are written (another flush, or another process)
    usage_records_write([(first, event()), (first, event(status=502))])
    # then they are added to the same row
    b1.refresh_from_db()
    assert (b1.requests, b1.errors) == (6, 2)
    assert UsageBackendBucket.objects.filter(bucket=start, backend="b1").count() == 1


def test_ttft_percentiles_are_interpolated_inside_their_bucket() -> None:
    # given 10 streams at 40 ms (bucket 0..50) and 10 at 150 ms (bucket 100..200)
    traffic = Traffic()
    traffic.histogram[ttft_bucket_index(40.0)] = 10
    traffic.histogram[ttft_bucket_index(150.0)] = 10
    # then p50 is the top of the first bucket and p95 is 90 % into the second one
    assert traffic.ttft_percentile(0.5) == 50.0
    assert traffic.ttft_percentile(0.95) == pytest.approx(190.0)
    assert TTFT_BOUNDS_MS[1] < 150.0 <= TTFT_BOUNDS_MS[2]  # the true p95 (150) lies in that bucket
    # and past the last bound the percentile is that bound; without streams there is none
    slow = Traffic()
    slow.histogram[-1] = 3
    assert slow.ttft_percentile(0.5) == float(TTFT_BOUNDS_MS[-1])
    assert Traffic().ttft_percentile(0.5) is None


def test_error_rate_counts_failed_attempts() -> None:
    traffic = Traffic(requests=8, errors=1, failed_attempts=2)
    assert traffic.error_rate == pytest.approx(3 / 10)
    assert Traffic().error_rate is None


@pytest.mark.django_db
def test_backend_traffic_reads_a_time_range() -> None:
    usage_records_write(
        [
            (NOW.timestamp(), event(backend="b1")),
            ((NOW - timedelta(hours=2)).timestamp(), event(backend="b1")),
            (NOW.timestamp(), event(backend="b2", status=500)),
        ]
    )
    traffic = usage_backend_traffic(start=bucket_start(NOW), end=bucket_start(NOW) + timedelta(minutes=5))
    assert {name: (t.requests, t.errors) for name, t in traffic.items()} == {"b1": (1, 0), "b2": (1, 1)}


@pytest.mark.django_db
def test_old_buckets_are_pruned_by_the_rollup_task(settings: Any) -> None:
    settings.USAGE_BACKEND_RETENTION_D = 2
    old = datetime.now(UTC) - timedelta(days=3)
    recent = datetime.now(UTC) - timedelta(days=1)
    usage_records_write([(old.timestamp(), event()), (recent.timestamp(), event())])
    assert UsageBackendBucket.objects.count() == 2
    usage_rollup_task()
    assert list(UsageBackendBucket.objects.values_list("bucket", flat=True)) == [bucket_start(recent)]


# --- admin ------------------------------------------------------------------------------------------------------


def test_trace_url_needs_a_template_and_a_well_formed_id(settings: Any) -> None:
    settings.ROUTER_TRACE_LINK_TEMPLATE = ""
    assert trace_url(TRACE) is None
    settings.ROUTER_TRACE_LINK_TEMPLATE = "https://jaeger.example/trace/{trace_id}"
    assert trace_url(TRACE) == f"https://jaeger.example/trace/{TRACE}"
    assert trace_url("javascript:alert(1)//aaaaaaaaaaaaaaaaaaaaaaa") is None
    assert trace_url(None) is None and trace_url("abc") is None


@pytest.fixture
def log() -> dict[str, UsageRecord]:
    at = datetime.now(UTC).timestamp()
    usage_records_write(
        [
            (at, event(request_id="req-ok", trace_id=TRACE, model="llama", attempts=1)),
            (
                at,
                event(
                    request_id="req-retried",
                    model="llama",
                    attempts=2,
                    failures=(("gpu-2", "connect_timeout"),),
                    backend="gpu-1",
                ),
            ),
            (at, event(request_id="req-failed", principal="team-b", model="mistral", status=502, backend="")),
        ]
    )
    return {r.request_id: r for r in UsageRecord.objects.all()}


def _listed(admin_client: Client, query: str) -> set[str]:
    """Request ids shown by the request log's list page for a query string."""
    page = admin_client.get(reverse("admin:governance_usagerecord_changelist") + query)
    assert page.status_code == 200
    return {rid for rid in ("req-ok", "req-retried", "req-failed") if f">{rid}<" in page.content.decode()}


@pytest.mark.django_db
def test_the_request_log_is_searchable_and_filterable(admin_client: Client, log: dict[str, UsageRecord]) -> None:
    assert _listed(admin_client, "") == {"req-ok", "req-retried", "req-failed"}
    assert _listed(admin_client, "?q=req-retried") == {"req-retried"}
    assert _listed(admin_client, f"?q={TRACE}") == {"req-ok"}
    assert _listed(admin_client, "?q=team-b") == {"req-failed"}
    assert _listed(admin_client, "?q=mistral") == {"req-failed"}
    assert _listed(admin_client, "?q=502") == {"req-failed"}
    assert _listed(admin_client, "?outcome=5xx") == {"req-failed"}
    assert _listed(admin_client, "?outcome=2xx") == {"req-ok", "req-retried"}
    assert _listed(admin_client, "?retried=yes") == {"req-retried"}
    assert _listed(admin_client, "?traced=yes") == {"req-ok"}
    assert _listed(admin_client, "?model__exact=llama") == {"req-ok", "req-retried"}


@pytest.mark.django_db
def test_a_record_links_to_its_trace(admin_client: Client, log: dict[str, UsageRecord], settings: Any) -> None:
    url = reverse("admin:governance_usagerecord_change", args=[log["req-ok"].pk])
    # without a template: the trace id, not linked
    settings.ROUTER_TRACE_LINK_TEMPLATE = ""
    page = admin_client.get(url).content.decode()
    assert TRACE in page and "trace-link" not in page
    # with one: a link to the tracing UI, opened in a new tab
    settings.ROUTER_TRACE_LINK_TEMPLATE = "https://jaeger.example/trace/{trace_id}"
    page = admin_client.get(url).content.decode()
    assert f'href="https://jaeger.example/trace/{TRACE}"' in page and 'target="_blank"' in page
    # and the retried record shows its history
    retried = admin_client.get(reverse("admin:governance_usagerecord_change", args=[log["req-retried"].pk]))
    assert b"<b>gpu-2</b>: connect timeout" in retried.content
    # the list links traces too
    listing = admin_client.get(reverse("admin:governance_usagerecord_changelist")).content.decode()
    assert f"https://jaeger.example/trace/{TRACE}" in listing
