"""Prometheus series of the backends read at scrape time (never per request): in-flight, circuit, health, state.

Registered with core.metrics by the backends app (BackendsConfig.ready) and served by governance.metrics on
/metrics, so that neither app imports the other (docs/architecture.md).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from backends.models import Backend, BackendState, HealthStatus
from backends.runtime import runtime_stats_collect
from core.db import db_call

logger = logging.getLogger(__name__)


class BackendStateCollector:
    """Backend in-flight requests, circuit state and health, read when Prometheus scrapes (never per request)."""

    CIRCUITS = ("closed", "half_open", "open")

    def describe(self) -> list[Metric]:
        """Nothing to declare up front (keeps registration free of database and Redis reads)."""
        return []

    def collect(self) -> Iterable[Metric]:
        """Merged runtime view of every web process (through Redis when configured) and health from the database."""
        try:
            runtime = runtime_stats_collect()
        except Exception as exc:  # Redis or anything else down: still export what the database says
            logger.warning("metrics: cannot collect runtime stats: %s", exc)
            runtime = {}
        rows = _backend_rows()
        pools = {name: pool for name, pool, _, _ in rows}
        names = sorted(set(runtime) | set(pools))

        in_flight = GaugeMetricFamily(
            "llm_backend_in_flight", "Requests in flight per backend (all processes).", labels=["backend", "pool"]
        )
        circuit = GaugeMetricFamily(
            "llm_backend_circuit_state",
            "Circuit breaker state per backend (1 for the current state; worst over processes).",
            labels=["backend", "pool", "state"],
        )
        circuits_open = GaugeMetricFamily(
            "llm_backend_circuit_open_processes",
            "Processes whose circuit for the backend is not closed.",
            labels=["backend", "pool"],
        )
        latency = GaugeMetricFamily(
            "llm_backend_latency_seconds", "Smoothed response-header latency per backend.", labels=["backend", "pool"]
        )
        waiting = GaugeMetricFamily(
            "llm_backend_vllm_requests_waiting", "vLLM's queue (kv_cache_aware pools).", labels=["backend", "pool"]
        )
        kv_cache = GaugeMetricFamily(
            "llm_backend_kv_cache_usage_ratio", "vLLM's KV-cache usage, 0..1.", labels=["backend", "pool"]
        )
        prefix_blocks = GaugeMetricFamily(
            "llm_backend_prefix_index_blocks",
            "Prompt blocks in the router's prefix index of the backend (prefix_aware pools).",
            labels=["backend", "pool"],
        )
        prefix_estimated = GaugeMetricFamily(
            "llm_backend_prefix_estimated_hit_ratio",
            "Share of routed prompt blocks the router expected the backend to hold (prefix_aware pools).",
            labels=["backend", "pool"],
        )
        kv_events = GaugeMetricFamily(
            "llm_backend_kv_events_blocks",
            "Blocks the engine reports holding through its KV-cache events (precise prefix mode, ROUTER_KV_EVENTS).",
            labels=["backend", "pool"],
        )
        engine_prefix = GaugeMetricFamily(
            "llm_backend_engine_prefix_cache_hit_ratio",
            "vLLM's own prefix-cache hit rate since it started (prefix_cache_hits / prefix_cache_queries).",
            labels=["backend", "pool"],
        )
        for name in names:
            stats = runtime.get(name, {})
            labels = [name, pools.get(name, "")]
            for family, key in (
                (prefix_blocks, "prefix_index_blocks"),
                (prefix_estimated, "prefix_estimated_hit_ratio"),
                (engine_prefix, "engine_prefix_cache_hit_rate"),
                (kv_events, "kv_events_blocks"),
            ):
                if stats.get(key) is not None:
                    family.add_metric(labels, float(stats[key]))
            in_flight.add_metric(labels, float(stats.get("in_flight") or 0))
            current = str(stats.get("circuit") or "closed")
            for state in self.CIRCUITS:
                circuit.add_metric([*labels, state], 1.0 if state == current else 0.0)
            circuits_open.add_metric(labels, float(stats.get("circuits_open") or 0))
            if stats.get("latency_ms") is not None:
                latency.add_metric(labels, float(stats["latency_ms"]) / 1000.0)
            if stats.get("vllm_waiting") is not None:
                waiting.add_metric(labels, float(stats["vllm_waiting"]))
            if stats.get("kv_cache_usage") is not None:
                kv_cache.add_metric(labels, float(stats["kv_cache_usage"]))
        yield from (in_flight, circuit, circuits_open, latency, waiting, kv_cache)
        yield from (prefix_blocks, prefix_estimated, engine_prefix, kv_events)
        yield from _health_families(rows)


def _backend_rows() -> list[tuple[str, str, str, str]]:
    """(name, pool, state, status) of every backend, or nothing when the database is unreachable."""
    try:
        return db_call(
            lambda: list(Backend.objects.order_by("name").values_list("name", "pool__name", "state", "status"))
        )()
    except Exception as exc:
        logger.warning("metrics: cannot read backends: %s", exc)
        return []


def _health_families(rows: list[tuple[str, str, str, str]]) -> Iterable[Metric]:
    health = GaugeMetricFamily(
        "llm_backend_health_status",
        "Last health check result per backend (1 for the current status).",
        labels=["backend", "pool", "status"],
    )
    state = GaugeMetricFamily(
        "llm_backend_state",
        "Operator state per backend (1 for the current state).",
        labels=["backend", "pool", "state"],
    )
    up = GaugeMetricFamily(
        "llm_backend_up", "1 when the backend is enabled and healthy or degraded.", labels=["backend", "pool"]
    )
    for name, pool, current_state, status in rows:
        for value in HealthStatus.values:
            health.add_metric([name, pool, value], 1.0 if value == status else 0.0)
        for value in BackendState.values:
            state.add_metric([name, pool, value], 1.0 if value == current_state else 0.0)
        usable = current_state == BackendState.ENABLED and status in (HealthStatus.HEALTHY, HealthStatus.DEGRADED)
        up.add_metric([name, pool], 1.0 if usable else 0.0)
    return (health, state, up)
