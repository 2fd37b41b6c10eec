"""Read-only queries on the registry."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.db.models import Sum

from backends.models import (
    SHADOW_COUNTERS,
    Backend,
    GpuPool,
    HealthStatus,
    ModelFallback,
    ModelRoute,
    RegistryState,
    RouteKind,
    ServedModel,
    ShadowComparison,
    api_key_problem,
    normalize_api_key,
)
from backends.snapshot import BackendSnap, ModelSnap, PoolSnap, RegistrySnapshot, ShadowSnap, SplitSnap
from core.versions import version_get


def registry_version_get() -> int:
    """Return the current registry version (one indexed single-row query; the change signal)."""
    return version_get(RegistryState)


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
    for m in ServedModel.objects.filter(enabled=True).order_by("name"):
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
    splits, shadows = _routes_build(models, unavailable, listed)
    return RegistrySnapshot(
        version=version,
        models=models,
        pools=pools,
        listed_models=tuple(listed),
        unavailable=unavailable,
        splits=splits,
        shadows=shadows,
    )


def _routes_build(
    models: dict[str, ModelSnap], unavailable: dict[str, ModelSnap], listed: list[ModelSnap]
) -> tuple[dict[str, SplitSnap], dict[str, tuple[ShadowSnap, ...]]]:
    """Traffic splits and shadows of enabled models, by public name (docs/routing.md, Canary and shadow traffic).

    A split keeps, on the model itself, what its shares leave of 100 %; targets that are disabled or not served
    drop out and the remaining shares are scaled to 100 %. A model its own backends do not serve is routed through
    its split only when its shares add up to 100 % (it then moves from `unavailable` to `models` and `listed`);
    otherwise it stays unavailable, rather than sending its own share to a canary. Shadows to targets that are
    not routable are left out.
    """
    configured: dict[int, list[ModelRoute]] = {}
    for route in ModelRoute.objects.filter(model__enabled=True).select_related("model", "target").order_by("id"):
        configured.setdefault(route.model_id, []).append(route)
    splits: dict[str, SplitSnap] = {}
    shadows: dict[str, tuple[ShadowSnap, ...]] = {}
    for routes in configured.values():
        source = routes[0].model
        name = source.name
        own = models.get(name) or unavailable.get(name)
        if own is None:
            continue
        routable = name in models
        split_rows = sorted((r for r in routes if r.kind == RouteKind.SPLIT), key=lambda r: r.target.name)
        mirrors = tuple(
            ShadowSnap(target=target, share=min(1.0, r.percent / 100.0))
            for r in sorted((r for r in routes if r.kind == RouteKind.SHADOW), key=lambda r: r.target.name)
            if (target := models.get(r.target.name)) is not None
        )
        if mirrors:
            shadows[name] = mirrors
        if not split_rows:
            continue
        own_share = max(0.0, 100.0 - sum(r.percent for r in split_rows))
        if own_share > 0 and not routable:
            continue  # its own share cannot be served: unavailable, as without a split
        weighted: list[tuple[ModelSnap, float]] = [(own, own_share)] if own_share > 0 else []
        for r in split_rows:
            target = models.get(r.target.name)  # disabled or not served: absent
            if target is not None:
                weighted.append((target, r.percent))
        total = sum(w for _, w in weighted)
        if total <= 0 or (len(weighted) == 1 and weighted[0][0] is own):
            continue
        bounds: list[float] = []
        running = 0.0
        for _, weight in weighted:
            running += weight
            bounds.append(running / total)
        bounds[-1] = 1.0
        splits[name] = SplitSnap(
            model=name,
            targets=tuple(m for m, _ in weighted),
            bounds=tuple(bounds),
            sticky_key=source.split_sticky_key,
        )
        if not routable:  # served through its split alone
            for public in [name, *(source.aliases or [])]:
                if unavailable.get(public) is own:
                    del unavailable[public]
                    models.setdefault(public, own)
            listed.append(own)
    listed.sort(key=lambda m: m.name)
    return splits, shadows


def shadow_comparison_summary(*, since: datetime, primary: str | None = None) -> list[dict[str, Any]]:
    """Shadow comparisons since a time, per (primary, shadow) pair: counts and the figures admin shows.

    `match_ratio` is of the answers compared (temperature 0), `latency_ratio` the shadow's mean latency over the
    primary's, the token deltas are means of shadow minus primary per successful mirror; None when undefined.
    """
    rows = ShadowComparison.objects.filter(hour__gte=since)
    if primary is not None:
        rows = rows.filter(primary=primary)
    sums = SHADOW_COUNTERS
    out = []
    grouped: Any = rows.values("primary", "shadow").annotate(**{k + "__s": Sum(k) for k in sums})
    for row in grouped.order_by("primary", "shadow"):
        figures = {k: row[k + "__s"] or 0 for k in sums}
        ok = figures["mirrored"] - figures["errors"]
        out.append(
            {
                "primary": row["primary"],
                "shadow": row["shadow"],
                **{k: figures[k] for k in ("mirrored", "errors", "dropped", "compared", "matched")},
                "match_ratio": figures["matched"] / figures["compared"] if figures["compared"] else None,
                "latency_ratio": (
                    figures["shadow_latency_ms_sum"] / figures["primary_latency_ms_sum"]
                    if figures["primary_latency_ms_sum"]
                    else None
                ),
                "completion_tokens_delta": (
                    (figures["shadow_completion_tokens"] - figures["primary_completion_tokens"]) / ok if ok else None
                ),
                "prompt_tokens_delta": figures["prompt_tokens_delta"] / ok if ok else None,
            }
        )
    return out


# Written by failed checks (backends.checks), read by the probes (backends.services): kept here, below both.
CHECKS_ERROR_PREFIX = "Checks failed"
"""Start of `Backend.last_error` when checks (not a probe) degraded the backend."""


def checks_hold_degraded(*, status: str, last_error: str) -> bool:
    """Whether a backend's status is the degradation written by failed checks (which a passing run lifts)."""
    return status == HealthStatus.DEGRADED and (last_error or "").startswith(CHECKS_ERROR_PREFIX)


def pools_with_backends() -> list[tuple[GpuPool, list[Backend]]]:
    """Every pool (by name) with its backends (by name): two queries."""
    pools = list(GpuPool.objects.order_by("name"))
    by_pool: dict[int, list[Backend]] = {pool.pk: [] for pool in pools}
    for backend in Backend.objects.order_by("name"):
        by_pool.setdefault(backend.pool_id, []).append(backend)
    return [(pool, by_pool[pool.pk]) for pool in pools]
