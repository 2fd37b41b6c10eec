"""Prometheus metrics: per-request series fed by usage events, backend state read at scrape time, `/metrics`.

Per-request series (requests, latency, time to first token, tokens, retries, rejections) are updated by
`RequestMetrics.observe` from the usage sink, with label children cached so that a request costs a few dict
lookups and counter increments. Backend state (in-flight, circuit, health) is read only when Prometheus scrapes.

Multiprocess: when `PROMETHEUS_MULTIPROC_DIR` is set (it must be set before the processes start, and emptied
at each start), every process writes its series to files there and a scrape merges them with
`multiprocess.MultiProcessCollector`; otherwise (development, one process) the default registry is served.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import ipaddress
import logging
import os
import weakref
from collections.abc import MutableMapping
from typing import Any

import orjson
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from core.metrics import scrape_collectors
from governance.events import UsageEvent

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
RATE_LIMIT_CODES = frozenset({"rate_limit_exceeded", "daily_budget_exceeded"})
NONE = "none"  # label value when a request had no model or backend (e.g. rejected before routing)

REQUESTS = Counter(
    "llm_requests",
    "Requests to the /v1 completion endpoints by model, backend and status.",
    ["model", "backend", "status"],
)
DURATION = Histogram(
    "llm_request_duration_seconds", "Time from request to last byte, by model.", ["model"], buckets=LATENCY_BUCKETS
)
TTFT = Histogram(
    "llm_time_to_first_token_seconds", "Time to the first streamed token, by model.", ["model"], buckets=TTFT_BUCKETS
)
TOKENS = Counter("llm_tokens", "Tokens by model and direction (in: prompt, out: completion).", ["model", "direction"])
RETRIES = Counter("llm_retries", "Attempts retried on another backend before the first byte.")
RATELIMIT_REJECTIONS = Counter(
    "llm_ratelimit_rejections", "Requests refused with 429 by a key's rate limit or daily budget.", ["key", "code"]
)
CAPACITY_REJECTIONS = Counter(
    "llm_capacity_rejections", "Requests refused with 429 because every backend was at its concurrency limit."
)
USAGE_BUFFERED = Gauge(
    "llm_usage_buffered_events", "Usage events waiting to be written to the database.", multiprocess_mode="livesum"
)
USAGE_WRITTEN = Counter("llm_usage_written_events", "Usage events written to the database.")
USAGE_DROPPED = Counter("llm_usage_dropped_events", "Usage events dropped (buffer full while the database was down).")
USAGE_FLUSH_FAILURES = Counter("llm_usage_flush_failures", "Failed attempts to write a batch of usage events.")

_CACHE_MAX = 10_000  # label children kept per cache; a runaway label set only costs a cache reset


class RequestMetrics:
    """Updates the per-request series from usage events; label children are cached per label tuple."""

    def __init__(self, dispatcher: Any = None) -> None:
        self.dispatcher = dispatcher
        self._requests: dict[tuple[str, str, int], Any] = {}
        self._models: dict[str, tuple[Any, Any, Any, Any]] = {}
        self._retries_seen = getattr(dispatcher, "retries", 0)
        self._capacity_seen = getattr(dispatcher, "rejected_capacity", 0)

    def observe(self, event: UsageEvent) -> None:
        """Count one finished request (runs on the event loop: no I/O)."""
        key = (event.model, event.backend, event.status)
        counter = self._requests.get(key)
        if counter is None:
            if len(self._requests) >= _CACHE_MAX:
                self._requests.clear()
            counter = self._requests[key] = REQUESTS.labels(
                event.model or NONE, event.backend or NONE, str(event.status)
            )
        counter.inc()
        per_model = self._models.get(event.model)
        if per_model is None:
            if len(self._models) >= _CACHE_MAX:
                self._models.clear()
            label = event.model or NONE
            per_model = self._models[event.model] = (
                DURATION.labels(label),
                TTFT.labels(label),
                TOKENS.labels(label, "in"),
                TOKENS.labels(label, "out"),
            )
        duration, ttft, tokens_in, tokens_out = per_model
        duration.observe(event.latency_ms / 1000.0)
        if event.ttft_ms is not None:
            ttft.observe(event.ttft_ms / 1000.0)
        if event.prompt_tokens:
            tokens_in.inc(event.prompt_tokens)
        if event.completion_tokens:
            tokens_out.inc(event.completion_tokens)
        if event.status == 429:
            self._rejected(event)
        dispatcher = self.dispatcher
        if dispatcher is not None and dispatcher.retries != self._retries_seen:
            self.sync_retries()

    def _rejected(self, event: UsageEvent) -> None:
        """Tell a rate-limit 429 from a capacity 429 (by the event's code when it has one, else the dispatcher)."""
        code = getattr(event, "code", None)
        if code is None:
            dispatcher = self.dispatcher
            capacity = getattr(dispatcher, "rejected_capacity", 0)
            if capacity > self._capacity_seen:  # the dispatcher refused one more request for capacity: this one
                self._capacity_seen += 1
                code = "backend_capacity"
            else:
                code = "rate_limit_exceeded"
        if code in RATE_LIMIT_CODES:
            RATELIMIT_REJECTIONS.labels(event.principal, code).inc()
        else:
            CAPACITY_REJECTIONS.inc()

    def sync_retries(self) -> None:
        """Add the dispatcher's retries since the last look to `llm_retries_total`."""
        dispatcher = self.dispatcher
        if dispatcher is None:
            return
        current = dispatcher.retries
        if current > self._retries_seen:
            RETRIES.inc(current - self._retries_seen)
        self._retries_seen = current


# --- scrape time --------------------------------------------------------------------------------------------


_LIVE_METRICS: weakref.WeakSet[RequestMetrics] = weakref.WeakSet()


def register_live(metrics: RequestMetrics) -> None:
    """Remember a sink's metrics so that a scrape can bring its retry count up to date."""
    _LIVE_METRICS.add(metrics)


def render_metrics() -> bytes:
    """The exposition text: every process's series (multiprocess mode) or this process's, then backend state."""
    for metrics in list(_LIVE_METRICS):
        metrics.sync_retries()
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=directory)
        base = generate_latest(registry)
    else:
        base = generate_latest(REGISTRY)
    scraped = CollectorRegistry()
    for collector in scrape_collectors():  # backend state (backends.metrics), registered by the backends app
        scraped.register(collector)
    return base + generate_latest(scraped)


# --- the endpoint -------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _networks(cidrs: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError:
            logger.error("METRICS_ALLOWED_CIDRS: %r is not a network; ignored", cidr)
    return tuple(networks)


def metrics_allowed(scope: MutableMapping[str, Any]) -> bool:
    """Whether the client may scrape: its address is in METRICS_ALLOWED_CIDRS, or it sent METRICS_TOKEN."""
    from django.conf import settings

    from governance.auth import bearer_token

    token = settings.METRICS_TOKEN
    if token:
        authorization = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), None)
        presented = bearer_token(authorization)
        if presented is not None and hmac.compare_digest(presented.encode(), token.encode()):
            return True
    client = scope.get("client")
    if not client:
        return False
    try:
        address = ipaddress.ip_address(client[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in _networks(tuple(settings.METRICS_ALLOWED_CIDRS)))


async def _send(send: Any, status: int, body: bytes, content_type: bytes, extra: tuple = ()) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _error(message: str, code: str) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}})


async def metrics_endpoint(scope: MutableMapping[str, Any], send: Any) -> None:
    """Serve GET /metrics (Prometheus text format) to allowed clients; 403 JSON to others."""
    if scope.get("method") != "GET":
        await _send(
            send, 405, _error("Use GET on /metrics.", "method_not_allowed"), b"application/json", ((b"allow", b"GET"),)
        )
        return
    if not metrics_allowed(scope):
        await _send(
            send,
            403,
            _error(
                "Metrics are not available to this client (see METRICS_ALLOWED_CIDRS / METRICS_TOKEN).", "forbidden"
            ),
            b"application/json",
        )
        return
    body = await asyncio.to_thread(render_metrics)  # reads Redis and the database: off the event loop
    await _send(send, 200, body, CONTENT_TYPE_LATEST.encode())
