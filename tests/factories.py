"""Factories for registry rows and snapshots used across the test suites."""

from __future__ import annotations

import itertools
from typing import Any

from backends.models import Backend, GpuPool, ServedModel
from backends.snapshot import BackendSnap, ModelSnap, PoolSnap, RegistrySnapshot

_seq = itertools.count(1)


def pool_create(**fields: Any) -> GpuPool:
    """Create a pool with a unique name."""
    fields.setdefault("name", f"pool-{next(_seq)}")
    return GpuPool.objects.create(**fields)


def backend_create(*, pool: GpuPool | None = None, **fields: Any) -> Backend:
    """Create a backend (in a new pool unless one is given)."""
    fields.setdefault("name", f"backend-{next(_seq)}")
    fields.setdefault("base_url", "http://127.0.0.1:9")
    return Backend.objects.create(pool=pool or pool_create(), **fields)


def model_create(*, pool: GpuPool | None = None, **fields: Any) -> ServedModel:
    """Create an enabled chat model (in a new pool unless one is given)."""
    fields.setdefault("name", f"model-{next(_seq)}")
    return ServedModel.objects.create(pool=pool or pool_create(), **fields)


def backend_snap(name: str = "b1", *, pool: str = "p1", base_url: str = "http://mock-a", **fields: Any) -> BackendSnap:
    """A backend snapshot with sensible defaults."""
    values: dict[str, Any] = {
        "id": next(_seq),
        "name": name,
        "pool": pool,
        "base_url": base_url,
        "api_key": "",
        "weight": 1,
        "max_concurrent_requests": 0,
        "connect_timeout_s": 1.0,
        "read_timeout_s": 5.0,
        "state": "enabled",
        "status": "healthy",
    }
    values.update(fields)
    return BackendSnap(**values)


def registry_snap(
    *,
    backends: list[BackendSnap] | None = None,
    models: list[ModelSnap] | None = None,
    strategy: str = "round_robin",
    aliases: dict[str, str] | None = None,
    extra_pools: list[PoolSnap] | None = None,
    version: int = 1,
) -> RegistrySnapshot:
    """A registry snapshot: one pool `p1` with the given backends, a chat, a completion and an embedding model."""
    backends = backends if backends is not None else [backend_snap()]
    models = models or [
        ModelSnap("chat-model", "served-chat", "chat", "p1", (), 2048, 1_700_000_000),
        ModelSnap("text-model", "served-text", "completion", "p1", (), 2048, 1_700_000_000),
        ModelSnap("embed-model", "served-embed", "embedding", "p1", (), None, 1_700_000_000),
    ]
    pools = {"p1": PoolSnap("p1", strategy, True, tuple(b for b in backends if b.pool == "p1"))}
    for pool in extra_pools or []:
        pools[pool.name] = pool
    by_name = {m.name: m for m in models}
    for alias, target in (aliases or {}).items():
        by_name[alias] = by_name[target]
    return RegistrySnapshot(version=version, models=by_name, pools=pools, listed_models=tuple(models))
