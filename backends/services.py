"""Writes to the registry: version bumps, health probes, state changes."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import httpx
from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from backends.models import (
    SHADOW_COUNTERS,
    Backend,
    BackendState,
    HealthStatus,
    InvalidApiKeyError,
    RegistryState,
    ServedModel,
    bearer_headers,
    normalize_api_key,
)
from core.versions import version_bump

logger = logging.getLogger(__name__)


def registry_version_bump() -> None:
    """Increase the registry version so every web process reloads its snapshot (within the poll interval)."""
    version_bump(RegistryState)


def registry_version_bump_on_commit() -> None:
    """Bump the registry version once the current transaction commits (or now, outside one)."""
    transaction.on_commit(registry_version_bump)


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """Outcome of one health probe of one backend."""

    backend: str
    status: str
    latency_ms: float | None
    error: str
    served_models: tuple[str, ...]


def _probe(backend: Backend, timeout_s: float) -> ProbeResult:
    """Probe `/health` and `/v1/models`: healthy when both answer properly (which models it lists is judged later).

    The key goes into the header through `bearer_headers`, so a key that is not a header value fails this backend
    alone, and no error text of this probe can contain it.
    """
    try:
        headers = bearer_headers(backend.api_key)
    except InvalidApiKeyError as exc:
        return ProbeResult(backend.name, HealthStatus.UNHEALTHY, None, str(exc), ())
    start = time.perf_counter()
    try:
        with httpx.Client(timeout=timeout_s, headers=headers) as client:
            health = client.get(f"{backend.base_url}/health")
            if health.status_code != 200:
                raise _ProbeFailure(f"/health answered HTTP {health.status_code}")
            listing = client.get(f"{backend.base_url}/v1/models")
            if listing.status_code != 200:
                raise _ProbeFailure(f"/v1/models answered HTTP {listing.status_code}")
            try:
                served = tuple(str(m["id"]) for m in listing.json()["data"])
            except (ValueError, KeyError, TypeError) as exc:
                raise _ProbeFailure("/v1/models did not return an OpenAI model list") from exc
    except _ProbeFailure as exc:
        return ProbeResult(backend.name, HealthStatus.UNHEALTHY, _ms(start), str(exc), ())
    except httpx.TimeoutException:
        return ProbeResult(backend.name, HealthStatus.UNHEALTHY, None, f"timed out after {timeout_s:g} s", ())
    except httpx.HTTPError as exc:
        error = _without_secret(f"unreachable: {exc}", normalize_api_key(backend.api_key))
        return ProbeResult(backend.name, HealthStatus.UNHEALTHY, None, error, ())
    return ProbeResult(backend.name, HealthStatus.HEALTHY, _ms(start), "", served)


def _probe_safely(backend: Backend, timeout_s: float) -> ProbeResult:
    """Probe one backend; an unexpected error fails this backend only, never the whole batch."""
    try:
        return _probe(backend, timeout_s)
    except Exception as exc:  # a bug or an odd library error must not lose the other backends' results
        logger.error("probe of backend %s failed unexpectedly: %s", backend.name, type(exc).__name__)
        return ProbeResult(backend.name, HealthStatus.UNHEALTHY, None, f"probe failed: {type(exc).__name__}", ())


def _without_secret(text: str, secret: str) -> str:
    """The text with the secret (if it appears at all) replaced: error texts of HTTP clients may quote headers."""
    return text.replace(secret, "***") if secret and secret in text else text


class _ProbeFailure(Exception):
    """A probe got an answer, but not a healthy one."""


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 2)


_STATUS_WRITE_ATTEMPTS = 5


def backend_health_write(
    *,
    backend_id: int,
    decide: Callable[[str, str], tuple[str, str] | None],
    fields: dict[str, Any] | None = None,
) -> tuple[str, str, str] | None:
    """Change a backend's status atomically: `decide(current status, current last_error)` sees the row as it is.

    `decide` returns the new (status, last_error), or None to keep them; `fields` (e.g. last_checked_at) are
    written either way. The row is locked (PostgreSQL) and the write is conditional on the status and error just
    read, retried when another writer got in between (SQLite), so a probe and a check run never overwrite each
    other's verdict with a stale one. Returns (status before, status after, last_error after), or None when the row
    is gone. The caller bumps the registry version when the statuses differ (`backend_probe_many`,
    `check_backends_update`): the router's snapshot carries the status.
    """
    for _ in range(_STATUS_WRITE_ATTEMPTS):
        with transaction.atomic():
            current = (
                Backend.objects.select_for_update().filter(pk=backend_id).values_list("status", "last_error").first()
            )
            if current is None:
                return None
            status, error = current
            decided = decide(status, error)
            values = dict(fields or {})
            if decided is not None:
                values["status"], values["last_error"] = decided
            if not values:
                return status, status, error
            if Backend.objects.filter(pk=backend_id, status=status, last_error=error).update(**values):
                return status, values.get("status", status), values.get("last_error", error)
    logger.warning(
        "backend #%s: status kept changing under this write; gave up after %s tries", backend_id, _STATUS_WRITE_ATTEMPTS
    )
    return None


def backend_probe_many(*, backends: Iterable[Backend], timeout_s: float | None = None) -> list[ProbeResult]:
    """Probe backends in parallel, store each result on its row, and publish the change to the router.

    Also records which models are served (see `_models_served_update`): a backend is unhealthy when it does not
    list a model its pool serves, while a model that no backend of its pool lists is marked unavailable instead.
    """
    rows = list(backends)
    if not rows:
        return []
    timeout = timeout_s if timeout_s is not None else settings.ROUTER_PROBE_TIMEOUT_S
    with ThreadPoolExecutor(max_workers=min(16, len(rows))) as pool:
        probed = list(pool.map(lambda b: _probe_safely(b, timeout), rows))
    changed, expected_by_pool = _models_served_update(rows, probed)
    from backends.selectors import checks_hold_degraded

    now = timezone.now()
    results = []
    for backend, result in zip(rows, probed, strict=True):
        missing = sorted(expected_by_pool.get(backend.pool_id, set()) - set(result.served_models))
        if result.status == HealthStatus.HEALTHY and missing:
            result = replace(result, status=HealthStatus.UNHEALTHY, error=f"models not served: {', '.join(missing)}")
        results.append(result)

        def decide(status: str, last_error: str, result: ProbeResult = result) -> tuple[str, str] | None:
            if result.status == HealthStatus.HEALTHY and checks_hold_degraded(status=status, last_error=last_error):
                return None  # a passing probe does not lift failed checks
            return result.status, result.error

        written = backend_health_write(
            backend_id=backend.pk,
            decide=decide,
            fields={"last_checked_at": now, "last_latency_ms": result.latency_ms},
        )
        if written is None:
            continue
        before, after, error = written
        if before != after:
            changed = True
            logger.info("backend %s health %s -> %s %s", backend.name, before, after, error)
        backend.status, backend.last_error = after, error
        backend.last_checked_at, backend.last_latency_ms = now, result.latency_ms
    if changed:
        registry_version_bump()
    return results


def _models_served_update(rows: list[Backend], probed: list[ProbeResult]) -> tuple[bool, dict[int, set[str]]]:
    """Mark each enabled model of the probed pools served or not; return (changed, served names by pool).

    A model is served when a backend of its pool lists it at /v1/models. It is marked unavailable (with the
    reason, shown in admin; the router then stops advertising and routing it) only on full evidence: every
    backend of the pool that is not disabled was probed in this batch and at least one answered, none listing it.
    A probe of some backends only can clear the mark, never set it. The served names are what every backend of
    the pool must list to be healthy.
    """
    pool_ids = {b.pool_id for b in rows}
    probed_ids = {b.pk for b in rows}
    listed: dict[int, set[str]] = {}
    answered: set[int] = set()
    for backend, result in zip(rows, probed, strict=True):
        if result.status == HealthStatus.HEALTHY:  # /v1/models answered with a model list
            answered.add(backend.pool_id)
            listed.setdefault(backend.pool_id, set()).update(result.served_models)
    complete = set(pool_ids)
    for pool_id, backend_id in (
        Backend.objects.filter(pool_id__in=pool_ids).exclude(state=BackendState.DISABLED).values_list("pool_id", "pk")
    ):
        if backend_id not in probed_ids:
            complete.discard(pool_id)
    changed = False
    served: dict[int, set[str]] = {}
    for model in ServedModel.objects.filter(enabled=True, pool_id__in=pool_ids).select_related("pool"):
        name = model.backend_name
        reason = model.unavailable_reason
        if name in listed.get(model.pool_id, ()):
            reason = ""
        elif model.pool_id in answered and model.pool_id in complete:
            reason = f"no backend of pool {model.pool.name!r} lists {name!r} at /v1/models"
        # Conditional, so that of two overlapping probes only one writes (and reports) a change.
        if reason != model.unavailable_reason and ServedModel.objects.filter(
            pk=model.pk, unavailable_reason=model.unavailable_reason
        ).update(unavailable_reason=reason):
            changed = True
            logger.info("model %s %s", model.name, f"unavailable: {reason}" if reason else "served again")
        if not reason:
            served.setdefault(model.pool_id, set()).add(name)
    return changed, served


def backend_probe(*, backend: Backend) -> ProbeResult:
    """Probe one backend and store the result."""
    return backend_probe_many(backends=[backend])[0]


def backend_probe_all() -> list[ProbeResult]:
    """Probe every backend that is not disabled (the periodic health check)."""
    return backend_probe_many(backends=Backend.objects.exclude(state=BackendState.DISABLED))


def backend_state_set(*, backends: Iterable[Backend], state: BackendState) -> int:
    """Set the operator state (enabled, draining, disabled) of backends; returns how many changed."""
    ids = [b.pk for b in backends]
    count = Backend.objects.filter(pk__in=ids).exclude(state=state).update(state=state, updated_at=timezone.now())
    if count:
        registry_version_bump_on_commit()
    return count


def model_routes_replace(*, model: ServedModel, kind: str, entries: list[tuple[ServedModel, float]]) -> None:
    """Replace a model's traffic split or shadows (`kind`) with (target, percent) entries; ValidationError if bad.

    Run it inside a transaction: a bad entry raises after the old routes are gone. The registry version is bumped
    on commit by the rows' signals.
    """
    from backends.models import ModelRoute, RouteKind, validate_split_total

    if kind == RouteKind.SPLIT:
        validate_split_total([percent for _, percent in entries])
    ModelRoute.objects.filter(model=model, kind=kind).delete()
    for target, percent in entries:
        route = ModelRoute(model=model, kind=kind, target=target, percent=percent)
        route.full_clean()
        route.save()


SHADOW_FLOAT_COUNTERS = frozenset({"primary_latency_ms_sum", "shadow_latency_ms_sum"})


def shadow_comparisons_add(*, hour: datetime, tallies: Mapping[tuple[str, str], Mapping[str, float]]) -> int:
    """Add each (primary, shadow) pair's tallies to its row of the hour (created when missing); return the rows."""
    from backends.models import ShadowComparison

    written = 0
    with transaction.atomic():
        for (primary, shadow), delta in sorted(tallies.items()):
            values = {
                k: F(k) + (v if k in SHADOW_FLOAT_COUNTERS else int(v))
                for k, v in delta.items()
                if k in SHADOW_COUNTERS and v
            }
            if not values:
                continue
            row, _ = ShadowComparison.objects.get_or_create(hour=hour, primary=primary, shadow=shadow)
            ShadowComparison.objects.filter(pk=row.pk).update(**values)
            written += 1
    return written


def registry_demo_create(*, mock_urls: list[str]) -> bool:
    """Create the demo registry (a pool of mock backends, a chat and an embedding model) if empty."""
    from backends.models import GpuPool

    if GpuPool.objects.exists():
        return False
    with transaction.atomic():
        pool = GpuPool.objects.create(name="demo", description="Bundled mock vLLM (make run's demo backends).")
        for index, url in enumerate(mock_urls, start=1):
            Backend.objects.create(pool=pool, name=f"demo-mock-{index}", base_url=url, read_timeout_s=60)
        ServedModel.objects.create(
            name="mock-chat", served_name="mock-chat", kind="chat", pool=pool, max_context_length=2048
        )
        ServedModel.objects.create(name="mock-embed", served_name="mock-embed", kind="embedding", pool=pool)
    return True


def registry_vllm_register(
    *, urls: list[str], model_name: str | None, pool_name: str = "vllm", kind: str = "chat"
) -> tuple[str, list[str]]:
    """Register real vLLM servers as one pool serving one model (discovered from /v1/models when not given).

    The pool belongs to the environment: each call makes it what the arguments say now. Backends are
    `<pool>-1..N` (created or updated by name); the pool's other `<pool>-<n>` backends and its models other than
    this one, left by an earlier registration with other URLs or another model, are deleted (a warning names
    them). Returns (model name, backend names).
    """
    from backends.models import GpuPool, normalize_base_url

    urls = [normalize_base_url(u) for u in urls]
    if not model_name:
        model_name = _discover_model(urls[0])
    with transaction.atomic():
        pool, _ = GpuPool.objects.get_or_create(name=pool_name, defaults={"description": "Registered from env."})
        names = []
        for index, url in enumerate(urls, start=1):
            name = f"{pool_name}-{index}"
            Backend.objects.update_or_create(
                name=name, defaults={"pool": pool, "base_url": url, "state": BackendState.ENABLED}
            )
            names.append(name)
        ServedModel.objects.update_or_create(
            name=model_name,
            defaults={"served_name": model_name, "kind": kind, "pool": pool, "enabled": True, "unavailable_reason": ""},
        )
        stale_models = list(ServedModel.objects.filter(pool=pool).exclude(name=model_name).order_by("name"))
        numbered = re.compile(rf"^{re.escape(pool_name)}-\d+$")
        stale_backends = [
            b
            for b in Backend.objects.filter(pool=pool).exclude(name__in=names).order_by("name")
            if numbered.match(b.name)
        ]
        for row in [*stale_models, *stale_backends]:
            row.delete()
        if stale_models or stale_backends:
            logger.warning(
                "registry: removed from pool %s what the environment no longer names: models [%s], backends [%s]",
                pool_name,
                ", ".join(m.name for m in stale_models),
                ", ".join(b.name for b in stale_backends),
            )
    return model_name, names


def _discover_model(url: str) -> str:
    """The first model id a vLLM server lists at /v1/models."""
    response = httpx.get(f"{url}/v1/models", timeout=10)
    response.raise_for_status()
    return str(response.json()["data"][0]["id"])
