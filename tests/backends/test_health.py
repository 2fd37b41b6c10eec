"""Health probes: the service stores results, the admin action calls it, the schedule exists."""

from __future__ import annotations

import pytest
from django_celery_beat.models import PeriodicTask

from backends.mock_vllm import MockServer
from backends.models import Backend
from backends.selectors import registry_version_get
from backends.services import backend_probe, backend_probe_all
from backends.tasks import probe_all_backends
from tests.factories import backend_create, model_create, pool_create

pytestmark = pytest.mark.django_db


def test_probe_healthy_backend_stores_result() -> None:
    with MockServer(models=["served-chat"]) as mock:
        pool = pool_create()
        backend = backend_create(pool=pool, base_url=mock.url)
        model_create(pool=pool, served_name="served-chat")
        result = backend_probe(backend=backend)
    backend.refresh_from_db()
    assert result.status == backend.status == "healthy"
    assert backend.last_checked_at is not None and backend.last_latency_ms is not None
    assert backend.last_error == ""


def test_probe_flags_a_model_no_backend_lists_and_bumps_version() -> None:
    # given the only backend of a pool, which answers but does not list the pool's model
    with MockServer(models=["something-else"]) as mock:
        pool = pool_create()
        backend = backend_create(pool=pool, base_url=mock.url)
        model = model_create(pool=pool, served_name="served-chat")
        before = registry_version_get()
        # when it is probed
        backend_probe(backend=backend)
    # then the model, not the server, is marked, and the routers reload
    backend.refresh_from_db()
    model.refresh_from_db()
    assert backend.status == "healthy"
    assert "served-chat" in model.unavailable_reason
    assert registry_version_get() > before


def test_a_backend_missing_a_model_its_pool_serves_is_unhealthy() -> None:
    # given two backends of a pool, only one of which lists the pool's model
    with MockServer(models=["served-chat"]) as full, MockServer(models=["something-else"]) as partial:
        pool = pool_create()
        good = backend_create(pool=pool, base_url=full.url)
        odd = backend_create(pool=pool, base_url=partial.url)
        model = model_create(pool=pool, served_name="served-chat")
        # when both are probed
        backend_probe_all()
    # then the model is served, and the backend that lacks it takes no requests
    good.refresh_from_db()
    odd.refresh_from_db()
    model.refresh_from_db()
    assert model.unavailable_reason == ""
    assert good.status == "healthy"
    assert odd.status == "unhealthy" and "served-chat" in odd.last_error


def test_probe_unreachable_and_http_error() -> None:
    dead = backend_create(base_url="http://127.0.0.1:9")
    with MockServer(health_status=503) as mock:
        sick = backend_create(base_url=mock.url)
        results = {r.backend: r for r in backend_probe_all()}
    assert results[dead.name].status == "unhealthy" and "unreachable" in results[dead.name].error
    assert results[sick.name].status == "unhealthy" and "503" in results[sick.name].error


def test_disabled_backends_are_not_probed_and_task_counts() -> None:
    backend_create(base_url="http://127.0.0.1:9", state="disabled")
    assert probe_all_backends() == 0
    assert Backend.objects.get().last_checked_at is None


def test_periodic_health_check_schedule_exists_after_migrate() -> None:
    task = PeriodicTask.objects.get(task="backends.probe_all_backends")
    assert task.enabled and task.interval is not None and task.interval.every == 30
