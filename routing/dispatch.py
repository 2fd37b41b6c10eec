"""Choosing a backend and sending it the request: strategies, circuit breakers, admission, retries.

One `Dispatcher` per process owns the pooled HTTP client, the per-pool strategy instances, the in-flight
counters, the per-pool admission queues, the circuit breakers, the retry budget and the metrics scraper.

Admission: a request takes a slot of a backend below its `max_concurrent_requests` at once, unless others already
wait for that pool; otherwise it waits in the pool's bounded fair queue (`routing.fairqueue`: classes first, then
fairness between keys, promotion of old requests, the last-to-be-served shed when full). A released slot is handed
directly to the queue's next request, so a newcomer cannot take it first.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from backends.models import InvalidApiKeyError, RoutingStrategy, bearer_headers
from backends.snapshot import BackendSnap, ModelSnap, PoolSnap, RegistrySnapshot
from core.aio import running_loop
from governance.priority import BY_RANK, DEFAULT_FLOW, Flow, Priority
from routing import errors
from routing.errors import APIError
from routing.fairqueue import FairQueue, Ticket
from routing.health import CircuitBreakers, MetricsScraper, RetryBudget
from routing.prefix import PrefixConfig, PrefixSync, prefix_blocks, prompt_bytes
from routing.strategies import (
    NEEDS_AFFINITY_KEY,
    NEEDS_CACHED_BLOCKS,
    NEEDS_METRICS,
    NEEDS_PEER_LOAD,
    NEEDS_PREFIX,
    PrefixAware,
    RoutingStats,
    Strategy,
    strategy_create,
)
from routing.upstream import (
    FastUpstream,
    HttpxUpstream,
    Timeouts,
    UpstreamClient,
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamPoolTimeout,
    UpstreamReadTimeout,
    UpstreamResponse,
)

if TYPE_CHECKING:
    from routing.precise import PreciseRouting

logger = logging.getLogger(__name__)

RETRYABLE_STATUSES = frozenset({502, 503})
SERVABLE_SCAN = 8
EMPTY_LOAD: dict[str, int] = {}  # no other process's load known (no prefix sync): never written to
"""When the next queued request cannot use a freed slot (a retry excluding that backend, a fallback chain), this many
of the following ones are tried."""

# Every live dispatcher of this process, for admin and the management API (weak: nothing to reset in tests).
LIVE_DISPATCHERS: weakref.WeakSet[Dispatcher] = weakref.WeakSet()


@dataclass(frozen=True, slots=True)
class _Prepared:
    """Per-backend request constants, computed once per registry version."""

    base_url: str
    headers: dict[str, str]
    timeouts: Timeouts
    upstream: UpstreamClient


@dataclass(frozen=True, slots=True)
class RequestContext:
    """What routing may read from the request itself: the `user` field and the headers (for affinity keys), and
    the validated body (for the prompt's prefix), computed only for strategies that declare they need them.
    `pin`: the one backend the request must go to (a stored response's), whatever the strategy."""

    user: str | None = None
    headers: Sequence[tuple[bytes, bytes]] = field(default_factory=tuple)
    endpoint: str = ""
    data: dict[str, Any] | None = None
    token_ids: Sequence[int] | None = None
    """The prompt's token ids, in precise prefix mode only (`routing.precise`)."""
    pin: BackendSnap | None = None

    def prefix_blocks(self, block_bytes: int) -> tuple[int, ...]:
        """The prompt's chained block keys (empty without a prompt)."""
        if self.data is None:
            return ()
        return prefix_blocks(prompt_bytes(self.endpoint, self.data), block_bytes)

    def affinity_key(self, source: str) -> str | None:
        """The session key named by a pool's `affinity_key` setting ("user" or "header:<name>")."""
        if source == "user":
            return self.user
        if source.startswith("header:"):
            wanted = source[len("header:") :].strip().lower().encode()
            for name, value in self.headers:
                if name == wanted:
                    return value.decode("latin-1")
        return None


NO_CONTEXT = RequestContext()

MAX_FAILURES_LOGGED = 10
"""Failed attempts kept in a request's retry history (the attempt limit is normally far lower)."""


@dataclass(slots=True)
class Attempts:
    """What one `send` went through besides its answer, for the request log: the time waited for a backend slot,
    how many backends were tried, and the (backend, reason) of each failed attempt. Filled by the dispatcher."""

    queue_wait_ms: float = 0.0
    tried: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)

    def failed(self, backend: str, reason: str) -> None:
        """Note one failed attempt (bounded)."""
        if len(self.failures) < MAX_FAILURES_LOGGED:
            self.failures.append((backend, reason))


class AttemptObserver(Protocol):
    """Told of the queue and of each upstream attempt (routing.tracing.RequestTrace, while tracing is on)."""

    def queued(self) -> None:
        """Every usable backend is at its limit: the request starts waiting for a slot."""

    def attempt(self, backend: BackendSnap, registry: RegistrySnapshot, previous: APIError | None) -> dict[str, str]:
        """An attempt on `backend` starts (after `previous`, the last one's failure); returns headers to send."""
        ...


@dataclass(eq=False, slots=True)
class _Waiter:
    """A queued request: what picking a backend for it needs, and the future its backend (or None) is handed to."""

    model: ModelSnap
    registry: RegistrySnapshot
    exclude: set[str]
    context: RequestContext
    future: asyncio.Future[BackendSnap | None]


def with_vllm_priority(body: bytes, priority: Priority) -> bytes:
    """The JSON object `body` with vLLM's `priority` for the class appended (the gateway removed the client's)."""
    if len(body) > 2 and body.endswith(b"}"):
        return body[:-1] + b',"priority":' + str(priority.vllm).encode() + b"}"
    return body


class Dispatcher:
    """Sends requests to backends of a model's pools; see the module docstring."""

    def __init__(
        self,
        *,
        max_attempts: int = 2,
        max_connections: int = 1000,
        max_keepalive: int = 200,
        transport: httpx.AsyncBaseTransport | None = None,
        circuits: CircuitBreakers | None = None,
        retry_budget: RetryBudget | None = None,
        scraper: MetricsScraper | None = None,
        queue_max: int = 100,
        queue_timeout_s: float = 10.0,
        queue_promote_after_s: float = 5.0,
        prefix: PrefixConfig | None = None,
        prefix_sync: PrefixSync | None = None,
        upstream_limits: dict[str, Any] | None = None,
        precise: PreciseRouting | None = None,
    ) -> None:
        self.max_attempts = max(1, max_attempts)
        # Backends (http:// and https://) are reached through FastUpstream (asyncio + httptools: ~50 us of CPU a
        # request at c64 against aiohttp's ~185, docs/performance.md), with limits on what a backend may send.
        # httpx serves background work (metrics scraping) and tests that inject a transport.
        self._httpx = HttpxUpstream(transport=transport, max_connections=max_connections, max_keepalive=max_keepalive)
        self._fast = (
            None
            if transport is not None
            else FastUpstream(
                max_connections_per_host=max_connections,
                max_keepalive_per_host=max_keepalive,
                **(upstream_limits or {}),
            )
        )
        self._strategies: dict[tuple[str, str], Strategy] = {}
        self._prepared: dict[BackendSnap, _Prepared] = {}
        self._prepared_version = -2
        self.in_flight: defaultdict[str, int] = defaultdict(int)
        self.circuits = circuits or CircuitBreakers()
        self.retry_budget = retry_budget or RetryBudget()
        self.scraper = scraper or MetricsScraper()
        self.queue_max = queue_max
        self.queue_timeout_s = queue_timeout_s
        self.queue_promote_after_s = queue_promote_after_s
        self._queues: dict[str, FairQueue[_Waiter]] = {}  # by pool, created at its first wait
        self.latency_ms: dict[str, float] = {}
        self.retries = 0
        self.rejected_capacity = 0
        self._registry: RegistrySnapshot | None = None
        self.prefix_config = prefix or PrefixConfig()
        self.prefix_sync = prefix_sync
        if prefix_sync is not None:  # what it publishes as this process's load
            prefix_sync.load_source = lambda: self.in_flight
        self.precise = precise  # KV-cache events (ROUTER_KV_EVENTS); None: off, and nothing below costs anything
        self._scraped_pools: set[str] = set()
        LIVE_DISPATCHERS.add(self)

    # --- client -------------------------------------------------------------------------------------------------

    def client(self) -> httpx.AsyncClient:
        """The pooled httpx client of the running event loop (background work such as metrics scraping)."""
        return self._httpx.client()

    async def aclose(self) -> None:
        """Stop background work and close pooled connections."""
        await self.scraper.aclose()
        if self.prefix_sync is not None:
            await self.prefix_sync.aclose()
        if self.precise is not None:
            await self.precise.aclose()
        await self._httpx.aclose()
        if self._fast is not None:
            await self._fast.aclose()

    # --- choice -------------------------------------------------------------------------------------------------

    def _strategy(self, pool: PoolSnap) -> Strategy:
        key = (pool.name, pool.strategy)
        strategy = self._strategies.get(key)
        if strategy is None:
            strategy = self._strategies[key] = strategy_create(pool.strategy, prefix=self.prefix_config)
            if isinstance(strategy, PrefixAware) and self.prefix_sync is not None:
                sync, name = self.prefix_sync, pool.name
                strategy.on_insert = lambda backend, blocks: sync.publish(name, backend, blocks)
                sync.attach(pool.name, strategy.index)
                sync.ensure_running()
        return strategy

    def _registry_changed(self, registry: RegistrySnapshot) -> None:
        """Forget the prefix indexes of backends that left their pool or stopped taking requests."""
        for (pool_name, _), strategy in self._strategies.items():
            if isinstance(strategy, PrefixAware):
                pool = registry.pools.get(pool_name)
                usable = [b.name for b in pool.backends if b.usable] if pool is not None else []
                strategy.index.keep_only(usable)

    def _candidates(self, pool: PoolSnap, exclude: set[str]) -> tuple[list[BackendSnap], bool]:
        """Usable backends with free capacity (healthy ones first, degraded only when no healthy one is left),
        and whether any usable backend was skipped only because it was at its concurrency limit."""
        healthy: list[BackendSnap] = []
        degraded: list[BackendSnap] = []
        full = False
        in_flight = self.in_flight
        circuits = self.circuits
        for b in pool.backends:
            if not b.usable or b.name in exclude or not circuits.allows(b.name):
                continue
            if b.max_concurrent_requests and in_flight[b.name] >= b.max_concurrent_requests:
                full = True
                continue
            (degraded if b.status == "degraded" else healthy).append(b)
        return healthy or degraded, full

    def pick(
        self,
        model: ModelSnap,
        registry: RegistrySnapshot,
        exclude: set[str],
        context: RequestContext = NO_CONTEXT,
    ) -> tuple[BackendSnap | None, bool]:
        """Choose a backend in the model's pool, else its fallback pools in order (without taking it).

        Returns the backend (or None) and whether some usable backend was only at its concurrency limit.
        """
        if context.pin is not None:
            return self._pick_pinned(context.pin, exclude)
        any_full = False
        for pool_name in (model.pool, *model.fallback_pools):
            pool = registry.pools.get(pool_name)
            if pool is None or not pool.enabled:
                continue
            candidates, full = self._candidates(pool, exclude)
            any_full = any_full or full
            if not candidates:
                continue
            strategy = self._strategy(pool)
            needs = strategy.needs
            if not needs:
                return strategy.select(candidates, RoutingStats(in_flight=self.in_flight)), any_full
            if registry is not self._registry:
                self._registry = registry
                self._registry_changed(registry)
            if NEEDS_METRICS in needs:
                self._scraped_pools.add(pool.name)
                self.scraper.ensure_running(self._scrape_targets, self.client)
            stats = RoutingStats(
                in_flight=self.in_flight,
                metrics=self.scraper.fresh() if NEEDS_METRICS in needs else {},
                affinity_key=context.affinity_key(pool.affinity_key) if NEEDS_AFFINITY_KEY in needs else None,
                prefix=context.prefix_blocks(self.prefix_config.block_bytes) if NEEDS_PREFIX in needs else (),
                peer_in_flight=(
                    self.prefix_sync.peer_in_flight
                    if self.prefix_sync is not None and NEEDS_PEER_LOAD in needs
                    else EMPTY_LOAD
                ),
                cached_blocks=(
                    self.precise.cached_blocks(candidates, context.token_ids)
                    if context.token_ids is not None and self.precise is not None and NEEDS_CACHED_BLOCKS in needs
                    else {}
                ),
            )
            return strategy.select(candidates, stats), any_full
        return None, any_full

    def _pick_pinned(self, backend: BackendSnap, exclude: set[str]) -> tuple[BackendSnap | None, bool]:
        """A pinned request's backend, unless disabled, already tried, its circuit open, or at its limit (full)."""
        if backend.state == "disabled" or backend.name in exclude or not self.circuits.allows(backend.name):
            return None, False
        if backend.max_concurrent_requests and self.in_flight[backend.name] >= backend.max_concurrent_requests:
            return None, True
        return backend, False

    def _scrape_targets(self) -> list[BackendSnap]:
        registry = self._registry
        if registry is None:
            return []
        return [
            b
            for pool in registry.pools.values()
            if pool.enabled and pool.name in self._scraped_pools
            for b in pool.backends
            if b.state != "disabled"
        ]

    async def acquire(
        self,
        model: ModelSnap,
        registry: RegistrySnapshot,
        exclude: set[str],
        context: RequestContext = NO_CONTEXT,
        observer: AttemptObserver | None = None,
        flow: Flow = DEFAULT_FLOW,
        attempts: Attempts | None = None,
    ) -> BackendSnap | None:
        """Take a backend for one attempt: wait in the pool's bounded fair queue while every usable one is at its
        limit (or others already wait for the pool).

        Returns None when no backend is usable at all; raises 429 when the request is refused or shed from a full
        queue, or its wait times out. The time spent in the queue is added to `attempts.queue_wait_ms`.
        """
        queue = self._queues.get(model.pool)
        if not queue:  # nobody waits for this pool: a free slot is this request's
            backend, any_full = self.pick(model, registry, exclude, context)
            if backend is not None:
                self._take(backend)
                return backend
            if not any_full:
                return None
            if queue is None:
                queue = self._queues[model.pool] = FairQueue(
                    classes=len(BY_RANK), max_size=self.queue_max, promote_after_s=self.queue_promote_after_s
                )
        if attempts is None:
            return await self._wait(queue, model, registry, exclude, context, flow, observer)
        waiting_since = time.monotonic()
        try:
            return await self._wait(queue, model, registry, exclude, context, flow, observer)
        finally:
            attempts.queue_wait_ms += (time.monotonic() - waiting_since) * 1000.0

    def _take(self, backend: BackendSnap) -> None:
        self.in_flight[backend.name] += 1
        self.circuits.acquire(backend.name)

    async def _wait(
        self,
        queue: FairQueue[_Waiter],
        model: ModelSnap,
        registry: RegistrySnapshot,
        exclude: set[str],
        context: RequestContext,
        flow: Flow,
        observer: AttemptObserver | None,
    ) -> BackendSnap | None:
        loop = running_loop()
        future: asyncio.Future[BackendSnap | None] = loop.create_future()
        queue.max_size = self.queue_max
        ticket, shed = queue.offer(
            flow.key, flow.priority.rank, _Waiter(model, registry, exclude, context, future), weight=flow.weight
        )
        if shed is not None:
            self.rejected_capacity += 1
            if not shed.item.future.done():
                error = errors.capacity_exceeded(shed.item.model.name, queue_full=True, shed=True)
                shed.item.future.set_exception(error)
        if ticket is None:
            self.rejected_capacity += 1
            raise errors.capacity_exceeded(model.name, queue_full=True)
        if observer is not None:
            observer.queued()
        self._drain(queue)
        timer = loop.call_later(self.queue_timeout_s, self._expire, queue, ticket)
        try:
            return await future
        except BaseException:
            # Timed out or shed (an APIError), or cancelled (the client left): out of the queue, and a slot
            # handed over meanwhile is given back.
            queue.remove(ticket)
            if future.done() and not future.cancelled() and future.exception() is None:
                backend = future.result()
                if backend is not None:
                    self.done(backend, None)
            raise
        finally:
            timer.cancel()

    def _expire(self, queue: FairQueue[_Waiter], ticket: Ticket[_Waiter]) -> None:
        if queue.remove(ticket):
            self.rejected_capacity += 1
            if not ticket.item.future.done():
                ticket.item.future.set_exception(errors.capacity_exceeded(ticket.item.model.name, queue_full=False))

    def _drain(self, queue: FairQueue[_Waiter]) -> None:
        """Hand free slots to the queue's requests in the discipline's order, while there are some."""
        while queue:
            ticket = queue.peek()
            assert ticket is not None
            waiter = ticket.item
            if waiter.future.done():  # cancelled, not yet withdrawn by its task
                queue.remove(ticket)
                continue
            backend, any_full = self.pick(waiter.model, waiter.registry, waiter.exclude, waiter.context)
            if backend is None and any_full:
                found = self._servable(queue)
                if found is None:
                    return
                ticket, backend = found
            queue.take(ticket)
            if backend is not None:
                self._take(backend)
            ticket.item.future.set_result(backend)  # None: nothing usable at all (the request fails over or 503s)

    def _servable(self, queue: FairQueue[_Waiter]) -> tuple[Ticket[_Waiter], BackendSnap] | None:
        """The first of the next few queued requests a free slot can serve, with its backend."""
        for ticket in queue.ordered()[1 : 1 + SERVABLE_SCAN]:
            waiter = ticket.item
            if waiter.future.done():
                continue
            backend, _ = self.pick(waiter.model, waiter.registry, waiter.exclude, waiter.context)
            if backend is not None:
                return ticket, backend
        return None

    @property
    def waiting(self) -> int:
        """Requests waiting in this process's admission queues."""
        return sum(len(q) for q in self._queues.values())

    def queue_view(self) -> dict[str, dict[str, object]]:
        """Per pool with a queue: waiting requests per class, and the counts of shed, refused and promoted ones."""
        return {
            pool: {
                "waiting": dict(zip((p.value for p in BY_RANK), q.depth(), strict=True)),
                "shed": q.shed,
                "refused": q.refused,
                "promoted": q.promotions,
            }
            for pool, q in self._queues.items()
        }

    def done(self, backend: BackendSnap, ok: bool | None = True, reason: str = "") -> None:
        """Release the backend's slot and record the outcome: ok, failed (reason), or None (no verdict)."""
        self.in_flight[backend.name] -= 1
        if ok is True:
            self.circuits.success(backend.name)
        elif ok is False:
            self.circuits.failure(backend.name, reason)
            if not self.circuits.allows(backend.name):
                self._forget(backend.name)  # its circuit opened: whatever it cached may be gone when it is back
        else:
            self.circuits.release(backend.name)
        if self._queues:
            # A slot (or a circuit) changed: hand it to the backend's pool's queue first, then to the other pools'
            # (their models may fall back to this pool).
            own = self._queues.get(backend.pool)
            if own:
                self._drain(own)
            for queue in self._queues.values():
                if queue and queue is not own:
                    self._drain(queue)

    def _forget(self, backend: str) -> None:
        for strategy in self._strategies.values():
            if isinstance(strategy, PrefixAware):
                strategy.forget(backend)

    def prefix_view(self) -> dict[str, dict[str, float | int | None]]:
        """Per backend: the prefix index's size (blocks) and routing's estimated hit ratio."""
        out: dict[str, dict[str, float | int | None]] = {}
        for strategy in self._strategies.values():
            if isinstance(strategy, PrefixAware):
                for name in strategy.index.backends():
                    out[name] = {
                        "prefix_index_blocks": strategy.index.size(name),
                        "prefix_estimated_hit_ratio": strategy.index.hit_ratio(name),
                    }
        return out

    def prepared(self, backend: BackendSnap, version: int) -> _Prepared:
        """Headers, URL and timeouts of a backend, cached per registry version."""
        if version != self._prepared_version:
            self._prepared.clear()
            self._prepared_version = version
        prep = self._prepared.get(backend)
        if prep is None:
            headers = {"content-type": "application/json"}
            # bearer_headers normalises the key, or raises InvalidApiKeyError (naming no secret) for a bad one.
            headers.update({k.lower(): v for k, v in bearer_headers(backend.api_key).items()})
            timeouts = Timeouts(
                connect=backend.connect_timeout_s,
                read=backend.read_timeout_s,
                write=backend.read_timeout_s,
                pool=backend.connect_timeout_s,
            )
            fast = self._fast is not None and FastUpstream.supports(backend.base_url)
            upstream: UpstreamClient = self._fast if fast else self._httpx  # type: ignore[assignment]
            prep = self._prepared[backend] = _Prepared(backend.base_url, headers, timeouts, upstream)
        return prep

    def _observe_latency(self, backend: str, started: float) -> None:
        elapsed = (time.perf_counter() - started) * 1000.0
        previous = self.latency_ms.get(backend)
        self.latency_ms[backend] = elapsed if previous is None else previous * 0.8 + elapsed * 0.2

    # --- sending ------------------------------------------------------------------------------------------------

    async def send(
        self,
        *,
        path: str,
        body: bytes,
        model: ModelSnap,
        registry: RegistrySnapshot,
        request_id: str,
        stream: bool,
        context: RequestContext = NO_CONTEXT,
        observer: AttemptObserver | None = None,
        flow: Flow = DEFAULT_FLOW,
        max_attempts: int | None = None,
        method: str = "POST",
        attempts: Attempts | None = None,
    ) -> tuple[UpstreamResponse, BackendSnap]:
        """Send the request; on connect errors and 502/503 (nothing sent to the client yet) retry on another
        backend, within the attempt limit (`max_attempts`, default the dispatcher's) and the retry budget.

        Returns the response (its body unread when `stream`; the caller closes it) and the backend, whose slot
        stays taken: the caller calls `done(backend, ok)` when the exchange is over. An `observer` (tracing) is
        told of the queue and of every attempt, and adds its headers (`traceparent`) to each. `flow` places the
        request in a full pool's queue; pools running vLLM's priority scheduler receive its class as vLLM's
        `priority`. `attempts`, when given, is filled with the queue wait, the backends tried and why each failed
        attempt failed (the request log).
        """
        tried: set[str] = set()
        failure: APIError | None = None
        log = attempts if attempts is not None else Attempts()
        self.retry_budget.request()
        if self.precise is not None:
            context = await self._with_token_ids(model, registry, context)
        for attempt in range(max_attempts or self.max_attempts):
            if attempt and not self.retry_budget.try_retry():
                logger.warning("retry budget exhausted; not retrying request %s", request_id)
                break
            backend = await self.acquire(model, registry, tried, context, observer, flow, log)
            if backend is None:
                break
            if attempt:
                self.retries += 1
            tried.add(backend.name)
            log.tried += 1
            traced = observer.attempt(backend, registry, failure) if observer is not None else None
            try:
                prep = self.prepared(backend, registry.version)
            except InvalidApiKeyError as exc:  # a key that slipped past validation: that backend alone fails
                failure = errors.backend_failed(backend.name, "its API key cannot be sent", detail=str(exc))
                self.done(backend, False, failure.message)
                log.failed(backend.name, "bad_api_key")
                continue
            headers = prep.headers | {"x-request-id": request_id}
            if traced:
                headers.update(traced)
            pool = registry.pools.get(backend.pool)
            payload = with_vllm_priority(body, flow.priority) if pool is not None and pool.priority_scheduling else body
            started = time.perf_counter()
            try:
                response = await prep.upstream.send(
                    method,
                    prep.base_url + path,
                    headers=headers,
                    content=payload,
                    timeouts=prep.timeouts,
                    stream=stream,
                )
            except UpstreamConnectTimeout:
                failure = errors.backend_timeout(backend.name, backend.connect_timeout_s, "accept the connection")
                self.done(backend, False, failure.message)
                log.failed(backend.name, "connect_timeout")
                continue
            except UpstreamConnectError as exc:
                failure = errors.backend_failed(backend.name, "cannot connect", detail=errors.describe(exc))
                self.done(backend, False, failure.message)
                log.failed(backend.name, "connect_error")
                logger.warning("backend %s: %s; trying another", backend.name, failure.message)
                continue
            except UpstreamClosed as exc:
                # Closed or reset before answering (a stale keep-alive connection, or the backend died with the
                # request in flight): nothing reached the client, so another backend may serve it.
                failure = errors.backend_failed(
                    backend.name, "connection closed before an answer", detail=errors.describe(exc)
                )
                self.done(backend, False, failure.message)
                log.failed(backend.name, "closed")
                continue
            except UpstreamReadTimeout:
                self.done(backend, False, "read timeout")
                log.failed(backend.name, "read_timeout")
                raise errors.backend_timeout(backend.name, backend.read_timeout_s) from None
            except UpstreamPoolTimeout:
                self.done(backend, None)
                log.failed(backend.name, "pool_timeout")
                failure = errors.no_backend(model.name)
                continue
            except UpstreamError as exc:
                self.done(backend, False, errors.describe(exc))
                log.failed(backend.name, "broken_answer")
                raise errors.backend_failed(backend.name, "broken answer", detail=errors.describe(exc)) from None
            except BaseException:
                self.done(backend, None)
                raise
            self._observe_latency(backend.name, started)
            if response.status_code in RETRYABLE_STATUSES:
                detail = await _error_detail(response)
                failure = errors.backend_failed(
                    backend.name, f"HTTP {response.status_code}: {detail}", status=response.status_code
                )
                self.done(backend, False, failure.message)
                log.failed(backend.name, f"http_{response.status_code}")
                logger.warning("backend %s answered %s; trying another", backend.name, response.status_code)
                continue
            return response, backend
        raise failure if failure is not None else errors.no_backend(model.name)

    async def _with_token_ids(
        self, model: ModelSnap, registry: RegistrySnapshot, context: RequestContext
    ) -> RequestContext:
        """Precise prefix mode: the request's token ids from a backend whose KV-cache events are live, when one of
        the model's pools is prefix_aware (else, or on any failure, the context as it was: approximate mode)."""
        precise = self.precise
        assert precise is not None
        precise.observe(registry, self.client)
        if context.data is None:
            return context
        for pool_name in (model.pool, *model.fallback_pools):
            pool = registry.pools.get(pool_name)
            if pool is None or not pool.enabled or pool.strategy != RoutingStrategy.PREFIX_AWARE:
                continue
            usable = (b for b in pool.backends if b.usable and self.circuits.allows(b.name))
            backend = precise.tokenizer(usable, self.in_flight)
            if backend is None:
                continue
            try:
                prep = self.prepared(backend, registry.version)
            except InvalidApiKeyError:
                continue
            ids = await precise.token_ids(
                context.endpoint,
                context.data,
                backend=backend,
                upstream=prep.upstream,
                url=prep.base_url,
                headers=prep.headers,
            )
            return context if ids is None else replace(context, token_ids=ids)
        return context

    # --- visibility ---------------------------------------------------------------------------------------------

    def runtime_stats(self) -> dict[str, dict[str, object]]:
        """This process's view of each backend: in-flight, circuit, latency, scraped metrics."""
        names = set(self.in_flight) | set(self.latency_ms) | set(self.circuits.snapshot())
        metrics = self.scraper.fresh()
        prefix = self.prefix_view()
        precise = self.precise.view() if self.precise is not None else {}
        names |= set(metrics) | set(prefix) | set(precise)
        out: dict[str, dict[str, object]] = {}
        for name in names:
            m = metrics.get(name)
            out[name] = {
                "in_flight": self.in_flight.get(name, 0),
                "circuit": self.circuits.state(name).value,
                "latency_ms": round(self.latency_ms[name], 2) if name in self.latency_ms else None,
                "vllm_waiting": m.waiting if m else None,
                "vllm_running": m.running if m else None,
                "kv_cache_usage": m.kv_cache_usage if m else None,
                "engine_prefix_cache_hit_rate": m.prefix_cache_hit_rate if m else None,
                "engine_prefix_cache_hits": m.prefix_cache_hits if m else None,
                "engine_prefix_cache_queries": m.prefix_cache_queries if m else None,
                "prefix_index_blocks": prefix.get(name, {}).get("prefix_index_blocks"),
                "prefix_estimated_hit_ratio": prefix.get(name, {}).get("prefix_estimated_hit_ratio"),
                "kv_events_blocks": precise.get(name, {}).get("kv_events_blocks"),
            }
        return out


async def _error_detail(response: UpstreamResponse) -> str:
    """Read a failed response and return its error message (bounded), closing it."""
    try:
        raw = await response.aread()
    except UpstreamError as exc:
        return f"unreadable body ({errors.describe(exc)})"
    finally:
        await response.aclose()
    return errors.error_message_from(raw, response.status_code)
