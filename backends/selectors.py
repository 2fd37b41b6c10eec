"""Read-only queries on the registry."""

from __future__ import annotations

from backends.models import (
    Backend,
    GpuPool,
    HealthStatus,
    Model,
    ModelFallback,
    RegistryState,
    api_key_problem,
    normalize_api_key,
)
from backends.snapshot import BackendSnap, ModelSnap, PoolSnap, RegistrySnapshot


def registry_version_get() -> int:
    """Return the current registry version (one indexed single-row query; the change signal)."""
    row = RegistryState.objects.filter(pk=1).values_list("version", flat=True).first()
    return row if row is not None else 0


def registry_snapshot_build() -> RegistrySnapshot:
    """Build an immutable snapshot of enabled pools, their backends and enabled models."""
    version = registry_version_get()
    backends_by_pool: dict[int, list[BackendSnap]] = {}
    pool_names: dict[int, str] = {}
    pools_rows = list(GpuPool.objects.all())
    for pool in pools_rows:
        pool_names[pool.pk] = pool.name
        backends_by_pool[pool.pk] = []
    for b in Backend.objects.order_by("pool_id", "name"):
        backends_by_pool.setdefault(b.pool_id, []).append(
            BackendSnap(
                id=b.pk,
                name=b.name,
                pool=pool_names.get(b.pool_id, ""),
                base_url=b.base_url,
                api_key=normalize_api_key(b.api_key),
                weight=b.weight,
                max_concurrent_requests=b.max_concurrent_requests,
                connect_timeout_s=b.connect_timeout_s,
                read_timeout_s=b.read_timeout_s,
                state=b.state,
                # A key that cannot be sent as a header would fail every request: never offer that backend.
                status=HealthStatus.UNHEALTHY if api_key_problem(b.api_key) else b.status,
            )
        )
    pools = {
        p.name: PoolSnap(
            name=p.name,
            strategy=p.routing_strategy,
            enabled=p.enabled,
            backends=tuple(backends_by_pool.get(p.pk, ())),
            affinity_key=p.affinity_key,
            priority_scheduling=p.priority_scheduling,
        )
        for p in pools_rows
    }
    fallbacks: dict[int, list[str]] = {}
    for fb in ModelFallback.objects.order_by("position", "id"):
        fallbacks.setdefault(fb.model_id, []).append(pool_names.get(fb.pool_id, ""))
    models: dict[str, ModelSnap] = {}
    unavailable: dict[str, ModelSnap] = {}
    listed: list[ModelSnap] = []
    for m in Model.objects.filter(enabled=True).order_by("name"):
        snap = ModelSnap(
            name=m.name,
            served_name=m.backend_name,
            kind=m.kind,
            pool=pool_names.get(m.pool_id, ""),
            fallback_pools=tuple(fallbacks.get(m.pk, ())),
            max_context_length=m.max_context_length,
            created=int(m.created_at.timestamp()),
            unavailable_reason=m.unavailable_reason,
        )
        # A model no backend of its pool lists is neither advertised nor routed (the probe sets the reason).
        target = unavailable if m.unavailable_reason else models
        if not m.unavailable_reason:
            listed.append(snap)
        target[m.name] = snap
        for alias in m.aliases or []:
            target.setdefault(alias, snap)
    return RegistrySnapshot(
        version=version, models=models, pools=pools, listed_models=tuple(listed), unavailable=unavailable
    )


# Written by failed checks (backends.checks), read by the probes (backends.services): kept here, below both.
CHECKS_ERROR_PREFIX = "Checks failed"
"""Start of `Backend.last_error` when checks (not a probe) degraded the backend."""


def checks_hold_degraded(*, status: str, last_error: str) -> bool:
    """Whether a backend's status is the degradation written by failed checks (which a passing run lifts)."""
    return status == HealthStatus.DEGRADED and (last_error or "").startswith(CHECKS_ERROR_PREFIX)
