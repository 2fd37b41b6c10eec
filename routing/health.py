"""Passive health in each web process: circuit breakers, the retry budget, and vLLM metrics scraping."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum

import httpx

from backends.snapshot import BackendSnap
from core.aio import running_loop
from routing.strategies import BackendMetrics

logger = logging.getLogger(__name__)


class CircuitState(StrEnum):
    """States of a backend's circuit breaker."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(slots=True)
class _Circuit:
    state: CircuitState = CircuitState.CLOSED
    failures: int = 0
    opened_at: float = 0.0
    trial_in_flight: bool = False
    last_change: float = 0.0


@dataclass(frozen=True, slots=True)
class CircuitTransition:
    """A change of a backend's circuit state, for logs, admin and metrics."""

    backend: str
    old: CircuitState
    new: CircuitState
    at: float
    reason: str


class CircuitBreakers:
    """Per-backend circuit breakers of this process.

    `threshold` consecutive failures (connect errors, timeouts, 5xx) open a circuit; after `cooldown_s` one trial
    request is let through (half-open); its success closes the circuit, its failure opens it again.
    """

    def __init__(
        self, *, threshold: int = 3, cooldown_s: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.threshold = max(1, threshold)
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._circuits: dict[str, _Circuit] = {}
        self.transitions: deque[CircuitTransition] = deque(maxlen=200)

    def state(self, backend: str) -> CircuitState:
        """The current state (an open circuit past its cool-down reads as half-open)."""
        circuit = self._circuits.get(backend)
        if circuit is None:
            return CircuitState.CLOSED
        if circuit.state is CircuitState.OPEN and self._clock() - circuit.opened_at >= self.cooldown_s:
            return CircuitState.HALF_OPEN
        return circuit.state

    def allows(self, backend: str) -> bool:
        """Whether a new request may go to the backend now (without taking the half-open trial)."""
        circuit = self._circuits.get(backend)
        if circuit is None or circuit.state is CircuitState.CLOSED:
            return True
        return self.state(backend) is CircuitState.HALF_OPEN and not circuit.trial_in_flight

    def acquire(self, backend: str) -> None:
        """Note that a request is being sent; in half-open state it becomes the one trial."""
        circuit = self._circuits.get(backend)
        if circuit is not None and circuit.state is not CircuitState.CLOSED:
            if circuit.state is CircuitState.OPEN:
                self._move(backend, circuit, CircuitState.HALF_OPEN, "cool-down over, trial request")
            circuit.trial_in_flight = True

    def success(self, backend: str) -> None:
        """Record a good answer: closes a half-open circuit, resets the failure count."""
        circuit = self._circuits.get(backend)
        if circuit is None:
            return
        circuit.failures = 0
        circuit.trial_in_flight = False
        if circuit.state is not CircuitState.CLOSED:
            self._move(backend, circuit, CircuitState.CLOSED, "trial request succeeded")

    def failure(self, backend: str, reason: str) -> None:
        """Record a failure: opens the circuit at the threshold, or re-opens a half-open one."""
        circuit = self._circuits.setdefault(backend, _Circuit())
        circuit.failures += 1
        circuit.trial_in_flight = False
        if circuit.state is CircuitState.HALF_OPEN or (
            circuit.state is CircuitState.CLOSED and circuit.failures >= self.threshold
        ):
            circuit.opened_at = self._clock()
            self._move(backend, circuit, CircuitState.OPEN, reason)
        elif circuit.state is CircuitState.OPEN:
            circuit.opened_at = self._clock()

    def release(self, backend: str) -> None:
        """A request ended without telling anything about health (e.g. the client went away)."""
        circuit = self._circuits.get(backend)
        if circuit is not None:
            circuit.trial_in_flight = False

    def snapshot(self) -> dict[str, str]:
        """Current state per backend that ever failed."""
        return {name: self.state(name).value for name in self._circuits}

    def _move(self, backend: str, circuit: _Circuit, new: CircuitState, reason: str) -> None:
        old = circuit.state
        circuit.state = new
        circuit.last_change = self._clock()
        self.transitions.append(CircuitTransition(backend, old, new, time.time(), reason))
        log = logger.warning if new is CircuitState.OPEN else logger.info
        log("circuit of backend %s: %s -> %s (%s)", backend, old.value, new.value, reason)


class RetryBudget:
    """Caps retries at a fraction of recent requests, so a failing pool is not hammered.

    Over a sliding window, retries are allowed while retries < max(min_retries, ratio x requests).
    """

    def __init__(
        self,
        *,
        ratio: float = 0.2,
        min_retries: int = 10,
        window_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ratio = ratio
        self.min_retries = min_retries
        self.window_s = window_s
        self._clock = clock
        self._requests: deque[float] = deque()
        self._retries: deque[float] = deque()
        self.denied = 0

    def _trim(self, now: float) -> None:
        horizon = now - self.window_s
        for queue in (self._requests, self._retries):
            while queue and queue[0] < horizon:
                queue.popleft()

    def request(self) -> None:
        """Count a first attempt."""
        self._requests.append(self._clock())

    def try_retry(self) -> bool:
        """Take a retry from the budget if there is one left."""
        now = self._clock()
        self._trim(now)
        if len(self._retries) < max(self.min_retries, self.ratio * len(self._requests)):
            self._retries.append(now)
            return True
        self.denied += 1
        return False


# --- metrics scraping -------------------------------------------------------------------------------------------

_METRIC_RE = re.compile(
    rb"^(vllm:num_requests_waiting|vllm:num_requests_running|vllm:kv_cache_usage_perc|vllm:gpu_cache_usage_perc"
    rb"|vllm:prefix_cache_hits_total|vllm:prefix_cache_queries_total)"
    rb"(?:\{[^}]*\})?\s+([0-9.eE+-]+|NaN)",
    re.MULTILINE,
)


def parse_vllm_metrics(text: bytes, scraped_at: float) -> BackendMetrics:
    """Sum vLLM's queue and KV-cache gauges (and prefix-cache counters) over engines from a Prometheus text."""
    waiting = running = hits = queries = 0.0
    kv: list[float] = []
    for name, raw in _METRIC_RE.findall(text):
        try:
            value = float(raw)
        except ValueError:
            continue
        if value != value:  # NaN
            continue
        if name == b"vllm:num_requests_waiting":
            waiting += value
        elif name == b"vllm:num_requests_running":
            running += value
        elif name == b"vllm:prefix_cache_hits_total":
            hits += value
        elif name == b"vllm:prefix_cache_queries_total":
            queries += value
        else:
            kv.append(value)
    # Older vLLM reports gpu_cache_usage_perc; newer kv_cache_usage_perc; both are fractions 0..1.
    return BackendMetrics(
        waiting=waiting,
        running=running,
        kv_cache_usage=max(kv, default=0.0),
        scraped_at=scraped_at,
        prefix_cache_hits=hits,
        prefix_cache_queries=queries,
    )


class MetricsScraper:
    """Scrapes `/metrics` of backends in the background every `interval_s`; never on the request path."""

    def __init__(self, *, interval_s: float = 2.0, timeout_s: float = 1.0, stale_after_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.stale_after_s = stale_after_s
        self._metrics: dict[str, BackendMetrics] = {}
        self._fresh: dict[str, BackendMetrics] | None = None
        self._fresh_at = 0.0
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def ensure_running(
        self, targets: Callable[[], Iterable[BackendSnap]], client: Callable[[], httpx.AsyncClient]
    ) -> None:
        """Start the background scraper on this event loop if it is not running."""
        loop = running_loop()
        if self._task is None or self._task.done() or self._loop is not loop:
            self._loop = loop
            self._task = loop.create_task(self._run(targets, client), name="vllm-metrics-scraper")

    def fresh(self) -> dict[str, BackendMetrics]:
        """Metrics younger than `stale_after_s`, by backend name (rebuilt at most every 0.25 s or per scrape)."""
        now = time.monotonic()
        cached = self._fresh
        if cached is not None and now - self._fresh_at < 0.25:
            return cached
        horizon = now - self.stale_after_s
        self._fresh = {name: m for name, m in self._metrics.items() if m.scraped_at >= horizon}
        self._fresh_at = now
        return self._fresh

    async def scrape_once(self, backends: Iterable[BackendSnap], client: httpx.AsyncClient) -> None:
        """Scrape every given backend concurrently; failures just leave older figures to go stale."""

        async def one(backend: BackendSnap) -> None:
            headers = {"authorization": f"Bearer {backend.api_key}"} if backend.api_key else None
            try:
                response = await client.get(f"{backend.base_url}/metrics", headers=headers, timeout=self.timeout_s)
            except httpx.HTTPError:
                return
            if response.status_code == 200:
                self._metrics[backend.name] = parse_vllm_metrics(response.content, time.monotonic())
                self._fresh = None

        await asyncio.gather(*(one(b) for b in backends))

    async def _run(self, targets: Callable[[], Iterable[BackendSnap]], client: Callable[[], httpx.AsyncClient]) -> None:
        while True:
            try:
                await self.scrape_once(list(targets()), client())
            except Exception:  # never let the scraper die
                logger.exception("metrics scrape failed")
            await asyncio.sleep(self.interval_s)

    async def aclose(self) -> None:
        """Stop scraping."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
