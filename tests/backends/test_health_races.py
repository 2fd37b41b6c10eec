"""Health probes and check runs write a backend's status atomically, and every status change bumps the version.

The interleavings are made deterministic by injecting the probe (or the check's summary step), which performs the
other writer's change at the worst moment: after the first writer read the row, before it wrote.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection

from backends.checks.models import CheckResult, CheckRun, Outcome, RunStatus, RunTrigger
from backends.checks.services import check_backends_update
from backends.models import Backend, ServedModel
from backends.selectors import registry_version_get
from backends.services import ProbeResult, backend_probe_all, registry_version_bump
from tests.factories import backend_create, model_create, pool_create

# The injected probe runs in the probe's worker thread, on a connection of its own: it must see committed rows.
pytestmark = pytest.mark.django_db(transaction=True)


def _failed_run(backend: Backend) -> CheckRun:
    """A finished check run in which `backend` failed one check (what the nightly run stores)."""
    run = CheckRun.objects.create(trigger=RunTrigger.COMMAND, status=RunStatus.FAILED, total=1, failed=1)
    CheckResult.objects.create(
        run=run,
        backend=backend,
        backend_name=backend.name,
        model_name="chat",
        case_name="capital",
        outcome=Outcome.FAIL,
        cause="wrong_answer",
        error="the answer does not contain 'Paris'",
    )
    return run


def _healthy_probe(name: str) -> ProbeResult:
    return ProbeResult(name, "healthy", 1.0, "", ("served-chat",))


def test_a_check_degradation_during_a_probe_is_not_overwritten(monkeypatch: pytest.MonkeyPatch) -> None:
    # given a healthy backend, read by the periodic probe before it probes
    pool = pool_create()
    model_create(pool=pool, name="chat", served_name="served-chat")
    backend = backend_create(pool=pool, name="b1", status="healthy")

    def probe_while_checks_fail(row: Backend, *args: Any) -> ProbeResult:
        # while /health is being asked, a check run finds wrong answers and degrades the backend
        check_backends_update(run=_failed_run(row))
        connection.close()
        return _healthy_probe(row.name)  # /health and /v1/models are fine

    monkeypatch.setattr("backends.services._probe", probe_while_checks_fail)
    # when the probe stores its (passing) result
    backend_probe_all()
    # then the check's degradation stands: a passing probe does not lift failed checks
    backend.refresh_from_db()
    assert backend.status == "degraded"
    assert backend.last_error.startswith("Checks failed")


def test_a_status_changed_during_a_probe_is_signalled_when_the_probe_changes_it_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # given a healthy backend, read by the periodic probe before it probes
    pool = pool_create()
    model_create(pool=pool, name="chat", served_name="served-chat")
    backend = backend_create(pool=pool, name="b1", status="healthy")
    during: dict[str, int] = {}

    def probe_while_marked_unhealthy(row: Backend, *args: Any) -> ProbeResult:
        # meanwhile another writer (an admin "Check health now") marks it unhealthy and signals that
        Backend.objects.filter(pk=row.pk).update(status="unhealthy", last_error="/health answered HTTP 503")
        registry_version_bump()
        during["version"] = registry_version_get()
        connection.close()
        return _healthy_probe(row.name)

    monkeypatch.setattr("backends.services._probe", probe_while_marked_unhealthy)
    # when this probe finds it healthy and writes that
    backend_probe_all()
    # then the change from unhealthy back to healthy is signalled, so no router keeps the backend out of rotation
    backend.refresh_from_db()
    assert (backend.status, backend.last_error) == ("healthy", "")
    assert registry_version_get() > during["version"]


def test_a_check_run_does_not_overwrite_an_unhealthy_status_written_after_it_read_the_row(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # given a healthy backend that failed a check
    backend = backend_create(name="b1", status="healthy")
    run = _failed_run(backend)
    from backends.checks import services as check_services

    summary = check_services._failure_summary

    def summary_while_a_probe_finds_it_down(*args: Any) -> str:
        # while the run prepares the backend's verdict, a probe finds the server down
        Backend.objects.filter(pk=backend.pk).update(status="unhealthy", last_error="unreachable: connection refused")
        return summary(*args)

    monkeypatch.setattr(check_services, "_failure_summary", summary_while_a_probe_finds_it_down)
    # when the run stores its verdict
    check_backends_update(run=run)
    # then the probe's verdict stands: an unreachable backend is unhealthy, not merely degraded
    backend.refresh_from_db()
    assert (backend.status, backend.last_error) == ("unhealthy", "unreachable: connection refused")


def test_an_operator_save_does_not_write_back_a_status_read_before_a_probe_changed_it() -> None:
    # given a backend an operator opened in admin (or PATCHed through the API) while it was healthy
    backend = backend_create(name="b1", status="healthy")
    model = model_create(pool=backend.pool, name="chat")
    # and a probe that meanwhile found the server down and the model unlisted
    Backend.objects.filter(pk=backend.pk).update(status="unhealthy", last_error="/health answered HTTP 503")
    ServedModel.objects.filter(pk=model.pk).update(unavailable_reason="no backend of the pool lists it")
    # when the operator's change is saved
    backend.weight = 5
    backend.save()
    model.max_context_length = 1024
    model.save()
    # then the change is stored and the probe's verdicts stand
    backend.refresh_from_db()
    model.refresh_from_db()
    assert backend.weight == 5 and (backend.status, backend.last_error) == ("unhealthy", "/health answered HTTP 503")
    assert model.max_context_length == 1024 and model.unavailable_reason == "no backend of the pool lists it"
