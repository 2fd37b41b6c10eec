"""Reads of the Batch API: a key's files and batches (someone else's is as if it did not exist), lines, keys."""

from __future__ import annotations

from datetime import datetime

from django.db.models import Q, QuerySet

from batches.models import Batch, BatchFile, BatchLine, LineState
from governance.auth import MASTER, Principal
from governance.selectors import key_snapshot_build
from governance.snapshot import KeySnap


def _owned(queryset: QuerySet, principal: Principal) -> QuerySet:
    if principal.key is None:  # the master key
        return queryset.filter(key__isnull=True)
    return queryset.filter(key_id=principal.key.id)


def file_list_for(*, principal: Principal, purpose: str | None = None, limit: int = 100) -> list[BatchFile]:
    """The principal's files, newest first."""
    files = _owned(BatchFile.objects.all(), principal)
    if purpose:
        files = files.filter(purpose=purpose)
    return list(files.order_by("-created_at")[:limit])


def file_get_for(*, principal: Principal, file_id: str) -> BatchFile | None:
    """The principal's file with this id, else None."""
    return _owned(BatchFile.objects.filter(pk=file_id), principal).first()


def batch_list_for(*, principal: Principal, after: str | None = None, limit: int = 20) -> list[Batch]:
    """The principal's batches, newest first, after the given id (cursor pagination as OpenAI)."""
    batches = _owned(Batch.objects.select_related("input_file"), principal).order_by("-created_at", "-pk")
    if after:
        anchor = _owned(Batch.objects.filter(pk=after), principal).first()
        if anchor is not None:
            batches = batches.filter(created_at__lt=anchor.created_at)
    return list(batches[:limit])


def batch_get_for(*, principal: Principal, batch_id: str) -> Batch | None:
    """The principal's batch with this id, else None."""
    return _owned(Batch.objects.filter(pk=batch_id), principal).first()


def batch_lines_finished(*, batch: Batch) -> QuerySet[BatchLine]:
    """The finished lines of a batch, in input order."""
    return BatchLine.objects.filter(batch=batch, state=LineState.DONE).order_by("index")


def batch_principal_get(*, batch: Batch) -> Principal | None:
    """Who a batch runs as: the master key, or its key as the router sees it (None: revoked or expired)."""
    if batch.key_id is None:
        return MASTER
    snap: KeySnap | None = next((k for k in key_snapshot_build().by_hash.values() if k.id == batch.key_id), None)
    if snap is None:
        return None
    return Principal(name=snap.name, is_master=False, key=snap)


def batches_needing_runner(*, now: datetime) -> list[str]:
    """Batches in progress (or being cancelled or finalized) whose runner's lease has run out: their worker died."""
    return list(
        Batch.objects.filter(status__in=["in_progress", "cancelling", "finalizing"])
        .filter(Q(runner_lease_until__isnull=True) | Q(runner_lease_until__lt=now))
        .values_list("pk", flat=True)[:1000]
    )
