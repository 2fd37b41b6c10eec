"""The operations dashboard's figures, read from aggregates kept off the request path (never from usage records).

Sources, per page view or refresh:
- the registry (pools, backends, health written by the probes): two small queries;
- the runtime view every web process publishes to Redis (in flight, circuit, vLLM queue and KV cache, prefix
  hits; `backends.runtime`), as the pool page and /api/pools/ read it;
- the per-backend 5-minute traffic buckets the usage writer adds to at each flush (`governance.usage`): requests
  per second and error rate over the last 5-10 minutes, time to first token p50/p95 over the last hour from the
  buckets' bounded histograms, and, for the charts only, 24 hourly points;
- the latest nightly check run, grouped per backend (`backends.checks.selectors`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from django.urls import reverse
from django.utils import timezone
from django.utils.safestring import SafeString, mark_safe

from backends.checks.selectors import check_run_latest_summary
from backends.models import BackendState, HealthStatus
from backends.runtime import runtime_stats_collect
from backends.selectors import pools_with_backends
from core.svg import GREEN, RED
from governance.charts import lines_svg, stacked_bars_svg
from governance.models import BUCKET_SECONDS
from governance.usage import Traffic, bucket_start, usage_backend_traffic, usage_backend_traffic_hourly

RATE_WINDOW = timedelta(seconds=BUCKET_SECONDS)
"""Requests per second and error rate: the current 5-minute bucket and the one before it."""
TTFT_WINDOW = timedelta(hours=1)
CHART_HOURS = 24


@dataclass(slots=True)
class Figures:
    """Traffic figures of a backend, a pool or everything."""

    requests_1h: int = 0
    rps: float | None = None
    error_rate: float | None = None
    ttft_p50_ms: float | None = None
    ttft_p95_ms: float | None = None

    @classmethod
    def of(cls, recent: Traffic, hour: Traffic, seconds: float) -> Figures:
        """Figures from the traffic of the rate window (`seconds` long) and of the last hour."""
        return cls(
            requests_1h=hour.requests,
            rps=recent.requests / seconds if seconds > 0 else None,
            error_rate=recent.error_rate,
            ttft_p50_ms=hour.ttft_percentile(0.50),
            ttft_p95_ms=hour.ttft_percentile(0.95),
        )


@dataclass(slots=True)
class BackendView:
    """One backend's row."""

    name: str
    url: str
    state: str
    health: str
    health_error: str
    circuit: str
    in_flight: int
    figures: Figures
    kv_cache_usage: float | None
    vllm_waiting: float | None
    vllm_running: float | None
    prefix_hit_rate: float | None
    prefix_source: str  # "engine" (scraped from vLLM), "estimate" (the router's prefix index) or ""
    checks_passed: int | None
    checks_total: int | None


@dataclass(slots=True)
class PoolView:
    """One pool: its totals and its backends."""

    name: str
    url: str
    strategy: str
    enabled: bool
    healthy: int
    in_flight: int
    figures: Figures
    backends: list[BackendView] = field(default_factory=list)


@dataclass(slots=True)
class CheckRunView:
    """The latest nightly check run."""

    id: int
    url: str
    status: str
    trigger: str
    finished_at: str | None
    passed: int
    total: int


@dataclass(slots=True)
class Dashboard:
    """Everything the dashboard shows, but the charts."""

    generated_at: str
    pools: list[PoolView]
    total: Figures
    unrouted: Figures
    check_run: CheckRunView | None
    rate_window_s: float

    def as_json(self) -> dict[str, Any]:
        """A JSON-serialisable copy."""
        return asdict(self)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def dashboard_get(*, now: datetime | None = None) -> Dashboard:
    """The dashboard's figures now (see the module docstring for where each comes from)."""
    now = now or timezone.now()
    current = bucket_start(now)
    rate_start = current - RATE_WINDOW
    rate_seconds = max((now - rate_start).total_seconds(), 1.0)
    recent = usage_backend_traffic(start=rate_start, end=current + RATE_WINDOW)
    hour = usage_backend_traffic(start=bucket_start(now - TTFT_WINDOW), end=current + RATE_WINDOW)
    runtime = runtime_stats_collect()
    checks = check_run_latest_summary()
    per_backend_checks = checks.per_backend if checks is not None else {}
    pools: list[PoolView] = []
    for pool, backends in pools_with_backends():
        pool_recent, pool_hour = Traffic(), Traffic()
        rows: list[BackendView] = []
        for backend in backends:
            live = runtime.get(backend.name, {})
            backend_recent = recent.get(backend.name, Traffic())
            backend_hour = hour.get(backend.name, Traffic())
            pool_recent.add(backend_recent)
            pool_hour.add(backend_hour)
            engine_hits = _number(live.get("engine_prefix_cache_hit_rate"))
            estimate = _number(live.get("prefix_estimated_hit_ratio"))
            passed_total = per_backend_checks.get(backend.name)
            rows.append(
                BackendView(
                    name=backend.name,
                    url=reverse("admin:backends_backend_change", args=[backend.pk]),
                    state=backend.state,
                    health=backend.status,
                    health_error=backend.last_error or "",
                    circuit=str(live.get("circuit") or "closed"),
                    in_flight=int(live.get("in_flight") or 0),
                    figures=Figures.of(backend_recent, backend_hour, rate_seconds),
                    kv_cache_usage=_number(live.get("kv_cache_usage")),
                    vllm_waiting=_number(live.get("vllm_waiting")),
                    vllm_running=_number(live.get("vllm_running")),
                    prefix_hit_rate=engine_hits if engine_hits is not None else estimate,
                    prefix_source="engine" if engine_hits is not None else ("estimate" if estimate is not None else ""),
                    checks_passed=passed_total[0] if passed_total else None,
                    checks_total=passed_total[1] if passed_total else None,
                )
            )
        pools.append(
            PoolView(
                name=pool.name,
                url=reverse("admin:backends_gpupool_change", args=[pool.pk]),
                strategy=pool.routing_strategy,
                enabled=pool.enabled,
                healthy=sum(
                    1 for b in backends if b.status == HealthStatus.HEALTHY and b.state != BackendState.DISABLED
                ),
                in_flight=sum(row.in_flight for row in rows),
                figures=Figures.of(pool_recent, pool_hour, rate_seconds),
                backends=rows,
            )
        )
    total_recent, total_hour = Traffic(), Traffic()
    for traffic in recent.values():
        total_recent.add(traffic)
    for traffic in hour.values():
        total_hour.add(traffic)
    check_run = None
    if checks is not None:
        run = checks.run
        check_run = CheckRunView(
            id=run.pk,
            url=reverse("admin:backends_checkrun_change", args=[run.pk]),
            status=run.status,
            trigger=run.trigger,
            finished_at=run.finished_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC") if run.finished_at else None,
            passed=run.passed,
            total=run.total,
        )
    return Dashboard(
        generated_at=now.astimezone(UTC).strftime("%H:%M:%S UTC"),
        pools=pools,
        total=Figures.of(total_recent, total_hour, rate_seconds),
        unrouted=Figures.of(recent.get("", Traffic()), hour.get("", Traffic()), rate_seconds),
        check_run=check_run,
        rate_window_s=round(rate_seconds, 1),
    )


@dataclass(slots=True)
class PoolCharts:
    """The 24-hour charts of one pool (inline SVG)."""

    pool: str
    requests: SafeString
    ttft: SafeString


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value)


def dashboard_charts(*, now: datetime | None = None) -> list[PoolCharts]:
    """Per pool: requests per hour (answered, failed) and TTFT p50/p95 per hour over the last 24 hours, from the
    hourly sums of the backend buckets (one grouped query of at most backends x 24 rows)."""
    now = now or timezone.now()
    last = now.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    hours = [last - timedelta(hours=i) for i in range(CHART_HOURS - 1, -1, -1)]
    hourly = usage_backend_traffic_hourly(start=hours[0], end=bucket_start(now) + RATE_WINDOW)
    labels = [h.strftime("%H:00") for h in hours]
    charts: list[PoolCharts] = []
    for pool, backends in pools_with_backends():
        names = {b.name for b in backends}
        points: list[Traffic] = []
        for h in hours:
            traffic = Traffic()
            for name in names:
                if (h, name) in hourly:
                    traffic.add(hourly[(h, name)])
            points.append(traffic)
        requests = stacked_bars_svg(
            labels,
            [
                ("answered", GREEN, [float(p.requests - p.errors) for p in points]),
                ("failed", RED, [float(p.errors + p.failed_attempts) for p in points]),
            ],
            f"{pool.name}: requests per hour",
        )
        ttft = lines_svg(
            labels,
            [
                ("p50", "#0969da", [_rounded(p.ttft_percentile(0.5)) for p in points]),
                ("p95", "#b35900", [_rounded(p.ttft_percentile(0.95)) for p in points]),
            ],
            f"{pool.name}: time to first token (ms)",
        )
        charts.append(PoolCharts(pool=pool.name, requests=mark_safe(requests), ttft=mark_safe(ttft)))  # escaped parts
    return charts
