"""Routing strategies: small classes with one `select(candidates, stats)` over immutable snapshots.

A strategy instance lives as long as its pool's configuration in one process (the dispatcher owns them), so
state such as a round-robin turn is never a module-level singleton.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from backends.models import RoutingStrategy
from backends.snapshot import BackendSnap
from routing.prefix import PrefixConfig, PrefixIndex, RecentPlacements


@dataclass(frozen=True, slots=True)
class BackendMetrics:
    """Load figures scraped from a vLLM server's `/metrics` (sums over its engines)."""

    waiting: float = 0.0
    running: float = 0.0
    kv_cache_usage: float = 0.0  # 0..1
    scraped_at: float = 0.0
    prefix_cache_hits: float = 0.0  # tokens, cumulative since the engine started
    prefix_cache_queries: float = 0.0

    @property
    def prefix_cache_hit_rate(self) -> float | None:
        """The engine's own prefix-cache hit rate since it started (None before any query)."""
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else None


@dataclass(frozen=True, slots=True)
class RoutingStats:
    """What a strategy may know besides the registry, for one request.

    `in_flight` counts this process's open requests per backend name; `metrics` holds the latest scrape per
    backend name (absent when never scraped or stale); `affinity_key` is the request's session key, if any.
    """

    in_flight: Mapping[str, int] = field(default_factory=dict)
    metrics: Mapping[str, BackendMetrics] = field(default_factory=dict)
    affinity_key: str | None = None
    prefix: tuple[int, ...] = ()
    """The request's prompt as chained block keys (`routing.prefix.prefix_blocks`)."""
    peer_in_flight: Mapping[str, int] = field(default_factory=dict)
    """The other web processes' and replicas' open requests per backend name, as they last published them
    (`routing.prefix.PrefixSync`; empty without Redis)."""
    cached_blocks: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    """Precise mode (vLLM's KV-cache events, `routing.precise`): per backend that publishes them, how many of the
    request's leading token blocks its engine holds, and how many full blocks the request has. A backend absent
    here is scored by the approximate index."""


NEEDS_METRICS = "metrics"
NEEDS_AFFINITY_KEY = "affinity_key"
NEEDS_PREFIX = "prefix"
NEEDS_CACHED_BLOCKS = "cached_blocks"
NEEDS_PEER_LOAD = "peer_load"


class Strategy(Protocol):
    """Chooses one backend among usable candidates (never empty).

    `needs` declares what the dispatcher must compute for it (`NEEDS_*`): nothing else is computed per request.
    """

    needs: frozenset[str]

    def select(self, candidates: Sequence[BackendSnap], stats: RoutingStats) -> BackendSnap:
        """Return the backend to try next."""
        ...


class RoundRobin:
    """Each candidate in turn."""

    needs: frozenset[str] = frozenset()

    def __init__(self) -> None:
        self._turn = itertools.count()

    def select(self, candidates: Sequence[BackendSnap], stats: RoutingStats) -> BackendSnap:
        """Return the next candidate in rotation."""
        return candidates[next(self._turn) % len(candidates)]


class Weighted:
    """Random choice proportional to each backend's weight."""

    needs: frozenset[str] = frozenset()

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def select(self, candidates: Sequence[BackendSnap], stats: RoutingStats) -> BackendSnap:
        """Pick a candidate with probability weight / total weight."""
        return self._rng.choices(candidates, weights=[max(b.weight, 1) for b in candidates])[0]


class LeastOutstanding:
    """The candidate with the fewest in-flight requests from this process; ties broken at random."""

    needs: frozenset[str] = frozenset()

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def select(self, candidates: Sequence[BackendSnap], stats: RoutingStats) -> BackendSnap:
        """Pick the least busy candidate."""
        in_flight = stats.in_flight
        fewest = min(in_flight.get(b.name, 0) for b in candidates)
        tied = [b for b in candidates if in_flight.get(b.name, 0) == fewest]
        return tied[0] if len(tied) == 1 else self._rng.choice(tied)


class KvCacheAware:
    """The candidate whose vLLM reports the least queueing and KV-cache pressure.

    Score = waiting x 4 + running + kv_cache_usage x 8 + this process's in-flight requests, so a queue on the
    server dominates, then a full KV cache, then load; candidates without fresh metrics are scored by their
    in-flight requests alone. Ties are broken at random.
    """

    needs = frozenset({NEEDS_METRICS})

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def select(self, candidates: Sequence[BackendSnap], stats: RoutingStats) -> BackendSnap:
        """Pick the candidate with the lowest load score."""
        scores = [(self._score(b, stats), b) for b in candidates]
        best = min(score for score, _ in scores)
        tied = [b for score, b in scores if score == best]
        return tied[0] if len(tied) == 1 else self._rng.choice(tied)

    @staticmethod
    def _score(backend: BackendSnap, stats: RoutingStats) -> float:
        metrics = stats.metrics.get(backend.name)
        load = float(stats.in_flight.get(backend.name, 0))
        if metrics is None:
            return load
        return metrics.waiting * 4.0 + metrics.running + metrics.kv_cache_usage * 8.0 + load


class SessionAffinity:
    """Rendezvous (highest-random-weight) hashing on the session key, so a conversation returns to the backend
    holding its prefix cache and only ~1/N of keys move when a backend joins or leaves.

    Requests without a key go to the least outstanding backend.
    """

    needs = frozenset({NEEDS_AFFINITY_KEY})

    def __init__(self, rng: random.Random | None = None) -> None:
        self._fallback = LeastOutstanding(rng)

    def select(self, candidates: Sequence[BackendSnap], stats: RoutingStats) -> BackendSnap:
        """Pick the candidate with the highest hash of (key, backend name)."""
        key = stats.affinity_key
        if not key:
            return self._fallback.select(candidates, stats)
        return max(candidates, key=lambda b: _hrw_score(key, b.name))


class PrefixAware:
    """The backend believed to hold the longest prefix of the prompt in its KV cache, under a load guard.

    1. Load guard: a candidate whose load (in-flight requests, this process's and, with Redis, the other
       processes' as last published, plus vLLM's waiting queue where scraped) exceeds the least loaded one's by
       more than `balance_abs` and by more than `balance_rel` times is overloaded and not chosen for its cache,
       so a popular prefix cannot melt one server.
    2. Among the others, the longest matched share of the prompt wins when it is at least `min_match`; ties go
       to the less loaded, then to the highest rendezvous hash of the prompt's first block.
    3. Otherwise (a new prompt) the least loaded wins, ties broken by the same hash, so that processes which
       see the same loads make the same choice for the same prompt.
    The match of a backend is the share of the prompt's blocks it holds: in precise mode (`stats.cached_blocks`
    has the backend: its engine's own KV-cache events) the leading token blocks its engine reports, or those
    this router sent it in the last `recent_s` seconds (not yet published), whichever is longer; otherwise the
    approximate index of what the router sent it. The choice is recorded in the index
    (`routing.prefix.PrefixIndex`) and, through `on_insert`, shared.
    """

    needs = frozenset({NEEDS_PREFIX, NEEDS_METRICS, NEEDS_CACHED_BLOCKS, NEEDS_PEER_LOAD})

    def __init__(self, rng: random.Random | None = None, *, config: PrefixConfig | None = None) -> None:
        self.config = config or PrefixConfig()
        self._rng = rng or random.Random()
        self.index = PrefixIndex(self.config.max_blocks)
        self.recent = RecentPlacements(self.config.recent_s)
        self.on_insert: Callable[[str, tuple[int, ...]], None] | None = None
        self.precise_decisions = 0

    def select(self, candidates: Sequence[BackendSnap], stats: RoutingStats) -> BackendSnap:
        """Pick by cached prefix within the load guard; see the class docstring."""
        config = self.config
        loads = {b.name: _load(b.name, stats) for b in candidates}
        least = min(loads.values())
        eligible = [
            b
            for b in candidates
            if not (loads[b.name] - least > config.balance_abs and loads[b.name] > least * config.balance_rel)
        ]
        blocks = stats.prefix
        if not blocks:  # nothing to match (a prompt shorter than a block): the least loaded, ties at random
            lightest = [b for b in eligible if loads[b.name] == least]
            return lightest[0] if len(lightest) == 1 else self._rng.choice(lightest)
        seed = f"{blocks[0]:x}"
        total = len(blocks)
        cached = stats.cached_blocks
        if cached:
            shares = {b.name: self._precise_share(b.name, blocks, cached.get(b.name)) for b in eligible}
        else:
            shares = {b.name: self.index.match(blocks, b.name) / total for b in eligible}
        best = max(shares.values())
        pool = eligible
        if best and best >= config.min_match:
            pool = [b for b in eligible if shares[b.name] == best]
        else:
            pool = [b for b in eligible if loads[b.name] == least] or eligible
        if len(pool) == 1:
            chosen = pool[0]
        else:
            lowest = min(loads[b.name] for b in pool)
            chosen = max((b for b in pool if loads[b.name] == lowest), key=lambda b: _hrw_score(seed, b.name))
        self.index.observe(chosen.name, round(shares[chosen.name] * total), total)
        self.index.insert(chosen.name, blocks)
        if cached:
            self.precise_decisions += 1
            self.recent.add(chosen.name, blocks)
        if self.on_insert is not None:
            self.on_insert(chosen.name, blocks)
        return chosen

    def _precise_share(self, name: str, blocks: tuple[int, ...], engine: tuple[int, int] | None) -> float:
        """A backend's matched share of the prompt: its engine's events when it publishes them, else the index."""
        if engine is None:
            return self.index.match(blocks, name) / len(blocks)
        held, request_blocks = engine
        recent = self.recent.match(blocks, name) / len(blocks)
        return max(held / request_blocks if request_blocks else 0.0, recent)

    def forget(self, backend: str) -> None:
        """Drop what is known of a backend's cache (drained, disabled, circuit open, removed)."""
        self.index.drop(backend)
        self.recent.drop(backend)


def _load(name: str, stats: RoutingStats) -> float:
    """Open requests on a backend: this process's, the other processes' (shared), and vLLM's waiting queue."""
    metrics = stats.metrics.get(name)
    load = stats.in_flight.get(name, 0) + stats.peer_in_flight.get(name, 0)
    return load + (metrics.waiting if metrics is not None else 0.0)


def _hrw_score(key: str, backend: str) -> int:
    digest = hashlib.blake2b(f"{key}\x00{backend}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


_FACTORIES: dict[RoutingStrategy, Callable[..., Strategy]] = {
    RoutingStrategy.ROUND_ROBIN: lambda rng: RoundRobin(),
    RoutingStrategy.WEIGHTED: Weighted,
    RoutingStrategy.LEAST_OUTSTANDING: LeastOutstanding,
    RoutingStrategy.KV_CACHE_AWARE: KvCacheAware,
    RoutingStrategy.SESSION_AFFINITY: SessionAffinity,
    RoutingStrategy.PREFIX_AWARE: PrefixAware,
}


def strategy_create(name: str, rng: random.Random | None = None, *, prefix: PrefixConfig | None = None) -> Strategy:
    """Create a fresh strategy instance for a pool; unknown names fall back to round robin."""
    try:
        kind = RoutingStrategy(name)
    except ValueError:
        kind = RoutingStrategy.ROUND_ROBIN
    if kind is RoutingStrategy.PREFIX_AWARE:
        return PrefixAware(rng, config=prefix)
    return _FACTORIES[kind](rng)
