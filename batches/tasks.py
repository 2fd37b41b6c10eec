"""Celery tasks of the Batch API: run a batch; resume batches whose worker died (at worker start and periodically)."""

from __future__ import annotations

from celery import shared_task
from celery.signals import worker_ready

from batches.runner import batch_run_sync, batches_resume

RUN_TASK_NAME = "batches.run"
RESUME_TASK_NAME = "batches.resume"


@shared_task(name=RUN_TASK_NAME, ignore_result=True, acks_late=True)
def batch_run_task(batch_id: str) -> str | None:
    """Run a batch's remaining lines and finalize it."""
    return batch_run_sync(batch_id)


@shared_task(name=RESUME_TASK_NAME, ignore_result=True)
def batches_resume_task() -> int:
    """Re-enqueue batches in progress whose runner's lease ran out."""
    return len(batches_resume())


@worker_ready.connect
def _resume_on_start(**_: object) -> None:
    """A worker that starts (again) picks up batches a dead worker left."""
    try:
        batches_resume()
    except Exception:  # the database may not be migrated yet; the periodic task retries
        import logging

        logging.getLogger(__name__).warning("resuming batches at worker start failed", exc_info=True)
