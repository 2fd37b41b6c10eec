"""Shared fixtures: the master key, registry snapshots, an in-process gateway wired to the mock vLLM."""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest

from backends.mock_vllm import MockConfig, MockVLLM
from core.db import db_connections_close
from governance.events import MemoryUsageSink, UsageEvent
from routing.dispatch import Dispatcher
from routing.gateway import Gateway
from routing.registry import RegistryCache
from tests.factories import backend_snap, registry_snap

MASTER_KEY = "test-master-key"
AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}


@functools.cache
def _seeding_migrations() -> tuple[str, ...]:
    """The backends migrations that seed check cases (a module-level SEEDED_CASES and a seed function)."""
    import backends.migrations

    names = sorted(info.name for info in pkgutil.iter_modules(backends.migrations.__path__))
    return tuple(n for n in names if hasattr(importlib.import_module(f"backends.migrations.{n}"), "SEEDED_CASES"))


def _reseed_after_flush(sender: Any, apps: Any = None, **kwargs: Any) -> None:
    """Recreate the rows the data migrations seed (check cases, beat schedules) after a test's flush.

    A transactional test ends with a flush, which empties those rows too; Django then sends post_migrate (that is
    how content types come back). Seeding again here keeps every later test, in any order, on a migrated-looking
    database, without serialized_rollback (whose reload collides with the content types post_migrate recreated).
    The seeds are get_or_create: a no-op when the rows exist. Tests only: in production, post_migrate after a
    `migrate` must not bring back cases an operator deleted.
    """
    schedule = importlib.import_module("backends.migrations.0002_health_check_schedule")
    if apps is None:  # flush sends post_migrate without the migration state's apps
        from django.apps import apps
    schedule.create_schedule(apps, None)
    for name in _seeding_migrations():  # every migration with SEEDED_CASES, in order (later ones add cases)
        importlib.import_module(f"backends.migrations.{name}").seed(apps, None)


def usage_events(gateway: Gateway) -> deque[UsageEvent]:
    """The usage events a test gateway recorded (its sink is the MemoryUsageSink of make_gateway)."""
    assert isinstance(gateway.usage, MemoryUsageSink)
    return gateway.usage.events


@pytest.fixture(scope="session", autouse=True)
def _reseed_data_migrations_after_flush() -> None:
    from django.apps import apps as global_apps
    from django.db.models.signals import post_migrate

    post_migrate.connect(
        _reseed_after_flush, sender=global_apps.get_app_config("backends"), dispatch_uid="tests-reseed-after-flush"
    )


@pytest.fixture(autouse=True)
def _master_key(settings: Any) -> None:
    settings.ROUTER_MASTER_KEY = MASTER_KEY


@pytest.fixture(autouse=True)
def _db_thread_connections_closed() -> Iterator[None]:
    """The database thread (core.db.run_db) keeps its connection between calls, as in a server process: closed after
    every test, so that no test inherits another's connection and the test database can be flushed and dropped."""
    yield
    db_connections_close()


@pytest.fixture
def mock_vllm() -> MockVLLM:
    """An in-process mock vLLM serving `served-chat`, `served-text` and `served-embed`."""
    return MockVLLM(MockConfig(models=["served-chat", "served-text"], embed_models=["served-embed"]))


@pytest.fixture
def make_gateway() -> Callable[..., Gateway]:
    """Build a gateway over a static registry whose backends are reached through the given transports."""

    def build(
        *,
        registry: Any = None,
        transport: httpx.AsyncBaseTransport | None = None,
        max_attempts: int = 2,
        **options: Any,
    ) -> Gateway:
        snapshot = registry if registry is not None else registry_snap()
        return Gateway(
            None,
            registry=RegistryCache.static(snapshot),
            dispatcher=Dispatcher(max_attempts=max_attempts, transport=transport),
            master_key=MASTER_KEY,
            usage=MemoryUsageSink(),
            **options,
        )

    return build


@pytest.fixture
async def gateway_client(
    make_gateway: Callable[..., Gateway], mock_vllm: MockVLLM
) -> AsyncIterator[tuple[httpx.AsyncClient, Gateway]]:
    """An httpx client talking in-process to a gateway whose single backend is the in-process mock."""
    gateway = make_gateway(
        registry=registry_snap(backends=[backend_snap("b1", base_url="http://mock-a")]),
        transport=httpx.ASGITransport(app=mock_vllm),
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway), base_url="http://router") as client:
        yield client, gateway
