"""Writes of the checks: start and execute runs, store results, degrade or restore backends, post reports."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import httpx
from celery import current_app
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from backends.checks.models import CheckResult, CheckRun, Outcome, RunStatus, RunTrigger
from backends.checks.report import run_webhook_payload
from backends.checks.runner import CheckOutcome, run_checks
from backends.checks.selectors import (
    check_filters_validate,
    check_run_results,
    check_targets_build,
)
from backends.models import Backend, HealthStatus
from backends.selectors import CHECKS_ERROR_PREFIX, checks_hold_degraded
from backends.services import backend_health_write, registry_version_bump

logger = logging.getLogger(__name__)

T = TypeVar("T")

CHECK_TASK_NAME = "backends.run_checks"  # the Celery task of backends.checks.tasks

WEBHOOK_TIMEOUT_S = 10.0
_FAILURES_IN_LAST_ERROR = 3


def check_run_create(
    *,
    trigger: RunTrigger | str,
    triggered_by: str = "",
    model_names: Sequence[str] = (),
    backend_names: Sequence[str] = (),
) -> CheckRun:
    """Create a queued run after checking that the named models and backends exist (CheckFilterError if not)."""
    check_filters_validate(model_names=model_names, backend_names=backend_names)
    return CheckRun.objects.create(
        trigger=trigger,
        triggered_by=triggered_by[:150],
        model_names=sorted(set(model_names)),
        backend_names=sorted(set(backend_names)),
    )


def check_run_start(
    *,
    trigger: RunTrigger | str,
    triggered_by: str = "",
    model_names: Sequence[str] = (),
    backend_names: Sequence[str] = (),
) -> CheckRun:
    """Create a run and hand it to the Celery worker once the transaction commits (never runs in this process)."""
    run = check_run_create(
        trigger=trigger, triggered_by=triggered_by, model_names=model_names, backend_names=backend_names
    )
    transaction.on_commit(lambda: check_run_enqueue(run_id=run.pk))
    return run


def check_run_enqueue(*, run_id: int) -> None:
    """Send a queued run to the worker; a broker failure is recorded on the run instead of raised."""
    try:
        # The task registered under its name (backends.checks.tasks imports this module, not the other way round).
        current_app.tasks[CHECK_TASK_NAME].delay(run_id)
    except Exception as exc:  # kombu raises several types when the broker is down
        logger.exception("could not enqueue check run #%s", run_id)
        CheckRun.objects.filter(pk=run_id, status=RunStatus.QUEUED).update(
            status=RunStatus.ERROR, finished_at=timezone.now(), error=f"Could not reach the Celery broker: {exc}"
        )


def check_run_execute(*, run: CheckRun, transport: httpx.AsyncBaseTransport | None = None) -> CheckRun:
    """Execute a queued run here and now: check, store results, update backends, post the report.

    Claims the run first (queued → running), so that a redelivered task message does not run it twice.
    """
    claimed = CheckRun.objects.filter(pk=run.pk, status=RunStatus.QUEUED).update(
        status=RunStatus.RUNNING, started_at=timezone.now()
    )
    run.refresh_from_db()
    if not claimed:
        logger.warning("check run #%s is %s already; not running it again", run.pk, run.status)
        return run
    try:
        targets = check_targets_build(model_names=run.model_names, backend_names=run.backend_names)
        outcomes = _run_sync(run_checks(targets, transport=transport)) if targets else []
        _results_store(run=run, outcomes=outcomes)
    except Exception as exc:
        logger.exception("check run #%s failed", run.pk)
        run.status, run.error, run.finished_at = RunStatus.ERROR, f"{type(exc).__name__}: {exc}", timezone.now()
        run.save(update_fields=["status", "error", "finished_at"])
        return run
    check_backends_update(run=run)
    check_report_post(run=run)
    return run


def check_run_now(
    *,
    trigger: RunTrigger | str,
    triggered_by: str = "",
    model_names: Sequence[str] = (),
    backend_names: Sequence[str] = (),
    transport: httpx.AsyncBaseTransport | None = None,
) -> CheckRun:
    """Create a run and execute it in this process (the command, the scheduled task, tests)."""
    run = check_run_create(
        trigger=trigger, triggered_by=triggered_by, model_names=model_names, backend_names=backend_names
    )
    return check_run_execute(run=run, transport=transport)


def _run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code (in a helper thread when a loop already runs here)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _results_store(*, run: CheckRun, outcomes: list[CheckOutcome]) -> None:
    """Store one result per outcome and the run's totals and final status."""
    rows = [
        CheckResult(
            run=run,
            backend_id=o.target.backend.id,
            backend_name=o.target.backend.name,
            model_id=o.target.model_id,
            model_name=o.target.model_name,
            case_id=o.target.case.id,
            case_name=o.target.case.name,
            outcome=Outcome.PASS if o.passed else Outcome.FAIL,
            cause=o.cause,
            answer=o.answer,
            finish_reason=o.finish_reason,
            latency_ms=o.latency_ms,
            ttft_ms=o.ttft_ms,
            prompt_tokens=o.prompt_tokens,
            completion_tokens=o.completion_tokens,
            http_status=o.http_status,
            error=o.error,
        )
        for o in outcomes
    ]
    passed = sum(1 for o in outcomes if o.passed)
    with transaction.atomic():
        CheckResult.objects.bulk_create(rows)
        run.total, run.passed, run.failed = len(rows), passed, len(rows) - passed
        run.finished_at = timezone.now()
        if not rows:
            run.status = RunStatus.ERROR
            run.error = (
                "Nothing to check: no enabled case applies to an enabled model (of its endpoint's kind) on a usable "
                "backend."
            )
        else:
            run.status = RunStatus.FAILED if run.failed else RunStatus.PASSED
        run.save(update_fields=["total", "passed", "failed", "finished_at", "status", "error"])


def _failure_summary(run: CheckRun, failures: list[CheckResult]) -> str:
    """The `last_error` of a backend degraded by checks: which checks failed and why."""
    parts = [
        f"{r.case_name} on {r.model_name}: {r.get_cause_display()}" + (f" ({r.error})" if r.error else "")
        for r in failures[:_FAILURES_IN_LAST_ERROR]
    ]
    more = len(failures) - _FAILURES_IN_LAST_ERROR
    if more > 0:
        parts.append(f"and {more} more")
    return f"{CHECKS_ERROR_PREFIX} (run #{run.pk}, {len(failures)} of the backend's checks): " + "; ".join(parts)


def check_backends_update(*, run: CheckRun) -> list[str]:
    """Mark backends that failed a check degraded, and lift that degradation when they pass again.

    A backend a probe found unhealthy stays unhealthy; a degradation is lifted only by a run covering all models
    (a run limited to some models cannot vouch for the others). Returns the names of backends whose status changed,
    and bumps the registry version when there is one, so the router sees it within 2 s.
    """
    by_backend: dict[int, list[CheckResult]] = {}
    for result in check_run_results(run=run).exclude(backend=None):
        if result.backend_id is not None:
            by_backend.setdefault(result.backend_id, []).append(result)
    changed: list[str] = []
    for backend in Backend.objects.filter(pk__in=by_backend):
        failures = [r for r in by_backend[backend.pk] if not r.passed]
        summary = _failure_summary(run, failures)[:2000] if failures else ""

        def decide(status: str, last_error: str, failed: bool = bool(failures), summary: str = summary) -> Any:
            """The verdict on the row as it is now (a probe may have written it since the run started)."""
            if failed:
                return None if status == HealthStatus.UNHEALTHY else (HealthStatus.DEGRADED, summary)
            if checks_hold_degraded(status=status, last_error=last_error) and not run.model_names:
                return HealthStatus.HEALTHY, ""
            return None

        written = backend_health_write(backend_id=backend.pk, decide=decide)
        if written is None:
            continue
        before, after, _ = written
        if before != after:
            changed.append(backend.name)
            logger.info("backend %s %s -> %s after check run #%s", backend.name, before, after, run.pk)
            Backend.objects.filter(pk=backend.pk).update(updated_at=timezone.now())
    if changed:
        registry_version_bump()
    return changed


def check_report_post(*, run: CheckRun, url: str | None = None) -> str:
    """Post the run's summary as Slack-compatible JSON to CHECKS_WEBHOOK_URL (when set); returns what happened."""
    url = url if url is not None else getattr(settings, "CHECKS_WEBHOOK_URL", "")
    if not url:
        return ""
    try:
        response = httpx.post(url, json=run_webhook_payload(run=run), timeout=WEBHOOK_TIMEOUT_S)
        status = f"posted: HTTP {response.status_code}"
        if response.status_code >= 400:
            status = f"failed: HTTP {response.status_code} {response.text[:200]}"
    except httpx.HTTPError as exc:
        status = f"failed: {type(exc).__name__}: {exc}"
    if status.startswith("failed"):
        logger.warning("check run #%s webhook %s", run.pk, status)
    run.webhook_status = status[:300]
    CheckRun.objects.filter(pk=run.pk).update(webhook_status=run.webhook_status)
    return status
