"""The Celery application: broker and schedule come from Django settings (`CELERY_*`)."""

import os

from celery import Celery
from celery.signals import worker_init, worker_process_init

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llm_platform.settings")

app = Celery("llm_platform")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


def _trace_tasks(**_: object) -> None:
    """Trace the tasks of a worker process (a span per task run) when the OTEL_* variables turn tracing on.

    In each pool process (after the fork: the span exporter's thread must belong to the process that runs the
    tasks), and in the worker itself for the pools that run tasks there (solo, threads).
    """
    from core import telemetry

    if telemetry.configure(service_name="llm-platform-worker"):
        telemetry.instrument_celery()


worker_process_init.connect(_trace_tasks, weak=False)
worker_init.connect(_trace_tasks, weak=False)
