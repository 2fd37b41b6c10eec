"""Prometheus collectors that the apps add to the /metrics scrape (read at scrape time, never per request).

An app registers a collector factory once (in its AppConfig.ready); the endpoint (governance.metrics) builds each
collector per scrape. This lets the backends app export its state without governance importing backends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client.registry import Collector

_FACTORIES: dict[str, Callable[[], Collector]] = {}


def scrape_collector_register(*, name: str, factory: Callable[[], Collector]) -> None:
    """Add (or replace, by name) a collector built at each scrape."""
    _FACTORIES[name] = factory


def scrape_collectors() -> Iterable[Collector]:
    """A fresh collector from every registered factory."""
    return [factory() for factory in list(_FACTORIES.values())]
