"""Usage accounting off the hot path: the batched writer, the hourly rollup, and usage reports.

`BatchUsageWriter.record` (called on the event loop for every /v1 request) appends the event to an in-memory
buffer and updates the Prometheus series: no I/O. A background task on the serving loop writes the buffer with
multi-row INSERTs in the process's database thread (`core.db.run_db`) every `USAGE_FLUSH_INTERVAL_S` (1 s), or as
soon as `USAGE_FLUSH_MAX` events wait, and once more at shutdown; a crash loses at most the last interval. When the
database is unreachable the events stay buffered (at most `USAGE_BUFFER_MAX` per process, the oldest dropped
beyond) and the write is retried every interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from django.conf import settings
from django.db import DataError, IntegrityError, transaction
from django.db.models import Count, Field, Max, Q, Sum
from django.db.models.functions import TruncHour
from django.utils import timezone

from core.aio import running_loop_or_none
from core.db import run_db
from governance.events import UsageEvent
from governance.metrics import (
    USAGE_BUFFERED,
    USAGE_DROPPED,
    USAGE_FLUSH_FAILURES,
    USAGE_WRITTEN,
    RequestMetrics,
    register_live,
)
from governance.models import (
    BUCKET_SECONDS,
    TTFT_BOUNDS_MS,
    TTFT_COLUMNS,
    ApiKey,
    UsageBackendBucket,
    UsageHourly,
    UsageRecord,
)

logger = logging.getLogger(__name__)

Entry = tuple[float, UsageEvent]  # (epoch seconds when recorded, event)
_LOG_EVERY_S = 60.0

# --- the writer ---------------------------------------------------------------------------------------------


class BatchUsageWriter:
    """A `UsageSink` that buffers events in memory and writes them in batches from a background task."""

    def __init__(
        self,
        *,
        flush_interval_s: float = 1.0,
        flush_max: int = 2000,
        buffer_max: int = 100_000,
        dispatcher: Any = None,
        metrics: bool = True,
        write: Callable[[Sequence[Entry]], int] | None = None,
    ) -> None:
        self.flush_interval_s = flush_interval_s
        self.flush_max = max(1, flush_max)
        self.buffer_max = max(self.flush_max, buffer_max)
        self.metrics: RequestMetrics | None = RequestMetrics(dispatcher) if metrics else None
        if self.metrics is not None:
            register_live(self.metrics)
        self._write = write or usage_records_write
        self._buffer: deque[Entry] = deque(maxlen=self.buffer_max)
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._closing = False
        self.written = 0
        self.dropped = 0
        self.failures = 0
        self._failing_since: float | None = None
        self._last_log = 0.0

    @classmethod
    def from_settings(cls, *, dispatcher: Any = None) -> BatchUsageWriter:
        """A writer configured by `USAGE_FLUSH_INTERVAL_S`, `USAGE_FLUSH_MAX` and `USAGE_BUFFER_MAX`."""
        from django.conf import settings

        return cls(
            flush_interval_s=settings.USAGE_FLUSH_INTERVAL_S,
            flush_max=settings.USAGE_FLUSH_MAX,
            buffer_max=settings.USAGE_BUFFER_MAX,
            dispatcher=dispatcher,
        )

    @property
    def pending(self) -> int:
        """Events waiting to be written."""
        return len(self._buffer)

    # --- hot path -------------------------------------------------------------------------------------------

    def record(self, event: UsageEvent) -> None:
        """Buffer one event and count it in the metrics (O(1), no I/O); make sure the flusher runs."""
        buffer = self._buffer
        if len(buffer) == self.buffer_max:
            self.dropped += 1
            USAGE_DROPPED.inc()
        buffer.append((time.time(), event))
        if self.metrics is not None:
            self.metrics.observe(event)
        task = self._task
        loop = running_loop_or_none()
        if task is None or task.done() or loop is not self._loop:
            self._start(loop)
        elif len(buffer) >= self.flush_max:
            self._wake.set()  # type: ignore[union-attr]

    def _start(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Start the flusher on the serving loop (per loop, restartable); without a loop, events wait."""
        if loop is None:
            return
        self._loop = loop
        self._wake = asyncio.Event()
        self._closing = False
        self._task = loop.create_task(self._run(), name="usage-writer")
        if len(self._buffer) >= self.flush_max:
            self._wake.set()

    # --- background -----------------------------------------------------------------------------------------

    async def _run(self) -> None:
        wake = self._wake
        assert wake is not None
        while not self._closing:
            try:
                async with asyncio.timeout(self.flush_interval_s):
                    await wake.wait()
            except TimeoutError:
                pass
            wake.clear()
            if self._buffer:
                await self.aflush()

    async def aflush(self) -> int:
        """Write every buffered event now (in a worker thread); return how many were written."""
        if not self._buffer:
            return 0
        batch = list(self._buffer)
        self._buffer = deque(maxlen=self.buffer_max)
        try:
            written = await run_db(functools.partial(self._write, batch))
        except Exception as exc:
            self._requeue(batch, exc)
            return 0
        self.written += written
        USAGE_WRITTEN.inc(written)
        USAGE_BUFFERED.set(len(self._buffer))
        if self._failing_since is not None:
            logger.info("usage writer: database back after %.0f s", time.monotonic() - self._failing_since)
            self._failing_since = None
        return written

    def _requeue(self, batch: list[Entry], exc: Exception) -> None:
        """Put a failed batch back in front of the buffer, within its bound; log at most once a minute."""
        self.failures += 1
        USAGE_FLUSH_FAILURES.inc()
        newer = self._buffer
        overflow = len(batch) + len(newer) - self.buffer_max
        if overflow > 0:
            self.dropped += overflow
            USAGE_DROPPED.inc(overflow)
        batch.extend(newer)
        self._buffer = deque(batch, maxlen=self.buffer_max)  # keeps the newest buffer_max events
        USAGE_BUFFERED.set(len(self._buffer))
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        if now - self._last_log >= _LOG_EVERY_S:
            self._last_log = now
            logger.warning(
                "usage writer: cannot write %d events (%s); keeping them in memory and retrying every %.1f s "
                "(%d dropped so far)",
                len(self._buffer),
                exc,
                self.flush_interval_s,
                self.dropped,
            )

    async def aclose(self) -> None:
        """Stop the flusher after its current write and write what is left (lifespan shutdown)."""
        task, wake = self._task, self._wake
        self._closing = True
        if task is not None and not task.done() and self._loop is asyncio.get_running_loop():
            if wake is not None:
                wake.set()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await task
        self._task = None
        await self.aflush()


# --- services (writes) --------------------------------------------------------------------------------------


def _count(value: Any) -> int:
    """A token count as stored: a non-negative int (a backend may report anything)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31 else 0


_COLUMNS = (
    "created_at",
    "request_id",
    "key",
    "principal",
    "endpoint",
    "model",
    "backend",
    "status",
    "prompt_tokens",
    "completion_tokens",
    "latency_ms",
    "ttft_ms",
    "stream",
    "trace_id",
    "queue_wait_ms",
    "attempts",
    "retry_history",
)
_JSON_COLUMN = _COLUMNS.index("retry_history")


def _trace_id(value: Any) -> str | None:
    """A W3C trace id as stored: 32 lowercase hex digits, else nothing."""
    if not isinstance(value, str) or len(value) != 32:
        return None
    value = value.lower()
    return value if all(c in "0123456789abcdef" for c in value) and value != "0" * 32 else None


def _history(failures: Any) -> list[list[str]]:
    """A retry history as stored: at most 10 [backend, reason] pairs of bounded strings."""
    out: list[list[str]] = []
    for item in list(failures or ())[:10]:
        if isinstance(item, tuple | list) and len(item) == 2:
            out.append([str(item[0])[:100], str(item[1])[:40]])
    return out


def _values(created: float, event: UsageEvent, known_keys: set[int]) -> tuple[Any, ...]:
    """One record's column values, in `_COLUMNS` order, clipped to what the columns hold."""
    return (
        datetime.fromtimestamp(created, tz=UTC),
        str(event.request_id)[:64],
        event.key_id if event.key_id in known_keys else None,
        str(event.principal)[:100],
        str(event.endpoint)[:40],
        str(event.model)[:200],
        str(event.backend)[:100],
        min(max(int(event.status), 0), 32767),
        _count(event.prompt_tokens),
        _count(event.completion_tokens),
        float(event.latency_ms),
        float(event.ttft_ms) if event.ttft_ms is not None else None,
        bool(event.stream),
        _trace_id(event.trace_id),
        float(event.queue_wait_ms) if event.queue_wait_ms is not None else None,
        min(max(int(event.attempts), 0), 32767),
        _history(event.failures),
    )


# --- per-backend 5-minute buckets (the operations dashboard) ------------------------------------------------------

_BUCKET_SUMS = (
    "requests",
    "errors",
    "client_errors",
    "failed_attempts",
    "prompt_tokens",
    "completion_tokens",
    "latency_ms_sum",
    "queue_wait_ms_sum",
    "ttft_count",
    "ttft_ms_sum",
    *TTFT_COLUMNS,
)
_TTFT_OFFSET = _BUCKET_SUMS.index(TTFT_COLUMNS[0])


def ttft_bucket_index(ttft_ms: float) -> int:
    """The histogram bucket of a time to first token (the last one holds everything above the last bound)."""
    for index, bound in enumerate(TTFT_BOUNDS_MS):
        if ttft_ms <= bound:
            return index
    return len(TTFT_BOUNDS_MS)


def usage_backend_buckets(entries: Sequence[Entry]) -> dict[tuple[int, str], list[float]]:
    """Sum events per (5-minute bucket start in epoch seconds, backend) into `_BUCKET_SUMS` order.

    A request counts on the backend that answered it ("" when none did); each failed attempt counts on the
    backend that failed it, so a backend whose failures were retried away shows them too.
    """
    sums: dict[tuple[int, str], list[float]] = {}
    width = len(_BUCKET_SUMS)
    for created, event in entries:
        start = int(created // BUCKET_SECONDS) * BUCKET_SECONDS
        backend = str(event.backend)[:100]
        row = sums.get((start, backend))
        if row is None:
            row = sums[(start, backend)] = [0.0] * width
        status = int(event.status)
        row[0] += 1
        if status >= 500:
            row[1] += 1
        elif 400 <= status < 499:
            row[2] += 1
        row[4] += _count(event.prompt_tokens)
        row[5] += _count(event.completion_tokens)
        row[6] += float(event.latency_ms)
        row[7] += float(event.queue_wait_ms or 0.0)
        if event.ttft_ms is not None:
            row[8] += 1
            row[9] += float(event.ttft_ms)
            row[_TTFT_OFFSET + ttft_bucket_index(float(event.ttft_ms))] += 1
        if event.failures:
            for failed_backend, _reason in _history(event.failures):
                other = sums.get((start, failed_backend))
                if other is None:
                    other = sums[(start, failed_backend)] = [0.0] * width
                other[3] += 1
    return sums


def _upsert_buckets(sums: dict[tuple[int, str], list[float]]) -> None:
    """Add bucket sums to the stored rows (one INSERT ... ON CONFLICT DO UPDATE, PostgreSQL and SQLite alike), so
    that several web processes can add to the same bucket concurrently."""
    if not sums:
        return
    from django.db import connection

    meta = UsageBackendBucket._meta
    quote = connection.ops.quote_name
    table = quote(meta.db_table)
    names = ("bucket", "backend", *_BUCKET_SUMS)
    columns = ", ".join(quote(name) for name in names)
    updates = ", ".join(f"{quote(n)} = {table}.{quote(n)} + EXCLUDED.{quote(n)}" for n in _BUCKET_SUMS)
    sql = (
        f"INSERT INTO {table} ({columns}) VALUES ({', '.join(['%s'] * len(names))}) "
        f"ON CONFLICT ({quote('bucket')}, {quote('backend')}) DO UPDATE SET {updates}"
    )
    adapt = connection.ops.adapt_datetimefield_value
    floats = {"latency_ms_sum", "queue_wait_ms_sum", "ttft_ms_sum"}
    params = [
        (
            adapt(datetime.fromtimestamp(start, tz=UTC)),
            backend,
            *(value if name in floats else int(value) for name, value in zip(_BUCKET_SUMS, values, strict=True)),
        )
        for (start, backend), values in sorted(sums.items())  # one order for every writer: no deadlock
    ]
    with connection.cursor() as cursor:
        cursor.executemany(sql, params)


def usage_backend_buckets_prune(*, before: datetime) -> int:
    """Delete the backend buckets older than `before`; return how many."""
    deleted, _ = UsageBackendBucket.objects.filter(bucket__lt=before).delete()
    return deleted


def _insert(rows: Sequence[tuple[Any, ...]], entries: Sequence[Entry]) -> None:
    """Multi-row INSERTs through the cursor, as many rows per statement as 999 parameters allow (58 rows: Django's
    limit for SQLite, and the one used where a backend names none, as PostgreSQL's does): about 10x less CPU than
    `bulk_create`'s model instances and compiler, which matters because the writer thread shares the GIL with the
    event loop. Not `executemany`: Python's sqlite3 module lets go of the GIL around every statement step, one per
    row there, and each time takes it back from the busy event loop (a hand-off of the GIL per row, futex calls on
    both threads). The backend buckets of the same events are added in the same transaction (a retried batch is
    not counted twice)."""
    from django.db import DEFAULT_DB_ALIAS, connection, connections

    meta = UsageRecord._meta
    quote = connection.ops.quote_name
    columns = ", ".join(quote(str(cast(Field, meta.get_field(name)).column)) for name in _COLUMNS)
    head = f"INSERT INTO {quote(meta.db_table)} ({columns}) VALUES "
    values = f"({', '.join(['%s'] * len(_COLUMNS))})"
    per_statement = max(1, (connection.features.max_query_params or 999) // len(_COLUMNS))
    adapt = connection.ops.adapt_datetimefield_value
    wrapper = connections[DEFAULT_DB_ALIAS]  # not the `connection` proxy: a thread-local lookup per row otherwise
    sqlite = _sqlite_in_utc(wrapper)
    if sqlite:
        # SQLite's own `?` parameters: its Django cursor rewrites each `%s` of a statement (1,000 here) with a
        # regular expression, where a statement without any is passed on as it is.
        adapt = _sqlite_datetime
        values = values.replace("%s", "?")
    prep = cast(Field, meta.get_field("retry_history")).get_db_prep_value
    no_failures = prep([], wrapper)  # most requests have no failed attempt: their empty history is encoded once
    params = [
        (adapt(row[0]), *row[1:_JSON_COLUMN], prep(history, wrapper) if (history := row[_JSON_COLUMN]) else no_failures)
        for row in rows
    ]
    with transaction.atomic():
        with connection.cursor() as cursor:
            for start in range(0, len(params), per_statement):
                chunk = params[start : start + per_statement]
                cursor.execute(head + ", ".join([values] * len(chunk)), list(itertools.chain.from_iterable(chunk)))
        _upsert_buckets(usage_backend_buckets(entries))


def _sqlite_in_utc(wrapper: Any) -> bool:
    """Whether the connection is SQLite's, stores datetimes as naive UTC text (USE_TZ, the UTC time zone) and does
    not log its queries: Django's query logging (DEBUG, as `make run` sets it, or a query capture) formats a
    statement's `%s` with its parameters and fails on `?` ones, after the statement ran."""
    return bool(
        wrapper.vendor == "sqlite" and settings.USE_TZ and wrapper.timezone_name == "UTC" and not wrapper.queries_logged
    )


def _sqlite_datetime(value: datetime | None) -> str | None:
    """An aware UTC datetime as Django's SQLite backend stores it (`str` of the naive UTC value), without its
    make_naive and time-zone checks per row: the same text, e.g. '2026-12-02 13:18:00.123456'."""
    return None if value is None else str(value.replace(tzinfo=None))


def usage_records_write(entries: Sequence[Entry]) -> int:
    """Insert a batch of usage events (keys deleted meanwhile are dropped from the row); return the count.

    A connection failure raises (the writer keeps the batch and retries); a row the database refuses is skipped
    rather than blocking every later batch. A refused batch is split in halves until the refused rows are alone:
    one bad row among 2,000 costs about 2 x log2(2000) = 22 statements in the database thread, not 2,000.
    """
    key_ids = {e.key_id for _, e in entries if e.key_id is not None}
    known = set(ApiKey.objects.filter(pk__in=key_ids).values_list("pk", flat=True)) if key_ids else set()
    rows = [_values(created, event, known) for created, event in entries]
    return _insert_split(rows, entries)


def _insert_split(rows: list[tuple[Any, ...]], entries: Sequence[Entry], *, whole: bool = True) -> int:
    """Insert these rows in one transaction, or, when the database refuses them, each half apart (recursively):
    every row the database accepts is written once, every row it refuses is dropped and logged."""
    try:
        _insert(rows, entries)
        return len(rows)
    except (DataError, IntegrityError) as exc:
        if len(rows) == 1:
            logger.error("usage writer: dropping record %s: %s", rows[0][1], exc)
            return 0
        if whole:
            logger.warning(
                "usage writer: batch of %d refused (%s); splitting it to drop the refused rows", len(rows), exc
            )
    middle = len(rows) // 2
    return _insert_split(rows[:middle], entries[:middle], whole=False) + _insert_split(
        rows[middle:], entries[middle:], whole=False
    )


def _hour(moment: datetime) -> datetime:
    """The start of the UTC hour containing `moment` (naive datetimes are taken as UTC)."""
    if timezone.is_naive(moment):
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def _hourly_aggregates(records: Any) -> Any:
    return (
        records.annotate(bucket=TruncHour("created_at", tzinfo=UTC))
        .values("bucket", "principal", "model")
        .annotate(
            n=Count("id"),
            n_errors=Count("id", filter=Q(status__gte=400)),
            prompt=Sum("prompt_tokens"),
            completion=Sum("completion_tokens"),
            latency=Sum("latency_ms"),
        )
        .order_by()
    )


def usage_rollup(*, since: datetime) -> int:
    """Rebuild the hourly rows of every hour from the one containing `since` on, from the records (idempotent).

    Delete and insert in one transaction, so running it twice, or concurrently with the writer, gives the same
    rows as running it once after the last write. Returns the number of hourly rows written.
    """
    start = _hour(since)
    with transaction.atomic():
        aggregates = list(_hourly_aggregates(UsageRecord.objects.filter(created_at__gte=start)))
        UsageHourly.objects.filter(hour__gte=start).delete()
        UsageHourly.objects.bulk_create(
            [
                UsageHourly(
                    hour=a["bucket"],
                    principal=a["principal"],
                    model=a["model"],
                    requests=a["n"],
                    errors=a["n_errors"],
                    prompt_tokens=a["prompt"] or 0,
                    completion_tokens=a["completion"] or 0,
                    latency_ms_sum=a["latency"] or 0.0,
                )
                for a in aggregates
            ],
            batch_size=500,
        )
    return len(aggregates)


def usage_rollup_recent(*, lookback_hours: int, now: datetime | None = None) -> int:
    """The periodic rollup: the last `lookback_hours`, and back to the last rolled-up hour if that is older
    (so hours missed while the scheduler was down are rebuilt too)."""
    now = now or timezone.now()
    since = now - timedelta(hours=lookback_hours)
    last = UsageHourly.objects.aggregate(last=Max("hour"))["last"]
    if last is not None and last < since:
        since = last
    return usage_rollup(since=since)


# --- selectors (reads) --------------------------------------------------------------------------------------


@dataclass(slots=True)
class UsageRow:
    """Usage of one period (hour or day), key and model; or a total when some of them are None."""

    period: datetime | None
    key: str | None
    model: str | None
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms_sum: float = 0.0

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens

    @property
    def mean_latency_ms(self) -> float | None:
        """Mean latency of the requests (None without requests)."""
        return round(self.latency_ms_sum / self.requests, 2) if self.requests else None

    def add(self, requests: int, errors: int, prompt: int, completion: int, latency: float) -> None:
        """Accumulate one source row."""
        self.requests += requests
        self.errors += errors
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        self.latency_ms_sum += latency


def rollup_boundary() -> datetime | None:
    """The latest hour the rollup has written: hours before it are read from the rollup, the rest from records."""
    return UsageHourly.objects.aggregate(last=Max("hour"))["last"]


def usage_hourly_list(
    *, start: datetime, end: datetime, key: str | None = None, model: str | None = None
) -> list[tuple[datetime, str, str, int, int, int, int, float]]:
    """Hourly usage (hour, key, model, requests, errors, prompt, completion, latency sum) of [start, end).

    Hours already rolled up come from `UsageHourly`; the latest rolled-up hour and later ones (still filling)
    are aggregated from the raw records, so the answer is current to the last flush (about 1 s).
    """
    start = _hour(start)
    boundary = rollup_boundary()
    out: list[tuple[datetime, str, str, int, int, int, int, float]] = []
    filters: dict[str, str] = {}
    if key is not None:
        filters["principal"] = key
    if model is not None:
        filters["model"] = model
    if boundary is not None and boundary > start:
        hourly = UsageHourly.objects.filter(hour__gte=start, hour__lt=min(boundary, end), **filters)
        out.extend(
            hourly.values_list(
                "hour",
                "principal",
                "model",
                "requests",
                "errors",
                "prompt_tokens",
                "completion_tokens",
                "latency_ms_sum",
            ).order_by()
        )
    raw_start = max(start, boundary) if boundary is not None else start
    if raw_start < end:
        records = UsageRecord.objects.filter(created_at__gte=raw_start, created_at__lt=end, **filters)
        out.extend(
            (
                a["bucket"],
                a["principal"],
                a["model"],
                a["n"],
                a["n_errors"],
                a["prompt"] or 0,
                a["completion"] or 0,
                a["latency"] or 0.0,
            )
            for a in _hourly_aggregates(records)
        )
    return out


def usage_report(
    *,
    start: datetime,
    end: datetime,
    group_by: str = "hour",
    key: str | None = None,
    model: str | None = None,
    by_key: bool = True,
    by_model: bool = True,
) -> list[UsageRow]:
    """Usage per period (`hour` or `day`, UTC; `total` for the whole range) and, optionally, per key and model."""
    rows: dict[tuple[datetime | None, str | None, str | None], UsageRow] = {}
    for hour, principal, model_name, requests, errors, prompt, completion, latency in usage_hourly_list(
        start=start, end=end, key=key, model=model
    ):
        if group_by == "day":
            period: datetime | None = hour.astimezone(UTC).replace(hour=0)
        elif group_by == "total":
            period = None
        else:
            period = hour.astimezone(UTC)
        group = (period, principal if by_key else None, model_name if by_model else None)
        row = rows.get(group)
        if row is None:
            row = rows[group] = UsageRow(*group)
        row.add(requests, errors, prompt, completion, latency)
    return sorted(
        rows.values(), key=lambda r: (r.period or datetime.min.replace(tzinfo=UTC), r.key or "", r.model or "")
    )


def usage_totals(rows: Sequence[UsageRow]) -> UsageRow:
    """The sum of report rows."""
    total = UsageRow(None, None, None)
    for row in rows:
        total.add(row.requests, row.errors, row.prompt_tokens, row.completion_tokens, row.latency_ms_sum)
    return total


# --- backend traffic (the operations dashboard): read from the 5-minute buckets, never from the records ---------


@dataclass(slots=True)
class Traffic:
    """Sums of backend buckets (any backends, any period) and the figures derived from them."""

    requests: int = 0
    errors: int = 0
    client_errors: int = 0
    failed_attempts: int = 0
    latency_ms_sum: float = 0.0
    queue_wait_ms_sum: float = 0.0
    ttft_count: int = 0
    ttft_ms_sum: float = 0.0
    histogram: list[int] = field(default_factory=lambda: [0] * len(TTFT_COLUMNS))

    def add(self, other: Traffic) -> None:
        """Accumulate another sum (histograms bucket by bucket)."""
        self.requests += other.requests
        self.errors += other.errors
        self.client_errors += other.client_errors
        self.failed_attempts += other.failed_attempts
        self.latency_ms_sum += other.latency_ms_sum
        self.queue_wait_ms_sum += other.queue_wait_ms_sum
        self.ttft_count += other.ttft_count
        self.ttft_ms_sum += other.ttft_ms_sum
        self.histogram = [a + b for a, b in zip(self.histogram, other.histogram, strict=True)]

    @property
    def error_rate(self) -> float | None:
        """Share of attempts that failed: 5xx answers plus failed attempts retried elsewhere (None: no traffic)."""
        attempts = self.requests + self.failed_attempts
        return (self.errors + self.failed_attempts) / attempts if attempts else None

    @property
    def mean_latency_ms(self) -> float | None:
        """Mean latency of the requests (None: none)."""
        return self.latency_ms_sum / self.requests if self.requests else None

    def ttft_percentile(self, quantile: float) -> float | None:
        """The time to first token at `quantile` (0..1), interpolated linearly inside its histogram bucket: exact
        to the bucket's width (`TTFT_BOUNDS_MS`); past the last bound, the last bound. None without streams."""
        total = sum(self.histogram)
        if not total:
            return None
        target = quantile * total
        seen = 0
        lower = 0.0
        for index, count in enumerate(self.histogram):
            if index == len(TTFT_BOUNDS_MS):
                return float(TTFT_BOUNDS_MS[-1])
            upper = float(TTFT_BOUNDS_MS[index])
            if count and seen + count >= target:
                return lower + (upper - lower) * max(0.0, target - seen) / count
            seen += count
            lower = upper
        return float(TTFT_BOUNDS_MS[-1])


_TRAFFIC_FIELDS = (
    "requests",
    "errors",
    "client_errors",
    "failed_attempts",
    "latency_ms_sum",
    "queue_wait_ms_sum",
    "ttft_count",
    "ttft_ms_sum",
)


def _traffic(row: Mapping[str, Any]) -> Traffic:
    return Traffic(
        **{name: row[name] or 0 for name in _TRAFFIC_FIELDS},
        histogram=[int(row[name] or 0) for name in TTFT_COLUMNS],
    )


def _sums() -> dict[str, Sum]:
    return {name: Sum(name) for name in (*_TRAFFIC_FIELDS, *TTFT_COLUMNS)}


def bucket_start(moment: datetime) -> datetime:
    """The start of the 5-minute bucket holding `moment` (UTC)."""
    epoch = int(moment.timestamp()) // BUCKET_SECONDS * BUCKET_SECONDS
    return datetime.fromtimestamp(epoch, tz=UTC)


def usage_backend_traffic(*, start: datetime, end: datetime) -> dict[str, Traffic]:
    """Traffic per backend ("" for requests that reached none) of the buckets starting in [start, end): one
    grouped query over at most (backends x buckets in the range) rows."""
    rows = (
        UsageBackendBucket.objects.filter(bucket__gte=start, bucket__lt=end)
        .values("backend")
        .annotate(**_sums())
        .order_by()
    )
    return {row["backend"]: _traffic(row) for row in rows}


def usage_backend_traffic_hourly(*, start: datetime, end: datetime) -> dict[tuple[datetime, str], Traffic]:
    """Traffic per (UTC hour, backend) of the buckets starting in [start, end), for the 24-hour charts."""
    rows = (
        UsageBackendBucket.objects.filter(bucket__gte=start, bucket__lt=end)
        .annotate(hour=TruncHour("bucket", tzinfo=UTC))
        .values("hour", "backend")
        .annotate(**_sums())
        .order_by()
    )
    return {(row["hour"].astimezone(UTC), row["backend"]): _traffic(row) for row in rows}
