"""Celery tasks of governance; thin wrappers over services."""

from __future__ import annotations

from datetime import timedelta

from celery import shared_task
from django.conf import settings
from django.utils import timezone

from governance.usage import usage_backend_buckets_prune, usage_rollup_recent


@shared_task(name="governance.usage_rollup", ignore_result=True)
def usage_rollup_task(lookback_hours: int | None = None) -> int:
    """Rebuild the hourly usage of the last hours (USAGE_ROLLUP_LOOKBACK_H by default) and drop the backend
    traffic buckets older than USAGE_BACKEND_RETENTION_D days; return the hourly rows written."""
    usage_backend_buckets_prune(before=timezone.now() - timedelta(days=settings.USAGE_BACKEND_RETENTION_D))
    return usage_rollup_recent(lookback_hours=lookback_hours or settings.USAGE_ROLLUP_LOOKBACK_H)
