"""Writes to the registry: version bumps, health probes, state changes."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from backends.models import Backend, BackendState, HealthStatus, Model, RegistryState

logger = logging.getLogger(__name__)


def registry_version_bump() -> None:
    """Increase the registry version so every web process reloads its snapshot (within the poll interval)."""
    with transaction.atomic():
        if not RegistryState.objects.filter(pk=1).update(version=F("version") + 1):
            RegistryState.objects.get_or_create(pk=1, defaults={"version": 1})


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


def _probe(backend: Backend, expected: set[str], timeout_s: float) -> ProbeResult:
    """Probe `/health` and `/v1/models`; every expected served model must be listed."""
    headers = {"Authorization": f"Bearer {backend.api_key}"} if backend.api_key else {}
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
        return ProbeResult(backend.name, HealthStatus.UNHEALTHY, None, f"unreachable: {exc}", ())
    latency = _ms(start)
    missing = sorted(expected - set(served))
    if missing:
        return ProbeResult(
            backend.name, HealthStatus.UNHEALTHY, latency, f"models not served: {', '.join(missing)}", served
        )
    return ProbeResult(backend.name, HealthStatus.HEALTHY, latency, "", served)


class _ProbeFailure(Exception):
    """A probe got an answer, but not a healthy one."""


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 2)


def backend_probe_many(*, backends: Iterable[Backend], timeout_s: float | None = None) -> list[ProbeResult]:
    """Probe backends in parallel, store each result on its row, and publish the change to the router."""
    rows = list(backends)
    if not rows:
        return []
    timeout = timeout_s if timeout_s is not None else settings.ROUTER_PROBE_TIMEOUT_S
    expected_by_pool: dict[int, set[str]] = {}
    for model in Model.objects.filter(enabled=True, pool_id__in={b.pool_id for b in rows}):
        expected_by_pool.setdefault(model.pool_id, set()).add(model.backend_name)
    with ThreadPoolExecutor(max_workers=min(16, len(rows))) as pool:
        results = list(pool.map(lambda b: _probe(b, expected_by_pool.get(b.pool_id, set()), timeout), rows))
    from backends.checks.selectors import checks_hold_degraded

    now = timezone.now()
    changed = False
    for backend, result in zip(rows, results, strict=True):
        status, error = result.status, result.error
        if status == HealthStatus.HEALTHY and checks_hold_degraded(
            status=backend.status, last_error=backend.last_error
        ):
            status, error = backend.status, backend.last_error  # a passing probe does not lift failed checks
        if backend.status != status:
            changed = True
            logger.info("backend %s health %s -> %s %s", backend.name, backend.status, status, error)
        Backend.objects.filter(pk=backend.pk).update(
            status=status, last_checked_at=now, last_error=error, last_latency_ms=result.latency_ms
        )
        backend.status, backend.last_error = status, error
        backend.last_checked_at, backend.last_latency_ms = now, result.latency_ms
    if changed:
        registry_version_bump()
    return results


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


def registry_demo_create(*, mock_urls: list[str]) -> bool:
    """Create the demo registry (a pool of mock backends, a chat and an embedding model) if empty."""
    from backends.models import GpuPool

    if GpuPool.objects.exists():
        return False
    with transaction.atomic():
        pool = GpuPool.objects.create(name="demo", description="Bundled mock vLLM (make run's demo backends).")
        for index, url in enumerate(mock_urls, start=1):
            Backend.objects.create(pool=pool, name=f"demo-mock-{index}", base_url=url, read_timeout_s=60)
        Model.objects.create(name="mock-chat", served_name="mock-chat", kind="chat", pool=pool, max_context_length=2048)
        Model.objects.create(name="mock-embed", served_name="mock-embed", kind="embedding", pool=pool)
    return True


def registry_vllm_register(
    *, urls: list[str], model_name: str | None, pool_name: str = "vllm", kind: str = "chat"
) -> tuple[str, list[str]]:
    """Register real vLLM servers as one pool serving one model (discovered from /v1/models when not given).

    Idempotent: backends and the model are created or updated by name. Returns (model name, backend names).
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
        Model.objects.update_or_create(
            name=model_name, defaults={"served_name": model_name, "kind": kind, "pool": pool, "enabled": True}
        )
    return model_name, names


def _discover_model(url: str) -> str:
    """The first model id a vLLM server lists at /v1/models."""
    response = httpx.get(f"{url}/v1/models", timeout=10)
    response.raise_for_status()
    return str(response.json()["data"][0]["id"])
