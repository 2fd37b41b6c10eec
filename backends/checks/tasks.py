"""Celery task of the checks: thin wrapper over the services (re-exported by `backends.tasks`)."""

from __future__ import annotations

from celery import shared_task

from backends.checks.models import CheckRun, RunTrigger
from backends.checks.services import CHECK_TASK_NAME, check_run_execute, check_run_now

TASK_NAME = CHECK_TASK_NAME


@shared_task(name=TASK_NAME, ignore_result=True)
def run_checks_task(run_id: int | None = None) -> int | None:
    """Execute a queued run (admin, API), or create and execute one when beat sends no run id (nightly)."""
    if run_id is None:
        return check_run_now(trigger=RunTrigger.SCHEDULE, triggered_by="celery beat").pk
    run = CheckRun.objects.filter(pk=run_id).first()
    if run is None:
        return None
    return check_run_execute(run=run).pk
