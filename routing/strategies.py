"""Routing strategies: small classes with one `select(candidates, stats)` over immutable snapshots.

A strategy instance lives as long as its pool's configuration in one process (the dispatcher owns them), so
state such as a round-robin turn is never a module-level singleton.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from backends.models import RoutingStrategy
from backends.snapshot import BackendSnap


@dataclass(frozen=True, slots=True)
class BackendMetrics:
    """Load figures scraped from a vLLM server's `/metrics` (sums over its engines)."""

    waiting: float = 0.0
    running: float = 0.0
    kv_cache_usage: float = 0.0  # 0..1
    scraped_at: float = 0.0


@dataclass(frozen=True, slots=True)
class RoutingStats:
    """What a strategy may know besides the registry, for one request.

    `in_flight` counts this process's open requests per backend name; `metrics` holds the latest scrape per
    backend name (absent when never scraped or stale); `affinity_key` is the request's session key, if any.
    """

    in_flight: Mapping[str, int] = field(default_factory=dict)
    metrics: Mapping[str, BackendMetrics] = field(default_factory=dict)
    affinity_key: str | None = None


class Strategy(Protocol):
    """Chooses one backend among usable candidates (never empty)."""

    def select(self, candidates: Sequence[BackendSnap], stats: RoutingStats) -> BackendSnap:
        """Return the backend to try next."""
        ...


class RoundRobin:
    """Each candidate in turn."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._turn = itertools.count()

    def select(self, candidates: Sequence[BackendSnap], stats: RoutingStats) -> BackendSnap:
        """Return the next candidate in rotation."""
        return candidates[next(self._turn) % len(candidates)]


class Weighted:
    """Random choice proportional to each backend's weight."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def select(self, candidates: Sequence[BackendSnap], stats: RoutingStats) -> BackendSnap:
        """Pick a candidate with probability weight / total weight."""
        return self._rng.choices(candidates, weights=[max(b.weight, 1) for b in candidates])[0]


class LeastOutstanding:
    """The candidate with the fewest in-flight requests from this process; ties broken at random."""

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

    def __init__(self, rng: random.Random | None = None) -> None:
        self._fallback = LeastOutstanding(rng)

    def select(self, candidates: Sequence[BackendSnap], stats: RoutingStats) -> BackendSnap:
        """Pick the candidate with the highest hash of (key, backend name)."""
        key = stats.affinity_key
        if not key:
            return self._fallback.select(candidates, stats)
        return max(candidates, key=lambda b: _hrw_score(key, b.name))


def _hrw_score(key: str, backend: str) -> int:
    digest = hashlib.blake2b(f"{key}\x00{backend}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


_FACTORIES: dict[RoutingStrategy, type[RoundRobin | Weighted | LeastOutstanding | KvCacheAware | SessionAffinity]] = {
    RoutingStrategy.ROUND_ROBIN: RoundRobin,
    RoutingStrategy.WEIGHTED: Weighted,
    RoutingStrategy.LEAST_OUTSTANDING: LeastOutstanding,
    RoutingStrategy.KV_CACHE_AWARE: KvCacheAware,
    RoutingStrategy.SESSION_AFFINITY: SessionAffinity,
}


def strategy_create(name: str, rng: random.Random | None = None) -> Strategy:
    """Create a fresh strategy instance for a pool; unknown names fall back to round robin."""
    try:
        factory = _FACTORIES[RoutingStrategy(name)]
    except ValueError:
        factory = RoundRobin
    return factory(rng)
