"""Writes of the Batch API: files (validated JSONL), batches, line claims and results, finalization."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import storages
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from batches.models import FINAL_STATUSES, Batch, BatchFile, BatchLine, BatchStatus, FilePurpose, LineState
from core.errors import APIError
from governance.auth import Principal
from governance.events import UsageEvent
from governance.usage import usage_records_write

BATCH_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
COMPLETION_WINDOWS = {"24h": timedelta(hours=24)}
MAX_METADATA_PAIRS = 16


def batch_storage() -> Any:
    """The storage of batch files (STORAGES["batches"]: local files by default, S3 through django-storages)."""
    return storages["batches"]


@dataclass(frozen=True, slots=True)
class ParsedLine:
    index: int
    custom_id: str
    url: str
    body: dict[str, Any]


def _line_error(index: int, message: str) -> APIError:
    return APIError(400, f"Line {index}: {message}", param="file", code="invalid_jsonl")


def jsonl_parse(content: bytes, *, max_lines: int) -> list[ParsedLine]:
    """Parse and validate a batch input file line by line; a 400 APIError names the first bad line."""
    lines: list[ParsedLine] = []
    seen: set[str] = set()
    url_first: str | None = None
    for number, raw in enumerate(content.split(b"\n"), start=1):
        if not raw.strip():
            continue
        if len(lines) >= max_lines:
            raise APIError(400, f"The file has more than {max_lines} requests.", param="file", code="too_many_lines")
        try:
            item = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise _line_error(number, "not valid JSON.") from None
        if not isinstance(item, dict):
            raise _line_error(number, "must be a JSON object.")
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id or len(custom_id) > 512:
            raise _line_error(number, "`custom_id` must be a non-empty string (at most 512 characters).")
        if custom_id in seen:
            raise _line_error(number, f"`custom_id` {custom_id!r} is used by an earlier line; it must be unique.")
        seen.add(custom_id)
        if item.get("method") != "POST":
            raise _line_error(number, '`method` must be "POST".')
        url = item.get("url")
        if url not in BATCH_ENDPOINTS:
            raise _line_error(number, f"`url` must be one of {', '.join(BATCH_ENDPOINTS)}.")
        if url_first is not None and url != url_first:
            raise _line_error(number, f"`url` {url} differs from the first line's {url_first}; one endpoint a file.")
        url_first = url
        body = item.get("body")
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            raise _line_error(number, "`body` must be a JSON object with a `model`.")
        if body.get("stream") is True:
            raise _line_error(number, "`body.stream` is not supported in a batch.")
        lines.append(ParsedLine(number, custom_id, url, body))
    if not lines:
        raise APIError(400, "The file contains no requests.", param="file", code="empty_file")
    return lines


def file_create(*, principal: Principal, filename: str, purpose: str, content: bytes) -> BatchFile:
    """Store an uploaded file (a `batch` file is validated first) through the batches storage."""
    if purpose != FilePurpose.BATCH:
        raise APIError(400, 'Only purpose "batch" is supported.', param="purpose", code="invalid_purpose")
    if len(content) > settings.BATCH_MAX_FILE_BYTES:
        raise APIError(
            413, f"The file is larger than {settings.BATCH_MAX_FILE_BYTES} bytes.", param="file", code="file_too_large"
        )
    parsed = jsonl_parse(content, max_lines=settings.BATCH_MAX_LINES)
    return _file_save(principal=principal, filename=filename, purpose=purpose, content=content, lines=len(parsed))


def _file_save(*, principal: Principal, filename: str, purpose: str, content: bytes, lines: int) -> BatchFile:
    row = BatchFile(
        key_id=principal.key.id if principal.key is not None else None,
        owner=principal.name,
        purpose=purpose,
        filename=filename[:255] or "file.jsonl",
        bytes=len(content),
        lines=lines,
    )
    row.storage_name = batch_storage().save(f"batches/{row.id}.jsonl", ContentFile(content))
    row.save()
    return row


def file_read(*, file: BatchFile) -> bytes:
    """The content of a stored file."""
    with batch_storage().open(file.storage_name, "rb") as handle:
        return handle.read()


def file_delete(*, file: BatchFile) -> None:
    """Delete a file and its content (409 while a batch that is not finished reads it)."""
    if file.batches_in.exclude(status__in=FINAL_STATUSES).exists():
        raise APIError(409, "The file is the input of a batch that has not finished.", code="file_in_use")
    if file.batches_in.exists():
        raise APIError(409, "The file is the input of a batch; delete the batch's files first.", code="file_in_use")
    name = file.storage_name
    file.delete()
    transaction.on_commit(lambda: batch_storage().delete(name))


def batch_create(
    *,
    principal: Principal,
    input_file: BatchFile,
    endpoint: str,
    completion_window: str,
    metadata: dict[str, str] | None,
) -> Batch:
    """Create a batch (validating), expand its input into lines, then in_progress and hand it to a worker."""
    if endpoint not in BATCH_ENDPOINTS:
        raise APIError(400, f"`endpoint` must be one of {', '.join(BATCH_ENDPOINTS)}.", param="endpoint")
    if completion_window not in COMPLETION_WINDOWS:
        raise APIError(400, '`completion_window` must be "24h".', param="completion_window")
    if metadata is not None and (
        not isinstance(metadata, dict)
        or len(metadata) > MAX_METADATA_PAIRS
        or not all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512 for k, v in metadata.items()
        )
    ):
        raise APIError(400, "`metadata`: at most 16 string pairs (keys 64, values 512 characters).", param="metadata")
    if input_file.purpose != FilePurpose.BATCH:
        raise APIError(400, 'The input file must have purpose "batch".', param="input_file_id")
    parsed = jsonl_parse(file_read(file=input_file), max_lines=settings.BATCH_MAX_LINES)
    if parsed[0].url != endpoint:
        raise APIError(400, f"The file's requests are for {parsed[0].url}, not {endpoint}.", param="endpoint")
    now = timezone.now()
    with transaction.atomic():
        batch = Batch.objects.create(
            key_id=principal.key.id if principal.key is not None else None,
            owner=principal.name,
            endpoint=endpoint,
            input_file=input_file,
            completion_window=completion_window,
            metadata=metadata,
            total=len(parsed),
            expires_at=now + COMPLETION_WINDOWS[completion_window],
        )
        BatchLine.objects.bulk_create(
            [BatchLine(batch=batch, index=p.index, custom_id=p.custom_id, body=p.body) for p in parsed],
            batch_size=1000,
        )
        Batch.objects.filter(pk=batch.pk).update(status=BatchStatus.IN_PROGRESS, in_progress_at=now)
        # read back before the commit hands it to a worker: the answer is the batch as created, not whatever a
        # fast worker made of it meanwhile (a small batch could be completed before this line ran)
        batch.refresh_from_db()
        transaction.on_commit(lambda: batch_enqueue(batch_id=batch.pk))
    return batch


def batch_enqueue(*, batch_id: str) -> None:
    """Send the batch to a Celery worker (the BATCH_CELERY_QUEUE queue, else the default one)."""
    from batches.tasks import batch_run_task

    if settings.BATCH_CELERY_QUEUE:
        batch_run_task.apply_async((batch_id,), queue=settings.BATCH_CELERY_QUEUE)
    else:
        batch_run_task.apply_async((batch_id,))


def batch_cancel(*, batch: Batch) -> Batch:
    """Ask a running batch to stop: `cancelling` now; its worker stops starting lines and finalizes as `cancelled`."""
    now = timezone.now()
    updated = Batch.objects.filter(pk=batch.pk, status__in=[BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS]).update(
        status=BatchStatus.CANCELLING, cancelling_at=now
    )
    batch.refresh_from_db()
    if not updated and batch.status not in (BatchStatus.CANCELLING, BatchStatus.CANCELLED):
        raise APIError(409, f"Cannot cancel a batch that is {batch.status}.", code="batch_not_cancellable")
    return batch


# --- execution (called by the runner) ---------------------------------------------------------------------------


def batch_runner_lease(*, batch_id: str, seconds: float) -> None:
    """Mark the batch as run by a live worker for the next `seconds`."""
    Batch.objects.filter(pk=batch_id).update(runner_lease_until=timezone.now() + timedelta(seconds=seconds))


def lines_claim(*, batch_id: str, limit: int, lease_s: float) -> list[BatchLine]:
    """Take up to `limit` lines that are pending or whose runner's lease ran out (it died): `running`, leased.

    A line is never taken while another live worker holds its lease, and a `done` line never again.
    """
    now = timezone.now()
    with transaction.atomic():
        ids = list(
            BatchLine.objects.select_for_update(skip_locked=True)
            .filter(batch_id=batch_id)
            .filter(Q(state=LineState.PENDING) | Q(state=LineState.RUNNING, lease_until__lt=now))
            .order_by("index")
            .values_list("pk", flat=True)[:limit]
        )
        if not ids:
            return []
        BatchLine.objects.filter(pk__in=ids).update(
            state=LineState.RUNNING, lease_until=now + timedelta(seconds=lease_s), attempts=F("attempts") + 1
        )
        return list(BatchLine.objects.filter(pk__in=ids).order_by("index"))


def lines_lease_renew(*, line_ids: list[int], lease_s: float) -> None:
    """Extend the leases of lines this worker is still running."""
    if line_ids:
        BatchLine.objects.filter(pk__in=line_ids, state=LineState.RUNNING).update(
            lease_until=timezone.now() + timedelta(seconds=lease_s)
        )


def line_release(*, line: BatchLine) -> None:
    """Give a claimed line back unrun (the batch is being cancelled or expired)."""
    BatchLine.objects.filter(pk=line.pk, state=LineState.RUNNING, attempts=line.attempts).update(
        state=LineState.PENDING, lease_until=None
    )


def line_finish(
    *,
    line: BatchLine,
    request_id: str,
    status_code: int | None,
    response: dict[str, Any] | None,
    error: dict[str, Any] | None,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    usage: UsageEvent | None = None,
) -> bool:
    """Record a line's result (durably, before the worker moves on), count it and write its usage record, all in
    one transaction; False when another worker's claim superseded this one (its result and usage are then the ones
    kept, and nothing is written for this one). So a line is charged exactly once: a worker killed before this
    commit charged nothing (its line runs again), one killed after it charged the line and never runs it again."""
    ok = status_code == 200 and error is None
    with transaction.atomic():
        updated = BatchLine.objects.filter(pk=line.pk, state=LineState.RUNNING, attempts=line.attempts).update(
            state=LineState.DONE,
            request_id=request_id,
            status_code=status_code,
            response=response,
            error=error,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            finished_at=timezone.now(),
            lease_until=None,
        )
        if updated:
            Batch.objects.filter(pk=line.batch_id).update(
                completed=F("completed") + (1 if ok else 0),
                failed=F("failed") + (0 if ok else 1),
                prompt_tokens=F("prompt_tokens") + prompt_tokens,
                completion_tokens=F("completion_tokens") + completion_tokens,
            )
            if usage is not None:
                usage_records_write([(time.time(), usage)])
    return bool(updated)


def _result_line(line: BatchLine) -> bytes:
    response = None
    if line.status_code is not None:
        response = {"status_code": line.status_code, "request_id": line.request_id, "body": line.response}
    return orjson.dumps(
        {
            "id": f"batch_req_{line.request_id or secrets.token_hex(12)}",
            "custom_id": line.custom_id,
            "response": response,
            "error": line.error,
        }
    )


FINALIZE_LEASE_S = 120.0


def batch_finalize(*, batch_id: str, final: str) -> Batch | None:
    """Write the output and error files from the lines and end the batch as `final` (completed, cancelled,
    expired); lines that never ran go to the error file of an expired batch. Once: a final batch is kept, and a
    batch another live runner is finalizing is left to it."""
    now = timezone.now()
    with transaction.atomic():
        batch = Batch.objects.select_for_update().filter(pk=batch_id).first()
        if batch is None or batch.is_final:
            return batch
        if (
            batch.status == BatchStatus.FINALIZING
            and batch.runner_lease_until is not None
            and batch.runner_lease_until > now
        ):
            return batch
        batch.status = BatchStatus.FINALIZING
        batch.finalizing_at = batch.finalizing_at or now
        batch.runner_lease_until = now + timedelta(seconds=FINALIZE_LEASE_S)
        batch.save(update_fields=["status", "finalizing_at", "runner_lease_until"])
    output: list[bytes] = []
    failures: list[bytes] = []
    prompt_tokens = completion_tokens = 0
    for line in BatchLine.objects.filter(batch_id=batch_id).order_by("index").iterator(chunk_size=1000):
        if line.state == LineState.DONE:
            (output if line.status_code == 200 and line.error is None else failures).append(_result_line(line))
            prompt_tokens += line.prompt_tokens
            completion_tokens += line.completion_tokens
        elif final == BatchStatus.EXPIRED:
            line.error = {
                "code": "batch_expired",
                "message": "This request could not be executed before the completion window expired.",
            }
            failures.append(_result_line(line))
    fields: dict[str, Any] = {
        "status": final,
        "runner_lease_until": None,
        "completed": len(output),
        "failed": len(failures),
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        FINAL_TIMESTAMPS[final]: timezone.now(),
    }
    if output:
        fields["output_file"] = _output_save(batch=batch, kind="output", lines=output)
    if failures:
        fields["error_file"] = _output_save(batch=batch, kind="errors", lines=failures)
    Batch.objects.filter(pk=batch_id).update(**fields)
    return Batch.objects.get(pk=batch_id)


FINAL_TIMESTAMPS: dict[str, str] = {
    BatchStatus.COMPLETED: "completed_at",
    BatchStatus.CANCELLED: "cancelled_at",
    BatchStatus.EXPIRED: "expired_at",
    BatchStatus.FAILED: "failed_at",
}


def _output_save(*, batch: Batch, kind: str, lines: list[bytes]) -> BatchFile:
    """Store a result file of a batch, owned by the batch's key."""
    content = b"\n".join(lines) + b"\n"
    row = BatchFile(
        key_id=batch.key_id,
        owner=batch.owner,
        purpose=FilePurpose.BATCH_OUTPUT,
        filename=f"{batch.pk}_{kind}.jsonl",
        bytes=len(content),
        lines=len(lines),
    )
    row.storage_name = batch_storage().save(f"batches/{row.id}.jsonl", ContentFile(content))
    row.save()
    return row


def batch_fail(*, batch_id: str, code: str, message: str) -> None:
    """End a batch as `failed` with a batch-level error (its key was revoked, ...)."""
    Batch.objects.filter(pk=batch_id).exclude(status__in=FINAL_STATUSES).update(
        status=BatchStatus.FAILED,
        failed_at=timezone.now(),
        errors={"object": "list", "data": [{"code": code, "message": message, "param": None, "line": None}]},
        runner_lease_until=None,
    )


def batch_expired(*, batch: Batch, now: datetime | None = None) -> bool:
    """Whether the batch's completion window has passed."""
    return (now or timezone.now()) >= batch.expires_at
