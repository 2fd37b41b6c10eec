"""Celery tasks of governance; thin wrappers over services."""

from __future__ import annotations

from celery import shared_task
from django.conf import settings

from governance.usage import usage_rollup_recent


@shared_task(name="governance.usage_rollup", ignore_result=True)
def usage_rollup_task(lookback_hours: int | None = None) -> int:
    """Rebuild the hourly usage of the last hours (USAGE_ROLLUP_LOOKBACK_H by default); return the rows written."""
    return usage_rollup_recent(lookback_hours=lookback_hours or settings.USAGE_ROLLUP_LOOKBACK_H)
