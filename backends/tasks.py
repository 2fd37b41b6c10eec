"""Celery tasks of the registry; thin wrappers over services."""

from celery import shared_task

from backends.checks.tasks import run_checks_task  # noqa: F401 - registers backends.run_checks
from backends.services import backend_probe_all


@shared_task(name="backends.probe_all_backends", ignore_result=True)
def probe_all_backends() -> int:
    """Probe every backend's /health and /v1/models and store the results; returns how many were probed."""
    return len(backend_probe_all())
